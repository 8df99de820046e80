"""The headline of issue 21: LoRA on a 7B-class Llama (the Llama-2-7B shape, random weights) in 4 bits on a
2-core, 24 GB CPU machine, where the model does not fit in RAM in float32 (27 GB) and barely in bf16 (13.5 GB).

The model is written shard by shard by bench/make_random_llama7b.py. Each library runs in a fresh process that
loads it with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute float32)``, ``device_map="cpu"``,
``low_cpu_mem_usage=True`` (the 4-bit layers are quantized tensor by tensor from the bf16 shards), attaches
all-linear LoRA r=8 (alpha 16, no dropout), turns on activation checkpointing and trains 5 steps of AdamW
(lr 1e-3) on one batch of 1 x 128 random tokens (the same batch every step, so the loss must fall), then saves
the delta. deltatune also uses its fused output-layer loss (core/lm_loss.py: the 128 x 32,000 logits never exist).

Every run is capped: a watchdog in the parent reads the child's anonymous resident memory (``RssAnon``) every
0.5 s and kills it past ``--cap-gib`` (the machine has no swap, so a run past the free memory would take other
processes down instead of swapping); a run that trips it is recorded as a failure at that cap, with the steps
it finished. Why anonymous memory and not VmRSS: the loader maps the 13.5 GB of shards, and the pages it has
read count in VmRSS (``RssFile``) although they are clean page cache the kernel takes back under pressure; both
peaks are recorded (``peak_anon_mib`` is the number that must fit in RAM). ``ulimit -v`` cannot cap this run
for the same reason: mapping the shards alone takes 13.5 GB of address space.

    python bench/make_random_llama7b.py /work/models/llama7b-random   # once: ~13.5 GB of bf16 shards
    python bench/quant7b.py run --library dt --cap-gib 12 --out bench/results/quant7b.jsonl
    python bench/quant7b.py run --library peft --cap-gib 20 --out bench/results/quant7b.jsonl
    python bench/quant7b.py table --out bench/results/quant7b.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = Path(os.environ.get("DELTATUNE_7B", "/work/models/llama7b-random"))
LENGTH, STEPS, LR = 128, 5, 1e-3
ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # as bench/quant.py, for both libraries


def rss_mib(pid: int | str = "self", key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def emit(row: dict, rows: Path) -> None:
    """Append a JSON line to ``rows``, flushed: the parent keeps the last one even if it has to kill the run."""
    with rows.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load(path: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32,
                                                low_cpu_mem_usage=True)


def prepare(model, library: str):
    """(what to call for the loss, the trainable parameters, a function saving the delta to a directory)."""
    kwargs = {"use_reentrant": False}
    if library == "dt":
        import deltatune as dt
        from deltatune.core.lm_loss import FusedLMLoss
        from deltatune.train.jobs import enable_activation_checkpointing

        enable_activation_checkpointing(model)
        delta = dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear"))
        return FusedLMLoss(model), list(delta.parameters().values()), delta.save
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # PEFT's documented QLoRA recipe: prepare_model_for_kbit_training turns on checkpointing and input grads
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs=kwargs)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    return (lambda batch: model(**batch).loss), [p for p in model.parameters() if p.requires_grad], \
        model.save_pretrained


def child(library: str, path: Path, steps: int, rows: Path) -> None:
    """Runs in the capped process; emits a row after loading and after every step."""
    from deltatune.train.jobs import cpu_threads

    threads = cpu_threads(None)  # 1 on a busy machine: 2 OpenMP threads on 2 busy cores wait on each other
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row = {"library": library, "threads": threads, "model": str(path), "steps_done": 0, "losses": [], "step_s": [],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg()[0]}
    began = time.perf_counter()
    model = load(path)
    loss_of, params, save = prepare(model, library)
    model.train()
    row |= {"load_s": round(time.perf_counter() - began, 1), "loaded_rss_mib": round(rss_mib(), 1),
            "load_peak_mib": round(rss_mib(key="VmHWM"), 1), "loaded_anon_mib": round(rss_mib(key="RssAnon"), 1),
            "trainable": sum(p.numel() for p in params)}
    emit(row, rows)
    ids = torch.randint(3, 32000, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    opt = torch.optim.AdamW(params, lr=LR)
    for _ in range(steps):
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        row["step_s"].append(round(time.perf_counter() - started, 1))
        row["losses"].append(round(loss.item(), 5))
        row["steps_done"] += 1
        row["peak_mib"] = round(rss_mib(key="VmHWM"), 1)
        row["anon_mib"] = round(rss_mib(key="RssAnon"), 1)
        row["load_avg"] = os.getloadavg()[0]
        emit(row, rows)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        files = [f for f in Path(tmp).rglob("*") if f.is_file()]
        row["checkpoint_bytes"] = sum(f.stat().st_size for f in files)
        row["checkpoint_files"] = sorted(f.name for f in files)
    row["peak_mib"] = round(rss_mib(key="VmHWM"), 1)
    row["ok"] = True
    emit(row, rows)


def capped(library: str, path: Path, steps: int, cap_gib: float, out: Path) -> dict:
    """Runs ``child`` in a fresh process under the RSS watchdog; appends its last row (or its failure) to out."""
    rows = Path(tempfile.mkdtemp()) / "rows.jsonl"
    cmd = [sys.executable, __file__, "child", "--library", library, "--model", str(path), "--steps", str(steps),
           "--rows", str(rows)]
    proc = subprocess.Popen(cmd, env=os.environ | ENV)
    cap_mib, seen, seen_rss, killed = cap_gib * 1024, 0.0, 0.0, False
    while proc.poll() is None:
        try:
            seen = max(seen, rss_mib(proc.pid, "RssAnon"))
            seen_rss = max(seen_rss, rss_mib(proc.pid))
        except (FileNotFoundError, KeyError, ProcessLookupError):
            pass
        if seen > cap_mib and not killed:
            proc.kill()
            killed = True
        time.sleep(0.5)
    lines = rows.read_text().splitlines() if rows.is_file() else []
    row = json.loads(lines[-1]) if lines else {"library": library, "steps_done": 0}
    row |= {"cap_gib": cap_gib, "peak_anon_mib": round(seen, 1), "peak_rss_mib": round(seen_rss, 1),
            "returncode": proc.returncode,
            "ok": bool(row.get("ok")) and not killed,
            "failure": (f"killed by the watchdog at {seen:,.0f} MiB anonymous > cap {cap_mib:,.0f} MiB" if killed
                        else None if row.get("ok") else f"exited with {proc.returncode}"),
            "cmd": " ".join(cmd), "env": ENV}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(summary(row), flush=True)
    return row


def summary(row: dict) -> str:
    steps = ", ".join(f"{v:.0f}" for v in row.get("step_s", []))
    losses = " ".join(f"{v:.4f}" for v in row.get("losses", []))
    size = f"{row['checkpoint_bytes'] / 2**20:.1f} MiB" if "checkpoint_bytes" in row else "-"
    state = "ok" if row.get("ok") else f"FAILED ({row.get('failure')})"
    gib = lambda key: f"{row[key] / 1024:.2f}" if key in row else "-"
    return (f"| {row['library']} | {state} | {gib('peak_anon_mib')} | {gib('peak_rss_mib')} | {gib('loaded_anon_mib')} "
            f"| {row.get('load_s', '-')} | {steps} | {losses} | {size} | {row.get('load_avg', '-')} |")


def table(out: Path) -> None:
    print("| library | result | peak anon RSS GiB | peak VmRSS GiB (with mapped shards) | loaded anon GiB | load s "
          "| step s | loss per step | checkpoint | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in out.read_text().splitlines():
        if line.strip():
            print(summary(json.loads(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "child", "table"])
    parser.add_argument("--library", choices=["dt", "peft"], default="dt")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cap-gib", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/quant7b.jsonl"))
    parser.add_argument("--rows", type=Path, help="(child) where to append progress rows")
    args = parser.parse_args()
    if args.command == "child":
        child(args.library, args.model, args.steps, args.rows)
    elif args.command == "run":
        if not (args.model / "config.json").is_file():
            sys.exit(f"no model at {args.model}: run python bench/make_random_llama7b.py {args.model} first")
        capped(args.library, args.model, args.steps, args.cap_gib, args.out)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
