"""The run report is rebuilt from the run dir alone: plots, summary table, evaluations, a stop reason."""

from __future__ import annotations

import json

import pytest

from deltatune.core.errors import CheckpointNotFoundError
from deltatune.train.report import write_report


def write_records(run, records):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_of_a_finished_run(tmp_path):
    write_records(tmp_path, [
        {"type": "train", "step": 1, "loss": 0.9}, {"type": "train", "step": 2, "loss": 0.5},
        {"type": "eval", "step": 2, "eval_loss": 0.6, "eval_accuracy": 0.75},
    ])
    (tmp_path / "summary.json").write_text(json.dumps({
        "methods": "lora(r=8)", "model": "m", "trainable_params": 1234, "trainable_percent": 0.5,
        "checkpoint_bytes": 5 * 2**20, "train_time_s": 12.34, "steps": 2, "metric": "accuracy", "best_metric": 0.75,
        "best_step": 2}))
    text = write_report(tmp_path).read_text()
    for row in ("| method | lora(r=8) |", "| trainable params | 1,234 (0.500%) |", "| checkpoint size | 5.00 MiB |",
                "| time | 12.3 s |", "| best accuracy | 0.7500 (step 2) |", "| 2 | 0.6000 | 0.7500 |"):
        assert row in text
    assert "![loss](loss.png)" in text and "![eval](eval.png)" in text
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "eval.png").stat().st_size > 1000


def test_report_of_a_stopped_run_says_why(tmp_path):
    write_records(tmp_path, [{"type": "train", "step": 1, "loss": 0.9},
                             {"type": "error", "step": 2, "message": "loss is nan at step 2"}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # a line cut short by kill -9 is skipped
    text = write_report(tmp_path).read_text()
    assert "has not finished" in text and "## Stopped\n\nloss is nan at step 2" in text
    assert not (tmp_path / "eval.png").exists()


def test_report_needs_a_run_dir(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no metrics.jsonl"):
        write_report(tmp_path)
