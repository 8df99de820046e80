"""Peak memory per process of sharded (fsdp) and replicated (ddp) training, against one process.

Each row launches a short `deltatune train` (LoRA on a causal LM, 3 steps) and samples every worker's
USS and PSS (psutil, /proc/<pid>/smaps) every 0.1 s: USS counts the pages only that process holds, PSS
also its share of pages it shares (the safetensors file mapped by several processes), so neither is
inflated by shared pages the way RSS is. Two peaks per process: over the whole run ("load": loading,
sharding, training) and from the first logged step on ("train").

    python bench/make_random_llama.py /tmp/llama500m
    python bench/sharded_memory.py run --model /tmp/llama500m --rows single,ddp2,fsdp2
    python bench/sharded_memory.py table --out bench/results/sharded_memory.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROWS = {"single": ("single", 1), "ddp2": ("ddp", 2), "fsdp2": ("fsdp", 2), "fsdp4": ("fsdp", 4)}
GLOBAL_BATCH = 4
MIB = 1 << 20


def write_job(directory: Path, model: str) -> Path:
    words = "the model weight layer train shard memory process node delta rank step batch token loss block".split()
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(200)) for i in range(40)))
    job = {"task": "causal_lm", "seed": 0, "model": {"path": model},
           "data": {"train": str(corpus), "max_length": 64, "cache_dir": str(directory / "cache")},
           "delta": [{"method": "lora", "r": 8, "targets": "all-linear"}],
           "train": {"max_steps": 3, "global_batch_size": GLOBAL_BATCH, "learning_rate": 1e-4, "eval_every": "never",
                     "save_every": 1000, "log_every": 1, "progress": "never", "num_threads": 1}}
    path = directory / "job.yaml"
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


def command(mode: str, processes: int, job: Path, out: Path) -> list[str]:
    cli = ["-m", "deltatune.cli", "train", str(job), "--output_dir", str(out)]
    if processes == 1:
        return [sys.executable, *cli]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), *cli, "--train.distributed", mode]


def workers(launcher: psutil.Process, processes: int) -> list[psutil.Process]:
    if processes == 1:
        return [launcher]
    found = []
    for child in launcher.children():
        try:
            if "deltatune.cli" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited between listing and reading
            continue
    return found


def sample(proc: subprocess.Popen, processes: int, metrics: Path) -> dict[int, dict[str, float]]:
    """Per worker pid: peak USS / PSS in MiB over the whole run and from the first logged step on."""
    launcher = psutil.Process(proc.pid)
    peaks: dict[int, dict[str, float]] = {}
    while proc.poll() is None:
        training = metrics.exists() and metrics.stat().st_size > 0
        for worker in workers(launcher, processes):
            try:
                info = worker.memory_full_info()
            except psutil.Error:
                continue
            peak = peaks.setdefault(worker.pid, {"uss": 0.0, "pss": 0.0, "train_uss": 0.0, "train_pss": 0.0})
            peak["uss"], peak["pss"] = max(peak["uss"], info.uss / MIB), max(peak["pss"], info.pss / MIB)
            if training:
                peak["train_uss"] = max(peak["train_uss"], info.uss / MIB)
                peak["train_pss"] = max(peak["train_pss"], info.pss / MIB)
        time.sleep(0.1)
    return peaks


def run_row(row: str, model: str) -> dict:
    mode, processes = ROWS[row]
    directory = Path(tempfile.mkdtemp(prefix=f"shardmem-{row}-"))
    try:
        job, out = write_job(directory, model), directory / "run"
        cmd = command(mode, processes, job, out)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peaks = sample(proc, processes, out / "metrics.jsonl")
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"{row} failed:\n{err[-3000:]}")
        held = [line for line in err.splitlines() if line.startswith("fsdp:")]
        malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        seconds = round(time.perf_counter() - started, 1)
        return {"row": row, "mode": mode, "processes": processes, "model": model, "seconds": seconds,
                "peaks": list(peaks.values()), "fsdp_log": held[:1], "malloc_env": malloc,
                "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB",
                "date": datetime.date.today().isoformat()}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| row | glibc malloc env | processes | peak USS / process MiB (whole run) | "
          "peak PSS / process MiB (whole run) | peak USS / process MiB (train) | peak PSS / process MiB (train) | "
          "sum of PSS MiB (whole run) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["peaks"]
        def span(key: str, peaks=p) -> str:
            values = sorted(round(x[key]) for x in peaks)
            return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"
        malloc = " ".join(f"{k}={v}" for k, v in r.get("malloc_env", {}).items()) or "default"
        print(f"| {r['row']} | {malloc} | {r['processes']} | {span('uss')} | {span('pss')} | {span('train_uss')} | "
              f"{span('train_pss')} | {round(sum(x['pss'] for x in p))} | {r['seconds']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "table"))
    parser.add_argument("--model", default="/tmp/llama500m")
    parser.add_argument("--rows", default="single,ddp2,fsdp2")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sharded_memory.jsonl"))
    args = parser.parse_args()
    if args.what == "table":
        table(args.out)
        return
    for row in args.rows.split(","):
        record = run_row(row, args.model)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
