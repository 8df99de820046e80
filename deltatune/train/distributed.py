"""Multi-process data parallelism with plain ``torch.distributed``: the same command under ``torchrun`` or
``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).

No DistributedDataParallel wrapper: after backward, every trainable gradient (the delta is small) and the
loss are averaged in ONE all-reduce of a flat buffer. That keeps the model the user's own object, works for
every method (parameters that got no gradient count as zeros) and makes a NaN on any process visible to all
of them in the same step, so they stop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import DeltaError


class DistributedError(DeltaError, RuntimeError):
    """The processes of a multi-process run could not join or talk to each other."""


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # the base is split across processes (FSDP): every process must run every forward

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched with several processes (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    where = _device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        join(world, rank, "nccl" if where.type == "cuda" else "gloo")
    return Dist(rank, world, where)


def join(world: int, rank: int, backend: str) -> None:
    """``init_process_group``, with an error naming the endpoint when it cannot be reached in time.

    ``DELTATUNE_DIST_TIMEOUT`` (seconds, default 600) bounds the join and every later collective, so a
    process whose peer died stops with an error instead of waiting forever.
    """
    timeout = datetime.timedelta(seconds=float(os.environ.get("DELTATUNE_DIST_TIMEOUT", "600")))
    endpoint = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise DistributedError(f"process {rank} of {world} could not join the process group at {endpoint} "
                               f"within {timeout.total_seconds():.0f} s ({type(e).__name__}: {str(e)[:200]}). "
                               f"Check that every node can reach {endpoint} (firewall, the address of node 0 "
                               f"in --rdzv_endpoint / --master_addr) and that all {world} processes were "
                               f"started") from e


def cleanup(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def peers_watched(info: Dist, run_dir: object) -> Iterator[None]:
    """Turn a failed collective of a multi-process run into an error that says what most likely happened.

    When a process dies (killed, out of memory), gloo / NCCL raise a bare RuntimeError in the others at
    their next collective ("Connection closed by peer"); the launcher then stops them all. torch gives no
    narrower type for it, so any non-deltatune RuntimeError of a multi-process run is reported this way,
    with its own first line kept.
    """
    try:
        yield
    except RuntimeError as e:
        if info.world == 1 or isinstance(e, DeltaError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(f"process {info.rank} of {info.world} stopped: an operation that needs every process "
                               f"failed ({type(e).__name__}: {first}). Most often another process died or was "
                               f"killed first (the launcher's log names the first failure). Training continues from "
                               f"the last state in {run_dir} with the same command plus --resume") from e


def barrier(info: Dist) -> None:
    if info.world > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(info: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it: no duplicated work or races."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


def gather(info: Dist, obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (a one-item list without a process group)."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(info: Dist, params: list[nn.Parameter]) -> None:
    """Start every process from rank 0's trainable values (seeded inits agree already; this makes it certain)."""
    if info.world == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(info: Dist, params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients of ``params`` and ``loss`` over processes (one all-reduce); returns the loss."""
    if info.world == 1:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[-1]


def check_agreement(info: Dist, params: list[nn.Parameter]) -> None:
    """Raise if the processes' trainable values differ (they must be bit-identical after every step)."""
    if info.world == 1:
        return
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = gather(info, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel processes disagree on the trained weights ({digests}); this is a bug")
