"""Adaptive LoRA rank budget, in the spirit of AdaLoRA (Zhang et al., 2023, arXiv:2303.10512).

``dt.LoRA(r=12, adaptive=dt.RankBudget(target_total=48, start=100, end=800))`` starts every targeted module
at rank r, scores each rank-1 component (row i of A with column i of B) during training, and from step
``start`` to step ``end`` keeps only the best components overall, so that the TOTAL rank over all modules
follows AdaLoRA's cubic schedule down to ``target_total``: modules that matter keep more rank.

Importance (AdaLoRA eqs. 8-11, on plain LoRA factors instead of AdaLoRA's SVD triplets): for every entry w
of A and B, the sensitivity I = |w * dL/dw| is smoothed, I_bar <- b1 I_bar + (1 - b1) I, and so is its
uncertainty, U_bar <- b2 U_bar + (1 - b2) |I - I_bar|. A component's score is mean(I_bar * U_bar) over its
row of A plus the same mean over its column of B.

Masking, not removing: a pruned component's column of B is held at zero (its old values are kept aside, and
its row of A is untouched), so it has no effect and gets no sensitivity; if a later allocation gives it back
its values return. At step ``end`` (or on ``delta.finalize()``) the modules are truncated in place: A and B
keep only the surviving components, alpha is adjusted so the scale alpha/r (or alpha/sqrt(r)) is unchanged,
modules left with rank 0 are removed, and the attachment's config becomes a plain LoRA with a per-module
``rank_pattern`` / ``alpha_pattern``: mergeable, savable, loadable by ``dt.load`` and exportable to PEFT.

How the schedule advances (``RankBudget.advance``):
- "optimizer" (default): every ``step()`` of a torch optimizer that holds this delta's parameters advances
  it by one (a global optimizer step post-hook, removed at finalize or detach), so existing training loops and
  ``transformers.Trainer`` need no change. Calling ``delta.step(...)`` yourself switches this off for good
  (so a step is never counted twice); from then on only your calls advance it.
- "manual": only ``delta.step(step)`` advances it; call it once after each optimizer step.
Truncation at ``end`` keeps the same Parameter objects (resized in place) and slices the optimizer state
(Adam moments, momentum) of every optimizer seen stepping them, so training simply continues.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ...core.errors import ConfigError, StateError
from ...core.inject import Attachment, remove_module

logger = logging.getLogger(__name__)
ADVANCE = ("optimizer", "manual")


@dataclasses.dataclass
class RankBudget:
    """Where the total LoRA rank should go, and when. Steps count optimizer steps from 0."""

    target_total: int        # total rank over all targeted modules from step ``end`` on
    start: int               # steps of importance warm-up before any pruning (B starts at 0: scores start at 0)
    end: int                 # the step at which the total rank reaches target_total and ranks are truncated
    interval: int = 1        # re-allocate every this many steps between start and end (AdaLoRA's delta T)
    beta1: float = 0.85      # EMA factor of the sensitivity |w * grad|: higher is smoother but slower to react
    beta2: float = 0.85      # EMA factor of its uncertainty |I - I_bar|
    min_rank: int = 0        # every module keeps at least this rank (0: a module may be dropped entirely)
    advance: str = "optimizer"  # "optimizer": advance on every optimizer step; "manual": only delta.step()

    def __post_init__(self) -> None:
        self.validate()

    def _require(self, ok: bool, field: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"lora.adaptive.{field} must be {allowed}, got {getattr(self, field)!r}")

    def validate(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        self._require(is_int(self.target_total) and self.target_total > 0, "target_total", "a positive integer")
        self._require(is_int(self.start) and self.start >= 0, "start", "a non-negative integer")
        self._require(is_int(self.end) and self.end > self.start, "end", f"an integer > start ({self.start})")
        self._require(is_int(self.interval) and self.interval > 0, "interval", "a positive integer")
        self._require(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        self._require(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        self._require(is_int(self.min_rank) and self.min_rank >= 0, "min_rank", "a non-negative integer")
        self._require(self.advance in ADVANCE, "advance", f"one of {ADVANCE}")

    @classmethod
    def coerce(cls, value: Any) -> RankBudget | None:
        """A RankBudget from itself, None, or its dict form (JSON/YAML), naming unknown keys."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"lora.adaptive must be a dt.RankBudget, a mapping of its fields or null, "
                              f"got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        missing = sorted({"target_total", "start", "end"} - set(value))
        if unknown or missing:
            raise ConfigError(f"lora.adaptive: unknown key(s) {unknown}, missing key(s) {missing}; "
                              f"allowed: {sorted(fields)}")
        return cls(**value)


