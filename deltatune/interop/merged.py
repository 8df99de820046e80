"""``dt.merge_and_save``: a standalone model for plain transformers, in any dtype, from a quantized base too.

``Delta.merge`` refuses on a quantized base (rounding W + dW to 4 bits erases most of a small dW). This is
the honest way out, used by ``dt.merge_and_save(delta, dir, dtype=...)``: build a full-precision copy of the
base from its dequantized weights (a model class instance created on the meta device, so nothing random is
initialised), attach the same delta to the copy, load its tensors, merge in float32 with each method's own
merge rule (LoRA, DoRA, IA3, ...), cast to ``dtype`` and write with ``save_pretrained``: a standalone model
with no ``quantization_config`` that plain transformers loads. The copy costs the full-precision model's
memory for the duration of the write (that is what the output holds).

``requantize=True`` then quantizes the merged weights again with the base's own quantization config, writes
that model instead, and records in ``requantize_report.json`` how much of the delta the rounding lost,
measured against the exact W + dW.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import attach
from ..api import merge_and_save as merge_in_place
from ..core import quant
from ..core.checkpoint import atomic_directory
from ..core.delta import Delta
from ..core.errors import ConfigError, StateError
from ..core.inject import base_state_dict, named_base_modules

log = logging.getLogger(__name__)

REPORT_FILE = "requantize_report.json"


def merge_and_save(delta: Delta, directory: str | os.PathLike, dtype: str | torch.dtype | None = None,
                   requantize: bool = False, **save_kwargs: Any) -> Path:
    """Write base + delta as a standalone model that plain ``from_pretrained`` loads (no deltatune needed).

    A full-precision base without ``dtype``: merged in place for the write and unmerged after
    (``Delta.save_merged``). With ``dtype`` ('bfloat16', 'float16', 'float32') or on a quantized base: a
    full-precision copy, merged exactly, written in ``dtype`` (default: the base's dtype before quantization).
    ``requantize=True`` (quantized base): quantize the merged model again with the base's config, write that,
    and record in ``requantize_report.json`` how much of the delta the rounding lost.
    """
    if dtype is None and not requantize and not quant.is_quantized_model(delta.model):
        return merge_in_place(delta, directory, **save_kwargs)
    return save_dequantized(delta, directory, dtype, requantize, **save_kwargs)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'float16' / 'float32' (or a torch.dtype) -> torch.dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ConfigError(f"merge dtype must be a floating dtype such as 'bfloat16', 'float16' or 'float32', "
                          f"got {dtype!r}")
    return found


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict at full precision (float32): quantized weights dequantized, the rest cast."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in base_state_dict(model).items()}
    for path, module in named_base_modules(model):
        if quant.is_quantized(module):
            state[f"{path}.weight"] = quant.dequantized_weight(module, torch.float32)
    return state


def full_precision_copy(model: nn.Module) -> nn.Module:
    """A float32 instance of ``model``'s class holding its dequantized weights, without quantization config."""
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(dequantized_state(model), strict=True, assign=True)
    _copy_buffers(model, plain)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in the state dict: take them from the source,
    or the meta-device copy would keep placeholders."""
    sources = dict(named_base_modules(source))
    for path, module in target.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                found = sources[path]._buffers.get(name)
                if found is None:
                    raise StateError(f"internal: no value for buffer {path}.{name} of the full-precision copy")
                module._buffers[name] = found.detach().clone().float() if found.is_floating_point() else found


def merged_copy(delta: Delta) -> tuple[nn.Module, Delta]:
    """The full-precision copy of ``delta``'s base with the same delta attached, loaded and merged."""
    plain = full_precision_copy(delta.model)
    twin = attach(plain, *delta.configs, name=delta.name, train_modules=None)
    # floating tensors in float32; integer ones (SparseFT's indices) as they are
    state = {k: v.float() if v.is_floating_point() else v for k, v in delta.state_dict().items()}
    twin.load_state_dict(state, "the delta being merged")
    twin.merge()
    return plain, twin


def save_dequantized(delta: Delta, directory: str | os.PathLike, dtype: str | torch.dtype | None = None,
                     requantize: bool = False, **save_kwargs: Any) -> Path:
    """Write base (dequantized) + delta (merged exactly) as a standalone model; see the module docstring."""
    delta._check_attached("save")
    target = parse_dtype(dtype) or _default_dtype(delta.model)
    plain, _ = merged_copy(delta)
    plain.to(target)
    state = base_state_dict(plain)
    if not requantize:
        with atomic_directory(Path(directory)) as tmp:
            plain.save_pretrained(tmp, state_dict=state, **save_kwargs)
        return Path(directory)
    return _save_requantized(delta.model, plain, state, Path(directory), save_kwargs)


def _default_dtype(model: nn.Module) -> torch.dtype:
    """The base's full-precision dtype: what it was before quantization, else its compute dtype."""
    before = getattr(model.config, "_pre_quantization_dtype", None)
    if isinstance(before, torch.dtype):
        return before
    return next((quant.compute_dtype(m) for m in model.modules() if quant.is_quantized(m)), torch.float32)


def _save_requantized(model: nn.Module, plain: nn.Module, state: dict[str, torch.Tensor], directory: Path,
                      save_kwargs: dict[str, Any]) -> Path:
    """Quantize the merged model again with the base's config, measure what that cost, write it."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        raise StateError("requantize=True needs a base loaded with a transformers quantization_config; this base "
                         "is not quantized: call dt.merge_and_save without requantize")
    with tempfile.TemporaryDirectory(dir=directory.parent if directory.parent.exists() else None) as scratch:
        plain.save_pretrained(scratch, state_dict=state)
        quantized = type(model).from_pretrained(scratch, quantization_config=config, device_map="cpu")
    report = requantize_report(model, plain, quantized)
    log.info("requantized merge: the rounding lost %.1f%% of the delta (relative to |dW|, worst layer %.1f%%)",
             100 * report["delta_lost_mean"], 100 * report["delta_lost_max"])
    with atomic_directory(directory) as tmp:
        quantized.save_pretrained(tmp, **save_kwargs)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return directory


@torch.no_grad()
def requantize_report(base: nn.Module, merged: nn.Module, requantized: nn.Module) -> dict[str, Any]:
    """Per quantized layer: |Q(W + dW) - (W + dW)| / |dW|, i.e. the share of the delta the rounding lost
    (W: the base's dequantized weight, W + dW: the exact merge, Q: requantize then dequantize)."""
    exact = dict(named_base_modules(merged))
    again = dict(named_base_modules(requantized))
    lost: dict[str, float] = {}
    for path, layer in named_base_modules(base):
        if not quant.is_quantized(layer):
            continue
        w = quant.dequantized_weight(layer, torch.float32)
        merged_w = exact[path].weight.float()
        change = (merged_w - w).norm().item()
        if change == 0:
            continue
        lost[path] = (quant.dequantized_weight(again[path], torch.float32) - merged_w).norm().item() / change
    values = list(lost.values()) or [0.0]
    return {"delta_lost_mean": sum(values) / len(values), "delta_lost_max": max(values), "layers": lost,
            "meaning": "|Q(W + dW) - (W + dW)|_F / |dW|_F per layer: 0 keeps the delta exactly, 1 loses as much "
                       "as the delta itself"}
