"""Hard per-sample routing at inference: per group of samples, one folded product or only its own low-rank path.

Why: through masks (``DeltaModule.scaled``), a routed linear layer runs its base product, then every routed
delta's low-rank path over the whole batch, and multiplies all but one of them away per sample: 2.3x the
latency of one delta on a mixed batch of MiniLM (BENCHMARKS.md, "Learned routing"), because one delta at
inference folds W + dW into its product (core/merge_on_the_fly.py) and costs what the base costs, while the
masked paths cost several activation-sized passes each. With hard routing and no autograd, the samples routed
to delta k can instead go through W + dW_k, exactly as that delta alone runs them: the product work of one
delta over the batch, plus one weight-sized fold per delta and a gather / scatter of the rows. Where a group
has too few tokens for a weight-sized fold to pay (short texts, decoding steps), the base product runs once
and each group's rows get only their own deltas' low-rank paths (``add_delta_into``).

Hard masks are made here (``hard_mask``, by ``dt.route``), so a 0/1 mask is known to be one without reading its
values (no device sync); soft weights (a router's mix) are other tensors and keep the masked path. A chain of
stacked wrappers on one layer (several named deltas) is folded from its outermost wrapper; every wrapper in
it must opt in (``DeltaWrapper.folds_per_sample``: LoRA), otherwise the masked path runs, which is exact too.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from . import onednn
from .inject import DeltaWrapper
from .layers import linear_types
from .merge_on_the_fly import linear_forward
from .structure import features

# id(mask) -> (the mask, weakly; which samples it selects). Entries leave when their mask is freed.
_HARD: dict[int, tuple[weakref.ref, tuple[bool, ...]]] = {}
# the last grouping computed, for the masks (compared by identity) of the chain that asked: every layer of one
# routed forward asks with the same masks, so it is computed once per routing, not once per layer
_LAST: list = [(), None]
# the last input split into its groups' rows: query, key and value projections read one tensor, so it is
# gathered once for the three. The input is held weakly, and freeing it drops its parts.
_GATHERED: list = [lambda: None, None, None]


def hard_mask(selected: Sequence[bool], device: torch.device) -> torch.Tensor:
    """A (batch,) float 0/1 routing mask, registered as hard so routed layers may fold per group of samples."""
    selected = tuple(bool(s) for s in selected)
    mask = torch.tensor(selected, dtype=torch.float32, device=device)
    key = id(mask)
    _HARD[key] = (weakref.ref(mask, lambda _ref, key=key: _forget(key, _ref)), selected)
    return mask


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _HARD.get(key)
    if entry is not None and entry[0] is ref:
        del _HARD[key]


def selection(mask: torch.Tensor) -> tuple[bool, ...] | None:
    """Which samples a hard mask selects; None for any other tensor (soft weights, gates)."""
    entry = _HARD.get(id(mask))
    return entry[1] if entry is not None and entry[0]() is mask else None


Rows = torch.Tensor | slice | None


def sample_groups(masks: tuple[torch.Tensor, ...], device: torch.device
                  ) -> list[tuple[tuple[int, ...], Rows]] | None:
    """The batch split by which of ``masks`` (hard) select each sample: [(mask indices, rows)], rows None when
    the group is the whole batch, a slice when its samples are consecutive (a batch sorted by route:
    ``compose/batch_order.py``), else their indices. None when a mask is not hard."""
    last_masks, last_groups = _LAST
    if len(last_masks) == len(masks) and all(a is b for a, b in zip(last_masks, masks, strict=True)):
        return last_groups
    selections = [selection(m) for m in masks]
    if any(s is None for s in selections):
        return None
    keys = [tuple(k for k, s in enumerate(selections) if s[i]) for i in range(len(selections[0]))]
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    groups = [(key, _rows(r, len(keys), device)) for key, r in rows.items()]
    _LAST[:] = [masks, groups]
    return groups


def _rows(rows: list[int], batch: int, device: torch.device) -> Rows:
    if len(rows) == batch:
        return None
    if rows[-1] - rows[0] + 1 == len(rows):  # increasing, so consecutive
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def _chain(outer: DeltaWrapper) -> tuple[list[DeltaWrapper], nn.Module] | None:
    """The stacked wrappers from ``outer`` down and the plain linear layer under them; None where any of them
    cannot be folded per group (a method that has not opted in, hooks that skipping inner calls would bypass,
    a quantized or custom layer)."""
    chain, layer = [], outer
    while isinstance(layer, DeltaWrapper):
        if not layer.folds_per_sample() or (layer is not outer and (layer._forward_hooks or layer._forward_pre_hooks)):
            return None
        chain.append(layer)
        layer = layer.base
    if type(layer) not in linear_types() or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    return chain, layer


def routed_forward(outer: DeltaWrapper, x: torch.Tensor) -> torch.Tensor | None:
    """What the wrapper chain from ``outer`` computes under hard routing: one folded product per group of
    samples where that pays, else the base product plus each group's own low-rank paths; None when neither
    applies (autograd on, soft weights or gates, a method or layer that cannot fold): the caller runs its usual
    (masked) path."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return None
    found = _chain(outer)
    if found is None:
        return None
    chain, layer = found
    on = [w for w in chain if w.uses_delta]
    if not on or any(w.sample_scale is None or w.gate_scale is not None for w in on):
        return None
    masks = tuple(w.sample_scale for w in on)
    if any(m.shape[0] != x.shape[0] for m in masks):
        return None  # the masked path raises the clear error
    # full precision only: in bf16 / fp16 a fold rounds the delta away, and a group's low-rank path added to the
    # already rounded base output rounds twice (logits several bf16 steps from the delta alone, tiny Llama)
    if layer.weight.dtype not in (torch.float32, torch.float64) or x.dtype != layer.weight.dtype:
        return None
    groups = sample_groups(masks, x.device)
    if groups is None:
        return None
    if _fold_pays(x, layer, len(groups)):
        return folded_per_group(layer, on, x, groups)
    return low_rank_per_group(layer, on, x, groups)


