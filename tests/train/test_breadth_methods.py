"""The methods beyond the seeds through ``deltatune train``: YAML keys are their field names, a short run
trains them, and the saved delta reproduces the run's evaluation on a fresh base model."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForSequenceClassification

import deltatune as dt
from deltatune.train import jobs
from deltatune.train.config import load_config
from tests.train.conftest import base_overrides

METHODS = {
    "vera": {"method": "vera", "r": 16, "targets": ["query", "value"]},
    "loha": {"method": "loha", "r": 4, "targets": ["query", "value"]},
    "lokr": {"method": "lokr", "r": 4, "targets": ["query", "value"]},
    "oft": {"method": "oft", "block_size": 8, "targets": ["query", "value"]},
    "sparse": {"method": "sparse", "density": 0.05, "select": "random", "seed": 2},
    "pissa": {"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"], "init": "pissa"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_short_run_trains_and_its_checkpoint_reproduces_the_eval(name, tmp_path, tiny_bert_dir, sentiment_files):
    data = base_overrides(tiny_bert_dir, sentiment_files[0], sentiment_files[1], tmp_path / "run", tmp_path / "c")
    data["delta"] = [METHODS[name]]
    data["train"].update(max_steps=6, eval_every=6)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    summary = jobs.train(load_config(tmp_path / "run.yaml"))
    assert summary["steps"] == 6
    run = tmp_path / "run"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    delta = dt.load(model, run / "last")
    assert delta.configs[0].method == METHODS[name]["method"]
    final = summary["final_eval"]
    assert final["step"] == 6  # evaluated at the last step, with the weights "last" holds
    evaluated = jobs.run_eval(load_config(run / "config.yaml"), run / "last")
    assert evaluated["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    assert summary["checkpoint_bytes"] < 0.2 * 4 * summary["total_params"]  # a delta, not the model
