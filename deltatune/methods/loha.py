"""LoHa: delta W = (alpha / r) * (W1a W1b) * (W2a W2b), a Hadamard product of two rank-r matrices
(FedPara, Hyeon-Woo et al., 2022, arXiv:2108.06098; LyCORIS, Yeh et al., 2024, arXiv:2309.14859).

The element-wise product of two rank-r matrices can have rank up to r^2, so LoHa reaches a higher-rank update
than LoRA for the same 2 r (in + out) trained numbers. W1a, W1b and W2a start Kaiming-uniform and W2b at zero,
as PEFT does, so the model is unchanged at attach. Parameter names are PEFT's (``hada_w1_a`` ...). Works on
nn.Linear and transformers' Conv1D (GPT-2; the delta is built (out, in) and transposed to merge; PEFT itself
has no LoHa for Conv1D, so ``dt.export_peft`` refuses those). Mergeable: the delta is additive.
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
class LoHa(DeltaConfig):
    method = "loha"
    mergeable = True
    # measured: BENCHMARKS.md "Methods beyond the seeds" (held-out SST-2 training rows): LoRA's 1e-3 / 1e-3 answered
    # one class after 63 steps (the Hadamard product starts slower than LoRA's B A); 3e-3 with the head at 1e-2 learned
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)

    r: int = 8                   # rank of each factor: the update's rank is up to r^2, its size 2 r (in + out)
    alpha: float = 8.0           # the update is scaled by alpha / r (PEFT's default alpha is 8)
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)

    def validate(self) -> None:
        self._require(self.r > 0, "r", "a positive integer")
        self._require(self.alpha > 0, "alpha", "> 0")


class LoHaLinear(WeightDeltaWrapper):
    """A frozen Linear/Conv1D plus x (delta W)^T, delta W built from the four factors at each call."""

    def __init__(self, base: nn.Module, cfg: LoHa) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = features(layer)
        self.r, self.alpha, self.scale = cfg.r, cfg.alpha, cfg.alpha / cfg.r
        kind = self.tensor_options()  # compute dtype: a quantized base stores integers
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, cfg.r, **kind))
        self.hada_w1_b = nn.Parameter(torch.empty(cfg.r, in_features, **kind))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, cfg.r, **kind))
        self.hada_w2_b = nn.Parameter(torch.zeros(cfg.r, in_features, **kind))  # zero: no change at attach
        for weight in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def update(self) -> torch.Tensor:
        """delta W in (out, in) layout, whatever the base layer stores."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


@register(LoHa)
def attach(model: nn.Module, cfg: LoHa, att: Attachment) -> None:
    for path in find_targets(model, cfg.targets, linear_types(), cfg.layers, "loha"):
        att.modules[path] = wrap_module(model, path, lambda m: LoHaLinear(m, cfg))
