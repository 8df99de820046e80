"""Search with Optuna on the tiny task: pruning, resuming, results, two workers on one sqlite study, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

import deltatune as dt
from deltatune.auto.report import pareto_front
from deltatune.auto.search import importances, run_search
from deltatune.cli import app
from deltatune.core.errors import ConfigError
from deltatune.train.config import load_config
from tests.auto.conftest import base_config, write_config

GOOD, BAD = 0.03, 1e-4  # the tiny task learns in ~30 steps at GOOD; at BAD the loss barely moves


def search_config(tiny_task, tmp_path: Path, **search) -> Path:
    cfg = base_config(tiny_task, max_steps=30)
    cfg["search"] = {"space": {"train.learning_rate": [GOOD, BAD], "train.log_every": [5, 10]},
                     "metric": "loss", "pruner": "median", "startup_trials": 1, "seed": 0, **search}
    return write_config(tmp_path / "search.yaml", cfg)


def states(study_dir: Path, name: str = "search") -> list[tuple[int, str]]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")
    return [(t.number, t.state.name) for t in study.trials]


def test_search_prunes_finishes_and_resumes(tiny_task, tmp_path):
    # trial 0 runs in full (startup), trial 1 (learning rate 1e-4) falls behind at an evaluation: pruned;
    # trial 2 trains exactly like trial 0 (log_every does not change training), so it is not worse: completes
    path = search_config(tiny_task, tmp_path, enqueue=[{"train.learning_rate": GOOD, "train.log_every": 5},
                                                       {"train.learning_rate": BAD, "train.log_every": 5},
                                                       {"train.learning_rate": GOOD, "train.log_every": 10}])
    out = tmp_path / "out"
    result = run_search(path, trials=3, output_dir=out)
    assert states(out) == [(0, "COMPLETE"), (1, "PRUNED"), (2, "COMPLETE")]
    rows = {r["number"]: r for r in result["trials"]}
    assert rows[1]["steps"] < 30 and rows[1]["steps"] % 5 == 0 and rows[0]["steps"] == 30  # stopped at an eval
    assert rows[2]["value"] == pytest.approx(rows[0]["value"], abs=1e-6)
    assert rows[0]["value"] < 0.68 < rows[1]["value"]  # ln 2 = 0.693: the good rate learns, the bad one does not
    assert result["best"]["number"] in (0, 2) and result["best"]["params"]["train.learning_rate"] == GOOD
    first = (out / "trials" / "0000" / "metrics.jsonl").read_text()
    # the same command again continues the study: earlier trials kept, numbering goes on, no re-enqueue
    again = run_search(path, trials=2, output_dir=out)
    assert [n for n, _ in states(out)] == [0, 1, 2, 3, 4]
    assert states(out)[:3] == [(0, "COMPLETE"), (1, "PRUNED"), (2, "COMPLETE")]
    assert (out / "trials" / "0000" / "metrics.jsonl").read_text() == first
    assert {r["number"] for r in again["trials"]} == {0, 1, 2, 3, 4}
    _check_results(out, again, tiny_task)


def _check_results(out: Path, result: dict, tiny_task) -> None:
    best = result["best"]
    report = (out / "report.md").read_text()
    assert f"**Best: trial {best['number']}**" in report and "| 1 | pruned |" in report
    for name in ("history.png", "pareto.png", "search.json", "best_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    if result["importances"]:
        assert (out / "importance.png").exists() and "Parameter importances (fANOVA)" in report
    else:
        assert "Parameter importances" in report
    cfg = load_config(out / "best_config.yaml")  # ready to run: validates, fresh output dir
    assert cfg.train.learning_rate == best["params"]["train.learning_rate"] and cfg.output_dir.startswith("runs")
    from transformers import AutoModelForSequenceClassification

    delta = dt.load(AutoModelForSequenceClassification.from_pretrained(tiny_task["model"]), out / "best_delta")
    assert delta.num_trainable() == best["trainable_params"]


def test_search_validates_before_any_trial(tiny_task, tmp_path):
    path = search_config(tiny_task, tmp_path)
    with pytest.raises(ConfigError, match="set data.validation and train.eval_every"):
        run_search(path, trials=1, output_dir=tmp_path / "x", overrides=[("train.eval_every", "never")])
    with pytest.raises(ConfigError, match="give a budget"):
        run_search(path, output_dir=tmp_path / "x")
    cfg = yaml.safe_load(path.read_text())
    cfg["search"]["space"]["lora.rr"] = [2]
    with pytest.raises(ConfigError, match="lora has no field 'rr'"):
        run_search(write_config(tmp_path / "bad.yaml", cfg), trials=1, output_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "trials").exists()


def test_resuming_with_another_metric_is_refused(tiny_task, tmp_path):
    path = search_config(tiny_task, tmp_path, pruner="none")
    run_search(path, trials=1, output_dir=tmp_path / "out", overrides=[("train.max_steps", 5)])
    cfg = yaml.safe_load(path.read_text())
    cfg["search"]["metric"] = "accuracy"
    with pytest.raises(ConfigError, match=r"study 'search' .* optimizes loss \(minimize\), not accuracy"):
        run_search(write_config(tmp_path / "search.yaml", cfg), trials=1, output_dir=tmp_path / "out")


def test_two_workers_share_one_sqlite_study(tiny_task, tmp_path):
    cfg = base_config(tiny_task, max_steps=10)
    cfg["search"] = {"space": {"train.learning_rate": {"low": 1e-3, "high": 5e-2, "log": True}},
                     "sampler": "random", "pruner": "none"}
    path = write_config(tmp_path / "shared.yaml", cfg)
    db = tmp_path / "db" / "study.db"
    command = [sys.executable, "-m", "deltatune.cli", "search", str(path), "--trials", "2", "--storage",
               f"sqlite:///{db}", "--study", "shared", "--output", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-800:] for o in outputs]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    trials = study.trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["train.learning_rate"] for t in trials}) == 4
    for t in trials:  # each trial trained its own config in its own directory
        run = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert run["train"]["learning_rate"] == t.params["train.learning_rate"]
        assert json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())["steps"] == 10
    assert sorted(p.name for p in (tmp_path / "out" / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    # two workers, two trials each. Whether their spans overlap is up to the scheduler (one worker may finish
    # before the other has imported torch), so it is not asserted: the study is shared either way.
    workers_seen = [t.user_attrs["worker"] for t in trials]
    assert sorted(workers_seen.count(w) for w in set(workers_seen)) == [2, 2]
    assert all(o[0].startswith("study shared: ") and "report: " in o[0] for o in outputs)


def test_cli_search_help_and_errors(tiny_task, tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["search", "--help"])
    assert shown.exit_code == 0 and "--storage" in shown.output and "--trials" in shown.output
    cfg = base_config(tiny_task)
    cfg["search"] = {"space": {"train.lr": [1e-3]}}
    failed = runner.invoke(app, ["search", str(write_config(tmp_path / "c.yaml", cfg)), "--trials", "1"])
    assert failed.exit_code == 2
    assert "error: search.space.train.lr: not a searchable key (did you mean 'train.learning_rate'?)" in failed.output
    assert runner.invoke(app, ["race", "--help"]).exit_code == 0


def test_pareto_front():
    points = [(100, 0.80), (50, 0.70), (200, 0.85), (150, 0.79), (50, 0.72), (300, 0.85)]
    assert pareto_front(points, maximize=True) == [4, 0, 2]  # (50, .72) beats (50, .70); (300, .85) adds nothing
    assert pareto_front([(10, 0.3), (20, 0.2), (30, 0.25)], maximize=False) == [0, 1]


def test_importances_need_two_completed_trials_and_find_the_parameter_that_matters():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert importances(study)[1] == "Parameter importances need at least 2 completed trials (0 so far)."
    study.optimize(lambda t: 10 * t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=20)
    found, note = importances(study)
    assert note is None and found["x"] > 0.9 > found["y"]


def test_the_search_example_is_valid(shared_data, monkeypatch):
    """examples/search/sst2.yaml (the README's search command) passes every check run before the first trial."""
    from pathlib import Path

    from deltatune.auto.search import prepare

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the example names ../shared/data relative to the project root, as the README runs it
    settings, base, metric = prepare(root / "examples" / "search" / "sst2.yaml", [])
    assert metric == "accuracy" and {p.name for p in settings.params} >= {"method", "lora.r"}
