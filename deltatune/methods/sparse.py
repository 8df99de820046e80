"""Sparse fine-tuning: train a fixed sparse set of entries of the chosen weights, W' = W + S with S zero
outside a mask chosen at attach (specification-based delta tuning beyond biases; fixed sparse masks as in
Sung et al., 2021, arXiv:2111.09839, with the magnitude / random criteria of the diff-pruning baselines of
Guo et al., 2021, arXiv:2012.07463).

Per output row of each targeted weight, ``k = max(1, round(density * in_features))`` entries are chosen:
``select="magnitude"`` takes the k largest |W| of the row (the weights that already matter), ``"random"``
k uniformly random ones (from ``seed``; a baseline that needs no look at W). The values start at zero, so the
model is unchanged at attach. The checkpoint is sparse: the (out, k) values and their (out, k) column indices
(int32), never a dense out x in matrix; loading uses the saved indices, so it does not depend on recomputing
the mask. Merge is exact: the values are added to W at their positions (and subtracted by unmerge).
In training the delta is scattered into a dense out x in matrix per call (one weight-sized temporary).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..core import quant
from ..core.config import DeltaConfig
from ..core.errors import CheckpointError
from ..core.inject import Attachment, wrap_module
from ..core.layers import linear_types
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features
from ..core.targets import Targets, find_targets
from ..core.weight_delta import WeightDeltaWrapper


@dataclasses.dataclass
class SparseFT(DeltaConfig):
    method = "sparse"
    mergeable = True
    recipe = Recipe(learning_rate=1e-3, head_learning_rate=1e-3)  # NOT measured yet: LoRA's measured rates

    density: float = 0.01        # share of each weight row that trains: size and capacity grow linearly with it
    select: Literal["magnitude", "random"] = "magnitude"  # which entries: the largest |W| per row, or random
    seed: int = 0                # for select="random"
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)

    def validate(self) -> None:
        self._require(0.0 < self.density <= 1.0, "density", "in (0, 1]")
        self._require(self.seed >= 0, "seed", "a non-negative integer")


def choose_entries(weight: torch.Tensor, k: int, select: str, generator: torch.Generator) -> torch.Tensor:
    """Column indices (out, k), ascending per row, of the entries of ``weight`` (out, in) that train."""
    if select == "magnitude":
        scores = weight.detach().abs().float()
    else:
        scores = torch.rand(weight.shape, generator=generator)
    return torch.topk(scores.cpu(), k, dim=1).indices.sort(dim=1).values.to(torch.int32)


class SparseLinear(WeightDeltaWrapper):
    """A frozen Linear/Conv1D plus x S^T, S the (out, in) matrix holding ``values`` at ``indices``, zero elsewhere."""

    def __init__(self, base: nn.Module, cfg: SparseFT, generator: torch.Generator) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = features(layer)
        self.in_features = in_features
        k = max(1, round(cfg.density * in_features))
        indices = choose_entries(self._weight(), k, cfg.select, generator).to(layer.weight.device)
        self.register_buffer("indices", indices, persistent=False)  # saved by saved_state, not as a model buffer
        self.values = nn.Parameter(torch.zeros(out_features, k, **self.tensor_options()))

    def _weight(self) -> torch.Tensor:
        """The base weight (out, in) that ``select="magnitude"`` ranks: dequantized for a quantized layer."""
        layer = self.base_layer()
        if self.quantized_base:
            return quant.dequantized_weight(layer)
        return layer.weight.T if self.conv1d else layer.weight

    def update(self) -> torch.Tensor:
        """S, dense, in (out, in) layout."""
        dense = self.values.new_zeros(self.values.shape[0], self.in_features)
        return dense.scatter(1, self.indices.long(), self.values)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.detach(), "indices": self.indices}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        indices = state["indices"]
        if indices.dtype.is_floating_point or indices.min() < 0 or indices.max() >= self.in_features:
            raise CheckpointError(f"sparse: saved indices must be integers in [0, {self.in_features}), got "
                                  f"{indices.dtype} in [{indices.min().item()}, {indices.max().item()}]; the "
                                  f"checkpoint is corrupt or from another model")
        with torch.no_grad():
            self.indices = indices.to(device=self.indices.device, dtype=torch.int32)
            self.values.copy_(state["values"])

    def extra_summary(self) -> str:
        return f"{self.values.shape[1]} of {self.in_features} entries per row"


@register(SparseFT)
def attach(model: nn.Module, cfg: SparseFT, att: Attachment) -> None:
    generator = torch.Generator().manual_seed(cfg.seed)  # one stream over the modules, in model order
    for path in find_targets(model, cfg.targets, linear_types(), cfg.layers, "sparse"):
        att.modules[path] = wrap_module(model, path, lambda m: SparseLinear(m, cfg, generator))
