"""Fixtures for the auto tests: a saved tiny BERT with a word-level tokenizer and a small learnable
sentiment task (from tests/train's helpers), and a base training config for races and searches.

One torch thread: the models are tiny, and on a shared 2-core machine a second OpenMP thread only spins
(a 40-step run took ~15 s instead of ~0.5 s under load with 2 threads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import tiny_bert
from tests.train.conftest import make_tokenizer, write_tsv

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    """A saved 2-layer BERT (no dropout: runs are deterministic) and train/dev TSVs of the toy sentiment task."""
    root = tmp_path_factory.mktemp("auto_task")
    make_tokenizer(root / "model")
    model = tiny_bert(num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "model")
    return {"model": root / "model", "train": write_tsv(root / "train.tsv", 96, seed=1),
            "dev": write_tsv(root / "dev.tsv", 32, seed=2)}


def base_config(task: dict[str, Path], **train: Any) -> dict[str, Any]:
    """A training config on the tiny task: few steps, an evaluation every 5 steps, no data cache."""
    return {
        "task": "classification", "seed": 0,
        "model": {"path": str(task["model"])},
        "data": {"train": str(task["train"]), "validation": str(task["dev"]), "cache": False, "max_length": 16},
        "delta": [{"method": "lora", "r": 4, "targets": ["query", "value"]}],
        "train_modules": ["classifier"],  # the saved tiny model has its (random) head: train it
        "train": {"max_steps": 20, "batch_size": 16, "eval_every": 5, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "save_every": None, "log_every": 5, "device": "cpu", "progress": "never", **train},
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
