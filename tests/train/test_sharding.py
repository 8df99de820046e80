"""Sharded training (``train.distributed: fsdp``, train/sharding.py): what gets sharded, the errors, and that
2 sharded processes (torchrun, gloo on CPU) end where 1 process with the same global batch ends.

The full method x head x activation-checkpointing matrix is marked ``matrix`` (``make test-sharded``, not
``make test``); a representative subset runs in the normal suite. Every subprocess has a timeout: a hang fails the test.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.core.structure import block_paths
from deltatune.train import distributed, jobs, sharding
from deltatune.train.config import TrainConfig, load_config, split_global_batch
from deltatune.train.loop import MetricsLog
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.train.conftest import base_overrides

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]},
    "dora": {"method": "lora", "r": 4, "alpha": 8, "dora": True, "targets": "all-linear"},
    "ia3": {"method": "ia3"},
    "adapter": {"method": "adapter", "bottleneck": 8},
    "prefix": {"method": "prefix", "num_tokens": 4, "reparam_hidden": 16},
    "prompt": {"method": "prompt", "num_tokens": 4},
}
FAST = [("lora", True, True), ("prefix", False, False)]  # (method, head, activation checkpointing)
MATRIX = [pytest.param(*case, marks=[] if case in FAST else [pytest.mark.matrix])
          for case in itertools.product(METHODS, (True, False), (True, False))]


# -- resolving the engine, refusing what it cannot do -------------------------------------------------------

@pytest.mark.parametrize(("configured", "world", "env", "mode"), [
    ("auto", 1, {}, "single"), ("auto", 2, {}, "ddp"), ("fsdp", 1, {}, "single"), ("fsdp", 2, {}, "fsdp"),
    ("ddp", 2, {}, "ddp"), ("auto", 2, {"ACCELERATE_USE_FSDP": "true"}, "fsdp"),
    ("auto", 2, {"ACCELERATE_USE_DEEPSPEED": "true"}, "deepspeed"), ("ddp", 2, {"ACCELERATE_USE_FSDP": "1"}, "ddp")])
def test_the_engine_follows_the_config_then_the_launcher(configured, world, env, mode):
    assert sharding.resolve_mode(configured, world, env) == mode


@pytest.mark.parametrize(("key", "match"), [("fused_loss", "trunk"), ("compile", "compile"), ("onednn", "copy")])
def test_fsdp_refuses_settings_it_cannot_honour(tmp_path, tiny_llama_dir, alpaca_file, key, match):
    cfg = load_config(None, [("task", "instruction"), ("model.path", str(tiny_llama_dir)),
                             ("data.train", str(alpaca_file)), (f"train.{key}", True)])
    sharding.check_settings(cfg, "ddp")  # fine without sharding
    with pytest.raises(ConfigError, match=f"train.{key} cannot be combined with train.distributed fsdp.*{match}"):
        sharding.check_settings(cfg, "fsdp")
    with pytest.raises(ConfigError, match="deepspeed is not wired into the training loop yet"):
        sharding.check_settings(cfg, "deepspeed")


def test_a_global_batch_is_split_over_processes_or_refused():
    t = TrainConfig(global_batch_size=16, grad_accum=2)
    split_global_batch(t, 4)
    assert t.batch_size == 2
    with pytest.raises(ConfigError, match=r"global_batch_size 12 cannot be split evenly over 4 process\(es\) x "
                                          r"train.grad_accum 2; use a multiple of 8 \(e.g. 8 or 16\)"):
        split_global_batch(TrainConfig(global_batch_size=12, grad_accum=2), 4)


def test_blocks_are_found_from_structure():
    assert block_paths(tiny_bert()) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert block_paths(tiny_llama()) == ["model.layers.0", "model.layers.1"]
    assert block_paths(tiny_gpt2()) == ["transformer.h.0", "transformer.h.1"]
    assert block_paths(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_join_timeout_names_the_endpoint(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("DELTATUNE_DIST_TIMEOUT", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(distributed.DistributedError, match=f"process 1 of 2 could not join .* at 127.0.0.1:{port} "
                                                           f"within 3 s"):
        distributed.join(2, 1, "gloo")
    assert not dist.is_initialized()


# -- sharding in one process (a 1-process gloo group): what is split, what stays whole --------------------------

@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield distributed.Dist(0, 1, torch.device("cpu"), sharded=True)
    dist.destroy_process_group()


def test_the_base_is_sharded_and_the_delta_stays_whole(one_process_group, tmp_path):
    model = tiny_llama()
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    with torch.no_grad():
        for p in delta.parameters().values():
            p.normal_()  # B starts at zero: make the delta change the output
    ids = torch.randint(3, 60, (2, 9))
    want = model(input_ids=ids).logits
    assert sharding.shard_model(model, delta, one_process_group) == 2
    trained = {id(p) for p in delta.parameters().values()}
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values() if id(p) not in trained)
    assert not any(isinstance(p, DTensor) for p in delta.parameters().values())
    assert len(params) > len(trained) > 0
    torch.testing.assert_close(model(input_ids=ids).logits, want)
    # a checkpoint of the sharded model is the single-process one, and loads onto a fresh (unsharded) model
    delta.save(tmp_path / "ckpt")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(fresh(input_ids=ids).logits, want)


def test_a_delta_loads_onto_a_sharded_model(one_process_group, tmp_path):
    source = tiny_llama()
    delta = dt.attach(source, dt.IA3())
    with torch.no_grad():
        for p in delta.parameters().values():
            p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 60, (2, 9))
    want = source(input_ids=ids).logits
    delta.save(tmp_path / "ckpt")
    model = tiny_llama()
    sharding.shard_model(model, None, one_process_group)
    loaded = dt.load(model, tmp_path / "ckpt")
    assert isinstance(model.model.layers[0].self_attn.k_proj.base.weight, DTensor)
    torch.testing.assert_close(model(input_ids=ids).logits, want)
    assert not any(isinstance(p, DTensor) for p in loaded.parameters().values())


# -- torchrun: 2 sharded processes == 1 process ---------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "OMP_NUM_THREADS": "1",
            "DELTATUNE_DIST_TIMEOUT": "120", **extra}


def _job(tmp_path: Path, model_dir: Path, files, method: str, head: bool, checkpointing: bool, **train) -> Path:
    cfg = base_overrides(model_dir, *files, tmp_path / "single", tmp_path / "cache")
    cfg["delta"] = [METHODS[method]]
    cfg["train_modules"] = "auto" if head else []
    cfg["train"].update({"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2,
                         "gradient_checkpointing": checkpointing, **train})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(path: Path, out: Path, *extra: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "deltatune.cli", "train", str(path),
           "--output_dir", str(out), "--train.distributed", "fsdp", *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _max_diff(a: Path, b: Path) -> float:
    one, two = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    assert one.keys() == two.keys()
    return max((one[k] - two[k]).abs().max().item() for k in one)


@pytest.mark.parametrize(("method", "head", "checkpointing"), MATRIX)
def test_two_sharded_processes_match_one(tmp_path, tiny_bert_nodrop_dir, sentiment_files, method, head,
                                         checkpointing):
    path = _job(tmp_path, tiny_bert_nodrop_dir, sentiment_files, method, head, checkpointing)
    jobs.train(load_config(path))
    result = _torchrun(path, tmp_path / "fsdp", "--train.batch_size", "4")  # 2 x 4 = the single run's 8
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp: base sharded over 2 processes (2 blocks + root)" in result.stderr
    assert "all 2 processes hold identical trained weights" in result.stderr  # checked bit for bit in the loop
    assert _max_diff(tmp_path / "single" / "last", tmp_path / "fsdp" / "last") < 1e-5
    evals = [[r for r in MetricsLog.read(tmp_path / run / "metrics.jsonl") if r["type"] == "eval"]
             for run in ("single", "fsdp")]
    assert [r["step"] for r in evals[1]] == [2, 4]
    for a, b in zip(*evals, strict=True):
        assert a["eval_accuracy"] == b["eval_accuracy"] and abs(a["eval_loss"] - b["eval_loss"]) < 1e-5


def test_a_sharded_decoder_matches_one_process(tmp_path, tiny_llama_dir):
    """Llama (grouped KV heads, rotary buffers, untied output layer sharded by the root), causal LM loss.
    A .txt corpus is cut into blocks of one length, so every process' mean token loss weighs tokens alike
    (with rows of different lengths, the mean of per-process means is not the global mean, sharded or not)."""
    from tests.train.conftest import WORDS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(20)))
    path = _job(tmp_path, tiny_llama_dir, (corpus, corpus), "lora", False, False, eval_batch_size=4)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(task="causal_lm", delta=[{"method": "lora", "r": 4, "targets": "all-linear"}])
    cfg["data"]["max_length"] = 16
    path.write_text(yaml.safe_dump(cfg))
    jobs.train(load_config(path))
    result = _torchrun(path, tmp_path / "fsdp", "--train.batch_size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _max_diff(tmp_path / "single" / "last", tmp_path / "fsdp" / "last") < 1e-5
    # merge and export of the sharded run's checkpoint, in one process, with nothing gathered by hand
    from transformers import AutoModelForCausalLM

    cfg, where = jobs.locate(str(tmp_path / "fsdp"))
    merged = jobs.merge(cfg, where, tmp_path / "merged")
    exported = jobs.export(cfg, where, tmp_path / "peft", "peft")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    dt.load(model, where)
    ids = torch.randint(3, 60, (2, 8))
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits,
                               model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert (exported / "adapter_model.safetensors").is_file()


# -- failures: kill -9 and --resume, a killed process, a watched collective --------------------------------------

STEPS = 24
TIMINGS = {"examples_per_s", "tokens_per_s", "elapsed_s"}


def _popen(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "deltatune.cli", "train", str(path),
           "--output_dir", str(out), "--train.distributed", "fsdp", "--train.batch_size", "4", *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        records = MetricsLog.read(run / "metrics.jsonl")
        if max((r.get("step", 0) for r in records if r.get("type") == "train"), default=0) >= step:
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"the run did not reach step {step} (exit code {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in MetricsLog.read(run / "metrics.jsonl")]


def test_resume_after_kill_9_of_a_sharded_run_is_the_uninterrupted_run(tmp_path, tiny_bert_dir, sentiment_files):
    """Dropout on: the resumed run must restore every process' RNG state as well as the delta and optimizer."""
    path = _job(tmp_path, tiny_bert_dir, sentiment_files, "lora", True, False, max_steps=STEPS, save_every=3,
                eval_every=8, log_every=1, epochs=10)
    reference = _torchrun(path, tmp_path / "ref", "--train.batch_size", "4")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    proc = _popen(path, run)
    _wait_for_step(proc, run, 7)
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)  # the launcher and both workers, as an OOM killer or scancel would
    proc.wait(timeout=30)
    assert not (run / "summary.json").exists()  # killed mid-run
    resumed = _torchrun(path, run, "--train.batch_size", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for which in ("last", "best"):
        got, want = load_file(run / which / "delta.safetensors"), load_file(tmp_path / "ref" / which /
                                                                            "delta.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), which  # bit for bit
    assert _records(run) == _records(tmp_path / "ref")


def test_a_killed_process_stops_the_others(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    path = _job(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "lora", True, False, max_steps=2000, epochs=100,
                eval_every="never", log_every=1, save_every=1000)
    proc = _popen(path, tmp_path / "run")
    _wait_for_step(proc, tmp_path / "run", 3)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # a hang fails here
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL) received" in err and "deltatune.cli FAILED" in err  # torchrun names the first failure
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)


def test_a_failed_collective_says_what_most_likely_happened(tmp_path):
    info = distributed.Dist(1, 2)
    with pytest.raises(distributed.DistributedError, match=r"process 1 of 2 stopped: .*\(RuntimeError: Connection "
                                                           r"closed by peer\).*another process died.*--resume"):
        with distributed.peers_watched(info, tmp_path):
            raise RuntimeError("Connection closed by peer\nmore")
    with pytest.raises(ConfigError):  # deltatune's own errors pass through unchanged
        with distributed.peers_watched(info, tmp_path):
            raise ConfigError("x")
    with pytest.raises(RuntimeError, match="^y$"):  # and one process has no peers to blame
        with distributed.peers_watched(distributed.Dist(), tmp_path):
            raise RuntimeError("y")


# -- multi-node: two launches on one machine stand in for two nodes ----------------------------------------------

def test_two_nodes_match_one_process(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    path = _job(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "ia3", True, False)
    jobs.train(load_config(path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", "-m", "deltatune.cli", "train",
               str(path), "--output_dir", str(tmp_path / "nodes"), "--train.distributed", "fsdp",
               "--train.batch_size", "4"]
        nodes.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=240)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert _max_diff(tmp_path / "single" / "last", tmp_path / "nodes" / "last") < 1e-5


@pytest.mark.matrix
def test_accelerate_launch_with_an_fsdp_config_shards(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    """``accelerate launch --use_fsdp`` exports ACCELERATE_USE_FSDP: train.distributed auto follows it."""
    path = _job(tmp_path, tiny_bert_nodrop_dir, sentiment_files, "lora", True, False)
    jobs.train(load_config(path))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "deltatune.cli", "train", str(path),
           "--output_dir", str(tmp_path / "acc"), "--train.batch_size", "4"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp: base sharded over 2 processes" in result.stderr
    assert _max_diff(tmp_path / "single" / "last", tmp_path / "acc" / "last") < 1e-5
