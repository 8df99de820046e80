"""The training loop end to end on a tiny BERT: it learns, writes a complete run dir, resumes exactly
(also after a real kill -9), and stops cleanly on a NaN loss keeping the last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

import deltatune as dt
from deltatune.core import onednn
from deltatune.core.errors import CheckpointNotFoundError, ConfigError
from deltatune.train import distributed, jobs
from deltatune.train.batches import Encoded
from deltatune.train.config import load_config
from deltatune.train.loop import Loop, MetricsLog, TrainingDivergedError, evaluate, lr_factor
from tests.train.conftest import base_overrides

REPO = Path(__file__).resolve().parents[2]


def make_config(tmp_path: Path, model_dir: Path, files, name: str, **train):
    data = base_overrides(model_dir, files[0], files[1], tmp_path / name, tmp_path / "cache")
    data["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(run_dir / which / "delta.safetensors")


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["type"] == kind]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert_dir, sentiment_files):
    """One uninterrupted run (52 steps, dropout on), the reference for the resume tests."""
    tmp = tmp_path_factory.mktemp("loop")
    path, cfg = make_config(tmp, tiny_bert_dir, sentiment_files, "full", epochs=5, max_steps=52)
    return path, cfg, jobs.train(cfg)


def test_a_run_learns_and_leaves_a_complete_run_dir(finished, tiny_bert_dir):
    _, cfg, summary = finished
    run = Path(cfg.output_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "loss.png", "eval.png",
                 "best/delta.safetensors", "last/delta.safetensors", "state/delta.safetensors"):
        assert (run / name).exists(), name
    train, evals = records(run, "train"), records(run, "eval")
    assert [r["step"] for r in evals] == [12, 24, 36, 48, 52]  # each epoch end, and the last step (mid-epoch)
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (train[:3], train[-3:]))
    assert last < 0.9 * first and evals[-1]["eval_loss"] < 0.85 * evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] >= 0.8 and summary["best_metric"] == max(r["eval_accuracy"] for r in evals)
    assert {"step", "loss", "lr", "examples_per_s", "tokens_per_s", "head_lr"} <= set(train[0])
    assert summary["steps"] == 52 and summary["trainable_params"] < 0.2 * summary["total_params"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["labels"] == ["0", "1"] and saved["train"]["max_steps"] == 52
    # the best checkpoint reproduces its eval accuracy on a fresh base model
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    dt.load(model, run / "best")
    assert jobs.run_eval(load_config(run / "config.yaml"), run / "best")["eval_accuracy"] == summary["best_metric"]


class Crash(Exception):
    pass


def test_resume_after_an_interruption_reaches_the_same_weights(finished, tmp_path, tiny_bert_dir,
                                                               sentiment_files, monkeypatch):
    path, cfg_full, _ = finished
    _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, "broken", epochs=5, max_steps=52)
    original = Loop._after_step

    def crash_at_step_13(self, epoch_end, last):
        original(self, epoch_end, last)
        if self.progress.step == 13:  # state saved at step 10 and at the epoch end (12): 13 is lost work
            raise Crash

    monkeypatch.setattr(Loop, "_after_step", crash_at_step_13)
    with pytest.raises(Crash):
        jobs.train(cfg)
    monkeypatch.setattr(Loop, "_after_step", original)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        jobs.train(cfg)
    jobs.train(cfg, resume=True)
    done, full = weights(Path(cfg.output_dir)), weights(Path(cfg_full.output_dir))
    assert done.keys() == full.keys()
    assert all(torch.equal(done[k], full[k]) for k in full)  # bit for bit
    steps = [r["step"] for r in records(Path(cfg.output_dir), "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 52  # the killed run's step 13 log was dropped


def test_resume_refuses_a_changed_config_and_a_missing_state(tmp_path, tiny_bert_dir, sentiment_files):
    _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, "run", max_steps=2)
    with pytest.raises(CheckpointNotFoundError, match="nothing to resume"):
        jobs.train(cfg, resume=True)
    jobs.train(cfg)
    _, changed = make_config(tmp_path, tiny_bert_dir, sentiment_files, "run", max_steps=2, batch_size=4)
    with pytest.raises(ConfigError, match=r"train.batch_size: 8 -> 4"):
        jobs.train(changed, resume=True)
    summary = jobs.train(cfg, resume=True)  # a finished run resumes to its end at once
    assert summary["steps"] == 2
    jobs.train(cfg, overwrite=True)
    assert len(records(Path(cfg.output_dir), "eval")) == 1


def _state_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state" / "delta_config.json").read_text())["progress"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_9_then_resume_equals_the_uninterrupted_run(finished, tmp_path):
    path, cfg_full, _ = finished
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true"}
    cmd = [sys.executable, "-m", "deltatune.cli", "train", str(path), "--output_dir", str(out),
           "--train.save_every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _state_step(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _state_step(out)
    assert proc.returncode == -signal.SIGKILL and 0 < killed_at < 52, (killed_at, proc.stderr.read()[-2000:])
    (out / ".state.tmp-leftover").mkdir(exist_ok=True)  # as a kill during a checkpoint write leaves behind
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {out} at step" in resumed.stderr and not (out / ".state.tmp-leftover").exists()
    done, full = weights(out), weights(Path(cfg_full.output_dir))
    assert all(torch.equal(done[k], full[k]) for k in full)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert_dir,
                                                                              sentiment_files, monkeypatch):
    _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, "nan", max_steps=20)
    original = Loop.checkpoint

    def poison_after_step_5(self):
        original(self)
        if self.progress.step == 5:
            with torch.no_grad():
                next(iter(self.s.delta.parameters().values())).fill_(float("nan"))

    monkeypatch.setattr(Loop, "checkpoint", poison_after_step_5)
    with pytest.raises(TrainingDivergedError) as info:
        jobs.train(cfg)
    msg = str(info.value)
    assert "loss is nan at step 6" in msg and "training state at step 5" in msg and "learning_rate" in msg
    run = Path(cfg.output_dir)
    last = weights(run)
    assert all(torch.isfinite(t).all() for t in last.values())
    assert _state_step(run) == 5
    assert records(run, "error")[0]["step"] == 6
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    dt.load(model, run / "last")  # the kept checkpoint loads


def test_schedule_warms_up_then_decays():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(9, 10, 2, "constant") == 1.0


def test_grad_accumulation_matches_a_larger_batch(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    _, big = make_config(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "big", batch_size=8, max_steps=4,
                         eval_every="never")
    _, acc = make_config(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "acc", batch_size=4, grad_accum=2,
                         max_steps=4, eval_every="never")
    big.data.group_by_length = acc.data.group_by_length = False  # same examples per step in both runs
    jobs.train(big)
    jobs.train(acc)
    a, b = weights(Path(big.output_dir)), weights(Path(acc.output_dir))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_gradient_checkpointing_gives_the_same_weights_and_bf16_runs(tmp_path, tiny_bert_nodrop_dir,
                                                                      sentiment_files):
    runs = {}
    for name, extra in {"plain": {}, "checkpointed": {"gradient_checkpointing": True},
                        "bf16": {"precision": "bf16"}}.items():
        _, cfg = make_config(tmp_path, tiny_bert_nodrop_dir, sentiment_files, name, max_steps=3,
                             eval_every="never", **extra)
        jobs.train(cfg)
        runs[name] = weights(Path(cfg.output_dir))
    assert all(torch.allclose(runs["plain"][k], runs["checkpointed"][k], atol=1e-6) for k in runs["plain"])
    assert all(torch.isfinite(t).all() for t in runs["bf16"].values())  # autocast on CPU: runs, stays finite
    assert any(not torch.equal(runs["plain"][k], runs["bf16"][k]) for k in runs["plain"])  # and is really used


def test_activation_checkpointing_is_on_and_uses_the_current_switch(tiny_bert_nodrop_dir):
    """transformers 5.24 warns (FutureWarning) on `gradient_checkpointing_enable`; users must not see it."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop_dir)

    def checkpointed_layers() -> int:  # the flag transformers' layers read, on every 5.x release
        return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())

    assert checkpointed_layers() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jobs.enable_activation_checkpointing(model)
    assert checkpointed_layers() > 0


