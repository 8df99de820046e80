"""Quantized base layers (bitsandbytes 4-bit / 8-bit, torchao weight-only), in one place.

A quantized layer stores its weight as packed integers (bitsandbytes ``Params4bit`` is uint8 of shape
(out * in / 2, 1)) or as a tensor subclass (torchao), so everything that reads ``layer.weight`` directly
(the dtype new delta parameters take, the shapes in a checkpoint's fingerprint, DoRA's column norms, a
merge) asks here instead. Nothing here imports bitsandbytes or torchao at module import time: a
layer is recognised by its weight's class, so a model without them never pays for the import.

One bitsandbytes quirk this module also handles (0.50.2, CPUs with AVX512-BF16, i.e. this machine): the
first forward of a ``Linear4bit`` in eval mode without gradients repacks its weight in place into a CPU
format (scales cast to bf16), and from then on that layer's training forward gives *no gradient to its
input* (the packed kernel has no backward), silently cutting every delta below it off from the loss.
``guard_gradients`` adds a forward hook that supplies the missing input gradient (g @ W, with W the
layer's dequantized weight, recomputed in backward and never stored).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from .errors import StateError

log = logging.getLogger(__name__)

_GUARD_KEY = "_deltatune_quant_guard"


def kind_of(weight: Any) -> str | None:
    """'bnb4', 'bnb8', 'torchao' or None (a plain tensor), from the tensor's class (no imports)."""
    if weight is None:
        return None
    cls = type(weight)
    data_cls = type(getattr(weight, "data", weight))
    if cls.__module__.startswith("bitsandbytes"):
        return {"Params4bit": "bnb4", "Int8Params": "bnb8"}.get(cls.__name__)
    if data_cls.__module__.startswith("torchao"):
        return "torchao"
    return None


def kind(layer: nn.Module) -> str | None:
    """How ``layer``'s weight is quantized: 'bnb4', 'bnb8', 'torchao', or None for a full-precision layer.

    Only a weight the module holds itself counts: a delta wrapper forwards ``weight`` to the layer it wraps,
    but it is not that layer (hooks and dtypes are decided per real layer)."""
    return kind_of(layer._parameters.get("weight"))


def is_quantized(layer: nn.Module) -> bool:
    return kind(layer) is not None


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The floating dtype the layer computes in, which is also the dtype a delta on it trains in (as QLoRA).

    bitsandbytes 4-bit: the layer's ``compute_dtype`` (``bnb_4bit_compute_dtype``); 8-bit and torchao layers
    compute in their input's dtype, which is the bias's (or the weight subclass's reported) dtype.
    A full-precision layer: its weight's dtype."""
    weight = layer.weight
    which = kind(layer)
    if which == "bnb4":
        return getattr(layer, "compute_dtype", None) or torch.float32
    if which == "bnb8":
        bias = getattr(layer, "bias", None)
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
    return weight.dtype  # torchao subclasses report the dtype they dequantize to


def float_dtype(module: nn.Module, fallback: torch.Tensor | None = None) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) for new delta tensors next to ``module`` (which may hold quantized layers): the first
    floating parameter's, or the compute dtype of its first quantized layer; else ``fallback``'s."""
    for layer in module.modules():
        if is_quantized(layer):
            return compute_dtype(layer), layer.weight.device
        for param in layer.parameters(recurse=False):
            if param.is_floating_point():
                return param.dtype, param.device
    if fallback is not None:
        return fallback.dtype, fallback.device
    raise ValueError(f"internal: {type(module).__name__} has no floating parameters")


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has at full precision: (out, in) for a packed 4-bit weight."""
    if kind_of(param) == "bnb4":
        return tuple(param.quant_state.shape)
    return tuple(param.shape)


