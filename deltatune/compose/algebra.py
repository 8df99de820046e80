"""Delta algebra on LoRA deltas: weighted sums (task arithmetic, Ilharco et al., 2023, arXiv:2212.04089).

A LoRA module's update is ``dW = s B A`` (s = alpha / r). A weighted sum ``sum_i w_i s_i B_i A_i`` is again
a LoRA, exactly, by concatenating ranks: ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, ``A = [A_1; A_2; ...]``
with scaling 1 (alpha = r). Given a target rank ``r`` it is truncated by SVD instead (Eckart-Young: the best
rank-r approximation in Frobenius norm); the SVD runs on the small factors (QR of B and A^T), never on a
dense out x in matrix. Each module keeps its own rank and scaling; modules only some deltas touch are fine.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..api import attach
from ..core.delta import Delta, deltas_of
from ..core.errors import ConfigError, StateError
from ..core.inject import DeltaWrapper
from ..methods.lora import LoRA
from ..methods.lora.inits import RESIDUAL_INITS

log = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, torch.Tensor]  # (B: out x k, A: k x in), product = the update


def truncate(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``B @ A`` and all its singular values (descending).

    Returns (B_r, A_r, S) with ``B_r @ A_r = U_r diag(S_r) V_r^T`` (sqrt(S) split between the factors).
    """
    q_b, r_b = torch.linalg.qr(B)          # B = Qb Rb
    q_a, r_a = torch.linalg.qr(A.T)        # A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    return (q_b @ u[:, :k]) * root, root[:, None] * (vh[:k] @ q_a.T), s


def retained_energy(s: torch.Tensor, k: int) -> float:
    """Share of ||dW||_F^2 kept by the top ``k`` singular values (1.0 for a zero update)."""
    total = float((s.double() ** 2).sum())
    return float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0


def _lora_factors(delta: Delta, weight: float) -> dict[str, Factors]:
    """Per module path, the weighted factors (w s B, A) of a LoRA-only delta."""
    found: dict[str, Factors] = {}
    for att in delta.attachments:
        cfg = att.config
        if cfg.trains_whole_modules:  # whole-module copies (task heads) are combined by _combine_heads
            continue
        if not isinstance(cfg, LoRA) or cfg.dora:
            kind = "lora(dora=True)" if isinstance(cfg, LoRA) else cfg.method
            raise ConfigError(f"dt.combine works on plain LoRA deltas only; delta {delta.name!r} contains {kind}, "
                              f"whose update is not a sum of low-rank products")
        if cfg.init in RESIDUAL_INITS:  # its A, B act on a residual base weight, not on the shared original
            raise ConfigError(f"dt.combine works on plain LoRA deltas only; delta {delta.name!r} is a LoRA with "
                              f"init={cfg.init!r}, which rewrote the base weights. Export it with dt.export_peft "
                              f"(a plain LoRA on the original weights) and dt.import_peft it to combine it.")
        for path, wrapper in att.wrappers().items():
            B = wrapper.lora_B.detach().float() * (weight * wrapper.scale)
            A = wrapper.lora_A.detach().float()
            if path in found:  # two LoRA configs on one module inside one delta: their updates add
                B, A = torch.cat([found[path][0], B], 1), torch.cat([found[path][1], A], 0)
            found[path] = (B, A)
    return found


def _check_shapes(path: str, parts: list[tuple[str, Factors]]) -> None:
    shapes = {(b.shape[0], a.shape[1]) for _, (b, a) in parts}
    if len(shapes) > 1:
        detail = ", ".join(f"{n}: {b.shape[0]}x{a.shape[1]}" for n, (b, a) in parts)
        raise ConfigError(f"dt.combine: the deltas' updates of {path} have different shapes ({detail}); "
                          f"they were trained on different base models")


def combined_factors(deltas: Sequence[Delta], weights: Sequence[float]) -> dict[str, Factors]:
    """Per module path, the exact rank-concatenated factors of ``sum_i weights[i] * deltas[i]``."""
    per_delta = [_lora_factors(d, float(w)) for d, w in zip(deltas, weights, strict=True)]
    paths = list(dict.fromkeys(p for factors in per_delta for p in factors))
    out: dict[str, Factors] = {}
    for path in paths:
        parts = [(d.name, f[path]) for d, f in zip(deltas, per_delta, strict=True) if path in f]
        _check_shapes(path, parts)
        out[path] = (torch.cat([b for _, (b, _) in parts], 1), torch.cat([a for _, (_, a) in parts], 0))
    return out


