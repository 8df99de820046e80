"""Training runs for racing and search, on the project's own training loop (deltatune.train).

Nothing here trains by itself: a run is ``jobs``' data loading and model building, then ``loop.Loop`` with
two additions (``WatchedLoop``): a callback after every evaluation (search reports it to Optuna, which
may stop the trial) and an optional pause step (racing trains every candidate to a rung, compares them,
then continues the survivors exactly where they stopped: same optimizer, schedule and data position).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..train import distributed
from ..train.batches import Encoded, train_batches
from ..train.config import CLASSIFICATION_METRICS, LM_METRICS, RunConfig, load_config
from ..train.jobs import build_model, check_run_dir, init_run_dir, load_data, write_summary
from ..train.loop import Loop, Session
from ..train.report import write_report

log = logging.getLogger(__name__)
EvalCallback = Callable[[int, dict[str, float]], None]


class Paused(Exception):
    """Raised inside the loop at the pause step; the Loop object keeps everything needed to go on."""


class WatchedLoop(Loop):
    """``Loop`` plus ``on_eval(step, metrics)`` after each evaluation, and ``run_until(step)``."""

    def __init__(self, session: Session, on_eval: EvalCallback | None = None) -> None:
        super().__init__(session)
        self.on_eval = on_eval
        self.pause_at: int | None = None

    def evaluate_and_keep_best(self) -> dict[str, float]:
        found = super().evaluate_and_keep_best()
        if self.on_eval is not None:
            self.on_eval(self.progress.step, found)  # may raise (optuna.TrialPruned) to stop the run here
        if self.pause_at is not None and self.progress.step >= self.pause_at:
            raise Paused
        return found

    def run_until(self, step: int) -> bool:
        """Train up to ``step`` (which must be an evaluation step); True when the run is complete."""
        self.pause_at = step
        try:
            self.run()
        except Paused:
            return self.progress.step >= self.total
        return True


def config_with(base: dict[str, Any], overrides: list[tuple[str, Any]]) -> RunConfig:
    """A validated, resolved RunConfig from a raw config dict plus overrides (later ones win)."""
    return load_config(None, [(k, v) for k, v in base.items()] + list(overrides))


def metric_key(cfg: RunConfig, metric: str | None) -> str:
    """The ``eval_*`` key to compare runs by (default: the run's train.metric), checked against the task."""
    name = metric or cfg.train.metric
    allowed = CLASSIFICATION_METRICS if cfg.task == "classification" else LM_METRICS
    if name not in allowed:
        raise ConfigError(f"metric must be one of {', '.join(allowed)} for task {cfg.task}, got {name!r}")
    return name


def maximize(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


def require_evaluation(cfg: RunConfig, what: str) -> None:
    if cfg.data.validation is None or cfg.train.eval_every == "never":
        raise ConfigError(f"{what} compares runs on a validation metric: set data.validation and train.eval_every "
                          f"(a number of steps), now {cfg.data.validation!r} / {cfg.train.eval_every!r}")


class DataCache:
    """Tokenizer and encoded splits per (task, model, data) settings: trials of one process share them."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Encoded, Encoded | None]] = {}

    def get(self, cfg: RunConfig) -> tuple[Any, Encoded, Encoded | None]:
        key = json.dumps([cfg.task, cfg.model.model_dump(), cfg.data.model_dump(exclude={"labels"})], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = load_data(cfg, distributed.Dist(device=self.device(cfg)))
        return self._cache[key]

    @staticmethod
    def device(cfg: RunConfig):
        return distributed.setup(cfg.train.device).device


def total_steps(cfg: RunConfig, train_set: Encoded) -> int:
    """The optimizer steps a run of ``cfg`` makes (as ``Loop`` computes them), for one process."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    batches = train_batches(train_set.lengths(), cfg.train.batch_size, cfg.seed, 0, cfg.data.group_by_length)
    return cfg.train.epochs * math.ceil(len(batches) / cfg.train.grad_accum)


def start_run(cfg: RunConfig, data: DataCache, on_eval: EvalCallback | None = None,
              overwrite: bool = True) -> WatchedLoop:
    """Set up the run directory, model and delta of ``cfg`` and return its loop, ready to ``run``."""
    tokenizer, train_set, eval_set = data.get(cfg)
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume=False, overwrite=overwrite)
    cfg = cfg.model_copy(deep=True)
    if train_set.label_names is not None:
        cfg.data.labels = train_set.label_names
    init_run_dir(run_dir, cfg, resume=False, overwrite=overwrite)
    info = distributed.Dist(device=data.device(cfg))
    model, delta = build_model(cfg, train_set.label_names, tokenizer.pad_token_id, info.device)
    loop = WatchedLoop(Session(cfg, model, delta, train_set, eval_set, tokenizer.pad_token_id, run_dir, info), on_eval)
    loop.start(resume=False)
    return loop


def finish_run(loop: WatchedLoop) -> dict[str, Any]:
    """summary.json and report.md of a run (also one stopped early: pruned, or out of a race)."""
    summary = write_summary(loop.s.run_dir, loop.s.cfg, loop.s.delta, loop.progress)
    write_report(loop.s.run_dir)
    return summary
