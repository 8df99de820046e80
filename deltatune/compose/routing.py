"""Per-sample routing: one batch, each sample through its own named delta.

``dt.route(model, ["sst2", "cola", None, ...])`` turns on every delta named in the list and gives each
of its modules a 0/1 mask over the batch (``sample_scale``); modules multiply their delta path by it in
``DeltaModule.scaled``. Sample i then sees base + its own delta only, and gets exactly what that delta
gives alone (the other deltas add ``0 * delta``). ``None`` routes a sample to the base model.

Works for every method whose modules are ``routable``: the additive wrappers pass their effect through
``scaled``; prefix and prompt tuning mask their slots out of the other samples' attention (methods/prefix.py,
methods/prompt.py). A delta with a module that is not routable, or that trains base tensors in place
(BitFit), is refused with a StateError; run those samples with ``dt.active`` instead. The routing lasts
until ``dt.activate`` / ``dt.deactivate``, or the end of a ``with dt.route(...):`` block, which restores the
previous state. The batch size must then equal the number of names (generation with beam search or sampling
several sequences changes it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..core.delta import Delta, deltas_of
from ..core.errors import StateError
from ..core.routed_fold import hard_mask
from .named import check_switchable, get_delta, restore, snapshot, warn_shared_state

log = logging.getLogger(__name__)


class Routing:
    """What ``dt.route`` returns: usable as a context manager that puts the previous state back."""

    def __init__(self, model: nn.Module, names: list[str | None], previous: list) -> None:
        self.model = model
        self.names = names
        self._previous = previous

    def __enter__(self) -> Routing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back which deltas were active and how they were routed before this ``route`` call."""
        restore(self._previous)

    def __repr__(self) -> str:
        return f"Routing({self.names})"


def check_routable(delta: Delta) -> None:
    for att in delta.attachments:
        blocked = [path for path, m in att.modules.items() if not m.routable]
        if blocked or att.existing:
            where = blocked[:2] or list(att.existing)[:2]
            raise StateError(f"per-sample routing is not supported for {att.config.method} (delta {delta.name!r}, "
                             f"on {where}): its effect cannot be switched per sample. Route deltas made of "
                             f"routable methods (LoRA, adapters, IA3, prefix, prompt, ...), or run these samples with "
                             f"dt.active(model, {delta.name!r})")


def _device(delta: Delta) -> torch.device:
    """Where the delta's tensors are: its first one (read lazily: this runs on every routed call)."""
    for att in delta.attachments:
        for module in att.modules.values():
            for _, param in module.own_parameters():
                return param.device
        for param in att.existing.values():
            return param.device
    return torch.device("cpu")


def route(model: nn.Module, names: Sequence[str | None]) -> Routing:
    """Route sample i of the next batches through the delta ``names[i]`` (``None``: the base model).

    Raises StateError for unknown names (listing the attached ones), a merged delta on the model, or a
    named delta whose methods cannot be routed per sample.
    """
    if isinstance(names, str) or not len(names):
        raise StateError(f"dt.route expects one delta name (or None) per sample, got {names!r}")
    names = list(names)
    used = [get_delta(model, n) for n in dict.fromkeys(n for n in names if n is not None)]
    check_switchable(model)
    for delta in used:
        check_routable(delta)
    previous = snapshot(model)
    for delta in deltas_of(model).values():
        delta.set_active(delta in used)
        mask = None
        if delta in used:
            mask = hard_mask([n == delta.name for n in names], _device(delta))  # core.routed_fold: why hard
            warn_shared_state(delta)
        for module in delta.modules():
            module.sample_scale = mask
    log.info("routing a batch of %d over deltas %s", len(names), [d.name for d in used])
    return Routing(model, names, previous)
