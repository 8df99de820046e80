"""Crash safety of checkpoint writes: kill -9 at any moment never leaves a checkpoint that loads wrong.

Two complementary attacks on ``Delta.save`` (core/checkpoint.py: temp dir, fsync, two renames):
- deterministic: a forked child saves with every file-system call instrumented and SIGKILLs itself
  just before or just after the k-th call, for every k: each crash point of the protocol is visited;
- random: a forked child saves different states in a loop and the parent SIGKILLs it after random delays.
After each kill the checkpoint must load and equal exactly one of the saved states (never a mix, never
garbage, never older than the last save that returned), and the leftovers of the kill (``.ck.tmp-*``,
``.ck.old``) must not disturb the next save or load. ``--resume`` after kill -9 is in test_resume_kill.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import checkpoint
from tests.conftest import logits, tiny_bert

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

# every file-system step of a save, as (owner, attribute) patched in the child
IO_POINTS = [(checkpoint, "save_file"), (checkpoint, "file_sha256"), (checkpoint, "_fsync_dir"), (os, "replace"),
             (os, "fsync"), (shutil, "rmtree"), (tempfile, "mkdtemp"), (Path, "write_text")]


def _fill(delta, value: float) -> None:
    with torch.no_grad():
        for p in delta.parameters().values():
            p.fill_(value)


def _model_and_delta(rank: int = 4):
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=rank, targets="all-linear"), train_modules=["classifier"])
    return model, delta


def _loaded_value(where: Path) -> float:
    """Load the checkpoint onto a fresh model; every delta tensor must hold one and the same value."""
    model = tiny_bert()
    delta = dt.load(model, where)
    values = torch.cat([p.detach().flatten() for p in delta.parameters().values()]).unique()
    assert values.numel() == 1, f"checkpoint mixes states: {values.tolist()[:5]}"
    return float(values)


def _fork(child: Callable[[], None]) -> int:
    """Run ``child`` in a forked process (which never returns into pytest); its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _instrument(on_call: Callable[[str, Callable, tuple, dict], object]) -> list[tuple[object, str, object]]:
    """Route every IO_POINTS call through ``on_call(name, real, args, kwargs)``; returns what to restore."""
    saved = []
    for owner, name in IO_POINTS:
        real = getattr(owner, name)
        saved.append((owner, name, real))

        def wrapper(*args, _real=real, _name=name, **kwargs):
            return on_call(_name, _real, args, kwargs)

        setattr(owner, name, wrapper)
    return saved


def _save_trace(delta, where: Path) -> list[str]:
    """The file-system calls one save makes, in order (instrumented in this process, then restored)."""
    trace: list[str] = []

    def record(name, real, args, kwargs):
        trace.append(name)
        return real(*args, **kwargs)

    saved = _instrument(record)
    try:
        delta.save(where)
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)
    return trace


def _kill_at(delta, where: Path, k: int, after: bool) -> int:
    """Save in a child that SIGKILLs itself just before (or after) its k-th file-system call."""
    calls = [0]

    def maybe_die(name, real, args, kwargs):
        calls[0] += 1
        mine = calls[0]  # calls may nest (_fsync_dir calls os.fsync)
        if mine == k and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if mine == k and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def child():
        _instrument(maybe_die)
        delta.save(where)

    return _fork(child)


def _prepare(tmp_path: Path, delta, start: str) -> Path:
    """The directory as a previous save (value 1.0) left it: cleanly, or killed between its two renames."""
    where = tmp_path / "ck"
    _fill(delta, 1.0)
    delta.save(where)
    if start == "torn-previous":  # old copy parked at .ck.old, the new one never renamed in
        os.replace(where, tmp_path / ".ck.old")
        (tmp_path / ".ck.tmp-dead").mkdir()
        (tmp_path / ".ck.tmp-dead" / checkpoint.TENSORS_FILE).write_bytes(b"partial")
    return where