def test_activation_checkpointing_falls_back_to_the_old_switch():
    calls = []

    class OlderTransformersModel(nn.Module):  # transformers 5.x before 5.24: only the old name
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    jobs.enable_activation_checkpointing(OlderTransformersModel())
    assert calls == [{"use_reentrant": False}]


def test_onednn_training_gives_the_default_paths_weights(tmp_path, tiny_bert_dir, sentiment_files, monkeypatch):
    if not onednn.available():
        pytest.skip("this torch build has no oneDNN")
    routed = []
    real = onednn.matmul_t
    monkeypatch.setattr(onednn, "matmul_t", lambda *args: routed.append(1) or real(*args))
    runs = {}
    for name, extra in {"default": {}, "onednn": {"onednn": True}}.items():
        _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, name, max_steps=3, eval_every="never",
                             **extra)
        jobs.train(cfg)
        runs[name] = weights(Path(cfg.output_dir))
        assert bool(routed) == (name == "onednn")
    assert runs["default"].keys() == runs["onednn"].keys()
    assert all(torch.allclose(runs["default"][k], runs["onednn"][k], atol=1e-5) for k in runs["default"])


@pytest.mark.parametrize(("device", "precision", "says"), [
    ("cuda", "fp32", "CPU training only"), ("cpu", "bf16", "float32 products only")])
