"""Many named deltas on one base model: switch which one is in effect, save and load them together.

Every named delta lives in the same model (wrappers nest), so they share the base weights; switching only
flips the modules' ``active`` flags, it never writes a weight. Rules (errors, not surprises):
- switching (activate / deactivate / active / route) refuses while another delta is merged into the base
  weights, because the merged delta cannot be switched off without writing weights: unmerge it first;
- ``Delta.merge`` refuses while another delta is in effect on one of its modules (see core/delta.py);
- ``train_modules`` (e.g. a task head) are per-delta copies and switch with their delta; parameters a
  method trains in place (BitFit biases) belong to the base model: they are shared by all named deltas
  and never switched (a warning says so when it matters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..api import load
from ..core.checkpoint import atomic_directory, save_checkpoint
from ..core.delta import Delta, deltas_of
from ..core.errors import CheckpointError, CheckpointNotFoundError, StateError
from ..core.inject import DeltaModule

log = logging.getLogger(__name__)
INDEX_FILE = "deltas.json"


def deltas(model: nn.Module) -> dict[str, Delta]:
    """The named deltas attached to ``model`` (a copy: attach / detach change the model's own table)."""
    return dict(deltas_of(model))


def get_delta(model: nn.Module, name: str) -> Delta:
    """The delta named ``name``; StateError listing the attached names when there is none."""
    table = deltas_of(model)
    if name not in table:
        raise StateError(f"no delta named {name!r} on this model; attached: {sorted(table) or 'none'}")
    return table[name]


def check_switchable(model: nn.Module, keep: str | None = None) -> None:
    """Raise StateError if a delta other than ``keep`` is merged (it cannot be switched off)."""
    for delta in deltas_of(model).values():
        if delta.is_merged and delta.name != keep:
            raise StateError(f"delta {delta.name!r} is merged into the base weights, so it cannot be switched "
                             f"off; call dt.deltas(model)[{delta.name!r}].unmerge() first")


def warn_shared_state(delta: Delta) -> None:
    """Log when switching to ``delta`` cannot switch everything it trained (base parameters it trains)."""
    shared = [k for a in delta.attachments for k in a.existing]  # train_modules are per-delta copies
    if shared:
        log.warning("delta %r trains base parameters in place (%s); they are shared by every named delta "
                    "and are not switched", delta.name, ", ".join(shared[:4]))


def _modules(model: nn.Module) -> list[DeltaModule]:
    return [m for d in deltas_of(model).values() for m in d.modules()]


def clear_routing(model: nn.Module) -> None:
    for module in _modules(model):
        module.sample_scale = None


def activate(model: nn.Module, name: str) -> Delta:
    """Make ``name`` the only delta in effect (ends any per-sample routing); returns it."""
    delta = get_delta(model, name)
    check_switchable(model, keep=name)
    clear_routing(model)
    for other in deltas_of(model).values():
        if other is not delta:
            other.set_active(False)
    delta.set_active(True)
    warn_shared_state(delta)
    return delta


def deactivate(model: nn.Module) -> nn.Module:
    """Switch every delta off: the model behaves as the base model (ends any per-sample routing)."""
    check_switchable(model)
    clear_routing(model)
    for delta in deltas_of(model).values():
        delta.set_active(False)
    return model


def snapshot(model: nn.Module) -> list[tuple[DeltaModule, bool, torch.Tensor | None]]:
    """Which delta modules are active and how they are routed: what ``restore`` puts back."""
    return [(m, m.active, m.sample_scale) for m in _modules(model)]


def restore(state: list[tuple[DeltaModule, bool, torch.Tensor | None]]) -> None:
    for module, was_active, scale in state:
        module.active, module.sample_scale = was_active, scale


@contextlib.contextmanager
def active(model: nn.Module, name: str | None) -> Iterator[Delta | None]:
    """``with dt.active(model, "cola"):`` run with only ``cola`` in effect (``None``: the base model);
    the previous state (active deltas, routing) comes back on exit, also after an exception."""
    state = snapshot(model)
    delta = activate(model, name) if name is not None else None
    if name is None:
        deactivate(model)
    try:
        yield delta
    finally:
        restore(state)


def _check_dir_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise StateError(f"delta name {name!r} cannot be used as a directory name by save_all; "
                         f"rename it (detach and attach/load with another name)")


def save_all(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save every named delta to ``directory/<name>/`` (ordinary checkpoints) plus an index, atomically."""
    table = deltas_of(model)
    if not table:
        raise StateError("save_all: this model has no deltas attached")
    for name in table:
        _check_dir_name(name)
    # under per-sample routing several deltas are on at once; loading them all active would add them up
    routed = any(m.sample_scale is not None for m in _modules(model))
    in_effect = [] if routed else [n for n, d in table.items() if d.is_active]
    with atomic_directory(Path(directory)) as tmp:
        for name, delta in table.items():
            save_checkpoint(tmp / name, delta.state_dict(), delta.metadata())
        index = {"format_version": 1, "deltas": list(table), "active": in_effect}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return Path(directory)


def _read_index(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} is missing: {directory} was not written by dt.save_all "
                                      f"(load single checkpoints with dt.load)")
    try:
        index = json.loads(path.read_text())
        return {"deltas": list(index["deltas"]), "active": list(index.get("active", []))}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid delta index ({e})") from e


def load_all(model: nn.Module, directory: str | os.PathLike, names: list[str] | None = None,
             check_base: bool = True) -> dict[str, Delta]:
    """Load deltas written by ``save_all`` onto one base model (they share its weights); all or nothing.

    Which deltas were in effect at save time is restored (among those loaded; none if it was routed).
    """
    directory = Path(directory)
    index = _read_index(directory)
    wanted = index["deltas"] if names is None else names
    missing = sorted(set(wanted) - set(index["deltas"]))
    if missing:
        raise CheckpointError(f"{directory} holds no delta named {missing}; it holds {index['deltas']}")
    loaded: dict[str, Delta] = {}
    try:
        for name in wanted:
            loaded[name] = load(model, directory / name, name=name, check_base=check_base)
    except BaseException:
        for delta in reversed(loaded.values()):
            delta.detach()
        raise
    for name, delta in loaded.items():
        delta.set_active(name in index["active"])
    return loaded
