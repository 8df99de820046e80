"""The deltatune CLI: every command, its one-paragraph errors (no traceback without --debug), and the
commands that use a trained run (eval, merge, export, inspect, report, generate) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.core.errors import ConfigError
from deltatune.train import jobs
from deltatune.train.data import alpaca_prompt
from tests.train.conftest import base_overrides

runner = CliRunner()
COMMANDS = ["train", "eval", "inspect", "merge", "export", "generate", "report"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()  # earlier lines may be progress logs
    message = lines[-1]
    assert message.startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    for needle in needles:
        assert needle in message
    return message


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_bad_config_is_one_paragraph_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n")
    assert_user_error(invoke("train", bad), "lerning_rate", "train.learning_rate")
    assert_user_error(invoke("train", "--train.batch_size", "0"), "train.batch_size", "greater than 0")
    assert_user_error(invoke("train", "--data.train", tmp_path / "none.tsv", "--data.validation", "null"),
                      "no such file")
    assert_user_error(invoke("train", "--resume", "--overwrite", "--output_dir", tmp_path / "r"), "contradict")


def test_debug_shows_the_real_exception(tmp_path):
    result = invoke("train", "--train.batch_size", "0", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


def test_unexpected_errors_and_interrupts_have_short_messages(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(jobs, "train", boom)
    result = invoke("train")
    assert result.exit_code == 1 and "internal error (RuntimeError: something broke)" in result.stderr
    assert "--debug" in result.stderr and "Traceback" not in result.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "train", interrupted)
    result = invoke("train")
    assert result.exit_code == 130 and "--resume" in result.stderr


def test_print_config_shows_the_resolved_config_and_loads_nothing(monkeypatch):
    monkeypatch.setattr(jobs, "train", lambda *a, **k: pytest.fail("print-config must not train"))
    result = invoke("train", "--print-config", "--train.max_steps", "7", "--delta.0.r", "2")
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["delta"][0]["r"] == 2
    assert printed["model"]["path"] and printed["data"]["train"].endswith("sentiment_train.tsv")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert_dir, sentiment_files) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = base_overrides(tiny_bert_dir, *sentiment_files, tmp / "run", tmp / "cache")
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = invoke("train", path, "--train.max_steps", "12")
    assert result.exit_code == 0, result.stderr
    assert "run: " in result.stdout and "best accuracy" in result.stdout and "report:" in result.stdout
    return tmp / "run"


def test_eval_reproduces_the_best_metric(run_dir):
    result = invoke("eval", run_dir)
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert found["eval_accuracy"] == summary["best_metric"] and found["examples"] == 48
    last = json.loads(invoke("eval", run_dir, "--checkpoint", "last").stdout)
    assert last["eval_accuracy"] == summary["final_eval"]["eval_accuracy"]


def test_merge_writes_a_model_plain_transformers_loads(run_dir, tiny_bert_dir, tmp_path):
    out = tmp_path / "merged"
    result = invoke("merge", run_dir, out)
    assert result.exit_code == 0, result.stderr
    ids = torch.tensor([[2, 10, 20, 30, 3]])
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    dt.load(base, run_dir / "best")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    assert (out / "tokenizer.json").exists()


def test_export_peft_round_trips(run_dir, tiny_bert_dir, tmp_path):
    result = invoke("export", run_dir, tmp_path / "peft", "--format", "peft")
    assert result.exit_code == 0, result.stderr
    ids = torch.tensor([[2, 11, 21, 3]])
    ours = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    dt.load(ours, run_dir / "best")
    theirs = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    dt.import_peft(theirs, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6)
    assert_user_error(invoke("export", run_dir, tmp_path / "x", "--format", "onnx"), "onnx", "--format peft")


def test_export_vllm_and_gguf_refuse_what_they_cannot_hold(run_dir, tmp_path):
    """The tiny BERT run trains its classifier head: vLLM refuses modules_to_save, llama.cpp has no BERT mapping."""
    assert_user_error(invoke("export", run_dir, tmp_path / "v", "--format", "vllm"), "vLLM", "modules_to_save")
    assert_user_error(invoke("export", run_dir, tmp_path / "g.gguf", "--format", "gguf"), "'bert'", "llama.cpp")
    assert not (tmp_path / "v").exists() and not (tmp_path / "g.gguf").exists()


def test_inspect_attaches_the_given_methods(tiny_bert_dir):
    result = invoke("inspect", tiny_bert_dir, "--method", "{method: lora, r: 2, targets: [query]}")
    assert result.exit_code == 0, result.stderr
    assert "lora wraps Linear(32x32)" in result.stdout and "query" in result.stdout
    assert "value" not in result.stdout and "classifier: train" in result.stdout  # the head trains too
    bare = invoke("inspect", tiny_bert_dir)
    assert bare.exit_code == 0 and "0 delta(s) attached" in bare.stdout
    assert_user_error(invoke("inspect", tiny_bert_dir, "--method", "{method: lora, r: 0}"), "lora.r")
    assert_user_error(invoke("inspect", tiny_bert_dir, "--method", "lorra"), "unknown method 'lorra'")


def test_report_rebuilds_files_and_names_a_wrong_dir(run_dir, tmp_path):
    (run_dir / "report.md").unlink()
    assert invoke("report", run_dir).exit_code == 0
    assert "| method | lora(" in (run_dir / "report.md").read_text()
    assert_user_error(invoke("report", tmp_path), "no metrics.jsonl")


def test_commands_on_the_wrong_thing_say_what_to_pass(run_dir, tmp_path):
    assert_user_error(invoke("eval", tmp_path), "neither a run directory")
    assert_user_error(invoke("generate", run_dir, "-p", "hi"), "generate needs a language-model run")
    assert_user_error(invoke("merge", run_dir / "best", tmp_path / "m", "--checkpoint", tmp_path / "nope"),
                      "no checkpoint at")


def test_instruction_tuning_then_generate_and_eval(tmp_path, tiny_llama_dir, alpaca_file):
    cfg = base_overrides(tiny_llama_dir, alpaca_file, alpaca_file, tmp_path / "lm", tmp_path / "cache")
    cfg.update(task="instruction", delta=[{"method": "lora", "r": 4}])
    cfg["data"]["max_length"] = 64
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = invoke("train", path, "--train.max_steps", "4")
    assert result.exit_code == 0, result.stderr
    assert "best perplexity" in result.stdout
    found = json.loads(invoke("eval", tmp_path / "lm").stdout)
    assert found["eval_perplexity"] == pytest.approx(torch.tensor(found["eval_loss"]).exp().item(), rel=1e-5)
    generated = invoke("generate", tmp_path / "lm", "-p", "write a good film", "--max-new-tokens", "5")
    assert generated.exit_code == 0, generated.stderr
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    dt.load(model, tmp_path / "lm" / "best")
    ids = tok(alpaca_prompt("write a good film"), return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert generated.stdout == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    bare = invoke("generate", "--model", tiny_llama_dir, "-p", "the film", "--max-new-tokens", "3")
    assert bare.exit_code == 0, bare.stderr
    merged = tmp_path / "merged"
    assert invoke("merge", tmp_path / "lm", merged).exit_code == 0
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
