"""USS / PSS of each process after loading and after sharding (train.distributed fsdp's load path), with
and without glibc returning freed memory (malloc_trim): does load-time memory fall as 1/N?

    torchrun --standalone --nproc_per_node 2 bench/sharded_load_phases.py /tmp/llama500m
"""

from __future__ import annotations

import ctypes
import gc
import sys

import psutil
import torch
import torch.distributed as dist

from deltatune.train import jobs, sharding
from deltatune.train.config import load_config
from deltatune.train.distributed import Dist


def report(rank: int, phase: str) -> None:
    gc.collect()
    found = psutil.Process().memory_full_info()
    print(f"rank {rank} {phase}: USS {found.uss / 2**20:.0f} MiB, PSS {found.pss / 2**20:.0f} MiB", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    info = Dist(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), sharded=True)
    cfg = load_config(None, [("task", "causal_lm"), ("model.path", sys.argv[1]), ("data.train", sys.argv[1]),
                             ("delta", [{"method": "lora", "r": 8, "targets": "all-linear"}])], check_files=False)
    report(info.rank, "started")
    model, delta = jobs.build_model(cfg, None, 0, info.device, sharded=True)
    report(info.rank, "loaded + LoRA attached")
    sharding.shard_model(model, delta, info)
    report(info.rank, "sharded")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    report(info.rank, "after malloc_trim")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
