"""The LoRA config (``dt.LoRA``): rank, scaling, targets, DoRA, init and the adaptive rank budget.

``rslora`` scales by alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023, arXiv:2312.03732), which keeps
the update's magnitude stable as r grows.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ...core.config import DeltaConfig
from ...core.recipe import Recipe
from ...core.targets import Targets
from .budget import RankBudget
from .inits import DATA_INITS, RESIDUAL_INITS, WEIGHT_INITS

INITS = ("kaiming", "gaussian", *WEIGHT_INITS, *DATA_INITS, "loftq")
CORDA_MODES = ("ipm", "kpm")


@dataclasses.dataclass
class LoRA(DeltaConfig):
    method = "lora"
    mergeable = True
    recipe = Recipe(learning_rate=1e-3, head_learning_rate=1e-3)  # measured: BENCHMARKS.md "Defaults"

    r: int = 8                   # rank: capacity, size and compute grow linearly with it
    alpha: float = 16.0          # the update is scaled by alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = 0.0         # dropout on the LoRA path's input only; regularises small datasets
    targets: Targets = "all-linear"  # module suffixes, full names, "re:<regex>", or "all-linear"
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)
    rslora: bool = False         # scale by alpha / sqrt(r): stable when sweeping large ranks
    dora: bool = False           # DoRA: learn a per-output magnitude too (Liu et al., 2024); still mergeable
    # how A and B start: "kaiming" (A uniform, as nn.Linear; B = 0) or "gaussian" (A with std 1/r); "pissa" or
    # "olora": from W's principal singular vectors / QR, W keeping the residual (inits.py: what happens to W);
    # "loftq": A and B at the quantization error's top-r SVD (quantized bases only, loftq.py); "eva" / "corda":
    # from a few batches of data, set by dt.eva_init(delta, batches) after attach (eva.py, corda.py;
    # ``deltatune train`` makes that call itself), plain kaiming LoRA until then
    init: str = "kaiming"
    # CorDA's mode: "ipm" trains the directions the data uses most (for the task), "kpm" the least (keeps what
    # the data's context holds in the frozen base)
    corda_mode: str = "ipm"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)     # per-module r overrides
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)  # per-module alpha overrides
    # prune/reallocate rank during training down to a total budget (AdaLoRA-like; see methods/lora/budget.py)
    adaptive: RankBudget | None = None

    def __post_init__(self) -> None:
        self.adaptive = RankBudget.coerce(self.adaptive)  # JSON/YAML give a dict
        super().__post_init__()

    def validate(self) -> None:
        self._require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer")
        self._require(self.alpha > 0, "alpha", "> 0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        self._require(self.init in INITS, "init", " or ".join(map(repr, INITS)))
        self._require(self.corda_mode in CORDA_MODES, "corda_mode", " or ".join(map(repr, CORDA_MODES)))
        if self.init in RESIDUAL_INITS:  # both rewrite W at attach; DoRA's magnitude and a rank budget assume not
            self._require(not self.dora, "dora", f"False with init={self.init!r} (not supported together)")
            self._require(self.adaptive is None, "adaptive", f"None with init={self.init!r} (not supported together)")
        self._require(not (self.init == "loftq" and self.dora), "init", "'kaiming' or 'gaussian' with dora "
                      "(DoRA's magnitude starts from B = 0)")
        self._require(all(isinstance(v, int) and v > 0 for v in self.rank_pattern.values()),
                      "rank_pattern", "a mapping of module patterns to positive integers")
        self._require(all(v > 0 for v in self.alpha_pattern.values()), "alpha_pattern",
                      "a mapping of module patterns to positive numbers")
        self._require(self.adaptive is None or isinstance(self.adaptive, RankBudget), "adaptive",
                      "a dt.RankBudget or None")
        if self.adaptive is not None:
            self.adaptive.validate()

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha for one module, honouring rank_pattern / alpha_pattern (PEFT's key semantics)."""
        return _lookup(self.rank_pattern, path, self.r), _lookup(self.alpha_pattern, path, self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _lookup(pattern: dict, path: str, default):
    r"""PEFT's semantics: key ``k`` (a name or regex) applies to a module whose path matches ``(.*\.)?k$``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?(?:{key})$", path):
            return value
    return default
