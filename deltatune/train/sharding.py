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

Why not ``Accelerator``: accelerate's FSDP2 plugin calls this same ``fully_shard``; moving the loop onto it
would add a second owner of the optimizer, the schedule and the checkpoints without sharding anything
more. ``accelerate launch`` with an FSDP config is honoured (``auto`` reads its environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
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
        return "single"  # one process: nothing to replicate or shard
    return configured


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true", "yes")


def check_settings(cfg: RunConfig, mode: str) -> None:
    """Refuse settings that sharding cannot honour, before any model is loaded (each names what to change)."""
    t = cfg.train
    if mode == "deepspeed":
        raise ConfigError("train.distributed deepspeed: DeepSpeed ZeRO-3 is not wired into the training loop in this "
                          "version (see docs/distributed.md for why); use train.distributed fsdp, which shards the "
                          "frozen base the same way with torch's own FSDP2")
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


def load_for_sharding(cfg: RunConfig, label_names: list[str] | None, pad_id: int | None,
                      info: Dist) -> tuple[nn.Module, list[str]]:
    """Rank 0 loads the checkpoint; every other process builds the same model on the meta device (no memory).

    ``shard_model(..., from_rank0=True)`` then hands each process its shards from rank 0, one tensor at a
    time, so only rank 0 ever holds the whole base, and only until it is sharded. The names of newly
    initialised parameters (a new head) come from rank 0 too. GGUF files are dequantised by transformers
    while loading, which has no meta-device form: every process loads those in full.
    """
    from .models import load_model

    if info.is_main or cfg.model.gguf_file:
        model, new = load_model(cfg, label_names, pad_id)
    else:
        model, new = _skeleton(cfg, label_names, pad_id), []
    shared = [new]
    dist.broadcast_object_list(shared, src=0)
    return model, shared[0]


def _skeleton(cfg: RunConfig, label_names: list[str] | None, pad_id: int | None) -> nn.Module:
    """The model ``load_model`` would return, with every tensor on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models import DTYPES

    kwargs: dict = {}
    auto = AutoModelForCausalLM
    if cfg.task == "classification":
        names = label_names or ["0", "1"]
        kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
        auto = AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(cfg.model.path, **kwargs)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=DTYPES[cfg.model.dtype])
    if getattr(model.config, "pad_token_id", None) is None and pad_id is not None:
        model.config.pad_token_id = pad_id
    return model


def is_skeleton(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def attach_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Where to attach the delta: on a skeleton, new tensors go to the meta device too (rank 0's values are
    broadcast later); elsewhere, nothing changes."""
    return torch.device("meta") if is_skeleton(model) else contextlib.nullcontext()


def shard_model(model: nn.Module, delta: Delta | None, info: Dist, from_rank0: bool = False) -> int:
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
    full = model.state_dict() if from_rank0 and info.is_main else {}  # rank 0's whole tensors, until handed out
    for path in paths:
        fully_shard(model.get_submodule(path), mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    if from_rank0:
        _receive_from_rank0(model, full, info)
        del full
    model.to(info.device)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if isinstance(p, DTensor))
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if isinstance(p, DTensor))
    log.info("fsdp: base sharded over %d processes (%d blocks + root): this process holds %.0f of its %.0f MiB; "
             "the delta (%d tensors) is replicated", info.world, len(paths), local / MIB, whole / MIB, len(ignored))
    return len(paths)


def _receive_from_rank0(model: nn.Module, full: dict[str, torch.Tensor], info: Dist) -> None:
    """Fill every process' shards (and whole tensors: the delta, buffers) from rank 0's loaded model.

    ``set_model_state_dict(broadcast_from_rank0=True)`` broadcasts one tensor at a time and keeps each
    process' shard of it. Buffers that are not saved (rotary ``inv_freq``) are not in a state dict: they
    are broadcast directly (they are small and FSDP does not shard buffers).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if is_skeleton(model):
        model.to_empty(device=info.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def idle_batches(info: Dist, lengths: list[int], batch_size: int, done: int) -> list[list[int]]:
    """Evaluation batches this process runs only to match rank 0's count of forwards (their results are dropped).

    Evaluation splits its batches across processes, so counts can differ by one; a sharded forward gathers
    weights from every process, and one process skipping it would leave the others waiting.
    """
    if not info.sharded:
        return []
    most = eval_batches(lengths, batch_size, info.world, 0)
    return [most[0]] * (len(most) - done)