def test_onednn_is_refused_where_it_would_do_nothing(tmp_path, tiny_bert_dir, sentiment_files, device, precision,
                                                     says):
    _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, "run", onednn=True, precision=precision)
    with pytest.raises(ConfigError, match=says):
        jobs.use_onednn(cfg, nn.Linear(2, 2), torch.device(device))


def instruction_config(tmp_path: Path, model_dir: Path, alpaca: Path, name: str, delta=None, **train):
    """Instruction tuning (prompt tokens masked out of the loss: -100 rows the fused loss skips), evaluated once
    at the end on the training file."""
    data = base_overrides(model_dir, alpaca, alpaca, tmp_path / name, tmp_path / "cache")
    data.update(task="instruction", delta=delta or [{"method": "lora", "r": 4, "targets": "all-linear"}])
    data["data"]["max_length"] = 64
    data["train"].update(max_steps=3, eval_every=3, batch_size=4, eval_batch_size=4, learning_rate=0.01,
                         **train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_fused_loss_training_gives_the_model_loss_weights(tmp_path, tiny_llama_dir, alpaca_file, monkeypatch):
    from deltatune.core import lm_loss

    fused_calls = []
    real = lm_loss.linear_cross_entropy
    monkeypatch.setattr(lm_loss, "linear_cross_entropy", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    runs = {}
    for name, extra in {"default": {}, "fused": {"fused_loss": True}}.items():
        cfg = instruction_config(tmp_path, tiny_llama_dir, alpaca_file, name, **extra)
        jobs.train(cfg)
        runs[name] = weights(Path(cfg.output_dir))
        runs[name + "_loss"] = [r["loss"] for r in records(Path(cfg.output_dir), "train")]
        runs[name + "_eval"] = [r["eval_loss"] for r in records(Path(cfg.output_dir), "eval")]
    # the check on the first batch, 3 steps, then the final evaluation's 2 batches
    assert len(fused_calls) == 6
    assert len(runs["fused_eval"]) == 1 and runs["fused_eval"] == pytest.approx(runs["default_eval"], rel=1e-4)
    assert runs["default"].keys() == runs["fused"].keys()
    assert runs["fused_loss"] == pytest.approx(runs["default_loss"], rel=1e-6)
    # gradients agree to float32 rounding; AdamW's normalisation magnifies that where a gradient is near zero
    # (LoRA's A while B is still ~0) to ~1e-4 of a tensor's norm after 3 steps; a wrong loss moves them by ~1
    for k, default in runs["default"].items():
        assert (runs["fused"][k] - default).norm() < 1e-3 * default.norm(), k
    assert all(runs["fused"][k].abs().sum() > 0 for k in runs["fused"] if "lora_B" in k)


def test_fused_loss_compiles_the_base_model_not_the_whole_model(tmp_path, tiny_llama_dir, alpaca_file,
                                                                monkeypatch):
    class Built(Exception):
        pass

    def stop_before_training(loop, resume):
        raise Built(loop)

    monkeypatch.setattr(Loop, "start", stop_before_training)
    with pytest.raises(Built) as built:
        jobs.train(instruction_config(tmp_path, tiny_llama_dir, alpaca_file, "run", fused_loss=True, compile=True))
    loop = built.value.args[0]
    assert loop.forward is loop.model  # the whole model is left alone...
    assert isinstance(loop.lm_loss.trunk, torch._dynamo.eval_frame.OptimizedModule)
    assert loop.lm_loss.trunk._orig_mod is loop.model.base_model  # ...its base model is compiled


@pytest.mark.parametrize(("task", "delta", "says"), [
    ("classification", None, "task classification has no such layer"),
    ("instruction", [{"method": "prompt", "num_tokens": 4}], "hooks run around LlamaForCausalLM.forward"),
    ("instruction", [{"method": "lora", "r": 4, "targets": ["lm_head"]}], "not a plain nn.Linear")])
def test_fused_loss_is_refused_where_it_would_change_the_loss(tmp_path, tiny_llama_dir, tiny_bert_dir,
                                                              sentiment_files, alpaca_file, task, delta, says):
    with pytest.raises(ConfigError, match=says):
        if task == "classification":
            make_config(tmp_path, tiny_bert_dir, sentiment_files, "run", fused_loss=True)
        else:
            jobs.train(instruction_config(tmp_path, tiny_llama_dir, alpaca_file, "run", delta, fused_loss=True))


def test_compiled_training_gives_the_same_weights_as_eager(tmp_path, tiny_bert_dir, sentiment_files):
    """Dropout on: on CPU the compiled step draws its masks from aten's generator, so even those match
    (inductor's own random kernels would give other masks, and fail this)."""
    runs = {}
    variants = {"eager": {}, "compiled": {"compile": True}}
    if onednn.available():  # inductor keeps the oneDNN custom op as a call: same weights within rounding
        variants["compiled_onednn"] = {"compile": True, "onednn": True}
    for name, extra in variants.items():
        _, cfg = make_config(tmp_path, tiny_bert_dir, sentiment_files, name, max_steps=3, eval_every="never",
                             **extra)
        jobs.train(cfg)
        runs[name] = weights(Path(cfg.output_dir))
    eager = runs["eager"]
    for compiled in list(runs.values())[1:]:
        assert eager.keys() == compiled.keys()
        assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)
    assert all(eager[k].abs().sum() > 0 for k in eager if "lora_B" in k)  # trained: B moved away from zero


def test_full_fine_tuning_through_a_whole_backbone_copy(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    """train_modules naming the whole backbone: transformers' get_input_embeddings reaches into the copy."""
    _, cfg = make_config(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "whole", max_steps=3, eval_every="never",
                         learning_rate=1e-3, head_learning_rate=1e-3)
    cfg.delta = [{"method": "train", "modules": ["bert", "classifier"]}]
    cfg.train_modules = []
    summary = jobs.train(cfg)
    saved = weights(Path(cfg.output_dir))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop_dir)
    assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
    embedding = saved["train:bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(embedding, base.bert.embeddings.word_embeddings.weight)  # trained
    loaded = dt.load(base, Path(cfg.output_dir) / "last")
    assert torch.equal(base.get_input_embeddings().weight, embedding)
    loaded.detach()


def test_evaluation_runs_without_autograd_and_restores_the_mode():
    """No autograd graph in evaluation: no activation memory, and LoRA takes its inference paths."""

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.seen = nn.Linear(1, 2), []

        def forward(self, input_ids, labels, **_):
            self.seen.append((torch.is_grad_enabled(), self.training))
            logits = self.head(input_ids[:, :1].float())
            return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)

    data = Encoded(input_ids=torch.arange(3, 9), offsets=torch.tensor([0, 2, 4, 6]), labels=torch.tensor([0, 1, 0]),
                   label_names=["a", "b"])
    model = Recorder().train()
    metrics = evaluate(model, data, pad_id=0, batch_size=2, info=distributed.Dist())
    assert model.seen and all(seen == (False, False) for seen in model.seen)
    assert model.training and 0 <= metrics["eval_accuracy"] <= 1
