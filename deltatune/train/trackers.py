"""Experiment trackers (``train.report_to``): the records of ``metrics.jsonl``, mirrored to TensorBoard,
trackio and MLflow, with the resolved config at the start and the summary at the end.

``metrics.jsonl`` stays the source of truth (the report, ``deltatune report`` and ``--resume`` read it); a
tracker is a copy for the dashboards people already watch. Every tracker writes locally by default, so a
run works offline:

* ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``).
* ``mlflow``: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite store ``RUN_DIR/mlflow.db`` with artifacts in
  ``RUN_DIR/mlflow-artifacts`` (recent MLflow refuses its plain file store by default);
  ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``.
* ``trackio``: trackio's own local store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project = ``train.tracker_project`` or the run name; ``trackio show``.

The tracker packages are optional: a missing one is a ConfigError at config time (``require_tracker``),
and each is imported only when its run starts, so ``import deltatune`` never pays for MLflow. A tracker
that fails in the middle of a run is switched off with a warning: the training and its checkpoints matter
more than a dashboard.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "trackio", "mlflow")
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"),
           "trackio": ("trackio", "pip install trackio"),
           "mlflow": ("mlflow", "pip install mlflow")}


def require_tracker(name: str) -> None:
    """ValueError (the config check reports it on ``train.report_to``) when ``name``'s package is missing."""
    module, install = INSTALL[name]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{name} is not installed: {install} (or drop it from train.report_to)")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, keyed ``type/name`` (``train/loss``, ``eval/eval_accuracy``)."""
    kind = record.get("type", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def texts(record: dict[str, Any]) -> dict[str, str]:
    """The non-numeric payloads worth showing (generation samples, error messages), as text."""
    kind = record.get("type", "train")
    return {f"{kind}/{k}": v if isinstance(v, str) else json.dumps(v, indent=2)
            for k, v in record.items() if k not in ("type",) and isinstance(v, (str, list, dict))}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"batch_size": 8}}`` -> ``{"train.batch_size": "8"}``: the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class Tracker:
    """One dashboard. ``start`` may raise (the run has not started); ``log`` / ``finish`` are guarded."""

    name = "tracker"

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        raise NotImplementedError

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, Any]) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, run_dir, run_name, config, resume_step):
        writer_class = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        # purge_step: a resumed run drops the events the killed run wrote after its last saved state
        self.writer = writer_class(log_dir=str(run_dir / "tensorboard"),
                                   purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, record):
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        for tag, value in texts(record).items():
            self.writer.add_text(tag, "```\n" + value + "\n```", step)
        if record.get("type") == "eval":
            self.writer.flush()

    def finish(self, summary):
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", summary.get("steps", 0))
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def start(self, run_dir, run_name, config, resume_step):
        mlflow = importlib.import_module("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.entities = importlib.import_module("mlflow.entities")
        experiment = self.client.get_experiment_by_name(run_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            run_name, artifact_location=(run_dir / "mlflow-artifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"deltatune.run_dir": str(run_dir)}).info.run_id
        params = [self.entities.Param(k, v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")
        self.uri = uri

    def log(self, record):
        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [self.entities.Metric(k.replace("/", "."), v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        for tag, value in texts(record).items():
            self.client.log_text(self.run_id, value, f"{tag}_step{step}.txt")

    def finish(self, summary):
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, status="FAILED" if summary.get("status") == "failed" else "FINISHED")
        log.info("MLflow run %s in %s", self.run_id, self.uri)


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, project: str | None = None) -> None:
        self.project = project

    def start(self, run_dir, run_name, config, resume_step):
        self.trackio = importlib.import_module("trackio")
        self.run = self.trackio.init(project=self.project or run_name, name=run_name, config=config,
                                     resume="allow" if resume_step is not None else "never", embed=False)

    def log(self, record):
        numbers = scalars(record)
        if numbers:
            self.run.log(numbers, step=int(record.get("step", 0)))

    def finish(self, summary):
        self.run.log({f"summary/{k}": float(v) for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None},
                     step=int(summary.get("steps", 0)))
        self.run.finish()


class Trackers:
    """The trackers a run reports to; ``log`` / ``finish`` never raise (a failing one is switched off)."""

    def __init__(self, names: list[str], project: str | None = None) -> None:
        made = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                "trackio": lambda: TrackioTracker(project)}
        self.active: list[Tracker] = [made[n]() for n in names]

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        for tracker in self.active:
            tracker.start(run_dir, run_name, config, resume_step)
            log.info("reporting to %s", tracker.name)

    def log(self, record: dict[str, Any]) -> None:
        self._each("log", record)

    def finish(self, summary: dict[str, Any]) -> None:
        self._each("finish", summary)
        self.active = []

    @contextlib.contextmanager
    def closed_on_failure(self) -> Iterator[None]:
        """Close the trackers (status ``failed``) when the run raises, so no dashboard shows it running."""
        try:
            yield
        except BaseException as e:
            self.finish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
            raise

    def _each(self, what: str, payload: dict[str, Any]) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, what)(payload)
            except Exception as e:  # noqa: BLE001 - any tracker failure: warn, switch it off, keep training
                log.warning("%s failed to %s (%s: %s); it is switched off for the rest of the run, "
                            "metrics.jsonl keeps every record", tracker.name, what, type(e).__name__, e)
                self.active.remove(tracker)
