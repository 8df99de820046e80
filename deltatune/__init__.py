"""deltatune: parameter-efficient fine-tuning (delta tuning) for any transformers model.

    import deltatune as dt
    delta = dt.attach(model, dt.LoRA(r=8, targets=["query", "value"]), train_modules=["classifier"])
    ... train ...
    delta.save("runs/lora"); delta.detach()
    dt.load(fresh_model, "runs/lora")
"""

# isort: off
from .core import quiet  # noqa: F401  (first: it quiets optional packages' import noise before transformers loads)
# isort: on
from .api import attach, detach, load, recipe
from .compose.algebra import combine
from .compose.extract import extract_lora
from .compose.hotswap import hotswap, prepare_hotswap
from .compose.named import activate, active, deactivate, deltas, load_all, save_all
from .compose.presets import MAM, UniPELT
from .compose.router import Router, attach_router, load_router
from .compose.routing import route
from .core.delta import Delta
from .core.errors import (
                          AttachError,
                          BaseModelMismatchError,
                          CheckpointError,
                          CheckpointNotFoundError,
                          ConfigError,
                          DeltaError,
                          StateError,
                          TargetError,
)
from .core.lm_loss import FusedLMLoss, linear_cross_entropy
from .core.onednn import disable as disable_onednn
from .core.onednn import enable as enable_onednn
from .core.recipe import Recipe
from .core.version import VERSION as __version__
from .inspect import inspect
from .interop.gguf import export_gguf
from .interop.merged import merge_and_save  # api.merge_and_save plus dtype= and quantized bases
from .interop.peft import export_peft, import_peft
from .interop.vllm import check_vllm, export_vllm
from .methods.adapter import Adapter
from .methods.bitfit import BitFit
from .methods.gates import Gates
from .methods.ia3 import IA3
from .methods.ipt import IntrinsicPromptTuning, fit_intrinsic_subspace
from .methods.loha import LoHa
from .methods.lokr import LoKr
from .methods.lora import LoRA, RankBudget, eva_init
from .methods.oft import OFT
from .methods.prefix import PrefixTuning
from .methods.prompt import PromptTuning
from .methods.sparse import SparseFT
from .methods.tokens import TrainableTokens
from .methods.train_modules import TrainModules
from .methods.vera import VeRA
from .methods.visual_prompt import VisualPromptTuning

__all__ = [
    "__version__",
    # verbs
    "attach", "detach", "load", "merge_and_save", "recipe", "inspect", "export_peft", "import_peft",
    "export_gguf", "export_vllm", "check_vllm",
    # named deltas, routing, algebra (compose/)
    "activate", "active", "deactivate", "deltas", "route", "save_all", "load_all", "combine", "extract_lora",
    "attach_router", "load_router", "Router", "hotswap", "prepare_hotswap",
    # combinations: gates and presets (compose/)
    "Gates", "UniPELT", "MAM",
    # methods
    "LoRA", "RankBudget", "Adapter", "BitFit", "IA3", "PrefixTuning", "PromptTuning", "IntrinsicPromptTuning",
    "fit_intrinsic_subspace", "TrainModules", "VeRA", "LoHa", "LoKr", "OFT", "SparseFT", "TrainableTokens",
    "VisualPromptTuning",
    "eva_init",
    # speed (core/onednn.py, core/lm_loss.py)
    "enable_onednn", "disable_onednn", "FusedLMLoss", "linear_cross_entropy",
    # types and errors
    "Delta", "Recipe", "DeltaError", "ConfigError", "TargetError", "AttachError", "StateError", "CheckpointError",
    "CheckpointNotFoundError", "BaseModelMismatchError",
]
