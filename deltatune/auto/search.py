"""Hyperparameter and method search with Optuna (Akiba et al., 2019) on the project's training loop.

``deltatune search CONFIG.yaml --trials N [--storage URL] [--study NAME] [--timeout S]``: the config is
a normal training config plus a ``search:`` section (see space.py). Each trial is one training run in
``<output>/trials/<number>``; every evaluation is reported to the trial, so the pruner (median or
successive halving) stops runs that are clearly worse than earlier ones at the same step.

The study lives in an Optuna storage: by default ``sqlite:///<output>/study.db``, so running the same
command again continues the same study (earlier trials count; numbering goes on). Several processes (or
machines, with any RDB URL such as postgresql://...) given the same ``--storage`` and ``--study`` work on one
study together: Optuna's storage hands out trial numbers atomically, and each worker writes only its own
trial directories. Heartbeats mark the trials of a killed worker as failed when another worker starts.
``--trials`` and ``--timeout`` are per worker (Optuna's n_trials / timeout).

Results, rewritten by every worker when it finishes: ``best_config.yaml`` (the best trial's resolved config,
ready for ``deltatune train``), ``best_delta/`` (its best checkpoint), ``report.md``, ``search.json`` and
plots: optimization history, parameter importances (fANOVA, >= 2 completed trials) and the metric vs
trainable-parameters Pareto front.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.exc import SQLAlchemyError

from ..core.errors import ConfigError, DeltaError
from ..train.config import read_yaml
from .report import publish_best, results_lock, write_search_report
from .runs import DataCache, config_with, finish_run, maximize, metric_key, require_evaluation, start_run
from .space import SearchSettings, parse_search, split_sections

log = logging.getLogger(__name__)


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; sqlite gets a long lock timeout so concurrent workers wait, not fail."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **kwargs)


def _sampler(s: SearchSettings) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, s.startup_trials))


def _pruner(s: SearchSettings) -> optuna.pruners.BasePruner:
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_steps)
    if s.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, s.warmup_steps), reduction_factor=2)
    return optuna.pruners.NopPruner()


class Objective:
    """One trial = one training run of the base config with this trial's values."""

    def __init__(self, settings: SearchSettings, base: dict[str, Any], overrides: list[tuple[str, Any]], out: Path,
                 metric: str) -> None:
        self.settings, self.base, self.overrides, self.out, self.metric = settings, base, overrides, out, metric
        self.data = DataCache()

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.settings.sample(trial)
        run_dir = self.out / "trials" / f"{trial.number:04d}"
        cfg = config_with(self.base, self.overrides + self.settings.overrides(values)
                          + [("output_dir", str(run_dir)), ("run_name", f"trial-{trial.number}"),
                             ("train.metric", self.metric)])  # the loop's best checkpoint follows the search metric
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        loop = start_run(cfg, self.data, on_eval=self._reporter(trial))
        trial.set_user_attr("trainable_params", loop.s.delta.num_trainable())
        trial.set_user_attr("methods", " + ".join(c.describe() for c in loop.s.delta.configs))
        try:
            progress = loop.run()
        finally:
            finish_run(loop)  # summary and report for pruned and failed trials too
            trial.set_user_attr("steps", loop.progress.step)
        if progress.best_metric is None:
            raise ConfigError(f"trial {trial.number} made no evaluation; set train.eval_every to a number of steps")
        return progress.best_metric

    def _reporter(self, trial: optuna.Trial):
        def report(step: int, found: dict[str, float]) -> None:
            value = found[f"eval_{self.metric}"]
            trial.report(value, step)
            if trial.should_prune():
                log.info("trial %d pruned at step %d (%s %.4f)", trial.number, step, self.metric, value)
                raise optuna.TrialPruned(f"{self.metric} {value:.4f} at step {step}")

        return report


def prepare(config: str | Path, overrides: list[tuple[str, Any]]) -> tuple[SearchSettings, dict[str, Any], str]:
    """Parse and validate everything (search section, base config, metric) before any trial starts."""
    base, sections = split_sections(read_yaml(config), "search", "race")
    if "search" not in sections:
        raise ConfigError(f"{config} has no search: section; add one, e.g. search: {{space: {{lora.r: [4, 8, 16]}}}}")
    settings = parse_search(sections["search"], base)
    probe = config_with(base, overrides)
    require_evaluation(probe, "search")
    return settings, base, metric_key(probe, settings.metric)


