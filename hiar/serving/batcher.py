"""Cross-stream batching on one replica: model calls of concurrent streams that wait at the same point become one
forward (``serve.max_batch``, ``serve.batch_wait_ms``).

Every stream on a replica is its own coroutine (one Serve call per stream, holding that stream's caches). When
a stream has a block to denoise it ``submit``\\ s one item and awaits its result; the batcher queues the items
of all streams and runs them, up to ``max_batch`` at a time, as ONE call of ``run(items)`` on the replica's
single compute thread (the executor every model call of the replica goes through, so the event loop keeps
receiving blocks and answering health checks meanwhile). A batch starts when ``max_batch`` items wait, or
``batch_wait_ms`` after the first of them arrived, whichever comes first; items that arrive while a batch is
computing wait for the next one, so under load batches fill without any wait (``batch_wait_ms = 0`` batches
only what queued up while the thread was busy; a few ms let streams that are almost in step meet). The wait is
skipped when no company can come: once every stream open on the replica (``open_streams``, e.g. one stream
alone) has its item queued, the batch starts at once -- on the tiny preset a lone stream otherwise paid
``batch_wait_ms`` on each of its N + S - 1 diagonals.

A stream has at most one item queued (it awaits each result before it submits again), so a stream's caches
are in a batch at most once and a stream never leaves the replica it started on. ``max_batch = 1`` runs every
item alone, as submitted: the unbatched service.

An item whose stream is cancelled while it waits is dropped from the queue; one cancelled while its batch
computes is computed anyway and its result discarded (the compute thread cannot be interrupted). If a batch
raises, every stream in it gets the error (the model checks a batch's calls before it writes any cache, but an
error during the forward -- out of memory, say -- leaves the batch's caches unknown).

Why not ``ray.serve.batch``: it would do the queueing, but each stream needs back what its batch was (size,
queue wait, compute time) for its chunk records and the replica's ``stats``, the sizes come from the config
when a replica starts, and this class is plain asyncio, testable without Serve (``tests/unit/serving``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, deque
from typing import Any, Callable, Sequence


class _Item:
    __slots__ = ("value", "future", "queued", "queued_wall")

    def __init__(self, value, future: asyncio.Future):
        self.value, self.future = value, future
        self.queued, self.queued_wall = time.monotonic(), time.time()


def _summary(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "mean": round(statistics.fmean(ordered), 3), "p50": round(pick(0.5), 3),
            "p95": round(pick(0.95), 3), "max": round(ordered[-1], 3)}


class Batcher:
    """Micro-batches ``submit``\\ ted items into calls of ``run(list of items) -> list of results`` on ``executor``."""

    def __init__(self, run: Callable[[list], list], executor, max_batch: int, batch_wait_ms: float,
                 history: int = 4096, open_streams: Callable[[], int] | None = None):
        if int(max_batch) < 1:
            raise ValueError(f"serve.max_batch must be >= 1, got {max_batch}")
        if not batch_wait_ms >= 0:
            raise ValueError(f"serve.batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.run, self.executor = run, executor
        self.max_batch, self.wait_s = int(max_batch), float(batch_wait_ms) / 1000.0
        self.batch_wait_ms = float(batch_wait_ms)
        # how many streams could submit at all (each has at most one item queued); None: unknown, always wait
        self.open_streams = open_streams
        self.queue: deque[_Item] = deque()
        self.task: asyncio.Task | None = None
        self.wake: asyncio.Event | None = None  # made in the loop the streams run in
        self.sizes: Counter = Counter()
        self.failed = 0
        self.queue_ms: deque[float] = deque(maxlen=history)  # recent items: submitted -> their batch started
        self.forward_ms: deque[float] = deque(maxlen=history)  # recent batches: compute time of run()

    async def submit(self, value) -> tuple[Any, dict]:
        """The result for ``value`` and what its batch was: ``{"batch", "queued_s", "start", "end"}`` (wall)."""
        loop = asyncio.get_running_loop()
        item = _Item(value, loop.create_future())
        self.queue.append(item)
        if self.wake is None:
            self.wake = asyncio.Event()
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._serve())
        return await item.future  # cancelling the caller cancels the future: the item is then dropped

    def _live(self) -> int:
        while self.queue and self.queue[0].future.done():
            self.queue.popleft()  # cancelled while waiting
        return sum(not item.future.done() for item in self.queue)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._live():
            deadline = self.queue[0].queued + self.wait_s
            while self._live() < self._company_cap() and time.monotonic() < deadline:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            while self.queue and len(batch) < self.max_batch:
                item = self.queue.popleft()
                if not item.future.done():
                    batch.append(item)
            if not batch:
                continue
            try:
                results, start, end = await loop.run_in_executor(self.executor, self._timed, [i.value for i in batch])
            except Exception as err:  # noqa: BLE001 - handed to every stream of the batch
                self.failed += 1
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.sizes[len(batch)] += 1
            self.forward_ms.append((end - start) * 1000.0)
            for item, result in zip(batch, results):
                queued = max(0.0, start - item.queued_wall)
                self.queue_ms.append(queued * 1000.0)
                if not item.future.done():
                    item.future.set_result((result, {"batch": len(batch), "queued_s": queued, "start": start,
                                                     "end": end}))

    def _company_cap(self) -> int:
        """The most items a batch can get by waiting: ``max_batch``, or fewer when fewer streams are open."""
        if self.open_streams is None:
            return self.max_batch
        return min(self.max_batch, max(1, int(self.open_streams())))

    def _timed(self, values: list) -> tuple[list, float, float]:
        start = time.time()
        results = self.run(values)
        if len(results) != len(values):
            raise RuntimeError(f"a batch of {len(values)} returned {len(results)} results")
        return results, start, time.time()

    def stats(self) -> dict:
        """Batch sizes actually used (``{size: batches}``), items, queue wait and compute time (ms, recent)."""
        batches = sum(self.sizes.values())
        items = sum(size * n for size, n in self.sizes.items())
        return {"max_batch": self.max_batch, "batch_wait_ms": self.batch_wait_ms, "batches": batches,
                "items": items, "mean_batch": round(items / batches, 3) if batches else None,
                "batch_sizes": {str(size): n for size, n in sorted(self.sizes.items())}, "failed_batches": self.failed,
                "waiting": self._live(), "queue_ms": _summary(self.queue_ms), "forward_ms": _summary(self.forward_ms)}


__all__ = ["Batcher"]