@pytest.mark.parametrize("start", ["clean", "torn-previous"])
def test_sigkill_at_every_step_of_a_save(tmp_path, start):
    _, delta = _model_and_delta()
    where = _prepare(tmp_path / "probe", delta, start)
    _fill(delta, 2.0)
    trace = _save_trace(delta, where)
    assert trace.count("replace") == (2 if start == "clean" else 1), trace
    assert {"mkdtemp", "save_file", "write_text", "fsync", "rmtree", "_fsync_dir"} <= set(trace), trace
    seen = []
    for k in range(1, len(trace) + 1):
        for after in (False, True):
            case = tmp_path / f"{k}-{after}"
            where = _prepare(case, delta, start)
            _fill(delta, 2.0)
            status = _kill_at(delta, where, k, after)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, after, status)
            value = _loaded_value(where)
            assert value in (1.0, 2.0), (k, after, value)
            seen.append((trace[k - 1], after, value))
            _fill(delta, 3.0)  # the leftovers of the kill must not disturb the next save and load
            delta.save(where)
            assert _loaded_value(where) == 3.0
            assert not (case / ".ck.old").exists()
            debris = [p.name for p in case.iterdir() if p.name.startswith(".ck.tmp-") and p.name != ".ck.tmp-dead"]
            assert debris == []  # the killed writer's temp dir was recognised (dead pid) and removed
    values = [v for _, _, v in seen]
    first_new = values.index(2.0)
    assert values[first_new:] == [2.0] * (len(values) - first_new), seen  # one commit point, no flip-flop
    assert seen[first_new][:2] == ("replace", True), seen  # ... right after the new directory is renamed in
    assert 1.0 in values  # killed early enough, the previous checkpoint is what loads


def test_sigkill_at_random_moments_of_repeated_saves(tmp_path):
    """A child saves states 1, 2, 3, ... as fast as it can; we kill it at random moments, 8 times."""
    model, delta = _model_and_delta(rank=32)  # ~0.5 MB of tensors: kills land inside writes too
    where = tmp_path / "ck"
    _fill(delta, 0.0)
    delta.save(where)
    rng = random.Random(1234)
    start = 1
    for _ in range(8):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                for value in range(start, start + 100000):
                    _fill(delta, float(value))
                    delta.save(where)
                    os.write(write_fd, struct.pack("q", value))  # reported only once save() returned
            finally:
                os._exit(0)
        os.close(write_fd)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        done = [v for (v,) in struct.iter_unpack("q", data)]
        last = done[-1] if done else start - 1
        value = _loaded_value(where)
        # never older than the last save that returned; at most the one in flight when killed
        assert value in (last, last + 1), (value, last)
        start = int(value) + 1
    assert start > 8  # the child really saved between kills
    _fill(delta, 0.5)
    delta.save(where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no debris of the 8 killed writers


def test_leftovers_of_a_crash_are_ignored_by_load_and_save(tmp_path):
    """Every combination of debris a kill can leave next to a checkpoint."""
    model, delta = _model_and_delta()
    _fill(delta, 1.0)
    where = delta.save(tmp_path / "ck")
    shutil.copytree(where, tmp_path / ".ck.tmp-complete")   # killed just before its rename: never committed
    (tmp_path / ".ck.tmp-partial").mkdir()                 # killed mid-write
    (tmp_path / ".ck.tmp-partial" / checkpoint.TENSORS_FILE).write_bytes(b"\x00" * 10)
    (tmp_path / ".ck.old").mkdir()                         # killed while deleting the previous copy
    dead = _dead_pid()
    (tmp_path / f".ck.tmp-{dead}-abc").mkdir()             # a writer that was killed
    (tmp_path / f".ck.tmp-{os.getppid()}-abc").mkdir()     # a writer that is still running
    (tmp_path / f".other.tmp-{dead}-abc").mkdir()          # debris of another checkpoint: not this save's business
    assert _loaded_value(where) == 1.0
    _fill(delta, 2.0)
    delta.save(where)
    assert _loaded_value(where) == 2.0
    assert not (tmp_path / ".ck.old").exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([".ck.tmp-complete", ".ck.tmp-partial", f".ck.tmp-{os.getppid()}-abc",
                            f".other.tmp-{dead}-abc", "ck"])


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_only_the_parked_copy_left(tmp_path):
    """Killed between the two renames: the target is gone and the complete previous copy sits at .ck.old."""
    model, delta = _model_and_delta()
    _fill(delta, 1.0)
    tuned = logits(model)
    where = delta.save(tmp_path / "ck")
    os.replace(where, tmp_path / ".ck.old")
    fresh = tiny_bert()
    dt.load(fresh, where)
    assert torch.equal(logits(fresh), tuned)
    _fill(delta, 2.0)
    delta.save(where)
    assert _loaded_value(where) == 2.0 and not (tmp_path / ".ck.old").exists()


def test_never_saved_is_not_found(tmp_path):
    """Killed before the first save ever committed: only a temp dir exists, and load says there is nothing."""
    (tmp_path / ".ck.tmp-x").mkdir()
    (tmp_path / ".ck.tmp-x" / checkpoint.CONFIG_FILE).write_text("{}")
    with pytest.raises(dt.CheckpointNotFoundError, match="does not exist"):
        dt.load(tiny_bert(), tmp_path / "ck")
