"""The router job from YAML (train/router_job.py): ``deltatune train router.yaml`` over two finished tiny runs,
``deltatune eval`` on the result (routed vs oracle), and the config errors raised before anything loads.

The two toy tasks can be told apart by their words (disjoint filler vocabularies) and need different deltas
(task "flip" inverts the sentiment labels), so a router that chose wrong would show in the routed metric."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.core.errors import ConfigError
from deltatune.train import jobs
from deltatune.train.config import load_config
from deltatune.train.router_job import (
    batches_of,
    check_runs,
    evaluate_router_run,
    load_router_config,
    predictions,
    task_data,
    train_router,
)
from tests.train.conftest import FILLER, NEGATIVE, POSITIVE, base_overrides

runner = CliRunner()
VOCABULARY = {"plain": FILLER[:12], "flip": ["instruction", "response", "input", "below", "task", "write", "###"]}


def write_task(path: Path, task: str, n: int, seed: int) -> Path:
    """Two words of the task's own vocabulary around a sentiment word; "flip" labels negative words 1."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        out.writerow(["sentence", "label"])
        for i in range(n):
            positive = i % 2 == 1
            words = rng.sample(VOCABULARY[task], 2)
            words.insert(rng.randint(0, 2), rng.choice(POSITIVE if positive else NEGATIVE))
            out.writerow([" ".join(words), int(positive != (task == "flip"))])
    return path


@pytest.fixture(scope="module")
def two_runs(tiny_bert_nodrop_dir, tmp_path_factory) -> dict[str, Path]:
    """Two finished `deltatune train` runs (LoRA + the head) on the tiny BERT, one per toy task."""
    root = tmp_path_factory.mktemp("router_runs")
    runs = {}
    for seed, task in enumerate(VOCABULARY):
        train, dev = write_task(root / f"{task}_train.tsv", task, 96, seed), write_task(root / f"{task}_dev.tsv",
                                                                                           task, 40, seed + 10)
        data = base_overrides(tiny_bert_nodrop_dir, train, dev, root / task, root / "cache")
        data["train"]["epochs"] = 8
        path = root / f"{task}.yaml"
        path.write_text(yaml.safe_dump(data))
        jobs.train(load_config(path))
        runs[task] = root / task
    return runs


def router_yaml(path: Path, runs: dict[str, Path], **router) -> Path:
    data = {"router": {"runs": {k: str(v) for k, v in runs.items()}, "samples_per_run": 64, **router},
            "train": {"num_threads": 1}, "output_dir": str(path.parent / "routed")}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_toy_runs_need_their_own_delta(two_runs):
    """Each run is good on its task and bad on the other's: routing to the wrong delta would cost accuracy."""
    for task, run in two_runs.items():
        assert json.loads((run / "summary.json").read_text())["best_metric"] >= 0.9, task
    cfg = load_router_config(router_yaml(two_runs["plain"].parent / "check.yaml", two_runs))
    configs = check_runs(cfg)
    from deltatune.train.router_job import base_and_deltas

    tokenizer, model = base_and_deltas(configs)
    _, sets = task_data(configs, tokenizer, None)
    with dt.active(model, "plain"):
        wrong = predictions(model, {"flip": sets["flip"]}, batches_of({"flip": sets["flip"]}, 16, 0))[0]["flip"]
    assert float((wrong == sets["flip"].labels).float().mean()) <= 0.1


