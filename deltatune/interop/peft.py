"""PEFT LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys look like ``base_model.model.<path>.lora_A.weight`` (Linear/Conv1D), ``...lora_embedding_A``
(Embedding), ``...lora_magnitude_vector`` (DoRA) and ``base_model.model.<path>.<param>`` for
``modules_to_save``. peft is not needed at run time: this file is the whole mapping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..api import attach
from ..core.checkpoint import atomic_directory, read_tensors
from ..core.delta import Delta
from ..core.errors import CheckpointError, CheckpointNotFoundError, StateError
from ..methods.lora import LoRA, LoRAConv1D, LoRAEmbedding

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"  # legacy pickle format: read only with allow_pickle=True
# our parameter name -> PEFT's, per wrapper kind
_LINEAR_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_NAMES = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"}


def _peft_param(module: nn.Module, name: str) -> str:
    table = _EMBEDDING_NAMES if isinstance(module, LoRAEmbedding) else _LINEAR_NAMES
    if name not in table:
        raise StateError(f"PEFT's LoRA format has no place for parameter {name!r} of {type(module).__name__}")
    return table[name]


def _lora_slot(delta: Delta):
    slots = [a for a in delta.attachments if a.config.method == "lora"]
    others = sorted({a.config.method for a in delta.attachments
                     if a.config.method != "lora" and not a.config.trains_whole_modules})
    if len(slots) != 1 or others:
        raise StateError(f"export_peft writes exactly one LoRA; delta {delta.name!r} has "
                         f"{[a.config.method for a in delta.attachments]}. Save it with delta.save() instead.")
    return slots[0]


def peft_config(delta: Delta) -> dict[str, Any]:
    att = _lora_slot(delta)
    cfg = att.config
    wrappers = att.wrappers()
    ranks = {p: w.r for p, w in wrappers.items()}
    alphas = {p: w.alpha for p, w in wrappers.items()}
    model = delta.model
    conv1d = any(isinstance(w, LoRAConv1D) for w in wrappers.values())  # GPT-2 layout: PEFT wants the flag
    return {
        "peft_type": "LORA", "task_type": None, "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(wrappers), "use_rslora": cfg.rslora, "use_dora": bool(getattr(cfg, "dora", False)),
        # a module named exactly in the config's pattern is listed even at the default value (a per-module
        # allocation such as an adaptive rank budget's stays complete and readable)
        "rank_pattern": {p: r for p, r in ranks.items() if r != cfg.r or p in cfg.rank_pattern},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != cfg.alpha or p in cfg.alpha_pattern},
        "modules_to_save": list(delta.train_modules) or None, "bias": "none", "fan_in_fan_out": conv1d,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    }


def export_peft(delta: Delta, directory: str | os.PathLike) -> Path:
    """Write ``delta`` (one LoRA, optionally with train_modules) as a PEFT adapter directory."""
    att = _lora_slot(delta)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in att.modules.items():
        for name, value in module.saved_state().items():
            tensors[f"{PREFIX}{path}.{_peft_param(module, name)}"] = value
    state = delta.state_dict()
    tensors.update({peft_key: state[key] for peft_key, key in _whole_module_keys(delta).items()})
    config = peft_config(delta)
    with atomic_directory(Path(directory)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def _lora_from_peft(cfg: dict[str, Any], where: Path):
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where / CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be "
                              f"imported")
    unsupported = [k for k in ("layer_replication", "target_parameters", "trainable_token_indices") if cfg.get(k)]
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CheckpointError(f"{where / CONFIG}: PEFT options {unsupported} are not supported by import_peft")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = "re:" + targets  # PEFT treats a string as a full-match regex
    options = {"dora": True} if cfg.get("use_dora") else {}
    return LoRA(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets,
                layers=cfg.get("layers_to_transform"), rslora=bool(cfg.get("use_rslora", False)),
                rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                **options)


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                allow_pickle: bool = False) -> Delta:
    """Attach the LoRA adapter PEFT saved in ``directory`` to ``model``; outputs match PEFT's.

    Weights are read from ``adapter_model.safetensors``. An old-style ``adapter_model.bin`` is a pickle,
    and unpickling a file can run any code it names, so it is read only with ``allow_pickle=True``, and
    then through ``torch.load(weights_only=True)``, which accepts plain tensors and refuses anything else.

    Raises:
        CheckpointNotFoundError: no adapter_config.json. CheckpointError: unusable config or weights,
        or a pickle file without ``allow_pickle=True``.
    """
    where = Path(directory)
    if not (where / CONFIG).exists():
        raise CheckpointNotFoundError(f"no PEFT adapter at {where}: {CONFIG} not found")
    try:
        cfg = json.loads((where / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where / CONFIG} is not valid JSON ({e})") from e
    lora = _checked_lora(cfg, where)
    tensors = _read_weights(where, allow_pickle)
    delta = attach(model, lora, name=name, train_modules=cfg.get("modules_to_save") or None)
    try:
        delta.load_state_dict(_to_deltatune_keys(delta, tensors), where)
    except BaseException:
        delta.detach()
        raise
    return delta


def _checked_lora(cfg: Any, where: Path):
    """``_lora_from_peft`` with every malformed-config failure turned into a CheckpointError."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where / CONFIG} must hold a JSON object, got {type(cfg).__name__}")
    try:
        return _lora_from_peft(cfg, where)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # ValueError includes ConfigError (lora.r must be ...)
        raise CheckpointError(f"{where / CONFIG} has unusable LoRA settings: {e}. Re-export the adapter "
                              f"with PEFT, or fix the file.") from e


def _read_weights(where: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (where / WEIGHTS).exists() or not (where / PICKLE_WEIGHTS).exists():
        return read_tensors(where, {"tensors": {"file": WEIGHTS}})
    if not allow_pickle:
        raise CheckpointError(f"{where} holds its weights as {PICKLE_WEIGHTS}, a pickle file; loading a pickle can "
                              f"run arbitrary code. If you trust its source, pass allow_pickle=True (it is then "
                              f"read with torch.load(weights_only=True)); better, re-save the adapter with PEFT's "
                              f"safe_serialization=True to get {WEIGHTS}.")
    path = where / PICKLE_WEIGHTS
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError/EOFError (truncated
        # or not a torch file): all mean "not a plain tensor file", which is all this message needs to say
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True): {first}. It holds something "
                              f"other than plain tensors (possibly malicious) or is corrupt; do not use it.") from e
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors; it is not a PEFT adapter")
    return state


def _whole_module_keys(delta: Delta) -> dict[str, str]:
    """PEFT key -> deltatune key of every tensor of the whole modules the delta trains (PEFT's modules_to_save)."""
    return {PREFIX + key.split(":", 1)[1]: key for key in delta.parameters(whole_modules=True)}


def _to_deltatune_keys(delta: Delta, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map PEFT keys onto this delta's keys; keys with no counterpart stay as they are so that
    the key check reports them."""
    att = delta.attachments[0]
    mapping = {f"{PREFIX}{path}.{_peft_param(m, n)}": f"{att.slot}:{path}.{n}"
               for path, m in att.modules.items() for n in m.saved_state()}
    mapping.update(_whole_module_keys(delta))
    # PEFT also writes the base embedding weight for embedding targets ("...base_layer.weight"): not a delta
    return {mapping.get(k, k): v for k, v in tensors.items() if not k.endswith("base_layer.weight")}