def _retrying(make, attempts: int = 6):
    """Workers that start together on a fresh database race to create its tables (one wins, the others get
    an IntegrityError / OperationalError): try again after a short random pause, then the tables exist."""
    for attempt in range(attempts):
        try:
            return make()
        except SQLAlchemyError as e:
            if attempt + 1 == attempts:
                raise
            log.info("storage busy (%s); retrying", type(e).__name__)
            time.sleep(0.2 + random.random() * (attempt + 1))


def open_study(name: str, storage: str, settings: SearchSettings, metric: str) -> optuna.Study:
    """Create the study, or load it when it exists (resume / another worker); refuse a different metric."""
    direction = settings.direction or ("maximize" if maximize(metric) else "minimize")
    study = _retrying(lambda: optuna.create_study(
        study_name=name, storage=make_storage(storage), load_if_exists=True, direction=direction,
        sampler=_sampler(settings), pruner=_pruner(settings)))
    stored = study.user_attrs.get("metric")
    if study.direction.name.lower() != direction or stored not in (None, metric):
        raise ConfigError(f"study {name!r} in {storage} optimizes {stored} ({study.direction.name.lower()}), not "
                          f"{metric} ({direction}); use another --study name or the same metric")
    if stored is None:
        study.set_user_attr("metric", metric)
    for params in settings.enqueued_params():
        study.enqueue_trial(params, skip_if_exists=True)
    return study


def run_search(config: str | Path, trials: int | None = None, storage: str | None = None, study: str | None = None,
               timeout: float | None = None, output_dir: str | Path | None = None,
               overrides: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Run up to ``trials`` trials (and/or ``timeout`` seconds) of the search in ``config`` in this process,
    then write the results; returns search.json's content."""
    if trials is None and timeout is None:
        raise ConfigError("give a budget: --trials N and/or --timeout SECONDS")
    overrides = list(overrides or [])
    settings, base, metric = prepare(config, overrides)
    name = study or Path(config).stem
    out = Path(output_dir or Path("searches") / name)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    opened = open_study(name, url, settings, metric)
    objective = Objective(settings, base, overrides, out, metric)
    opened.optimize(objective, n_trials=trials, timeout=timeout, catch=(DeltaError,), gc_after_trial=True)
    return write_results(opened, out, url, metric)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == optuna.trial.TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"number": t.number, "state": t.state.name, "value": value, "params": t.params,
                     "trainable_params": t.user_attrs.get("trainable_params"), "steps": t.user_attrs.get("steps"),
                     "methods": t.user_attrs.get("methods"), "run_dir": t.user_attrs.get("run_dir"),
                     "error": t.system_attrs.get("fail_reason")})
    return rows


def importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances of the parameters every completed trial has (Hutter et al., 2014)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return None, f"Parameter importances need at least 2 completed trials ({len(done)} so far)."
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:  # e.g. no parameter varies across the completed trials
        return None, f"Parameter importances could not be computed: {e}"
    return dict(found), None


def write_results(study: optuna.Study, out: Path, storage: str, metric: str) -> dict[str, Any]:
    """best_config.yaml, best_delta/, report.md, search.json and the plots, from everything in the study."""
    with results_lock(out):
        return _write_results(study, out, storage, metric)


def _write_results(study: optuna.Study, out: Path, storage: str, metric: str) -> dict[str, Any]:
    rows = trial_rows(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    summary: dict[str, Any] = {"study": study.study_name, "storage": storage, "metric": metric,
                               "direction": study.direction.name.lower(),
                               "counts": ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) or "no",
                               "best": None}
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        best = study.best_trial
        summary["best"] = next(r for r in rows if r["number"] == best.number)
        publish_best(Path(best.user_attrs["run_dir"]), out)
    found, note = importances(study)
    write_search_report(out, summary, rows, found, note)
    return json.loads((out / "search.json").read_text())
