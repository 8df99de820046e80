"""Frozen linear layers' forward products on oneDNN (CPU, float32): an opt-in speed-up.

Why: a frozen model's training step is mostly its own matrix products; no delta makes those cheaper
(BENCHMARKS.md, "the compile target on this CPU"). On CPU, aten multiplies float32 matrices through MKL;
oneDNN's matmul ran the benchmark models' shapes 4-38% faster on the 2-core benchmark machine
(``bench/gemm_rate.py``). ``enable(model)`` sends the forward product of every frozen ``nn.Linear`` there,
LoRA's and DoRA's fused products on those layers too. The input gradient (g W) stays on the default path:
oneDNN would need W^T row-major, and a transposed copy per call cost more than it saved.

What it costs: outputs equal the default path within float32 rounding (another summation order), not
bitwise. Layers whose weight trains, inputs in another dtype or device, autocast, and inputs of fewer than
``MIN_TOKENS`` rows keep the default path; the state dict, the module tree, hooks, merges and
``torch.compile`` work as before (the call is a custom op that inductor leaves as is).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeltaError

MIN_TOKENS = 16  # fewer rows (decoding a few tokens at a time) keep the default path: only many rows were measured


def available() -> bool:
    """Whether this torch build has oneDNN and the linear op this module calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("deltatune::onednn_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T + bias, by oneDNN. A custom op so that torch.compile keeps it a call:
    inductor's own lowering of the oneDNN op wants the weight frozen into the graph as a constant."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def matmul_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias for a 2-D ``x`` and a (out, in) ``weight`` (made contiguous: oneDNN reads it so)."""
    weight = weight.contiguous()
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # eager: skip the op's dispatch


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W frozen, the product on oneDNN; dL/dx = g W as usual; dL/db when b trains (BitFit)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        flat = x.reshape(-1, x.shape[-1])
        return matmul_t(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        # g W on the default path: oneDNN wants W^T row-major here, and a transposed copy per call cost more than
        # oneDNN saved (32000 x 768 lm_head: 136 ms copy, 777 ms MKL, 872 ms oneDNN; BENCHMARKS.md)
        grad_x = (g @ weight).view(*grad.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def routes(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call of an enabled ``layer`` goes to oneDNN (frozen weight, float32 on CPU, no autocast)."""
    weight = layer.weight
    return (getattr(layer, "onednn", False) and not weight.requires_grad and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.numel() >= MIN_TOKENS * weight.shape[1])


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if routes(self, x):
        return FrozenLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def enable(model: nn.Module) -> int:
    """Run the forward products of ``model``'s frozen ``nn.Linear`` layers (float32, CPU) on oneDNN; returns how
    many layers. Call after freezing (e.g. after ``dt.attach``): a layer that trains later falls back by itself.
    Reversible with ``disable``; nothing is saved with the model."""
    if not available():
        raise DeltaError("oneDNN products: this torch build has no oneDNN (torch.backends.mkldnn.is_available() "
                         "is False); leave them off (train.onednn: false)")
    count = 0
    for layer in model.modules():
        if (type(layer) is nn.Linear and not layer.weight.requires_grad and layer.weight.device.type == "cpu"
                and layer.weight.dtype == torch.float32):
            layer.onednn = True
            layer.forward = types.MethodType(_forward, layer)  # a bound method: deepcopy rebinds it to the copy
            count += 1
    return count


def disable(model: nn.Module) -> int:
    """Undo ``enable``: the default path again. Returns how many layers changed back."""
    count = 0
    for layer in model.modules():
        if "onednn" in vars(layer):  # not getattr: delta wrappers answer with their base layer's attributes
            del layer.onednn, layer.forward
            count += 1
    return count
