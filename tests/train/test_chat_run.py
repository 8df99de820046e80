"""A task: chat run end to end on the tiny Llama: packed training, generation samples, report, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deltatune.train import jobs
from deltatune.train.config import load_config
from deltatune.train.loop import MetricsLog
from deltatune.train.samples import sample_prompts
from tests.conftest import tiny_llama
from tests.train.test_chat import TWO_TURNS, chat_tokenizer


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_chat_llama")
    chat_tokenizer().save_pretrained(directory)
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    records = [{"messages": TWO_TURNS[:2]}, {"messages": TWO_TURNS},
               {"instruction": "say hi", "input": "", "output": "hello"},
               {"messages": [{"role": "system", "content": "be brief"}] + TWO_TURNS[2:]}] * 4
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(tmp_path: Path, model_dir: Path, data: Path, name: str, fused_loss: bool = False, **data_settings):
    cfg = {"task": "chat", "seed": 3, "output_dir": str(tmp_path / name),
           "model": {"path": str(model_dir)},
           "data": {"train": str(data), "validation": str(data), "max_length": 48,
                    "cache_dir": str(tmp_path / "cache"), **data_settings},
           "delta": [{"method": "lora", "r": 4, "targets": "all-linear"}],
           "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 0.01, "warmup_ratio": 0.0, "log_every": 1,
                     "eval_every": 3, "progress": "never", "num_threads": 1, "sample_prompts": ["say hi"],
                     "sample_max_new_tokens": 4, "fused_loss": fused_loss}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    jobs.train(config)
    return config, MetricsLog.read(Path(config.output_dir) / "metrics.jsonl")


def test_packed_run_trains_like_the_unpacked_one_and_writes_samples(tmp_path, chat_model_dir, chat_file):
    packed_cfg, packed = run(tmp_path, chat_model_dir, chat_file, "packed", packing=True)
    _, padded = run(tmp_path, chat_model_dir, chat_file, "padded", packing=False, group_by_length=True)
    losses = {name: [r["loss"] for r in records if r["type"] == "train"]
              for name, records in (("packed", packed), ("padded", padded))}
    assert len(losses["packed"]) == 3
    # the same examples per step; the loss is the same function of the weights, so the runs stay together
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)
    samples = [r for r in packed if r["type"] == "samples"]
    assert len(samples) == 1 and samples[0]["step"] == 3 and samples[0]["samples"][0]["prompt"] == "say hi"
    completion = samples[0]["samples"][0]["completion"]
    # generate uses the chat template's generation prompt, like the samples: the same greedy continuation
    generated = jobs.generate(packed_cfg, Path(packed_cfg.output_dir) / "last", "say hi", 4, 0.0)
    assert generated == completion
    _, fused = run(tmp_path, chat_model_dir, chat_file, "fused", fused_loss=True, packing=True)
    assert [r["loss"] for r in fused if r["type"] == "train"] == pytest.approx(losses["padded"], abs=1e-5)
    report = (Path(packed_cfg.output_dir) / "report.md").read_text()
    assert "## Generation samples" in report and f"- **say hi** {completion.strip() or '(nothing)'}" in report


def test_sample_prompts_default_per_task_and_empty_is_off(chat_model_dir, chat_file):
    cfg = load_config(None, [("task", "chat"), ("model.path", str(chat_model_dir)), ("data.train", str(chat_file)),
                             ("train.sample_prompts", [])])
    assert cfg.train.sample_prompts == []
    assert sample_prompts("chat", []) == [] and len(sample_prompts("chat", None)) == 2
    assert sample_prompts("classification", None) == []
