"""``deltatune train`` with ``init: eva`` / ``init: corda``: the job starts the LoRA from its first training batches
(train/data_init.py), and the saved delta reproduces the run's evaluation on a fresh base model."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import deltatune as dt
from deltatune.train import jobs
from deltatune.train.config import load_config
from tests.train.conftest import base_overrides


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_the_job_starts_the_lora_from_data_and_the_checkpoint_reproduces_the_eval(init, tmp_path, tiny_bert_dir,
                                                                                 sentiment_files):
    data = base_overrides(tiny_bert_dir, sentiment_files[0], sentiment_files[1], tmp_path / "run", tmp_path / "c")
    data["delta"] = [{"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"], "init": init}]
    data["train"].update(max_steps=4, eval_every=4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    summary = jobs.train(load_config(tmp_path / "run.yaml"))
    run = tmp_path / "run"
    tensors = load_file(next((run / "last").glob("*.safetensors")))
    if init == "corda":  # the data-driven start is saved: W_res cannot be recomputed without the data
        starts = [t for k, t in tensors.items() if k.endswith(".init_B")]
        assert len(starts) == 4 and all(t.abs().max() > 0 for t in starts)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    delta = dt.load(model, run / "last")
    assert delta.configs[0].init == init
    evaluated = jobs.run_eval(load_config(run / "config.yaml"), run / "last")
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], abs=1e-5)


def test_eva_in_the_job_sets_orthonormal_a_rows(tmp_path, tiny_bert_dir, sentiment_files):
    """EVA's A rows are eigenvectors (orthonormal), which a Kaiming start is not: the call did run."""
    data = base_overrides(tiny_bert_dir, sentiment_files[0], None, tmp_path / "run", tmp_path / "c")
    data["delta"] = [{"method": "lora", "r": 4, "alpha": 8, "targets": ["query"], "init": "eva"}]
    data["train"].update(max_steps=1, learning_rate=1e-9)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    jobs.train(load_config(tmp_path / "run.yaml"))
    tensors = load_file(next((tmp_path / "run" / "last").glob("*.safetensors")))
    a = next(t for k, t in tensors.items() if k.endswith("lora_A"))
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-3)
