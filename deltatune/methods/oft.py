"""OFT: y = W (R x) + b with R block-diagonal orthogonal, i.e. W' = W R^T (Qiu et al., 2023, arXiv:2306.07280;
the input-side form of Liu et al., 2024, "OFTv2", arXiv:2506.19847, which PEFT implements).

Each block of ``block_size`` input features is rotated by R_i = (I - Q_i)(I + Q_i)^{-1}, the Cayley transform of
a skew-symmetric Q_i = U - U^T built from its block_size (block_size - 1) / 2 trained upper-triangle entries U.
Q = 0 gives R = I exactly, so the model is unchanged at attach; R stays orthogonal whatever the entries, so
the angles between W's rows (the "hyperspherical energy") are preserved. The trained tensor has PEFT's layout
(``oft_R.weight``: one row of upper-triangle entries per block) and the inverse is PEFT's exact one
(``use_cayley_neumann=False``: a linear solve per block).

PEFT's default ``use_cayley_neumann=True`` replaces (I + Q)^{-1} by the truncated Neumann series
I - Q + Q^2 - ... (R ~ I + 2Q + 2Q^2 + ... + Q^(n-1), n = ``num_cayley_neumann_terms``): cheaper, but only
approximately orthogonal, and a different function of the same entries. Supporting it would need a
``neumann_terms`` field here, R built by that series in ``rotation()``, and merge's undo through a real
inverse (R^T is no longer R^-1); until then ``dt.import_peft`` refuses such adapters instead of changing
their outputs.

Merge is exact: W <- W R^T (Conv1D, which stores W^T: W^T <- R W^T), undone with R^T = R^-1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import TargetError
from ..core.inject import Attachment, DeltaWrapper, named_base_modules, wrap_module
from ..core.layers import linear_types
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features
from ..core.targets import Targets, find_targets


@dataclasses.dataclass
class OFT(DeltaConfig):
    method = "oft"
    mergeable = True
    # measured once: BENCHMARKS.md "Methods beyond the seeds": one candidate, LoHa's (3e-3, head 1e-2), within 0.5 / 1.9
    # points of LoRA on SST-2 / MR; no second candidate was run
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)

    block_size: int = 32         # rotated block width: in * (block_size - 1) / 2 trained numbers per layer
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)

    def validate(self) -> None:
        self._require(self.block_size > 1, "block_size", "an integer > 1")


def cayley(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rotations (blocks, k, k) from upper-triangle entries (blocks, k (k - 1) / 2): (I - Q)(I + Q)^{-1}.

    Solved in float32 at least (the LU behind ``linalg.solve`` has no bf16 / fp16 kernels, and a rotation
    rounded to bf16 is no longer orthogonal), returned in the entries' dtype."""
    work = torch.promote_types(upper.dtype, torch.float32)
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=upper.device)
    skew = upper.new_zeros(upper.shape[0], block_size, block_size, dtype=work)
    skew[:, rows, cols] = upper.to(work)
    skew = skew - skew.transpose(-2, -1)
    eye = torch.eye(block_size, dtype=work, device=upper.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(upper.dtype)  # X (I + Q) = I - Q


class OFTLinear(DeltaWrapper):
    """Rotates the input of a frozen Linear/Conv1D block by block before the layer."""

    mergeable = True
    routable = True  # under routing/gates: base(x + scaled(R x - x)), so scale 0 gives the base output
    # the rotation is applied to the layer's input, the same map as merge's W R^T, so a quantized layer runs as
    # it is and its weight is never rebuilt (tests/quant)
    wraps_quantized = True

    def __init__(self, base: nn.Module, block_size: int) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, _ = features(layer)
        self.conv1d = not isinstance(layer, nn.Linear)
        self.block_size, self.blocks = block_size, in_features // block_size
        n_entries = block_size * (block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(self.blocks, n_entries, **self.tensor_options()))

    def rotation(self) -> torch.Tensor:
        """The R_i as (blocks, k, k)."""
        return cayley(self.oft_R, self.block_size)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x with each k-wide block multiplied by its R_i (row vectors: x_i R_i, PEFT's convention)."""
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, self.rotation()).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_delta:
            return self.base(x)
        if self.sample_scale is None and self.gate_scale is None:
            return self.base(self.rotate(x))
        return self.base(x + self.scaled(self.rotate(x) - x))

    def _block_diagonal(self) -> torch.Tensor:
        return torch.block_diag(*self.rotation().detach())

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base_layer().weight
        rotation = self._block_diagonal().to(weight.dtype)
        weight.copy_(rotation @ weight if self.conv1d else weight @ rotation.T)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer().weight
        rotation = self._block_diagonal().to(weight.dtype)  # orthogonal: its inverse is its transpose
        weight.copy_(rotation.T @ weight if self.conv1d else weight @ rotation)
        self.merged = False

    def extra_summary(self) -> str:
        return f"{self.blocks} blocks of {self.block_size}"


def _check_divisible(model: nn.Module, paths: list[str], block_size: int) -> None:
    layers = dict(named_base_modules(model))
    bad = {p: features(layers[p])[0] for p in paths if features(layers[p])[0] % block_size}
    if bad:
        path, width = next(iter(bad.items()))
        divisors = [d for d in range(2, min(width, 256) + 1) if width % d == 0]
        raise TargetError(f"oft: block_size {block_size} does not divide the input width {width} of {path} "
                          f"({len(bad)} such module(s)); choose a block_size dividing every targeted input width, "
                          f"e.g. one of {divisors[-6:]}, or leave those modules out of targets")


@register(OFT)
def attach(model: nn.Module, cfg: OFT, att: Attachment) -> None:
    paths = find_targets(model, cfg.targets, linear_types(), cfg.layers, "oft")
    _check_divisible(model, paths, cfg.block_size)
    for path in paths:
        att.modules[path] = wrap_module(model, path, lambda m: OFTLinear(m, cfg.block_size))
