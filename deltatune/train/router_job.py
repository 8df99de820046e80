"""``deltatune train router.yaml`` and ``deltatune eval RUN_DIR`` for a learned router over finished runs.

A router config names finished ``deltatune train`` runs; each one's best delta becomes a named delta on one
shared base model, and a router (compose/router.py) learns to tell the runs' inputs apart::

    router:
      runs: {sst2: runs/sst2, mrpc: runs/mrpc, cola: runs/cola}  # name -> run dir (its best/ delta, its data)
      samples_per_run: 1000   # the first N training examples of each run's data.train: the router's data
      mode: hard              # hard: one delta per sample; soft: a softmax mix (LoRA-like, adapters)
      hidden: null            # null: a linear router; N: one hidden layer of width N
      features: embeddings    # embeddings: mean input embedding (cheap); hidden: the frozen model's mean
                              # last hidden state (one more forward per call); tokens: a bag of token ids
                              # (cheapest; needs many samples_per_run, learns more from them)
      bigram_buckets: 262144  # features=tokens: neighbouring token pairs hashed into N buckets; 0: none
      epochs: 100             # full-batch steps on the fixed features
      learning_rate: 0.01
    train: {eval_batch_size: 64, num_threads: null}
    seed: 0

Each run's own config.yaml gives its data and tokenisation; the runs must share the base model (path,
tokenizer, dtype, task, number of labels). The run directory holds ``deltas/`` (``dt.save_all``),
``router/`` (``router.save``), ``config.yaml`` and ``summary.json``; ``deltatune eval`` on it writes
``eval.json``: every task's validation set run twice, routed (the router chooses, in batches that mix the
tasks) and oracle (``dt.active(model, name)``), plus the router's accuracy per task.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from inspect import signature
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError
from torch import nn

from ..api import load
from ..compose.named import active, load_all, save_all
from ..compose.router import BIGRAM_BUCKETS, Router, attach_router, load_router
from ..core.checkpoint import CONFIG_FILE
from ..core.errors import ConfigError
from .batches import Encoded
from .config import RunConfig, Section, apply_overrides, load_config, read_yaml
from .data import load_split
from .jobs import cpu_threads
from .loop import seed_everything
from .metrics import classification_metrics
from .models import load_model, load_tokenizer

log = logging.getLogger(__name__)
ROUTER_FILES = ("deltas", "router", "config.yaml", "summary.json", "eval.json")
METRICS = ("accuracy", "f1", "mcc")


class RouterSection(Section):
    runs: dict[str, str]                     # delta name -> finished run directory (its best/ checkpoint)
    samples_per_run: PositiveInt = 1000      # first N training examples per run; features=tokens gains from many
    mode: Literal["hard", "soft"] = "hard"   # hard: exact per-sample routing, any routable method; soft: a mix
    hidden: PositiveInt | None = None        # None: linear on the features; N: one hidden layer (non-linear)
    features: Literal["embeddings", "hidden", "tokens"] = "embeddings"  # what the router reads: cost vs accuracy
    bigram_buckets: NonNegativeInt = BIGRAM_BUCKETS  # features=tokens: hashed token pairs; 0: single tokens
    epochs: PositiveInt = 100                # full-batch optimizer steps on fixed features (cheap)
    learning_rate: PositiveFloat = 0.01


class RouterTrain(Section):
    eval_batch_size: PositiveInt = 64        # feature and evaluation batches
    num_threads: PositiveInt | None = None   # torch CPU threads; None: as for training runs


class RouterRunConfig(Section):
    router: RouterSection
    train: RouterTrain = Field(default_factory=RouterTrain)
    seed: int = 0
    run_name: str | None = None              # None: the config file's stem
    output_dir: str | None = None            # None: runs/<run_name>

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- the config -------------------------------------------------------------------------------------

def is_router_config(path: str | os.PathLike) -> bool:
    """A config with a top-level ``router:`` section describes a router job, not a delta training run."""
    return "router" in read_yaml(path)


def is_router_run(path: str | os.PathLike) -> bool:
    return (Path(path) / "router" / "router.json").is_file() and (Path(path) / "config.yaml").is_file()


def _problems(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            schema = {(): RouterRunConfig, ("router",): RouterSection, ("train",): RouterTrain}.get(tuple(parent))
            allowed = f"; allowed: {', '.join(schema.model_fields)}" if schema else ""
            lines.append(f"unknown key '{key}'{allowed}")
        else:
            lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
    return "; ".join(lines)


def load_router_config(path: str | os.PathLike, overrides: list[tuple[str, Any]] | None = None) -> RouterRunConfig:
    """Read, override and validate a router config; resolve run_name and output_dir (nothing is loaded)."""
    data = read_yaml(path)
    data = apply_overrides(data, overrides) if overrides else data  # its copy sorts keys: keep the runs' order
    try:
        cfg = RouterRunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {path}: {_problems(e)}") from None
    cfg.run_name = cfg.run_name or Path(path).stem
    cfg.output_dir = cfg.output_dir or str(Path("runs") / cfg.run_name)
    return cfg


def _run_config(name: str, where: str) -> RunConfig:
    """The resolved config of the finished run ``where``, which must have a best checkpoint and a validation set."""
    key, run = f"router.runs.{name}", Path(where)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{key}: {where!r} is not a run directory (no config.yaml); give the output_dir of a "
                          f"finished `deltatune train` run")
    if not (run / "best" / CONFIG_FILE).is_file():
        raise ConfigError(f"{key}: run {where!r} has no best checkpoint (best/{CONFIG_FILE}); it is written when a "
                          f"run evaluates, so train it with data.validation set")
    cfg = load_config(run / "config.yaml", check_files=True)
    if cfg.task != "classification":
        raise ConfigError(f"{key}: run {where!r} is a {cfg.task} run; the router job routes classification "
                          f"runs (route language models from Python: dt.attach_router)")
    if cfg.data.validation is None:
        raise ConfigError(f"{key}: run {where!r} has no data.validation, so routing on it cannot be measured")
    return cfg


def _base_of(cfg: RunConfig) -> dict[str, Any]:
    """What must be equal for two runs' deltas to live on one base model."""
    m = cfg.model
    return {"model.path": m.path, "model.tokenizer": m.tokenizer or m.path, "model.dtype": m.dtype,
            "model.gguf_file": m.gguf_file, "labels": len(cfg.data.labels or [])}


