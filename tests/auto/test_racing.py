"""Method racing: the successive-halving schedule and selection, and a real race on the tiny task."""

from __future__ import annotations

import json
import math

import pytest
import torch

import deltatune as dt
from deltatune.auto.racing import DEFAULT_CANDIDATES, Rung, halving_plan, parse_candidates, run_race, select
from deltatune.core.errors import ConfigError
from deltatune.train.config import load_config
from deltatune.train.jobs import train
from deltatune.train.loop import MetricsLog
from tests.auto.conftest import base_config, write_config


def test_plan_halves_candidates_and_doubles_steps():
    assert halving_plan(4, 40) == [Rung(10, 4, 2), Rung(20, 2, 1), Rung(40, 1, 1)]
    # 5 candidates: 5 -> 3 -> 2 -> 1, steps 5, 10, 20, 40 (40 // 2^3 = 5)
    assert [(r.steps, r.alive) for r in halving_plan(5, 41)] == [(5, 5), (10, 3), (20, 2), (40, 1)]
    assert [(r.steps, r.alive, r.keep) for r in halving_plan(9, 90, eta=3)] == [(10, 9, 3), (30, 3, 1), (90, 1, 1)]
    assert halving_plan(1, 7) == [Rung(7, 1, 1)]


@pytest.mark.parametrize("args,message", [
    ((4, 3, 2), r"3 training steps are too few for 4 candidates with eta 2 \(3 rungs need at least 4 steps\)"),
    ((4, 40, 1), "race.eta must be an integer >= 2"),
    ((0, 40, 2), "no candidates"),
])
def test_plan_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        halving_plan(*args)


def test_select_orders_and_ties():
    scores = {"a": 0.7, "b": 0.9, "c": None, "d": 0.9, "e": math.nan}
    assert select(scores, 2, maximize=True) == ["b", "d"]  # tie: the earlier candidate first
    assert select(scores, 5, maximize=True) == ["b", "d", "a", "c", "e"]  # failed ones last
    assert select(scores, 1, maximize=False) == ["a"]


def test_candidates_parsing():
    assert parse_candidates(None) == DEFAULT_CANDIDATES
    named = parse_candidates([{"method": "lora", "r": 2}, [{"method": "lora"}, {"method": "ia3"}]])
    assert list(named) == ["lora-0", "lora+ia3-1"] and named["lora+ia3-1"][1] == {"method": "ia3"}
    with pytest.raises(ConfigError, match=r"race.candidates.bad: lora: unknown field\(s\) \['rank'\]"):
        parse_candidates({"bad": {"method": "lora", "rank": 4}})
    with pytest.raises(ConfigError, match="race.candidates.x must be a method mapping"):
        parse_candidates({"x": "lora"})


def test_race_keeps_the_best_and_survivors_continue_exactly(tiny_task, tmp_path):
    cfg = base_config(tiny_task, max_steps=40, learning_rate=0.03)
    cfg["race"] = {"metric": "loss", "candidates": {
        "lora": {"method": "lora", "r": 4, "targets": ["query", "value"]}, "bitfit": {"method": "bitfit"},
        "adapter": {"method": "adapter", "bottleneck": 4},
        "too-wide": {"method": "adapter", "bottleneck": 64},  # wider than hidden 32: cannot attach
        "prefix": {"method": "prefix", "num_tokens": 4}}}
    result = run_race(write_config(tmp_path / "race.yaml", cfg), tmp_path / "race")
    entries = result["candidates"]
    assert [r["steps"] for r in result["rungs"]] == [5, 10, 20, 40]
    assert "hidden size (32)" in entries["too-wide"]["error"] and entries["too-wide"]["scores"] == []
    # every candidate that started trained exactly as far as its last rung; the losers stopped there
    for entry in entries.values():
        if entry["error"] is None:
            rung = 3 if entry["out_at_rung"] is None else entry["out_at_rung"]
            assert entry["steps"] == result["rungs"][rung]["steps"] and len(entry["scores"]) == rung + 1
    winner = result["winner"]
    assert [n for n, e in entries.items() if e["out_at_rung"] is None] == [winner]
    for k, rung in enumerate(result["rungs"][:-1]):  # each rung kept its best (lowest loss)
        scored = {n: e["scores"][k] for n, e in entries.items() if len(e["scores"]) > k}
        survivors = [n for n in scored if len(entries[n]["scores"]) > k + 1]
        assert set(survivors) == set(select(scored, rung["keep"], maximize=False))
    # paused and continued in memory == one uninterrupted run of the winner's config
    alone = load_config(tmp_path / "race" / "candidates" / winner / "config.yaml",
                        [("output_dir", str(tmp_path / "alone"))])
    train(alone)
    evals = [r for r in MetricsLog.read(tmp_path / "alone" / "metrics.jsonl") if r["type"] == "eval"]
    raced = [r for r in MetricsLog.read(tmp_path / "race" / "candidates" / winner / "metrics.jsonl")
             if r["type"] == "eval"]
    assert [r["eval_loss"] for r in raced] == pytest.approx([r["eval_loss"] for r in evals], abs=1e-6)
    assert entries[winner]["scores"][-1] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)
    _check_outputs(tmp_path / "race", tiny_task, entries[winner])


def _check_outputs(out, tiny_task, winner):
    for name in ("report.md", "race.json", "race.png", "best_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| too-wide |" in report and "**Winner:" in report and "![race](race.png)" in report
    assert json.loads((out / "race.json").read_text())["winner"] is not None
    best = load_config(out / "best_config.yaml")  # ready to train as it is
    assert best.delta == load_config(winner["run_dir"] + "/config.yaml").delta
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_task["model"])
    delta = dt.load(model, out / "best_delta")
    # a prefix winner trains through its MLP and is saved folded: the loaded delta is never larger
    assert 0 < delta.num_trainable() <= winner["trainable_params"]
    saved = dt.load(AutoModelForSequenceClassification.from_pretrained(tiny_task["model"]),
                    winner["run_dir"] + "/best").model
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, saved(input_ids=ids).logits)