# -- pure parts: schedule, scores, allocation ---------------------------------------------------------

def budget_at(step: int, initial: int, target: int, start: int, end: int) -> int:
    """AdaLoRA's cubic schedule: ``initial`` until ``start``, ``target`` from ``end``, and in between
    target + floor((initial - target) * (1 - (step - start) / (end - start))^3): monotone non-increasing,
    fast pruning first (while most components are redundant), gentle near the target."""
    if step <= start:
        return initial
    if step >= end:
        return target
    remaining = 1.0 - (step - start) / (end - start)
    return target + math.floor((initial - target) * remaining ** 3)


class Importance:
    """Smoothed sensitivity and uncertainty of one tensor's entries (AdaLoRA eqs. 8-10)."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: torch.Tensor | None = None
        self.uncertainty: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, param: nn.Parameter) -> None:
        """Fold in |w * grad| of the current step (no-op without a gradient)."""
        if param.grad is None:
            return
        current = (param.detach() * param.grad.detach()).abs().float()
        if self.sensitivity is None or self.sensitivity.shape != current.shape:
            self.sensitivity, self.uncertainty = torch.zeros_like(current), torch.zeros_like(current)
        self.sensitivity.mul_(self.beta1).add_(current, alpha=1 - self.beta1)
        self.uncertainty.mul_(self.beta2).add_((current - self.sensitivity).abs(), alpha=1 - self.beta2)

    def score(self) -> torch.Tensor | None:
        return None if self.sensitivity is None else self.sensitivity * self.uncertainty


def component_scores(score_a: torch.Tensor | None, score_b: torch.Tensor | None, r: int) -> torch.Tensor:
    """Score of each rank-1 component: mean over its row of A (r, in) plus mean over its column of B (out, r)."""
    total = torch.zeros(r)
    if score_a is not None:
        total += score_a.mean(dim=1).cpu()
    if score_b is not None:
        total += score_b.mean(dim=0).cpu()
    return total


def allocate(scores: dict[str, torch.Tensor], budget: int, min_rank: int = 0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks holding exactly ``budget`` components in all: each module's ``min_rank`` best,
    then the best remaining ones over all modules. Ties go to the earlier module and index (deterministic)."""
    keep = {path: torch.zeros(len(s), dtype=torch.bool) for path, s in scores.items()}
    for path, s in scores.items():
        keep[path][torch.sort(s, descending=True, stable=True).indices[:min_rank]] = True
    left = budget - sum(int(k.sum()) for k in keep.values())
    if left < 0 or budget > sum(len(s) for s in scores.values()):
        raise ValueError(f"internal: budget {budget} does not fit {min_rank=} and the module ranks")
    owners = [(path, i) for path, s in scores.items() for i in range(len(s)) if not keep[path][i]]
    if owners and left > 0:
        values = torch.stack([scores[p][i] for p, i in owners])
        for j in torch.sort(values, descending=True, stable=True).indices[:left].tolist():
            path, i = owners[j]
            keep[path][i] = True
    return keep


# -- the controller -------------------------------------------------------------------------------------

