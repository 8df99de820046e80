"""``deltatune train --resume`` after kill -9 at random points ends exactly where an uninterrupted run ends.

tests/train/test_loop.py kills one run once, right after a state save, and compares the final weights.
This extends it: runs are killed at random steps *and* random moments within a step (mid-step, while a
checkpoint or metrics line is being written), several times in a row (a resumed run is killed again),
and afterwards the final ``last`` and ``best`` deltas must equal the reference bit for bit and the
metrics log must hold exactly the reference's records (timings aside). The killed processes are forks of
this one running the CLI (cheap: no re-import); each is killed with a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.train.loop import MetricsLog
from tests.conftest import tiny_bert
from tests.reliability.conftest import write_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
STEPS = 24
TIMINGS = {"examples_per_s", "tokens_per_s", "elapsed_s"}


def _config(tmp: Path, model: Path, data, name: str) -> Path:
    return write_config(tmp, model, data, name, train__max_steps=STEPS, train__epochs=10, train__save_every=3,
                        train__eval_every=5, train__log_every=1, train__num_threads=1)


def _train(path: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["train", str(path), *extra])
    assert result.exit_code == 0, result.stderr[-2000:]


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in MetricsLog.read(run / "metrics.jsonl")]


def _logged_step(run: Path) -> int:
    steps = [r.get("step", 0) for r in MetricsLog.read(run / "metrics.jsonl") if r.get("type") == "train"]
    return max(steps, default=0)


def _state_step(run: Path) -> int | None:
    for where in (run / "state", run / ".state.old"):
        try:
            return json.loads((where / "delta_config.json").read_text())["progress"]["step"]
        except (OSError, ValueError, KeyError):
            continue
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_model, cli_data) -> Path:
    """The uninterrupted run (dropout on: resuming must restore the RNG states too)."""
    tmp = tmp_path_factory.mktemp("reference")
    path = _config(tmp, cli_model, cli_data, "ref")
    _train(path)
    return tmp / "ref"


def _kill_during(path: Path, run: Path, resume: bool, target: int, jitter: float) -> int | None:
    """Run the CLI in a forked child and SIGKILL it once it has logged step ``target`` (plus a random
    few milliseconds, so the kill lands anywhere in the following step); returns the state's step."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            torch.set_num_threads(1)
            result = CliRunner().invoke(app, ["train", str(path), *(["--resume"] if resume else [])])
            code = result.exit_code
        finally:
            os._exit(code)
    deadline = time.time() + 120
    while _logged_step(run) < target and time.time() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            pytest.fail(f"the run ended before step {target}")
        time.sleep(0.002)
    time.sleep(jitter)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return _state_step(run)


def _assert_same_run(run: Path, reference: Path) -> None:
    for which in ("last", "best"):
        got, want = load_file(run / which / "delta.safetensors"), load_file(reference / which / "delta.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), which  # bit for bit
    assert _records(run) == _records(reference)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_repeatedly_at_random_points_then_resumed(reference, tmp_path, cli_model, cli_data, seed):
    """Three kills at random steps (the later ones kill an already resumed run), then one last resume."""
    rng = random.Random(seed)
    path = _config(tmp_path, cli_model, cli_data, "run")
    run = tmp_path / "run"
    targets = sorted(rng.sample(range(4, STEPS - 1), 3))
    resume = False
    for target in targets:
        state = _kill_during(path, run, resume, target, rng.uniform(0, 0.03))
        assert state is not None and state <= _logged_step(run) + 1, (target, state)
        model = tiny_bert()
        dt.load(model, run / "last", check_base=False)  # whatever the kill interrupted, last/ loads
        resume = True
    _train(path, "--resume")
    _assert_same_run(run, reference)
    # the final saves of last/ and state/ removed what the killed writers left of theirs
    assert not [p.name for p in run.iterdir() if p.name.startswith((".last.", ".state."))]


def test_killed_before_the_first_state_save(tmp_path, cli_model, cli_data, reference):
    """No state yet: --resume has nothing to continue, and --overwrite starts the run cleanly again."""
    path = _config(tmp_path, cli_model, cli_data, "run")
    run = tmp_path / "run"
    _kill_during(path, run, False, 1, 0.0)
    if _state_step(run) is not None:
        pytest.skip("the child got past its first state save before the kill")
    result = CliRunner().invoke(app, ["train", str(path), "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    _train(path, "--overwrite")
    _assert_same_run(run, reference)