def check_runs(cfg: RouterRunConfig) -> dict[str, RunConfig]:
    """Every run's config, checked before any model is loaded: at least two, all on one base model."""
    runs = cfg.router.runs
    if len(runs) < 2:
        raise ConfigError(f"router.runs: a router chooses among at least two runs, got {list(runs) or 'none'}")
    bad = [n for n in runs if not n or n.startswith(".") or "/" in n]
    if bad:
        raise ConfigError(f"router.runs: {bad} cannot name a delta (they become directory names under deltas/)")
    configs = {name: _run_config(name, where) for name, where in runs.items()}
    first, base = next(iter(configs.items()))
    for name, run_cfg in configs.items():
        differ = {k: (v, _base_of(run_cfg)[k]) for k, v in _base_of(base).items() if _base_of(run_cfg)[k] != v}
        if differ:
            shown = "; ".join(f"{k}: {a!r} ({first}) vs {b!r} ({name})" for k, (a, b) in differ.items())
            raise ConfigError(f"router.runs: runs {first!r} and {name!r} were trained on different base models "
                              f"({shown}); a router chooses among deltas of one base model")
    return configs


def dump_router_config(cfg: RouterRunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# -- data -------------------------------------------------------------------------------------------

def task_data(configs: dict[str, RunConfig], tokenizer, samples: int | None) -> tuple[dict, dict]:
    """Each run's first ``samples`` training examples and its validation set, tokenised by its own config."""
    train_sets, eval_sets = {}, {}
    for name, run_cfg in configs.items():
        if samples is not None:
            run_cfg = run_cfg.model_copy(deep=True)
            run_cfg.data.max_train_samples = samples
            train_sets[name] = load_split(run_cfg, tokenizer, "train", run_cfg.data.labels)
        eval_sets[name] = load_split(run_cfg, tokenizer, "validation", run_cfg.data.labels)
    return train_sets, eval_sets


def mixed_collate(sets: dict[str, Encoded], items: list[tuple[str, int]], pad_id: int) -> dict[str, Any]:
    """One right-padded batch of examples from several tasks; ``route`` and ``index`` say where each row is from."""
    rows = [(sets[name], int(sets[name].offsets[i]), int(sets[name].offsets[i + 1])) for name, i in items]
    width = max(e - s for _, s, e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids) if any(d.token_type_ids is not None for d, _, _ in rows) else None
    for row, (data, s, e) in enumerate(rows):
        ids[row, : e - s], mask[row, : e - s] = data.input_ids[s:e], 1
        if types is not None and data.token_type_ids is not None:
            types[row, : e - s] = data.token_type_ids[s:e]
    batch = {"input_ids": ids, "attention_mask": mask, "route": [name for name, _ in items],
             "index": [i for _, i in items]}
    return batch if types is None else {**batch, "token_type_ids": types}


def batches_of(sets: dict[str, Encoded], batch_size: int, pad_id: int, seed: int | None = None) -> list[dict]:
    """All examples of all sets in batches: task by task (``seed=None``) or shuffled together (mixed)."""
    items = [(name, i) for name, data in sets.items() for i in range(len(data))]
    if seed is not None:
        random.Random(seed).shuffle(items)
    return [mixed_collate(sets, items[i:i + batch_size], pad_id) for i in range(0, len(items), batch_size)]


# -- training ---------------------------------------------------------------------------------------

def base_and_deltas(configs: dict[str, RunConfig]) -> tuple[Any, nn.Module]:
    """Tokenizer and the shared base model, loaded once, with each run's best delta under its name."""
    first = next(iter(configs.values()))
    tokenizer = load_tokenizer(first.model)
    model, _ = load_model(first, first.data.labels, tokenizer.pad_token_id)
    model.eval()
    for name, run_cfg in configs.items():
        load(model, Path(run_cfg.output_dir) / "best", name=name)
    return tokenizer, model


def check_output(run_dir: Path, overwrite: bool) -> None:
    used = [n for n in ROUTER_FILES if (run_dir / n).exists()]
    if used and not overwrite:
        raise ConfigError(f"{run_dir} already holds a router run ({', '.join(used)}); pass --overwrite to replace "
                          f"it, or --output_dir DIR for a new one")
    for name in used if overwrite else []:
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()


def write_text(path: Path, text: str) -> None:
    """Written next to its final name, then renamed: a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def fit_router(cfg: RouterRunConfig, model: nn.Module, train_sets: dict[str, Encoded], pad_id: int) -> Router:
    """Attach a router over the runs' deltas and fit it on their training texts, labelled with the run's name."""
    r = cfg.router
    router = attach_router(model, list(r.runs), mode=r.mode, hidden=r.hidden, features=r.features,
                           bigram_buckets=r.bigram_buckets)
    router.fit(batches_of(train_sets, cfg.train.eval_batch_size, pad_id), epochs=r.epochs, lr=r.learning_rate,
               seed=cfg.seed)
    return router


def train_router(cfg: RouterRunConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run the router job described by ``cfg``; returns the summary written to summary.json."""
    configs = check_runs(cfg)
    run_dir = Path(cfg.output_dir)
    check_output(run_dir, overwrite)
    torch.set_num_threads(cpu_threads(cfg.train.num_threads))
    seed_everything(cfg.seed)
    tokenizer, model = base_and_deltas(configs)
    train_sets, eval_sets = task_data(configs, tokenizer, cfg.router.samples_per_run)
    started = time.perf_counter()
    router = fit_router(cfg, model, train_sets, tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    size = cfg.train.eval_batch_size
    summary = {
        "run_dir": str(run_dir), "model": next(iter(configs.values())).model.path, "mode": cfg.router.mode,
        "deltas": {name: str(Path(c.output_dir) / "best") for name, c in configs.items()},
        "train_samples": {name: len(d) for name, d in train_sets.items()}, "fit_seconds": round(seconds, 2),
        "router_train_accuracy": router.fit_accuracy,
        "router_accuracy": {name: router.accuracy(batches_of({name: d}, size, tokenizer.pad_token_id))
                            for name, d in eval_sets.items()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    router.disable()  # save_all records which deltas are active; routing state is not part of it
    save_all(model, run_dir / "deltas")
    router.save(run_dir / "router")
    write_text(run_dir / "config.yaml", dump_router_config(cfg))
    write_json(run_dir / "summary.json", summary)
    return summary


# -- evaluation -------------------------------------------------------------------------------------

def _forward_kwargs(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    accepted = signature(model.forward).parameters  # token_type_ids only where the model takes them
    return {k: v for k, v in batch.items() if k in accepted and isinstance(v, torch.Tensor)}


@torch.no_grad()
def predictions(model: nn.Module, sets: dict[str, Encoded], batches: list[dict],
                router: Router | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each task's predicted class per example (in the set's order), and the router's choice per example
    (the delta it routed to, as an index into ``router.names``; empty without a router)."""
    preds = {name: torch.full((len(d),), -1) for name, d in sets.items()}
    chosen = {name: torch.full((len(d),), -1) for name, d in sets.items()}
    for batch in batches:
        out = model(**_forward_kwargs(model, batch)).logits.argmax(-1)
        picks = [router.names.index(n) for n in router.last_choice] if router is not None else [-1] * len(out)
        for row, (name, i) in enumerate(zip(batch["route"], batch["index"], strict=True)):
            preds[name][i], chosen[name][i] = out[row], picks[row]
    return preds, chosen


def _headline(metric: str | None) -> str:
    return metric if metric in METRICS else "accuracy"


def evaluate_router_run(run_dir: str | os.PathLike, batch_size: int | None = None) -> dict[str, Any]:
    """Routed vs oracle metrics per task on the runs' validation sets; written to RUN_DIR/eval.json."""
    run_dir = Path(run_dir)
    cfg = load_router_config(run_dir / "config.yaml")
    configs = check_runs(cfg)
    torch.set_num_threads(cpu_threads(cfg.train.num_threads))
    first = next(iter(configs.values()))
    tokenizer = load_tokenizer(first.model)
    model, _ = load_model(first, first.data.labels, tokenizer.pad_token_id)
    model.eval()
    load_all(model, run_dir / "deltas")
    router = load_router(model, run_dir / "router", enable=False)
    _, sets = task_data(configs, tokenizer, None)
    size, pad = batch_size or cfg.train.eval_batch_size, tokenizer.pad_token_id
    oracle = {}
    for name in sets:
        with active(model, name):
            oracle.update(predictions(model, {name: sets[name]}, batches_of({name: sets[name]}, size, pad))[0])
    with router:
        routed, chosen = predictions(model, sets, batches_of(sets, size, pad, seed=cfg.seed), router)
    rows = [_row(name, configs[name], sets[name], oracle[name], routed[name], chosen[name], router) for name in sets]
    result = {"run_dir": str(run_dir), "mode": cfg.router.mode, "tasks": rows}
    write_json(run_dir / "eval.json", result)
    return result


def _row(name: str, run_cfg: RunConfig, data: Encoded, oracle: torch.Tensor, routed: torch.Tensor,
         chosen: torch.Tensor, router: Router) -> dict[str, Any]:
    classes = len(data.label_names)
    metric = _headline(run_cfg.train.metric)
    scores = {"oracle": classification_metrics(oracle, data.labels, classes),
              "routed": classification_metrics(routed, data.labels, classes)}
    return {"task": name, "metric": metric, "examples": len(data),
            "oracle": scores["oracle"][metric], "routed": scores["routed"][metric],
            "router_accuracy": float((chosen == router.names.index(name)).float().mean()),
            "routed_to": {other: float((chosen == k).float().mean()) for k, other in enumerate(router.names)},
            "same_prediction": float((oracle == routed).float().mean()),
            "all_metrics": scores}  # a headline metric can hide a change (MCC 0 for any constant answer)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['mode']} routing, {result['run_dir']}",
             "| task | metric | examples | oracle | routed | router accuracy | same prediction |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['examples']} | {r['oracle']:.4f} | {r['routed']:.4f} | "
              f"{r['router_accuracy']:.4f} | {r['same_prediction']:.4f} |" for r in result["tasks"]]
    return "\n".join(lines)