class RankAllocator:
    """Runs a ``RankBudget`` on one LoRA attachment (created by the LoRA attach rule; see the module doc)."""

    def __init__(self, model: nn.Module, att: Attachment, budget: RankBudget) -> None:
        self.model, self.att, self.budget = model, att, budget
        self.wrappers = dict(att.wrappers())
        self.initial = {path: w.r for path, w in self.wrappers.items()}
        self._check_feasible()
        self.masks = {path: torch.ones(r, dtype=torch.bool) for path, r in self.initial.items()}
        self._kept_b = {path: torch.zeros_like(w.lora_B.detach()) for path, w in self.wrappers.items()}
        self._importance = {path: (Importance(budget.beta1, budget.beta2), Importance(budget.beta1, budget.beta2))
                            for path in self.wrappers}
        self._param_ids = {id(p) for w in self.wrappers.values() for _, p in w.own_parameters()}
        self.manual = budget.advance == "manual"
        self.last_step: int | None = None
        self.finalized = False
        self.optimizers: weakref.WeakSet = weakref.WeakSet()
        self.history: list[tuple[int, int, int]] = []  # (step, scheduled budget, total rank in effect)
        # not in att.hooks, which lists forward hooks (a delta with those cannot be merged): an undo step
        self._hook = register_optimizer_step_post_hook(self._after_optimizer_step)
        att.on_detach.append(self._hook.remove)

    def _check_feasible(self) -> None:
        total, n, b = sum(self.initial.values()), len(self.initial), self.budget
        if b.target_total > total:
            raise ConfigError(f"lora.adaptive.target_total must be <= the total initial rank {total} "
                              f"({n} modules), got {b.target_total}; raise lora.r or lower the target")
        if b.min_rank * n > b.target_total:
            raise ConfigError(f"lora.adaptive.min_rank must be <= target_total / modules = {b.target_total // n} "
                              f"({n} modules), got {b.min_rank}")

    # -- what it is -------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """Rank in effect per module (masked components excluded)."""
        return {path: int(mask.sum()) for path, mask in self.masks.items()}

    def total_rank(self) -> int:
        return sum(self.ranks().values())

    def budget_at(self, step: int) -> int:
        b = self.budget
        return budget_at(step, sum(self.initial.values()), b.target_total, b.start, b.end)

    def scores(self) -> dict[str, torch.Tensor]:
        """Current importance score of every component, per module path."""
        return {path: component_scores(imp_a.score(), imp_b.score(), len(self.masks[path]))
                for path, (imp_a, imp_b) in self._importance.items()}

    # -- advancing ----------------------------------------------------------------------------------
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.finalized or not any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"]):
            return
        self.optimizers.add(optimizer)
        if not self.manual:
            self._advance(0 if self.last_step is None else self.last_step + 1)

    def step(self, step: int | None = None) -> None:
        """An optimizer step finished (``step``: its 0-based index; None: the next one)."""
        if not self.manual:
            logger.info("delta.step() called: the rank budget now advances only on delta.step()")
            self.manual = True
        if self.finalized:
            return
        step = (0 if self.last_step is None else self.last_step + 1) if step is None else int(step)
        if step != self.last_step:
            self._advance(step)

    def _advance(self, step: int) -> None:
        for path, w in self.wrappers.items():
            imp_a, imp_b = self._importance[path]
            imp_a.update(w.lora_A)
            imp_b.update(w.lora_B)
        b = self.budget
        scheduled = self.budget_at(step)
        if step >= b.end or (step > b.start and (step - b.start) % b.interval == 0):
            self._reallocate(scheduled)
        self._apply_masks()  # also undoes what optimizer momentum did to masked columns this step
        self.last_step = step
        self.history.append((step, scheduled, self.total_rank()))
        if step >= b.end:
            self.finalize()

    @torch.no_grad()
    def _reallocate(self, budget: int) -> None:
        masks = allocate(self.scores(), budget, self.budget.min_rank)
        for path, w in self.wrappers.items():
            old, new = self.masks[path], masks[path]
            pruned, revived = old & ~new, new & ~old
            self._kept_b[path][:, pruned] = w.lora_B[:, pruned]
            w.lora_B[:, revived] = self._kept_b[path][:, revived]
            self.masks[path] = new
        logger.debug("rank budget %d: %s", budget, self.ranks())

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for path, w in self.wrappers.items():
            mask = self.masks[path]
            if not bool(mask.all()):
                w.lora_B[:, ~mask] = 0

    # -- the end: a plain LoRA ------------------------------------------------------------------------
    def finalize(self) -> None:
        """Prune to ``target_total`` now (if not there yet) and truncate the modules to plain LoRA ranks."""
        if self.finalized:
            return
        if any(w.merged for w in self.wrappers.values()):
            raise StateError("cannot finalize the adaptive LoRA ranks while the delta is merged; unmerge() first")
        if self.total_rank() != self.budget.target_total:
            logger.warning("finalizing the rank budget at step %s, before its end step %d: pruning to %d now",
                           self.last_step, self.budget.end, self.budget.target_total)
            self._reallocate(self.budget.target_total)
            self._apply_masks()
        self._truncate()
        self.finalized = True
        self._hook.remove()  # nothing left to advance
        logger.info("rank budget reached: ranks %s", self.ranks())

    def _truncate(self) -> None:
        cfg = self.att.config
        ranks, alphas = {}, {}
        for path, w in list(self.wrappers.items()):
            keep = self.masks[path].nonzero().flatten()
            if len(keep) == 0:
                self._drop(path, w)
                continue
            r = len(keep)
            alpha = w.scale * (math.sqrt(r) if cfg.rslora else r)  # same scale as during training
            self._resize(w.lora_A, 0, keep)
            self._resize(w.lora_B, 1, keep)
            w.r, w.alpha, w.scale = r, alpha, cfg.scaling(r, alpha)
            self.masks[path] = torch.ones(r, dtype=torch.bool)
            ranks[path], alphas[path] = r, alpha
        self.att.config = dataclasses.replace(cfg, adaptive=None, targets=sorted(ranks), layers=None,
                                              rank_pattern=ranks, alpha_pattern=alphas)

    @torch.no_grad()
    def _resize(self, param: nn.Parameter, dim: int, keep: torch.Tensor) -> None:
        """Keep only ``keep`` along ``dim``, in place (same Parameter object), optimizer state included.

        ``swap_tensors`` rather than ``param.data = ...``: a graph still alive from the last step (a ``loss``
        the loop keeps) caches the old shape in the parameter's gradient accumulator; swapping gives the same
        Python object a fresh one, so optimizers and parameter lists keep working."""
        old_shape = param.shape
        index = keep.to(param.device)
        new = nn.Parameter(param.detach().index_select(dim, index).clone(), requires_grad=param.requires_grad)
        if param.grad is not None:
            new.grad = param.grad.detach().index_select(dim, index).clone()
        torch.utils.swap_tensors(param, new)
        for optimizer in self.optimizers:
            _slice_state(optimizer, param, old_shape, dim, index)

    def _drop(self, path: str, wrapper: nn.Module) -> None:
        """A module left with rank 0: take it out of the model, the attachment and the optimizers."""
        remove_module(self.model, path, wrapper)
        self.att.modules.pop(path)
        self.wrappers.pop(path)
        self.masks.pop(path)
        params = {id(p) for _, p in wrapper.own_parameters()}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in params]
            for _, p in wrapper.own_parameters():
                optimizer.state.pop(p, None)


def _slice_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, old_shape: torch.Size, dim: int,
                 index: torch.Tensor) -> None:
    """Slice the per-entry state of ``param`` (Adam moments, momentum buffers) like the parameter itself;
    state of any other shape (e.g. factored second moments) cannot be sliced, so it is reset."""
    state = optimizer.state.get(param)
    if not state:
        return
    odd = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != old_shape]
    if odd:
        logger.warning("optimizer state %s of a truncated LoRA factor has an unexpected shape; resetting it", odd)
        del optimizer.state[param]
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old_shape:
            state[key] = value.index_select(dim, index).clone()


def rank_allocators(delta: Any) -> list[RankAllocator]:
    """The rank-budget controllers of a delta (empty for a non-adaptive one), e.g. to read ``history``."""
    return [c for att in delta.attachments for c in att.controllers if isinstance(c, RankAllocator)]
