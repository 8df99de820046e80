"""The CPU thread count follows what *other* processes use: 1 thread while another job keeps the cores
busy, all of them once it has ended, re-decided while the run goes (train/threads.py)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from deltatune.train import threads
from deltatune.train.threads import ThreadGovernor, threads_for


class FakeMachine:
    """A clock and CPU counters advanced by hand: ``run(seconds, others=cores, own=cores)``."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def governor(self, configured=None, world=1, cores=2) -> ThreadGovernor:
        return ThreadGovernor(configured, world, cores=cores, clock=lambda: self.now, busy=lambda: self.busy,
                              own=lambda: self.own)


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_run_started_next_to_a_busy_job_takes_both_cores_once_that_job_ends():
    m = FakeMachine()
    gov = m.governor()
    m.run(5.0, others=2.0, own=0.5)   # start-up while another job keeps both cores busy
    assert gov.decide() == 1 and torch.get_num_threads() == 1
    m.run(threads.RECHECK_S / 2, others=2.0, own=1.0)
    gov.tick()                        # before RECHECK_S: no new decision
    assert gov.threads == 1
    m.run(threads.RECHECK_S / 2, others=0.0, own=1.0)   # the other job ends in the middle of a window
    gov.tick()
    assert gov.threads == 1           # that window was half busy
    m.run(threads.RECHECK_S, others=0.0, own=1.0)
    gov.tick()                        # the next one is idle: both cores
    assert gov.threads == 2 and torch.get_num_threads() == 2
    m.run(threads.RECHECK_S, others=1.0, own=1.2)   # a new job takes a core: back to 1
    gov.tick()
    assert gov.threads == 1


def test_the_load_left_by_a_finished_job_does_not_count():
    """The old rule read the 1-minute load average, which still counts a job that ended seconds ago."""
    m = FakeMachine()
    gov = m.governor()
    m.run(3.0, others=0.0, own=1.0)   # only this run's own start-up in the window
    assert gov.decide() == 2


def test_configured_threads_and_several_processes_are_not_re_decided():
    m = FakeMachine()
    gov = m.governor(configured=3)
    m.run(1.0, others=2.0, own=1.0)
    assert gov.decide() == 3
    m.run(threads.RECHECK_S, others=0.0, own=1.0)
    gov.tick()
    assert gov.threads == 3
    shared = m.governor(world=2, cores=4)
    assert shared.decide() == 2 and not shared.measured


def test_threads_each_get_a_core_of_their_own():
    assert [threads_for(free, 2) for free in (0.0, 0.7, 1.0, 1.74, 1.8, 2.0, 3.0)] == [1, 1, 1, 1, 2, 2, 2]


def test_machine_busy_seconds_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {tick} 0 {tick} {50 * tick} {tick} 0 0 0 0 0\ncpu0 1 2 3\n")
    assert threads.machine_busy_seconds(str(stat)) == pytest.approx(2.0)  # idle and iowait not counted
    assert threads.machine_busy_seconds(str(tmp_path / "missing")) is None


def _spin(seconds: float, started) -> None:
    started.release()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat") or (os.cpu_count() or 1) < 2, reason="needs /proc, 2 cores")
def test_real_processes_spinning_on_every_core_are_seen_and_their_end_too(monkeypatch):
    monkeypatch.setattr(threads, "RECHECK_S", 1.0)
    cores = os.cpu_count() or 1
    gov = ThreadGovernor(None, 1)
    time.sleep(1.0)
    before = gov.others_cores()  # what the rest of the machine does without the spinners
    ctx = multiprocessing.get_context("fork")  # a pure-Python loop: nothing to re-import
    started = ctx.Semaphore(0)
    spinners = [ctx.Process(target=_spin, args=(3.0, started)) for _ in range(cores)]
    for p in spinners:
        p.start()
    for _ in spinners:
        started.acquire()
    gov._mark()       # a window with every core spinning
    time.sleep(1.0)
    spinning = gov.others_cores()
    assert spinning > cores - 0.6, f"{cores} spinning processes measured as {spinning:.2f} cores"
    assert gov.decide() == 1
    for p in spinners:
        p.join()
    gov._mark()
    time.sleep(1.0)
    gov.tick()
    if before < 0.3:  # a quiet machine (CI): the spinners' end frees every core
        assert gov.threads == gov.most, f"{gov.threads} threads after the spinners ended (before: {before:.2f})"
    else:             # other work on the machine: at least the spinners' load is gone from the measure
        assert gov.others_cores() < spinning - 0.5
