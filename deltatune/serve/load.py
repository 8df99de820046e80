"""Build the server's engine from the command line's words: a base model and ``NAME=DIR`` deltas.

Each DIR is a delta checkpoint (``dt.save``) or a training run directory (its best, else last checkpoint);
a run's config gives that delta's label names. The base is loaded once, the way training loads it
(``train.models``), and every delta is loaded onto it under its name (``dt.load``), sharing its weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..core.errors import CheckpointNotFoundError, ConfigError
from ..train.config import load_config
from ..train.jobs import locate
from ..train.models import guess_task, load_model, load_tokenizer
from .engine import Engine

log = logging.getLogger(__name__)


def parse_deltas(specs: list[str]) -> dict[str, str]:
    """``["sst2=runs/sst2", ...]`` -> ``{"sst2": "runs/sst2"}``; ConfigError for a malformed or repeated name."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise ConfigError(f"--delta {spec!r}: expected NAME=DIR, e.g. --delta sst2=runs/sst2")
        if name in found:
            raise ConfigError(f"--delta {name!r} is given twice; every delta needs its own name")
        found[name] = where
    return found


def load_engine(base: str, deltas: dict[str, str], task: str | None = None, gguf_file: str | None = None,
                dtype: str = "float32", device: str = "cpu", labels: list[str] | None = None,
                max_tokens: int | None = None) -> tuple[Engine, Any]:
    """The engine (base + every named delta) and its tokenizer."""
    task = task or ("causal_lm" if gguf_file else guess_task(base))
    if task == "instruction":
        task = "causal_lm"
    checkpoints: dict[str, Path] = {}
    run_labels: dict[str, list[str]] = {}
    for name, where in deltas.items():
        cfg, checkpoint = locate(where, model=base, task=task)
        if checkpoint is None:
            raise CheckpointNotFoundError(f"--delta {name}={where}: no checkpoint there (a run without best/ or "
                                          f"last/?); pass a checkpoint directory")
        checkpoints[name] = checkpoint
        if cfg.data.labels:
            run_labels[name] = list(cfg.data.labels)
    head = labels or next(iter(run_labels.values()), None)
    cfg = load_config(None, [("model.path", base), ("task", task), ("model.gguf_file", gguf_file),
                             ("model.dtype", dtype)], check_files=False)
    tokenizer = load_tokenizer(cfg.model)
    model, _ = load_model(cfg, head if task == "classification" else None, tokenizer.pad_token_id)
    model.to(torch.device(device))
    for name, checkpoint in checkpoints.items():
        load(model, checkpoint, name=name)
        log.info("delta %r loaded from %s", name, checkpoint)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = Engine(model, task, tokenizer.pad_token_id, eos, labels=run_labels, max_tokens=max_tokens)
    return engine, tokenizer
