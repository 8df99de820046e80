"""``model.quantization`` and ``train.optimizer: adamw8bit`` from the CLI, on the tiny Llama (instruction task)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.core import quant
from deltatune.core.errors import ConfigError
from deltatune.train.config import load_config
from tests.quant.conftest import require
from tests.train.conftest import make_tokenizer

runner = CliRunner()
NF4 = {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


@pytest.fixture
def job(tmp_path, base_dir) -> Path:
    """A run config for 4 steps of LoRA on the nf4 tiny Llama, on a small Alpaca-style file."""
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(model_dir)
    make_tokenizer(model_dir)
    rows = [{"instruction": "write a good film", "input": "", "output": "the film was great"},
            {"instruction": "write a bad plot", "input": "the plot", "output": "it was dull and boring"}] * 4
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    cfg = {"task": "instruction", "model": {"path": str(model_dir), "quantization": NF4},
           "data": {"train": str(tmp_path / "alpaca.json"), "validation": str(tmp_path / "alpaca.json"),
                    "max_length": 48, "cache_dir": str(tmp_path / "cache")},
           "delta": [{"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"}],
           "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "progress": "never", "num_threads": 1,
                     "warmup_ratio": 0.0, "eval_every": "never", "save_every": 2},
           "output_dir": str(tmp_path / "run"), "seed": 3}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_train_quantized_then_merge_to_bfloat16(job, tmp_path):
    require("bitsandbytes")
    result = invoke("train", job, "--train.optimizer", "adamw8bit")
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "last" / "delta_config.json").read_text())
    assert meta["base_quantization"]["bnb_4bit_quant_type"] == "nf4"
    merged = tmp_path / "merged"
    result = invoke("merge", tmp_path / "run", merged, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert not any(quant.is_quantized(m) for m in plain.modules())


def test_quantization_is_validated_before_anything_loads(job):
    with pytest.raises(ConfigError, match="scheme"):
        load_config(job, [("model.quantization", {"backend": "torchao"})])
    with pytest.raises(ConfigError, match="quant_type"):
        load_config(job, [("model.quantization.quant_type", "int3")])


def test_a_missing_backend_names_what_to_install(job, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed: pip install .*bitsandbytes"):
        load_config(job)
    with pytest.raises(ConfigError, match="train.optimizer.*AdamW8bit"):
        load_config(job, [("model.quantization", None), ("train.optimizer", "adamw8bit")])



def test_adamw8bit_state_round_trips_through_a_training_state(loader, tmp_path):
    """The 8-bit optimizer keeps its quantized moments in a nested dict: the training state must restore it
    so that the next step is the same as without the save."""
    require("bitsandbytes")
    import deltatune as dt
    from deltatune.train.quantization import adamw_8bit
    from deltatune.train.state import Progress, load_state, save_state
    from tests.quant.conftest import ids

    model = loader(None)
    delta = dt.attach(model, dt.LoRA(r=64, targets="all-linear"))  # 64 x 128 > 4096: 8-bit moments
    params = list(delta.parameters().values())

    def step(opt) -> None:
        opt.zero_grad()
        model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()

    opt = adamw_8bit([{"params": params, "lr": 1e-2, "name": "delta"}], 1e-2, 0.0)
    for _ in range(2):
        step(opt)
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())  # really 8-bit moments
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_state(tmp_path / "state", delta, opt, scheduler, None, Progress(step=2), [{}])
    saved = {k: p.detach().clone() for k, p in delta.parameters().items()}
    step(opt)
    expected = {k: p.detach().clone() for k, p in delta.parameters().items()}
    with torch.no_grad():
        for k, p in delta.parameters().items():
            p.copy_(saved[k])
    again = adamw_8bit([{"params": params, "lr": 1e-2, "name": "delta"}], 1e-2, 0.0)
    again.load_state_dict(load_state(tmp_path / "state", again).optimizer)
    step(again)
    assert all(torch.equal(p, expected[k]) for k, p in delta.parameters().items())
