"""LoKr: delta W = (alpha / r) * (W1 kron W2), a Kronecker product of a small and a (low-rank) larger matrix
(LyCORIS, Yeh et al., 2024, arXiv:2309.14859).

With in = c d and out = a b (each split into two near-square factors, ``factorization``), W1 is (a, c) and
W2 is (b, d); W2 is itself a rank-r product W2a W2b when r < max(b, d) / 2, and W1 too with
``decompose_both``. The Kronecker product reaches full-rank updates with very few numbers. Shapes, the
factorization and the initialisation follow PEFT's LoKr exactly (W1 starts at zero, so the model is unchanged
at attach; the rest Kaiming-uniform); parameter names are PEFT's (``lokr_w1``, ``lokr_w2_a`` ...). Works on
nn.Linear and transformers' Conv1D (the delta is built (out, in) and transposed to merge; PEFT has no LoKr for
Conv1D, so ``dt.export_peft`` refuses those). Mergeable: the delta is additive.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.inject import Attachment, wrap_module
from ..core.layers import linear_types
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features
from ..core.targets import Targets, find_targets
from ..core.weight_delta import WeightDeltaWrapper


@dataclasses.dataclass
class LoKr(DeltaConfig):
    method = "lokr"
    mergeable = True
    # measured once: BENCHMARKS.md "Methods beyond the seeds": one candidate, LoHa's (LoRA's 1e-3 / 1e-3 left LoHa's
    # slower-starting product at one class after 63 steps); it beat head-only on SST-2 and MR
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)

    r: int = 8                   # rank of W2 (and of W1 with decompose_both) when they are factored
    alpha: float = 8.0           # the update is scaled by alpha / r (PEFT's default alpha is 8)
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)
    decompose_both: bool = False     # factor W1 into rank-r matrices too (fewer numbers for large layers)
    decompose_factor: int | None = None  # size of the first factor of in/out (None: the divisor pair nearest
    #                                      sqrt; PEFT writes None as -1)

    def validate(self) -> None:
        self._require(self.r > 0, "r", "a positive integer")
        self._require(self.alpha > 0, "alpha", "> 0")
        self._require(self.decompose_factor is None or self.decompose_factor > 0, "decompose_factor",
                      "None or a positive integer")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m * n = dimension (LyCORIS' rule, as PEFT applies it).

    With a ``factor`` that divides it: (factor, dimension // factor), unsorted. Otherwise walk the divisors
    upwards and stop at the first one at least sqrt(dimension), or at the last one not above ``factor``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if dimension % d:
            continue
        if d > limit:
            break
        m = d
        if d >= dimension // d:
            break
    n = dimension // m
    return (m, n) if m <= n else (n, m)


class LoKrLinear(WeightDeltaWrapper):
    """A frozen Linear/Conv1D plus x (delta W)^T, delta W = scale * kron(W1, W2) built at each call."""

    def __init__(self, base: nn.Module, cfg: LoKr) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = features(layer)
        self.r, self.alpha, self.scale = cfg.r, cfg.alpha, cfg.alpha / cfg.r
        factor = -1 if cfg.decompose_factor is None else cfg.decompose_factor
        (in_m, in_n), (out_l, out_k) = factorization(in_features, factor), factorization(out_features, factor)
        kind = self.tensor_options()  # compute dtype: a quantized base stores integers
        if cfg.decompose_both and cfg.r < max(out_l, in_m) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(out_l, cfg.r, **kind))  # zero: no change at attach
            self.lokr_w1_b = _kaiming(torch.empty(cfg.r, in_m, **kind))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(out_l, in_m, **kind))  # zero: no change at attach
        if cfg.r < max(out_k, in_n) / 2:
            self.lokr_w2_a = _kaiming(torch.empty(out_k, cfg.r, **kind))
            self.lokr_w2_b = _kaiming(torch.empty(cfg.r, in_n, **kind))
        else:
            self.lokr_w2 = _kaiming(torch.empty(out_k, in_n, **kind))

    def _factor(self, name: str) -> torch.Tensor:
        params = self._parameters
        return params[name] if name in params else params[f"{name}_a"] @ params[f"{name}_b"]

    def update(self) -> torch.Tensor:
        """delta W in (out, in) layout, whatever the base layer stores."""
        return torch.kron(self._factor("lokr_w1"), self._factor("lokr_w2")) * self.scale



def _kaiming(tensor: torch.Tensor) -> nn.Parameter:
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return nn.Parameter(tensor)


@register(LoKr)
def attach(model: nn.Module, cfg: LoKr, att: Attachment) -> None:
    for path in find_targets(model, cfg.targets, linear_types(), cfg.layers, "lokr"):
        att.modules[path] = wrap_module(model, path, lambda m: LoKrLinear(m, cfg))