def numel(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (two 4-bit weights share a stored byte)."""
    return math.prod(logical_shape(param))


def dequantized_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight at full precision, (out, in), in ``dtype`` (default: the compute dtype).

    A fresh tensor each call (never cached: keeping it would cost the memory quantization saved)."""
    which = kind(layer)
    dtype = dtype or compute_dtype(layer)
    if which == "bnb4":
        weight = _dequantize_4bit(layer.weight)
    elif which == "bnb8":
        weight = _dequantize_8bit(layer)
    elif which == "torchao":
        weight = layer.weight.dequantize()
    else:
        weight = layer.weight.detach()
    return weight.to(dtype)


def _dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return bnbf.dequantize_4bit(weight.data, state)
    # The CPU repacked layout (see the module docstring) holds the scales as bf16, transposed to
    # (in / blocksize, out). bitsandbytes' inverse restores the codes but, for a non-nested state, not the
    # scales' layout (0.50.2), so unpack a copy of the codes and lay the bf16 scales out ourselves: this is
    # exactly the weight the packed kernel multiplies by.
    packed_scales = state.absmax
    codes, unpacked = bnbf._convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    unpacked.absmax = packed_scales.T.reshape(-1).float()
    unpacked.nested = False
    unpacked.dtype = torch.float32
    return bnbf.dequantize_4bit(codes, unpacked)


def _dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    # Before the first forward the int8 rows and their scales live on the parameter (CB, SCB); afterwards
    # bitsandbytes moves them to the layer's MatmulLtState and ``weight.data`` is the int8 rows.
    state = getattr(layer, "state", None)
    scales = getattr(layer.weight, "SCB", None)
    if scales is None and state is not None:
        scales = state.SCB
    rows = layer.weight.data if state is None or state.CB is None else state.CB
    return bnbf.int8_vectorwise_dequant(rows, scales)


def describe(layer: nn.Module) -> str:
    """A short description for ``dt.inspect``: 'Linear4bit nf4 double-quant', 'Linear8bitLt int8', ..."""
    which = kind(layer)
    name = type(layer).__name__
    if which == "bnb4":
        state = layer.weight.quant_state
        nested = getattr(state, "nested", False) or getattr(state, "original_nested", False)
        return f"{name} {state.quant_type}{' double-quant' if nested else ''}"
    if which == "bnb8":
        return f"{name} int8"
    if which == "torchao":
        return f"{name} torchao {type(layer.weight.data).__name__}"
    return name


def model_quantization(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint records about its base's quantization: the transformers quantization config (a
    plain dict) plus the layer kinds found, or None for a full-precision base."""
    kinds = sorted({k for m in model.modules() if (k := kind(m)) is not None})
    if not kinds:
        return None
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    keep = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "quant_type")
    summary = {k: v for k, v in (config or {}).items() if k in keep}
    return {"layers": kinds, **{k: (str(v) if not isinstance(v, (bool, int, float)) else v)
                                for k, v in summary.items()}}


class _InputGradient(torch.autograd.Function):
    """Identity on ``out`` in forward; in backward gives ``x`` the gradient g @ W of y = x W^T (+ b).

    For a layer whose own forward has no backward (bitsandbytes' packed CPU format): its output value is
    kept exactly as computed, and the dequantized W is recomputed in backward, never saved."""

    @staticmethod
    def forward(ctx, x, out, layer):
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        weight = dequantized_weight(ctx.layer, grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None, None


def _packed_hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    x = args[0] if args else None
    packed = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    if not packed or x is None or not torch.is_grad_enabled() or not x.requires_grad:
        return None  # bitsandbytes' own backward applies (or no gradient is wanted)
    # the packed kernel's output claims a grad_fn, but its backward gives the input None: replace it
    return _InputGradient.apply(x, out.detach(), layer)


def guard_gradients(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer pass gradients to its input even after bitsandbytes repacked it
    for CPU inference (see the module docstring). Idempotent; ``release_gradients`` removes the hooks."""
    if model.__dict__.get(_GUARD_KEY):
        return
    handles = [m.register_forward_hook(_packed_hook) for m in model.modules() if kind(m) == "bnb4"]
    if handles:
        model.__dict__[_GUARD_KEY] = handles


def release_gradients(model: nn.Module) -> None:
    """Remove the hooks ``guard_gradients`` added (the last delta was detached)."""
    for handle in model.__dict__.pop(_GUARD_KEY, []):
        handle.remove()


def check_mergeable(name: str, layers: list[nn.Module]) -> None:
    """Refuse to merge a delta into quantized weights, naming the honest alternatives.

    Why refuse: W + dW rounded back to 4 bits loses most of a small dW (a LoRA update is typically far
    below one quantization step), and bitsandbytes' packed weights cannot be written in place anyway."""
    quantized = [layer for layer in layers if is_quantized(layer)]
    if not quantized:
        return
    raise StateError(
        f"cannot merge delta {name!r} into its base: {len(quantized)} of the layers it changes are quantized "
        f"({describe(quantized[0])}), and rounding W + dW back to the quantized grid would erase most of the "
        f"delta. Options: keep the delta unmerged (it runs as is); dt.merge_and_save(delta, dir, "
        f"dtype='bfloat16') to write a standalone full-precision model (the base dequantized, the delta "
        f"added exactly; also `deltatune merge --dtype bfloat16`); or dt.merge_and_save(delta, dir, "
        f"requantize=True) to merge and quantize again, reporting the error that costs.")


def note_quantization(saved: dict[str, Any] | None, model: nn.Module, where: Any) -> None:
    """Log (not refuse) when a delta is loaded onto a base quantized differently from the one it was trained
    on: the shapes fit, and outputs differ by the quantization error only."""
    now = model_quantization(model)
    if (saved or None) != now:
        log.info("loading %s, trained on a %s base, onto a %s base: it fits (same full-precision shapes); outputs "
                 "differ by the quantization error", where, _label(saved), _label(now))


def _label(info: dict[str, Any] | None) -> str:
    if not info:
        return "full-precision"
    return info.get("bnb_4bit_quant_type") if info.get("load_in_4bit") else "/".join(info.get("layers", []))
