"""Dynamic batching: rows from concurrent requests are collected for a short window and run as one batch.

Each row waits in a queue with a future. The worker takes the oldest row, waits up to ``max_wait_ms`` for
more (or until ``max_batch_size`` rows are there), and runs every queued row that can share its forward
(same kind, same sampling settings; the delta may differ: the engine routes per sample) on one model thread.
Rows that cannot share wait, in order, for the next batch. While a batch runs, new rows queue up, so under
load the next batch is full without waiting. ``max_batch_size=1`` runs one row at a time (batching off).
A failing batch fails only its own rows' requests; the worker goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    key: Hashable          # rows with equal keys can run in one batch
    row: Any
    future: asyncio.Future


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0


class Batcher:
    """Collects rows and calls ``run(key, rows) -> results`` (one result per row) on a single worker thread."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], max_batch_size: int = 16,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ConfigError(f"batching: max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size} "
                              f"and {max_wait_ms}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-serve")

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for pending in self._queue:
            pending.future.cancel()
        self._thread.shutdown(wait=True)

    async def submit(self, key: Hashable, rows: list[Any]) -> list[Any]:
        """Queue ``rows`` (they may land in different batches) and wait for their results, in order."""
        if self._arrived is None:
            raise RuntimeError("Batcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        pending = [_Pending(key, row, loop.create_future()) for row in rows]
        self._queue.extend(pending)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _serve(self) -> None:
        while True:
            await self._next_arrival()
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while self._count(self._queue[0].key) < self.max_batch_size:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or not await self._next_arrival(left):
                    break
            batch = self._take(self._queue[0].key)
            await self._run(batch)

    async def _next_arrival(self, timeout: float | None = None) -> bool:
        """Wait until the queue is not empty (first call) or a new row came (with ``timeout``)."""
        assert self._arrived is not None
        if timeout is None and self._queue:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _count(self, key: Hashable) -> int:
        return sum(1 for p in self._queue if p.key == key and not p.future.done())

    def _take(self, key: Hashable) -> list[_Pending]:
        """Up to max_batch_size live rows with ``key``, oldest first; cancelled ones (client gone) are dropped."""
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        for pending in self._queue:
            if pending.future.done():
                continue
            (batch if pending.key == key and len(batch) < self.max_batch_size else rest).append(pending)
        self._queue = rest
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self.run, batch[0].key, [p.row for p in batch])
        except Exception as e:  # noqa: BLE001 - the error goes to the requests of this batch, the server lives on
            log.exception("a batch of %d rows failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
