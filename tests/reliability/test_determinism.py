"""Determinism on CPU: the same seed gives the same delta weights (API) and the same run (CLI), bit for bit.

The API check trains every registered method (and LoRA with dropout, which draws random masks) in two
separate processes with different PYTHONHASHSEED values, so that neither set/dict ordering nor leftover
state of one process can hide behind the comparison; a different seed must give different weights, so
the comparison can fail. The CLI check runs `deltatune train` twice (here and in a fresh process) and
compares every metrics record and the saved deltas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.methods import METHODS
from tests.reliability import determinism_job
from tests.reliability.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp: Path, seed: int, hash_seed: str) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"seed{seed}-hash{hash_seed}"
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.determinism_job", str(seed), str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Seed 3 in two processes started together (different hash seeds), and seed 4 in this one meanwhile."""
    tmp = tmp_path_factory.mktemp("determinism")
    started = {"first": _start(tmp, 3, "1"), "second": _start(tmp, 3, "2")}
    (tmp / "other").mkdir()
    determinism_job.main(4, tmp / "other")
    for proc, _ in started.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return {"other": tmp / "other", **{name: out for name, (_, out) in started.items()}}


def test_same_seed_same_delta_weights_across_processes(runs):
    first, second = runs["first"], runs["second"]
    files = sorted(p.name for p in first.glob("*.safetensors"))
    methods = {n for n, m in METHODS.items() if not m.sees_delta}
    assert {f.removesuffix(".safetensors") for f in files} >= methods | {"lora+dropout", "lora+adapter+gates"}
    for name in files:
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs between two runs with seed 3"
    losses = json.loads((first / "losses.json").read_text())
    assert losses == json.loads((second / "losses.json").read_text())
    assert all(len(set(v)) > 1 for v in losses.values())  # it really trained


def test_other_seed_other_weights(runs):
    """The check above can fail: a different seed changes the trained weights of every method."""
    first, other = runs["first"], runs["other"]
    for path in sorted(first.glob("*.safetensors")):
        a, b = load_file(path), load_file(other / path.name)
        assert any(not torch.equal(a[k], b[k]) for k in a), path.name


# -- the CLI ---------------------------------------------------------------------------------------------

TIMINGS = {"examples_per_s", "tokens_per_s", "elapsed_s"}


def _cli_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def _cli_run(tmp: Path, model: Path, data, name: str, seed: int, subprocess_env: dict | None = None) -> Path:
    """One tiny `deltatune train` run (dropout on, two evaluations); in this process, or a fresh one."""
    path = write_config(tmp, model, data, name, seed=seed, train__max_steps=10, train__eval_every=5,
                        train__num_threads=1)
    if subprocess_env is None:
        result = CliRunner().invoke(app, ["train", str(path)])
        assert result.exit_code == 0, result.stderr[-2000:]
    else:
        done = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(path)], cwd=tmp,
                              env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return tmp / name


def test_cli_same_seed_same_metrics_and_delta(tmp_path, cli_model, cli_data):
    env = {**os.environ, "PYTHONHASHSEED": "5", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CI": "true"}
    first = _cli_run(tmp_path, cli_model, cli_data, "a", seed=11)
    second = _cli_run(tmp_path, cli_model, cli_data, "b", seed=11, subprocess_env=env)
    records = _cli_records(first)
    assert [r["type"] for r in records].count("eval") == 2 and len(records) > 10
    assert records == _cli_records(second)  # every loss, lr and eval metric, exactly
    for which in ("last", "best"):
        a, b = load_file(first / which / "delta.safetensors"), load_file(second / which / "delta.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    other = _cli_records(_cli_run(tmp_path, cli_model, cli_data, "c", seed=12))
    assert [r.get("loss") for r in other] != [r.get("loss") for r in records]  # the seed matters