def test_train_and_eval_from_yaml_route_every_sample_like_its_oracle(two_runs, tmp_path):
    config = router_yaml(tmp_path / "router.yaml", two_runs)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "routed"
    assert {p.name for p in out.iterdir()} >= {"deltas", "router", "config.yaml", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples"] == {"plain": 64, "flip": 64}
    # the tasks are separable by their words: the stated floor is every validation sample routed right
    assert summary["router_accuracy"] == {"plain": 1.0, "flip": 1.0}
    assert sorted(json.loads((out / "deltas" / "deltas.json").read_text())["deltas"]) == ["flip", "plain"]

    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "| plain | accuracy | 40 |" in result.stdout
    rows = {r["task"]: r for r in json.loads((out / "eval.json").read_text())["tasks"]}
    for task, row in rows.items():
        assert row["router_accuracy"] == 1.0 and row["routed_to"][task] == 1.0
        assert row["same_prediction"] == 1.0 and row["routed"] == row["oracle"], task  # per sample, exactly
        assert row["oracle"] >= 0.9


def test_routed_logits_equal_each_delta_alone(two_runs, tmp_path):
    """In batches mixing both tasks, each row's logits are its own delta's, to float rounding."""
    out = tmp_path / "routed"
    train_router(load_router_config(router_yaml(tmp_path / "r.yaml", two_runs)))
    cfg = load_router_config(out / "config.yaml")
    configs = check_runs(cfg)
    from deltatune.train.router_job import _forward_kwargs, base_and_deltas

    tokenizer, model = base_and_deltas(configs)
    router = dt.load_router(model, out / "router", enable=False)
    _, sets = task_data(configs, tokenizer, None)
    batch = batches_of(sets, 16, tokenizer.pad_token_id, seed=3)[0]
    assert len(set(batch["route"])) == 2
    inputs = _forward_kwargs(model, batch)
    with router, torch.no_grad():
        routed = model(**inputs).logits
    for row, name in enumerate(batch["route"]):
        with dt.active(model, name), torch.no_grad():
            alone = model(**{k: v[row:row + 1] for k, v in inputs.items()}).logits
        # the single row is unpadded-equal: padding is masked, so its logits match the batched row
        torch.testing.assert_close(routed[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_soft_mode_from_yaml(two_runs, tmp_path):
    summary = train_router(load_router_config(router_yaml(tmp_path / "soft.yaml", two_runs, mode="soft")))
    assert summary["mode"] == "soft" and min(summary["router_accuracy"].values()) == 1.0
    rows = evaluate_router_run(tmp_path / "routed")["tasks"]
    assert all(r["routed"] >= 0.9 for r in rows)  # a confident mix of LoRA deltas is close to the chosen one


@pytest.mark.parametrize(("features", "described"), [("hidden", "mean last"), ("tokens", "bag of input tokens")])
def test_other_features_from_yaml(two_runs, tmp_path, features, described):
    """router.features: hidden reads the frozen model's last hidden states, tokens a bag of token ids; saved,
    and read back by eval."""
    config = router_yaml(tmp_path / "h.yaml", two_runs, features=features, epochs=200, learning_rate=0.05)
    summary = train_router(load_router_config(config))
    assert min(summary["router_accuracy"].values()) == 1.0
    assert json.loads((tmp_path / "routed" / "router" / "router.json").read_text())["features"].startswith(described)
    rows = evaluate_router_run(tmp_path / "routed")["tasks"]
    assert all(r["router_accuracy"] == 1.0 and r["routed"] == r["oracle"] for r in rows)


# -- errors, before anything is loaded --------------------------------------------------------------------

def test_unknown_key_is_named(two_runs, tmp_path):
    path = router_yaml(tmp_path / "bad.yaml", two_runs, sample_per_run=10)
    with pytest.raises(ConfigError, match=r"unknown key 'router.sample_per_run'.*samples_per_run"):
        load_router_config(path)
    with pytest.raises(ConfigError, match=r"router.features: .*'embeddings', 'hidden' or 'tokens'"):
        load_router_config(router_yaml(tmp_path / "bad2.yaml", two_runs, features="pixels"))


def test_missing_run_and_run_without_best_are_named(two_runs, tmp_path):
    cfg = load_router_config(router_yaml(tmp_path / "a.yaml", {**two_runs, "gone": tmp_path / "nowhere"}))
    with pytest.raises(ConfigError, match=r"router.runs.gone: .* is not a run directory"):
        check_runs(cfg)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(two_runs["plain"] / "config.yaml", unfinished / "config.yaml")
    cfg = load_router_config(router_yaml(tmp_path / "b.yaml", {**two_runs, "half": unfinished}))
    with pytest.raises(ConfigError, match=r"router.runs.half: .* has no best checkpoint"):
        check_runs(cfg)


def test_runs_on_different_base_models_are_refused_naming_both(two_runs, tiny_bert_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_runs["flip"], other)
    data = yaml.safe_load((other / "config.yaml").read_text())
    data["model"]["path"] = str(tiny_bert_dir)
    (other / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_router_config(router_yaml(tmp_path / "c.yaml", {"plain": two_runs["plain"], "other": other}))
    with pytest.raises(ConfigError, match=r"runs 'plain' and 'other' were trained on different base models.*"
                                          r"model.path"):
        check_runs(cfg)


def test_one_run_is_not_a_choice_and_a_used_output_dir_needs_overwrite(two_runs, tmp_path):
    with pytest.raises(ConfigError, match="at least two runs"):
        check_runs(load_router_config(router_yaml(tmp_path / "d.yaml", {"plain": two_runs["plain"]})))
    (tmp_path / "routed").mkdir()
    (tmp_path / "routed" / "summary.json").write_text("{}")
    result = runner.invoke(app, ["train", str(router_yaml(tmp_path / "e.yaml", two_runs))])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
