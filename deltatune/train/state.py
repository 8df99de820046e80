"""Training-state checkpoints: everything ``--resume`` needs to continue as if never stopped.

A state checkpoint holds the delta's tensors, the optimizer's state, the scheduler, the gradient scaler,
every process' RNG states (torch, CUDA, numpy, python) and the data position (epoch, batches consumed,
optimizer steps). It is written like a delta checkpoint (core/checkpoint.py): one safetensors file plus
JSON with the file's SHA-256, in a temporary directory renamed into place, so ``kill -9`` at any moment
leaves either the previous state or the new one, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checkpoint import atomic_directory, read_meta, read_tensors, write_files
from ..core.delta import Delta
from ..core.errors import CheckpointError

KIND = "deltatune-train-state"


@dataclasses.dataclass
class Progress:
    """Where training is, and what it has found so far (saved with every state checkpoint)."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # the epoch in progress
    batch: int = 0           # batches of that epoch already consumed (always a whole number of steps)
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    elapsed_s: float = 0.0   # wall time spent in earlier sessions of this run
    finished: bool = False


def rng_state() -> dict[str, Any]:
    """This process' RNG states, as tensors and JSON-able values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def save_state(directory: Path, delta: Delta, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, progress: Progress, rng_states: list[dict[str, Any]]) -> None:
    """Atomically write the training state (``rng_states``: one entry per process, in rank order)."""
    tensors = {f"delta/{k}": v for k, v in delta.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    shared: set[int] = set()
    for index, entry in optim["state"].items():
        for name, value in _flat(entry):
            if torch.is_tensor(value):
                # safetensors refuses two keys on one storage; bitsandbytes' 8-bit optimizers share a code map
                tensors[f"optim/{index}/{name}"] = value.clone() if value.data_ptr() in shared else value
                shared.add(value.data_ptr())
            else:
                scalars[f"{index}/{name}"] = value
    rng_meta = []
    for rank, state in enumerate(rng_states):
        tensors.update({f"rng/{rank}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
        rng_meta.append({k: v for k, v in state.items() if not torch.is_tensor(v)})
    meta = {"kind": KIND, "progress": dataclasses.asdict(progress), "param_groups": _jsonable(optim["param_groups"]),
            "optimizer_scalars": scalars, "scheduler": _jsonable(scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_meta}
    with atomic_directory(directory) as tmp:
        write_files(tmp, tensors, meta)


@dataclasses.dataclass
class LoadedState:
    progress: Progress
    delta: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[dict[str, Any]]


def _flat(entry: dict[str, Any], prefix: str = ""):
    """(name, value) pairs of one parameter's optimizer state; nested dicts (bitsandbytes' 8-bit optimizers keep
    their quantized moments under one key) become ``outer/inner`` names."""
    for name, value in entry.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


def _put(entry: dict[str, Any], name: str, value: Any) -> None:
    """Inverse of ``_flat`` for one value."""
    *outer, leaf = name.split("/")
    for part in outer:
        entry = entry.setdefault(part, {})
    entry[leaf] = value


def load_state(directory: Path, optimizer: torch.optim.Optimizer) -> LoadedState:
    """Read a state checkpoint (checksum verified); ``optimizer`` gives the shape of its param groups."""
    where, meta = read_meta(directory)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{where} is not a deltatune training state (kind {meta.get('kind')!r})")
    tensors = read_tensors(where, meta)
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            _put(state.setdefault(int(index), {}), name, value)
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split("/", 1)
        _put(state.setdefault(int(index), {}), name, value)
    rng = [dict(m) for m in meta["rng"]]
    for key, value in tensors.items():
        if key.startswith("rng/"):
            _, rank, name = key.split("/", 2)
            rng[int(rank)][name] = value
    delta = {k[len("delta/"):]: v for k, v in tensors.items() if k.startswith("delta/")}
    return LoadedState(Progress(**meta["progress"]), delta, {"state": state, "param_groups": groups},
                       meta["scheduler"], meta["scaler"], rng)
