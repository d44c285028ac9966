"""Back-pressure between the stages of a stream: a small credit actor.

Ray Serve's streaming calls have no back-pressure: an upstream generator runs as fast as it can and its
outputs pile up in the caller (DESIGN §8). Here every producer/consumer pair of a stream (step stage j ->
step stage j + 1, last step -> decoder, decoder -> ingress) is a *boundary* ``b`` (the producer's position:
0..S-1 for the step stages, S for the decoder). A consumer reports each block it *takes* (``take``); a
producer may start block ``n`` only while fewer than ``window`` (``serve.max_buffered_blocks``) of its
outputs are produced but not yet taken, i.e. once ``taken >= n - window + 1``. So at most ``window`` blocks
wait between two stages of a stream, whatever the speeds, and a slow reader stalls the pipeline instead of
growing queues (the Serve proxy's own buffer towards the HTTP client is outside this, at most one chunk
record per block of the request).

One actor per ingress replica (created by it, so it lives and dies with it) serves every stream; the ingress
``close``\\ s a stream when it ends for any reason (finished, failed, client gone), which wakes every waiting
producer of that stream with ``closed`` so the stage gives the stream up and frees its cache. A producer that
waits longer than ``timeout`` also gives up (a consumer that died without the ingress noticing).

Cancellation: an actor call made while serving a request is that request's child task, and Ray cancels a
cancelled request's children too (recursively, even calls made later from its ``finally``; ray issue 52476).
So an in-flight ``wait`` of a cancelled stage raises ``TaskCancelledError`` rather than ``CancelledError``
(both are ``CANCELLED``), and the ingress sends ``close`` in an empty context (``close_stream``): as a child of
the request whose client went away it was itself cancelled now and then, and the stream stayed open here.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict

import ray

CLOSED = -1
CANCELLED = (asyncio.CancelledError, GeneratorExit, ray.exceptions.TaskCancelledError)  # how a cancelled call ends
_REMEMBER_CLOSED = 4096  # closed stream ids kept to ignore late reports (FIFO)


@ray.remote(num_cpus=0, max_restarts=0)
class FlowControl:
    def __init__(self, window: int):
        if int(window) < 1:
            raise ValueError(f"serve.max_buffered_blocks must be >= 1, got {window}")
        self.window = int(window)
        self.taken: dict[tuple[str, int], int] = {}
        self.waiters: dict[tuple[str, int], list[tuple[int, asyncio.Future]]] = {}
        self.closed: OrderedDict[str, float] = OrderedDict()  # recently closed streams: late reports ignored

    async def take(self, stream: str, boundary: int, count: int) -> None:
        """The consumer of ``boundary`` has taken ``count`` blocks (0..count-1) of ``stream``."""
        if stream in self.closed:
            return
        key = (stream, boundary)
        if count <= self.taken.get(key, 0):
            return
        self.taken[key] = count
        still = []
        for target, fut in self.waiters.get(key, []):
            if count >= target:
                if not fut.done():
                    fut.set_result(count)
            else:
                still.append((target, fut))
        self._set_waiters(key, still)

    async def wait(self, stream: str, boundary: int, block: int, timeout: float) -> int:
        """Return once the producer of ``boundary`` may start ``block``: the taken count, or CLOSED.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        if stream in self.closed:
            return CLOSED
        key = (stream, boundary)
        target = block - self.window + 1
        have = self.taken.get(key, 0)
        if have >= target:
            return have
        fut = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(key, []).append((target, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"stream {stream}: the consumer of stage boundary {boundary} took no block for "
                               f"{timeout:.0f} s") from None
        finally:
            # a producer that timed out or was cancelled stops waiting: without this its entry (and the stream,
            # in ``stats``) stayed here until the ingress closed the stream, or for good if the close never came
            self._set_waiters(key, [w for w in self.waiters.get(key, []) if w[1] is not fut])

    def _set_waiters(self, key: tuple[str, int], waiters: list[tuple[int, asyncio.Future]]) -> None:
        if waiters:
            self.waiters[key] = waiters
        else:
            self.waiters.pop(key, None)

    async def close(self, stream: str) -> None:
        now = time.time()
        self.closed[stream] = now
        for key in [k for k in self.taken if k[0] == stream] + [k for k in self.waiters if k[0] == stream]:
            self.taken.pop(key, None)
            for _, fut in self.waiters.pop(key, []):
                if not fut.done():
                    fut.set_result(CLOSED)
        while len(self.closed) > _REMEMBER_CLOSED:
            self.closed.popitem(last=False)

    async def stats(self) -> dict:
        open_ = {k[0] for k in self.taken} | {k[0] for k in self.waiters}
        return {"streams": len(open_), "waiters": sum(len(v) for v in self.waiters.values()), "window": self.window,
                "open": sorted(open_), "taken": {f"{k[0][:8]}/{k[1]}": v for k, v in self.taken.items()},
                "closed_recently": [x[:8] for x in list(self.closed)[-8:]]}


class StreamClosed(Exception):
    """The ingress closed the stream (finished elsewhere, failed or the client went away)."""


class Producer:
    """A stage's view of one boundary as a producer: ``await acquire(n)`` before computing block ``n``.

    Remembers the last taken count it saw, so it only calls the actor when the window is full.
    """

    def __init__(self, flow, stream: str, boundary: int, window: int, timeout: float):
        self.flow, self.stream, self.boundary = flow, stream, boundary
        self.window, self.timeout = window, timeout
        self.taken = 0
        self.max_lead = 0  # most blocks ever produced but not yet taken, seen when starting one (<= window - 1)

    async def acquire(self, block: int) -> None:
        if block - self.taken >= self.window:
            got = await self.flow.wait.remote(self.stream, self.boundary, block, self.timeout)
            if got == CLOSED:
                raise StreamClosed(f"stream {self.stream} was closed")
            self.taken = max(self.taken, got)
        self.max_lead = max(self.max_lead, block - self.taken)


def report_taken(flow, stream: str, boundary: int, count: int) -> None:
    """Fire-and-forget: the consumer of ``boundary`` took ``count`` blocks."""
    flow.take.remote(stream, boundary, count)


def close_stream(flow, stream: str) -> None:
    """Fire-and-forget ``close``, submitted outside the current request so cancelling that request (the client
    went away: the usual reason to close) cannot cancel the close with it."""
    contextvars.Context().run(flow.close.remote, stream)