def folded_per_group(layer: nn.Module, on: list[DeltaWrapper], x: torch.Tensor, groups: list) -> torch.Tensor:
    """Each group's samples through W + its deltas' folds: one product per group (many tokens per group)."""
    weight, bias = layer.weight, layer.bias
    if len(groups) == 1:
        return linear_forward(layer, x, _folded(weight, [on[k] for k in groups[0][0]]), bias)
    out = x.new_empty(*x.shape[:-1], features(layer)[1])
    for (key, rows), part in zip(groups, _gathered(x, groups), strict=True):
        weight_k = _folded(weight, [on[k] for k in key])
        if isinstance(rows, slice):  # consecutive samples: a view in, the product written in place
            _linear_into(out[rows], layer, part, weight_k, bias)
        else:
            out.index_copy_(0, rows, linear_forward(layer, part, weight_k, bias))
    return out


def low_rank_per_group(layer: nn.Module, on: list[DeltaWrapper], x: torch.Tensor, groups: list) -> torch.Tensor:
    """The base product over the whole batch, then each group's deltas added to its own rows only. For few
    tokens per group (short texts, decoding steps), where a weight-sized fold does not pay: the masked path
    would run every delta's low-rank path over every sample and multiply all but one away (K passes and 2K
    activation-sized multiplies and adds for K deltas); this runs each sample's own. Consecutive groups are
    views written in place; scattered ones are gathered and added back (``index_add_``)."""
    out = linear_forward(layer, x, layer.weight, layer.bias).contiguous()  # (a no-op: products come out contiguous)
    fan_in, fan_out = x.shape[-1], out.shape[-1]
    parts = [x] if groups[0][1] is None else _gathered(x, groups)  # rows None: one group, the whole batch
    for (key, rows), part in zip(groups, parts, strict=True):
        if not key:
            continue
        scattered = isinstance(rows, torch.Tensor)
        target = part.new_zeros(*part.shape[:-1], fan_out) if scattered else out if rows is None else out[rows]
        for k in key:
            on[k].add_delta_into(target.view(-1, fan_out), part.reshape(-1, fan_in))
        if scattered:
            out.index_add_(0, rows, target)
    return out


def _linear_into(out: torch.Tensor, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
    """``out`` (a slice of the routed output along the batch) = what ``linear_forward`` gives for ``x`` with
    ``weight``: written there by the product itself where it can be (no copy of the activations)."""
    if not (x.is_contiguous() and out.is_contiguous()) or (isinstance(layer, nn.Linear) and onednn.routes(layer, x)):
        out.copy_(linear_forward(layer, x, weight, bias))
        return
    flat, target = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    weight = weight.t() if isinstance(layer, nn.Linear) else weight  # Conv1D keeps (in, out)
    if bias is None:
        torch.mm(flat, weight, out=target)
    else:
        torch.addmm(bias, flat, weight, out=target)


def _gathered(x: torch.Tensor, groups: list) -> list[torch.Tensor]:
    """Each group's rows of ``x``: views for consecutive rows, copies otherwise. The copies are kept while the
    next layer reads the same tensor (views are not: one would keep ``x`` alive)."""
    last_x, last_groups, parts = _GATHERED
    if last_x() is x and last_groups is groups and x._version == parts[0]:  # unchanged since (in-place ops)
        copies = parts[1]
    else:
        copies = [None if isinstance(rows, slice) else x.index_select(0, rows) for _, rows in groups]
        if any(c is not None for c in copies):
            _GATHERED[:] = [weakref.ref(x, _drop_gathered), groups, (x._version, copies)]
    return [x[rows] if copy is None else copy for (_, rows), copy in zip(groups, copies, strict=True)]


def _drop_gathered(ref: weakref.ref) -> None:
    if _GATHERED[0] is ref:
        _GATHERED[:] = [lambda: None, None, None]


def _folded(weight: torch.Tensor, wrappers: list[DeltaWrapper]) -> torch.Tensor:
    for wrapper in wrappers:
        weight = wrapper.fold_into(weight)
    return weight


def _fold_pays(x: torch.Tensor, layer: nn.Module, groups: int) -> bool:
    """Each group's fold is weight-sized: it pays when a group's tokens N_g make N_g (in + out) > in x out
    (the rule of core/merge_on_the_fly.py per group)."""
    fan_in, fan_out = features(layer)
    return (x.numel() // fan_in) * (fan_in + fan_out) > groups * fan_in * fan_out
