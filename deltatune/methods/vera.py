"""VeRA: y = W x + b + Lambda_b B Lambda_d A x  (Kopiczko et al., 2024, arXiv:2310.11454).

A (r, in) and B (out, r) are random and frozen, and shared by every targeted layer: one pair of the largest
shape needed, generated from ``projection_seed``, of which each layer uses the top-left slice
``A[:, :in]`` / ``B[:out, :]``. Only two vectors per layer train: d (r values, the diagonal of Lambda_d,
starting at ``d_initial``) and b (out values, starting at 0, so the model is unchanged at attach). That is
r + out numbers per layer, against r * (in + out) for LoRA: the paper's ~10x fewer trainable parameters.

The projections are drawn exactly as PEFT draws them (Kaiming-uniform with gain sqrt(2), A first, then B,
from ``torch.Generator("cpu").manual_seed(projection_seed)``), so a PEFT VeRA adapter and ours agree on them
without saving them. Our checkpoints hold only d and b: loading regenerates A and B from the seed (CPU
Mersenne Twister draws are the same on every platform); ``dt.export_peft`` also writes them, as PEFT's
``save_projection=True`` does. Mergeable: delta W = diag(b) B diag(d) A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig
from ..core.inject import Attachment, DeltaWrapper, named_base_modules, wrap_module
from ..core.layers import linear_types
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features
from ..core.targets import Targets, find_targets


@dataclasses.dataclass
class VeRA(DeltaConfig):
    method = "vera"
    mergeable = True
    # measured: BENCHMARKS.md "Methods beyond the seeds" (chosen on held-out SST-2 training rows of 1e-2, 3e-2, and
    # 3e-2 with the head at 1e-2). VeRA's few vectors want ~30x LoRA's rate, and the head LoRA's 1e-3 left too slow:
    # at 1e-3 the head still answered one class after 63 steps
    recipe = Recipe(learning_rate=3e-2, head_learning_rate=1e-2)

    r: int = 256                 # rank of the shared projections: costs 1 trained number per layer per unit
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)
    d_initial: float = 0.1       # start of every d entry (the paper's 0.1; b starts at 0 either way)
    dropout: float = 0.0         # dropout on the VeRA path's input only
    projection_seed: int = 0     # seed of the frozen A and B (PEFT's projection_prng_key)

    def validate(self) -> None:
        self._require(self.r > 0, "r", "a positive integer")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        self._require(self.projection_seed >= 0, "projection_seed", "a non-negative integer")


def projections(r: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen A (r, in) and B (out, r), float32, drawn as PEFT draws them (see the module doc)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return _kaiming_uniform((r, in_features), generator), _kaiming_uniform((out_features, r), generator)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (a Linear's weight)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRALinear(DeltaWrapper):
    """A frozen Linear/Conv1D plus b * (B (d * (A x))), with A, B slices of the shared projections."""

    mergeable = True
    routable = True  # the VeRA path goes through ``scaled``
    wraps_quantized = True  # the VeRA path is added to the base layer's output, never to its weight (tests/quant)

    def __init__(self, base: nn.Module, shared_a: torch.Tensor, shared_b: torch.Tensor, cfg: VeRA) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = features(layer)
        self.conv1d = not isinstance(layer, nn.Linear)  # Conv1D stores its weight (in, out): merge transposes
        # frozen, not saved (regenerated from the seed): non-persistent buffers, not parameters
        kind = self.tensor_options()  # compute dtype: a quantized base stores integers
        self.register_buffer("vera_A", shared_a[:, :in_features].to(**kind), persistent=False)
        self.register_buffer("vera_B", shared_b[:out_features, :].to(**kind), persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kind))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **kind))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.uses_delta:
            return out
        hidden = F.linear(self.drop(x), self.vera_A) * self.vera_lambda_d
        return out + self.scaled(F.linear(hidden, self.vera_B) * self.vera_lambda_b)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)
        return delta.T if self.conv1d else delta


@register(VeRA)
def attach(model: nn.Module, cfg: VeRA, att: Attachment) -> None:
    paths = find_targets(model, cfg.targets, linear_types(), cfg.layers, "vera")
    layers = dict(named_base_modules(model))
    shapes = [features(layers[p]) for p in paths]
    shared_a, shared_b = projections(cfg.r, max(i for i, _ in shapes), max(o for _, o in shapes), cfg.projection_seed)
    for path in paths:
        att.modules[path] = wrap_module(model, path, lambda m: VeRALinear(m, shared_a, shared_b, cfg))
