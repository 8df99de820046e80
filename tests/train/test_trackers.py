"""``train.report_to``: a tiny run reports to TensorBoard, MLflow (local SQLite) and trackio (local store),
all offline; each test reads back what the tracker wrote and compares it with ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltatune.core.errors import ConfigError
from deltatune.train import trackers
from deltatune.train.config import load_config
from deltatune.train.loop import MetricsLog
from tests.train.conftest import base_overrides

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, model_dir: Path, files, report_to, **train) -> Path:
    data = base_overrides(model_dir, files[0], files[1], tmp_path / "run", tmp_path / "cache")
    data["train"].update({"max_steps": 6, "eval_every": 3, "log_every": 2, "report_to": report_to, **train})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_bert_dir, sentiment_files) -> Path:
    """One run reporting to all three trackers, in a subprocess so trackio's store (read from
    $TRACKIO_DIR when trackio is first imported) is this test's own directory."""
    tmp = tmp_path_factory.mktemp("tracked")
    config = write_config(tmp, tiny_bert_dir, sentiment_files, ["tensorboard", "mlflow", "trackio"])
    env = {**os.environ, "TRACKIO_DIR": str(tmp / "trackio"), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(config)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def jsonl(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["type"] == kind]


def test_tensorboard_holds_every_metrics_record_config_and_summary(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run / "run"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for kind, key in (("train", "loss"), ("eval", "eval_accuracy"), ("eval", "eval_loss")):
        written = [(e.step, e.value) for e in acc.Scalars(f"{kind}/{key}")]
        expected = [(r["step"], r[key]) for r in jsonl(run_dir, kind)]
        assert [s for s, _ in written] == [s for s, _ in expected]
        assert [v for _, v in written] == pytest.approx([v for _, v in expected], rel=1e-6)
    tags = acc.Tags()["tensors"]  # add_text is stored as tensors
    assert {"config/text_summary", "summary/text_summary"} <= set(tags)


def test_mlflow_sqlite_store_holds_params_metrics_and_summary(tracked_run):
    import mlflow

    run_dir = tracked_run / "run"
    assert (run_dir / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    expected = jsonl(run_dir, "train")
    assert sorted(m.step for m in history) == [r["step"] for r in expected]
    by_step = {m.step: m.value for m in history}
    assert [by_step[r["step"]] for r in expected] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert json.loads((artifacts / "summary.json").read_text())["steps"] == summary["steps"] == 6


def test_trackio_local_store_holds_the_logged_metrics(tracked_run):
    script = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
              "print(json.dumps(SQLiteStorage.get_logs('job', 'job')))")
    env = {**os.environ, "TRACKIO_DIR": str(tracked_run / "trackio")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    logs = json.loads(out.stdout.strip().splitlines()[-1])
    losses = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    expected = jsonl(tracked_run / "run", "train")
    assert sorted(losses) == [r["step"] for r in expected]
    assert [losses[r["step"]] for r in expected] == pytest.approx([r["loss"] for r in expected], rel=1e-6)


def test_report_to_accepts_one_name_or_none_and_names_unknown_trackers(tmp_path, tiny_bert_dir, sentiment_files):
    assert load_config(write_config(tmp_path, tiny_bert_dir, sentiment_files, "tensorboard")).train.report_to \
        == ["tensorboard"]
    assert load_config(write_config(tmp_path, tiny_bert_dir, sentiment_files, "none")).train.report_to == []
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(write_config(tmp_path, tiny_bert_dir, sentiment_files, ["wandb"]))


def test_a_missing_tracker_package_is_a_config_error_naming_the_install(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install mlflow"):
        trackers.require_tracker("mlflow")


def test_a_tracker_that_fails_mid_run_is_switched_off_with_a_warning(caplog):
    class Broken(trackers.Tracker):
        name = "broken"

        def log(self, record):
            raise OSError("disk full")

    group = trackers.Trackers([])
    group.active = [Broken()]
    group.log({"type": "train", "step": 1, "loss": 1.0})
    assert group.active == [] and "broken failed to log" in caplog.text


def test_records_become_scalars_and_texts():
    record = {"type": "eval", "step": 3, "eval_loss": 0.5, "finished": True, "nan": float("nan"),
              "samples": [{"prompt": "hi", "output": "hello"}]}
    assert trackers.scalars(record) == {"eval/eval_loss": 0.5}
    assert list(trackers.texts(record)) == ["eval/samples"]
    assert trackers.flatten({"train": {"batch_size": 8, "report_to": ["mlflow"]}}) == \
        {"train.batch_size": "8", "train.report_to": '["mlflow"]'}
