"""How many CPU threads a run uses: decided from what *other* processes use now, and decided again while
the run goes, so a run started next to another job gets the whole machine once that job ends.

Why not torch's default: torch's OpenMP threads wait for each other at every operator; when another
process takes a core, one of them is descheduled and the rest wait a whole time slice. On 2 busy cores a
MiniLM LoRA step took 4.3-5.7 s with 2 threads and 0.46-0.79 s with 1; on idle cores 2 threads are faster.

Why not the load average (what deltatune did before): it is a 1-minute moving average that also counts
the job that has just finished, so a run started right after it decided "busy" and kept 1 of 2 cores for
its whole length on a machine that was then idle. Here the other processes' share is measured directly,
over a recent window: the machine's busy CPU time (``/proc/stat``) minus this process's own CPU time,
divided by the wall time. Where ``/proc/stat`` does not exist (macOS) the load average is the fallback,
decided once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

RECHECK_S = 10.0      # re-decide at the first step boundary this long after the last decision: a change
#                       of load is acted on within two windows
MIN_WINDOW_S = 0.25   # the shortest window a decision is measured over


def machine_busy_seconds(stat: str = "/proc/stat") -> float | None:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def threads_for(free_cores: float, most: int) -> int:
    """Threads that each get a core of their own: the free cores, rounded down unless nearly whole."""
    return max(1, min(most, math.floor(free_cores + 0.25)))


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` at start (``decide``) and at step boundaries (``tick``).

    ``configured`` (``train.num_threads``) wins and is never changed. Several processes on one machine
    (``world`` > 1) split the cores evenly and keep that: each would count its peers as "other load".
    ``clock`` / ``busy`` / ``own`` are injectable so the rule can be tested without a loaded machine.
    """

    def __init__(self, configured: int | None, world: int = 1, cores: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 busy: Callable[[], float | None] = machine_busy_seconds,
                 own: Callable[[], float] = time.process_time) -> None:
        self.configured, self.world = configured, world
        self.cores = cores or os.cpu_count() or 1
        self.most = max(1, self.cores // world)
        self.clock, self.busy, self.own = clock, busy, own
        self.threads: int | None = None
        self.measured = configured is None and world == 1 and busy() is not None
        self._mark()

    def _mark(self) -> None:
        self.window = (self.clock(), self.busy() if self.measured else None, self.own())

    def others_cores(self) -> float:
        """Cores kept busy by other processes since the last mark (never negative)."""
        then, busy_then, own_then = self.window
        elapsed = max(self.clock() - then, 1e-9)
        busy_now = self.busy()
        if busy_then is None or busy_now is None:
            return 0.0
        return max(0.0, ((busy_now - busy_then) - (self.own() - own_then)) / elapsed)

    def decide(self) -> int:
        """The start-up decision (the window is the run's own start-up: loading the model and data)."""
        if self.configured:
            return self._set(self.configured, " as configured (train.num_threads)")
        if not self.measured:
            busy = self.world == 1 and hasattr(os, "getloadavg") and os.getloadavg()[0] >= self.cores - 0.5
            return self._set(1 if busy else self.most, " (the machine is busy)" if busy else "")
        waited = self.clock() - self.window[0]
        if waited < MIN_WINDOW_S:
            time.sleep(MIN_WINDOW_S - waited)
        return self._measure_and_set()

    def tick(self) -> None:
        """Call between steps: every ``RECHECK_S`` seconds, re-decide from the window just past."""
        if self.measured and self.clock() - self.window[0] >= RECHECK_S:
            self._measure_and_set()

    def _measure_and_set(self) -> int:
        others = self.others_cores()
        self._mark()
        threads = threads_for(self.cores - others, self.most)
        why = f" (other processes use {others:.1f} of {self.cores} cores)"
        return self._set(threads, why)

    def _set(self, threads: int, why: str) -> int:
        if threads != self.threads:
            before = "" if self.threads is None else f"{self.threads} -> "
            log.info("using %s%d CPU thread(s) per process%s", before, threads, why)
            torch.set_num_threads(threads)
            self.threads = threads
        return threads
