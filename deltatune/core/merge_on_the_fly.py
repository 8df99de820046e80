"""Inference with a delta folded into the weight for one call, without touching the layer.

A mergeable delta on a Linear/Conv1D can run two ways at inference: as written (base output plus the delta's
own activation-sized work: read the input again, rewrite the output) or as one product with the changed
weight W' built for the call (weight-sized work). Over N tokens the first touches about N (in + out) extra
values, the second in x out, so folding wins once N (in + out) > in x out (past ~190 tokens for a 384 x 384
layer); decoding a few tokens at a time keeps the written path. ``merges_pay`` adds "no autograd": with it,
a weight-sized gradient would be computed for W'. LoRA's training Function uses the bare cost rule
(``folding_pays``) for its output and input gradient, whose products need no gradient of their own.
Used by LoRA and IA3 (``merges_pay``, ``folding_pays``, ``linear_forward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .structure import features


def merges_pay(x: torch.Tensor, layer: nn.Module) -> bool:
    """Whether folding the delta into ``layer``'s weight for this call is cheaper (and allowed: no autograd)."""
    return not torch.is_grad_enabled() and folding_pays(x, layer)


def folding_pays(x: torch.Tensor, layer: nn.Module) -> bool:
    """The cost rule alone: N (in + out) > in x out for the N tokens of ``x``; and full-precision weights
    only: in bf16 / fp16, W + delta rounds to W wherever the delta is under half a step of W (bf16 keeps
    8 bits), so a young delta would vanish; the written path adds it to the output instead."""
    if layer.weight.dtype not in (torch.float32, torch.float64):
        return False
    fan_in, fan_out = features(layer)
    return (x.numel() // fan_in) * (fan_in + fan_out) > fan_in * fan_out


def linear_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """What ``layer`` (nn.Linear, or transformers' Conv1D with its (in, out) weight) computes, with ``weight``
    and ``bias`` in place of its own: same layout, same kernel, so an unchanged weight gives bitwise the
    layer's own output (on oneDNN where the layer opted in: ``core.onednn``)."""
    if isinstance(layer, nn.Linear):
        return onednn.FrozenLinear.apply(x, weight, bias) if onednn.routes(layer, x) else F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])  # as Conv1D.forward
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[1])
