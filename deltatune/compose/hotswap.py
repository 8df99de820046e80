"""Hot-swap: put another delta's weights into a loaded delta in place, without re-attaching or recompiling.

A server holds one base model with one attached delta and switches tasks by copying tensors: no module is
replaced, no Python attribute a compiled graph depends on changes, so a ``torch.compile``d model keeps its
graphs (tests/compose/test_hotswap.py counts the compilations).

Two things differ between LoRAs of one layout, and both are absorbed into the tensors:
- the rank: ``prepare_hotswap(delta, max_rank)`` zero-pads every LoRA to ``max_rank`` once, up front (rows of A,
  columns of B: zeros add nothing, so outputs are unchanged); a smaller rank is then written zero-padded;
- the scale alpha / r, which the wrappers hold as a Python float (compiled graphs bake it in): instead of
  changing it, the incoming B is multiplied by ``scale_incoming / scale_loaded``, so B A * scale is the
  incoming delta's update (float rounding aside).
Methods other than LoRA, and trained whole modules, are copied as they are; their configs must be equal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import torch
from torch import nn

from ..core.checkpoint import check_fingerprint, read_meta, read_tensors
from ..core.config import DeltaConfig, config_from_dict
from ..core.delta import Delta
from ..core.errors import CheckpointError, StateError
from ..core.inject import Attachment
from ..core.registry import config_classes
from ..methods.lora import LoRA
from ..methods.lora.inits import RESIDUAL_INITS


@dataclasses.dataclass
class _Source:
    """The delta to swap in: its configs by slot and its checkpoint tensors (``<slot>:<path>.<name>``)."""

    configs: dict[str, DeltaConfig]
    tensors: dict[str, torch.Tensor]
    where: str


def prepare_hotswap(delta: Delta, max_rank: int) -> Delta:
    """Zero-pad every LoRA of ``delta`` to rank ``max_rank`` so that deltas of any rank up to it can be swapped in
    (``hotswap``). Outputs are unchanged. Call it before ``torch.compile`` and before building an optimizer:
    it replaces the LoRA parameters by larger ones. The delta's config follows (r = max_rank, alphas that keep
    every module's scale), so ``delta.save`` writes a checkpoint that loads as it is.

    Raises:
        StateError: a LoRA is larger than ``max_rank``, or cannot be padded (DoRA, PiSSA / OLoRA, a rank budget),
        or the delta is merged or detached.
    """
    _check_swappable(delta, "prepare_hotswap")
    if not isinstance(max_rank, int) or max_rank <= 0:
        raise StateError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    for att in _loras(delta):
        larger = {p: w.r for p, w in att.wrappers().items() if w.r > max_rank}
        if larger:
            raise StateError(f"prepare_hotswap: {att.slot} has rank {max(larger.values())} on "
                             f"{sorted(larger)[:2]}, above max_rank={max_rank}; pass a max_rank >= it")
    for att in _loras(delta):
        scales = {p: w.scale for p, w in att.wrappers().items()}
        for wrapper in att.wrappers().values():
            _pad(wrapper, max_rank)
        att.config = _padded_config(att.config, max_rank, scales)
        for path, wrapper in att.wrappers().items():
            wrapper.alpha = att.config.rank_and_alpha(path)[1]
    return delta


def hotswap(delta: Delta, source: str | os.PathLike | Delta) -> None:
    """Replace the weights of ``delta`` by those of ``source`` (a checkpoint directory or another ``Delta``) in
    place: same modules, same parameter objects, so a compiled model does not recompile.

    ``source`` must have the same methods on the same modules; a LoRA may have any rank up to the loaded one
    (see ``prepare_hotswap``) and any alpha / rsLoRA. Nothing is copied unless every tensor fits.

    Raises:
        StateError: methods, targets or shapes differ (the message names them), or ``delta`` is merged / detached.
        CheckpointError: the checkpoint is unreadable or saved for another base model.
    """
    _check_swappable(delta, "hotswap")
    incoming = _read_source(delta, source)
    slots = {a.slot: a.config.method for a in delta.attachments}
    theirs = {slot: cfg.method for slot, cfg in incoming.configs.items()}
    if slots != theirs:
        raise StateError(f"hotswap: {incoming.where} holds {theirs}, the loaded delta {delta.name!r} holds {slots}; "
                         f"only deltas with the same methods can be swapped in place (attach it instead)")
    tensors: dict[str, torch.Tensor] = {}
    for att in delta.attachments:
        if isinstance(att.config, LoRA):
            tensors.update(_lora_tensors(att, incoming))
        else:
            tensors.update(_same_config_tensors(att, incoming))
    delta.load_state_dict(tensors, incoming.where)  # checks every key and shape first, then copies in place


# -- preparing ------------------------------------------------------------------------------------------

def _check_swappable(delta: Delta, what: str) -> None:
    if not delta.attached:
        raise StateError(f"{what}: delta {delta.name!r} was detached; attach or load it again")
    if delta.is_merged:
        raise StateError(f"{what}: delta {delta.name!r} is merged into the base weights; unmerge() it first")
    for att in _loras(delta):
        cfg = att.config
        if cfg.dora or cfg.init in RESIDUAL_INITS or att.controllers:
            kind = "DoRA" if cfg.dora else (f"init={cfg.init!r}" if cfg.init in RESIDUAL_INITS else "a rank budget")
            raise StateError(f"{what}: {att.slot} uses {kind}, whose weights are not a plain B A on the original "
                             f"base weight; hot-swap works on plain LoRA (init 'kaiming', 'gaussian' or 'loftq')")


def _loras(delta: Delta) -> list[Attachment]:
    return [a for a in delta.attachments if isinstance(a.config, LoRA)]


@torch.no_grad()
def _pad(wrapper: nn.Module, rank: int) -> None:
    a, b = wrapper.lora_A, wrapper.lora_B
    if a.shape[0] == rank:
        return
    padded_a = a.new_zeros(rank, a.shape[1])
    padded_a[: a.shape[0]] = a
    padded_b = b.new_zeros(b.shape[0], rank)
    padded_b[:, : b.shape[1]] = b
    wrapper.lora_A = nn.Parameter(padded_a, requires_grad=a.requires_grad)
    wrapper.lora_B = nn.Parameter(padded_b, requires_grad=b.requires_grad)
    wrapper.r = rank


def _padded_config(cfg: LoRA, rank: int, scales: dict[str, float]) -> LoRA:
    """The config that attaches the padded delta: r = rank, and alphas giving each module its scale back."""
    per_rank = math.sqrt(rank) if cfg.rslora else rank  # scale = alpha / per_rank
    default = cfg.scaling(cfg.r, cfg.alpha)
    pattern = {re.escape(p): s * per_rank for p, s in scales.items() if not math.isclose(s, default, rel_tol=1e-12)}
    return dataclasses.replace(cfg, r=rank, alpha=default * per_rank, rank_pattern={}, alpha_pattern=pattern)


# -- swapping -------------------------------------------------------------------------------------------

def _read_source(delta: Delta, source: str | os.PathLike | Delta) -> _Source:
    if isinstance(source, Delta):
        if not source.attached:
            raise StateError(f"hotswap: source delta {source.name!r} was detached")
        return _Source({a.slot: a.config for a in source.attachments}, source.state_dict(), f"delta {source.name!r}")
    where, meta = read_meta(source)
    check_fingerprint(meta.get("base_model", {}), delta.model, where)
    try:
        configs = {m["slot"]: config_from_dict(m["config"], config_classes()) for m in meta["methods"]}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed method list in delta_config.json ({e})") from e
    return _Source(configs, read_tensors(where, meta), str(where))


def _lora_tensors(att: Attachment, incoming: _Source) -> dict[str, torch.Tensor]:
    """The incoming LoRA's A and B, zero-padded to the loaded rank, with B rescaled to the loaded scale."""
    theirs: LoRA = incoming.configs[att.slot]
    if theirs.dora or theirs.init in RESIDUAL_INITS:
        raise StateError(f"hotswap: {incoming.where} is a LoRA with {'DoRA' if theirs.dora else theirs.init!r}; "
                         f"only plain LoRA weights can be swapped in")
    _check_same_modules(att, incoming)
    out = {}
    for path, wrapper in att.wrappers().items():
        key = f"{att.slot}:{att.state_path(path)}."
        a, b = incoming.tensors[key + "lora_A"], incoming.tensors[key + "lora_B"]
        rank = a.shape[0]
        if rank > wrapper.r or a.shape[1] != wrapper.lora_A.shape[1] or b.shape != (wrapper.lora_B.shape[0], rank):
            raise StateError(f"hotswap: {path} of {incoming.where} has A {tuple(a.shape)}, B {tuple(b.shape)}; the "
                             f"loaded LoRA takes A ({wrapper.r}, {wrapper.lora_A.shape[1]}) and B "
                             f"({wrapper.lora_B.shape[0]}, {wrapper.r}) at most (a larger rank needs "
                             f"dt.prepare_hotswap(delta, max_rank={rank}) before compiling)")
        ratio = theirs.scaling(*theirs.rank_and_alpha(att.state_path(path))) / wrapper.scale
        out[key + "lora_A"] = torch.cat([a, a.new_zeros(wrapper.r - rank, a.shape[1])])
        b = b if ratio == 1.0 else b * ratio
        out[key + "lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], wrapper.r - rank)], dim=1)
    return out


def _check_same_modules(att: Attachment, incoming: _Source) -> None:
    prefix = f"{att.slot}:"
    theirs = {k[len(prefix):].rsplit(".", 1)[0] for k in incoming.tensors if k.startswith(prefix)}
    ours = {att.state_path(p) for p in att.modules}
    if theirs != ours:
        raise StateError(f"hotswap: {incoming.where} adapts other modules than the loaded {att.slot}: missing "
                         f"{sorted(ours - theirs)[:3]}, extra {sorted(theirs - ours)[:3]}; deltas swapped in place "
                         f"need the same targets")


def _same_config_tensors(att: Attachment, incoming: _Source) -> dict[str, torch.Tensor]:
    theirs = incoming.configs[att.slot]
    if theirs.to_dict() != att.config.to_dict():
        raise StateError(f"hotswap: {att.slot} of {incoming.where} is configured differently from the loaded one "
                         f"({theirs.describe()} vs {att.config.describe()}); methods other than LoRA swap only "
                         f"between identical configs")
    prefix = f"{att.slot}:"
    return {k: v for k, v in incoming.tensors.items() if k.startswith(prefix)}
