"""deltatune: parameter-efficient fine-tuning (delta tuning) for any transformers model.

    import deltatune as dt
    delta = dt.attach(model, dt.LoRA(r=8, targets=["query", "value"]), train_modules=["classifier"])
    ... train ...
    delta.save("runs/lora"); delta.detach()
    dt.load(fresh_model, "runs/lora")
"""

__version__ = "0.1.0"

from .api import attach, detach, load, merge_and_save
from .core.delta import Delta
from .core.errors import (AttachError, BaseModelMismatchError, CheckpointError, CheckpointNotFoundError,
                          ConfigError, DeltaError, StateError, TargetError)
from .inspect import inspect
from .interop.peft import export_peft, import_peft
from .methods import LoRA

__all__ = [
    "__version__",
    # verbs
    "attach", "detach", "load", "merge_and_save", "inspect", "export_peft", "import_peft",
    # methods
    "LoRA",
    # types and errors
    "Delta", "DeltaError", "ConfigError", "TargetError", "AttachError", "StateError", "CheckpointError",
    "CheckpointNotFoundError", "BaseModelMismatchError",
]
