"""A run started right after another job: CPU threads decided by the old rule vs re-decided while running.

    python bench/threads.py --rounds 2 --steps 60        # make bench-threads

Each round: a "previous job" keeps every core busy for ``--busy`` seconds (so the 1-minute load average is
high), ends, and a training run starts at once: the embedded default job (LoRA on the offline MiniLM,
batch 16), ``--steps`` steps, no evaluation, in a fresh process. Two ways, alternating which goes first:

* ``old``: the rule deltatune had before, emulated exactly: 1 thread when the 1-minute load average is
  >= cores - 0.5 at start (it is, right after the busy job), else all cores, kept for the whole run.
* ``new``: ``train.num_threads`` unset: train/threads.py measures what other processes use over the start-up
  and again every 10 s.

Reports each run's training seconds (summary.json ``train_time_s``), the thread decisions it logged, and
the per-round ratio old / new. Rows go to bench/results/threads.jsonl. Meaningful only on a machine with no
other work: the point is a machine that becomes idle.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "threads.jsonl"


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def previous_job(seconds: float) -> None:
    """Every core busy for ``seconds``, then nothing."""
    ctx = multiprocessing.get_context("fork")
    spinners = [ctx.Process(target=_spin, args=(seconds,)) for _ in range(os.cpu_count() or 1)]
    for p in spinners:
        p.start()
    for p in spinners:
        p.join()


def old_rule_threads() -> int:
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores - 0.5 else cores


def run(mode: str, steps: int, out: Path) -> dict:
    load = os.getloadavg()[0]
    args = [sys.executable, "-m", "deltatune.cli", "train", "--train.max_steps", str(steps), "--train.eval_every",
            "never", "--train.save_every", str(steps), "--output_dir", str(out), "--overwrite"]
    if mode == "old":
        args += ["--train.num_threads", str(old_rule_threads())]
    began = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(f"{mode} run failed: {done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    decisions = re.findall(r"using ([\d >-]+) CPU thread\(s\) per process([^\n]*)", done.stderr)
    return {"mode": mode, "steps": steps, "train_time_s": summary["train_time_s"],
            "wall_s": round(time.perf_counter() - began, 2), "load1_at_start": round(load, 2),
            "threads": [f"{n.strip()}{why}" for n, why in decisions]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--busy", type=float, default=45.0, help="seconds the previous job keeps cores busy")
    args = parser.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times = {}
            for mode in (("old", "new") if r % 2 == 0 else ("new", "old")):
                previous_job(args.busy)
                row = run(mode, args.steps, Path(tmp) / mode)
                row.update(round=r, date=time.strftime("%Y-%m-%d %H:%M"), cores=os.cpu_count())
                print(json.dumps(row), flush=True)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
                times[mode] = row["train_time_s"]
            ratios.append(times["old"] / times["new"])
    print(f"old / new training time per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
