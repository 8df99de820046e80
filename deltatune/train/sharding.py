"""Sharded training (``train.distributed: fsdp``): the frozen base is split across processes by torch's
FSDP2 ``fully_shard``; the delta stays whole in every process.

What is sharded: every parameter of the base model. ``fully_shard`` is applied to each transformer block
(found from the module tree by ``core.structure.block_paths``, the same rule that places adapters; no
per-architecture table), then to the root, which takes what is left (embeddings, final norm, output
layer, a frozen classifier). Each process keeps 1/N of every base tensor and gathers one block at a time
for its forward and backward.

What stays whole: the delta's own parameters and ``train_modules`` (``ignored_params``). They are a small
fraction of the model, so replicating them costs little and keeps everything downstream exactly the
single-process code: the hand-written all-reduce of ``train/distributed.py`` averages their gradients,
AdamW holds state only for them, checkpoints, ``--resume`` and ``dt.load`` see plain tensors, and the
bit-for-bit agreement check after training still holds. The base is frozen, so FSDP never reduces a
gradient: its only communication is the all-gather of the weights.

Loading: every process loads the model as usual. transformers maps the safetensors file without reading
it (when the file's dtype is the model's), and ``fully_shard`` copies only this process' rows of each
tensor, so no process materialises the whole base (measured in docs/distributed.md; a rank-0 load with a
broadcast to meta-device processes was tried and held more memory, see there).

Why not ``Accelerator``: accelerate's FSDP2 plugin calls this same ``fully_shard``; moving the loop onto it
would add a second owner of the optimizer, the schedule and the checkpoints without sharding anything
more. ``accelerate launch`` with an FSDP config is honoured (``auto`` reads its environment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from torch import nn
from torch.distributed.tensor import DTensor

from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.structure import block_paths
from .batches import eval_batches
from .config import RunConfig
from .distributed import Dist

log = logging.getLogger(__name__)
MODES = ("auto", "ddp", "fsdp", "deepspeed")
MIB = 1 << 20


def resolve_mode(configured: str, world: int, env: Mapping[str, str] = os.environ) -> str:
    """The engine this run uses: ``single`` (one process), ``ddp``, ``fsdp`` or ``deepspeed``.

    ``auto`` follows the launcher: ``accelerate launch`` with an FSDP or DeepSpeed config exports
    ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED; otherwise several processes replicate (ddp).
    """
    if configured not in MODES:
        raise ConfigError(f"train.distributed must be one of {', '.join(MODES)}, got {configured!r}")
    if configured == "auto":
        if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
            configured = "deepspeed"
        elif _flag(env, "ACCELERATE_USE_FSDP"):
            configured = "fsdp"
        else:
            configured = "ddp"
    if world == 1 and configured in ("ddp", "fsdp"):
        if configured == "fsdp":
            log.info("train.distributed fsdp with one process: nothing to shard, training in one process")
        return "single"
    return configured


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true", "yes")


def check_settings(cfg: RunConfig, mode: str) -> None:
    """Refuse settings that sharding cannot honour, before any model is loaded (each names what to change)."""
    t = cfg.train
    if mode == "deepspeed":
        raise ConfigError("train.distributed deepspeed is not wired into the training loop yet: DeepSpeed ZeRO-3 "
                          "itself runs (bench/engine_probes.py), but its engine would own backward, the optimizer step "
                          "and a partitioned optimizer state that deltatune's checkpoints and --resume do not cover "
                          "yet (docs/distributed.md). Use train.distributed fsdp, which shards the frozen base the "
                          "same way with torch's FSDP2")
    if mode != "fsdp":
        return
    refused = {
        "train.fused_loss": (t.fused_loss, "it runs the model's trunk without its root module, whose sharded "
                                           "embeddings FSDP gathers only in the root's forward"),
        "train.compile": (t.compile, "torch.compile of FSDP2 hooks is not tested here"),
        "train.onednn": (t.onednn, "it keeps its own copy of each frozen weight, which sharding splits up"),
    }
    for key, (value, why) in refused.items():
        if value:
            raise ConfigError(f"{key} cannot be combined with train.distributed fsdp: {why}. Set {key} to false, "
                              f"or use train.distributed ddp")


def shard_model(model: nn.Module, delta: Delta | None, info: Dist) -> int:
    """Apply FSDP2 to ``model``: each block, then the root. Returns the number of blocks.

    The delta's parameters are ``ignored_params``: FSDP neither shards nor moves them, so they are moved to
    the device here, after the base has been sharded (the whole base never lands on one device). A delta
    attached or loaded later (``dt.load`` onto the sharded model) is plain tensors too, outside FSDP.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    ignored = set(delta.parameters().values()) if delta is not None else set()
    paths = block_paths(model)
    if not paths:
        raise ConfigError(f"train.distributed fsdp: found no transformer blocks in {type(model).__name__} (no "
                          f"ModuleList of repeated layers holding Linear layers), so there is nothing to shard by "
                          f"block; use train.distributed ddp")
    for path in paths:
        fully_shard(model.get_submodule(path), mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    model.to(info.device)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if isinstance(p, DTensor))
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if isinstance(p, DTensor))
    log.info("fsdp: base sharded over %d processes (%d blocks + root): this process holds %.1f of its %.1f MiB; "
             "the delta (%d tensors) is replicated", info.world, len(paths), local / MIB, whole / MIB, len(ignored))
    return len(paths)


def idle_batches(info: Dist, lengths: list[int], batch_size: int, done: int) -> list[list[int]]:
    """Evaluation batches this process runs only to match rank 0's count of forwards (their results are dropped).

    Evaluation splits its batches across processes, so counts can differ by one; a sharded forward gathers
    weights from every process, and one process skipping it would leave the others waiting.
    """
    if not info.sharded:
        return []
    most = eval_batches(lengths, batch_size, info.world, 0)
    return [most[0]] * (len(most) - done)