def lora_config(ranks: dict[str, int]) -> LoRA:
    """A LoRA config placing rank ``ranks[path]`` with scaling 1 (alpha = r) on exactly those paths."""
    first = next(iter(ranks.values()))
    pattern = {re.escape(p): k for p, k in ranks.items() if k != first}
    return LoRA(r=first, alpha=float(first), targets=list(ranks), rank_pattern=pattern,
                alpha_pattern={p: float(k) for p, k in pattern.items()})


def _combine_heads(deltas: Sequence[Delta], weights: Sequence[float], combined: Delta) -> None:
    """Task arithmetic on the deltas' trained module copies: head = original + sum_i w_i (head_i - original)."""
    with torch.no_grad():
        for path, copy in combined.train_modules.items():
            target = dict(copy.own_parameters())
            for delta, weight in zip(deltas, weights, strict=True):
                theirs = delta.train_modules.get(path)
                if theirs is None:
                    continue
                original = dict(theirs.base_layer().named_parameters())
                for n, p in theirs.own_parameters():
                    target[n].add_(weight * (p - original[n]))


def attach_factors(model: nn.Module, factors: dict[str, Factors], name: str,
                   train_modules: list[str] | None = None) -> Delta:
    """Attach a new LoRA delta named ``name`` whose update on each path is exactly B @ A (plus fresh copies
    of ``train_modules``, which callers fill in)."""
    delta = attach(model, lora_config({p: a.shape[0] for p, (_, a) in factors.items()}), name=name,
                   train_modules=train_modules or None)
    wrappers: dict[str, DeltaWrapper] = delta.attachments[0].wrappers()
    with torch.no_grad():
        for path, (B, A) in factors.items():
            wrappers[path].lora_B.copy_(B)
            wrappers[path].lora_A.copy_(A)
    return delta


def _check_inputs(deltas: Sequence[Delta], weights: Sequence[float] | None, r: int | None) -> list[float]:
    if not deltas or not all(isinstance(d, Delta) for d in deltas):
        raise ConfigError(f"dt.combine expects a non-empty list of Delta handles, got {deltas!r}")
    if weights is None:
        weights = [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ConfigError(f"dt.combine got {len(deltas)} deltas but {len(weights)} weights; give one weight each")
    if r is not None and (not isinstance(r, int) or r <= 0):
        raise ConfigError(f"dt.combine r must be a positive integer or None (exact), got {r!r}")
    detached = [d.name for d in deltas if not d.attached]
    if detached:
        raise StateError(f"dt.combine: deltas {detached} were detached; attach or load them again")
    return [float(w) for w in weights]


def combine(deltas: Sequence[Delta], weights: Sequence[float] | None = None, r: int | None = None,
            name: str | None = None, model: nn.Module | None = None) -> Delta:
    """A new LoRA delta equal to ``sum_i weights[i] * deltas[i]``, attached under ``name`` and returned.

    Args:
        deltas: LoRA deltas (not DoRA), usually named deltas of one model; they may live on different
            copies of the same base, the result goes onto ``model`` (default: the first delta's model).
        weights: one factor per delta (default 1.0 each); negative weights subtract (task negation).
        r: None for the exact sum (rank = sum of ranks per module), or a rank to truncate to by SVD.
            ``delta.combine_report[path]`` then gives the rank and the retained energy per module.
        name: default ``"<name1>+<name2>..."``.
    Raises:
        ConfigError: non-LoRA deltas, weights/deltas count mismatch, modules of different shapes.
    """
    weights = _check_inputs(deltas, weights, r)
    model = model if model is not None else deltas[0].model
    merged = [d.name for d in deltas_of(model).values() if d.is_merged]
    if merged:
        raise StateError(f"dt.combine: delta {merged[0]!r} is merged into the target model's weights, so the new "
                         f"delta would be added on top of it; unmerge it first")
    name = name or "+".join(d.name for d in deltas)
    if name in deltas_of(model):
        raise StateError(f"a delta named {name!r} is already attached; pass name='...' to dt.combine")
    factors = combined_factors(deltas, weights)
    report: dict[str, dict[str, float]] = {}
    for path, (B, A) in factors.items():
        if r is not None and A.shape[0] > r:
            B_r, A_r, s = truncate(B, A, r)
            factors[path] = (B_r, A_r)
            report[path] = {"rank": A_r.shape[0], "retained_energy": retained_energy(s, r)}
        else:
            report[path] = {"rank": A.shape[0], "retained_energy": 1.0}
    heads = list(dict.fromkeys(p for d in deltas for p in d.train_modules))
    delta = attach_factors(model, factors, name, heads)
    _combine_heads(deltas, weights, delta)
    delta.combine_report = report
    low = min(v["retained_energy"] for v in report.values())
    log.info("combined %s with weights %s into %r (%d modules, lowest retained energy %.4f)",
             [d.name for d in deltas], weights, name, len(report), low)
    return delta
