"""The adaptive rank budget (methods/lora/budget.py) under ``deltatune train``: the loop needs no change for it."""

import json

import deltatune as dt


def test_the_training_loop_runs_a_budget_unchanged(tiny_task, tmp_path):
    """deltatune train (its own AdamW, schedule, clipping, checkpoints) advances the budget through the
    optimizer hook alone; the last checkpoint is the truncated LoRA and reloads with the same outputs."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.config import load_config
    from deltatune.train.jobs import train as train_job
    from tests.auto.conftest import base_config

    cfg = base_config(tiny_task, max_steps=30, learning_rate=0.03)
    cfg["delta"] = [{"method": "lora", "r": 4, "targets": ["query", "key", "value"],
                     "adaptive": {"target_total": 7, "start": 5, "end": 20}}]
    summary = train_job(load_config(None, [(k, v) for k, v in cfg.items()] + [("output_dir", str(tmp_path / "run"))]))
    assert summary["steps"] == 30 and summary["best_metric"] > 0.7  # still learns (chance: 0.5, 32 dev rows)
    saved = json.loads((tmp_path / "run" / "last" / "delta_config.json").read_text())["methods"][0]["config"]
    assert saved["adaptive"] is None and sum(saved["rank_pattern"].values()) == 7
    model = AutoModelForSequenceClassification.from_pretrained(tiny_task["model"])
    delta = dt.load(model, tmp_path / "run" / "last")
    assert sum(w.r for w in delta.attachments[0].wrappers().values()) == 7
