"""The replica's cross-stream batcher (hiar.serving.batcher), in plain asyncio with a real one-thread executor."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hiar.serving.batcher import Batcher


class Recorder:
    """``run``: doubles each item and remembers the batches it was given; can hold a batch until released."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(60)
        if self.fail_on in items:
            raise RuntimeError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def submit_all(batcher, count: int) -> list:
    """Submit items 0..count-1 at once and wait for every result."""
    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(count)))

    return run_async(main())


async def hold_first_batch(batcher, rec: Recorder) -> asyncio.Future:
    """Submit item 0 and return once its batch is computing and held there (until ``rec.release`` is set)."""
    rec.release.clear()
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 60)
    return first


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def test_max_batch_one_runs_every_item_alone(executor):
    rec = Recorder()
    b = Batcher(rec, executor, max_batch=1, batch_wait_ms=50)
    out = submit_all(b, 5)
    assert [r for r, _ in out] == [0, 2, 4, 6, 8] and all(info["batch"] == 1 for _, info in out)
    assert rec.batches == [[0], [1], [2], [3], [4]]
    assert b.stats()["batch_sizes"] == {"1": 5} and b.stats()["items"] == 5


def test_waiting_items_form_batches_of_at_most_max_batch(executor):
    rec = Recorder()
    b = Batcher(rec, executor, max_batch=4, batch_wait_ms=0)
    out = submit_all(b, 6)
    assert [r for r, _ in out] == [0, 2, 4, 6, 8, 10]
    assert rec.batches == [[0, 1, 2, 3], [4, 5]]
    assert [info["batch"] for _, info in out] == [4, 4, 4, 4, 2, 2]
    stats = b.stats()
    assert stats["batch_sizes"] == {"2": 1, "4": 1} and stats["mean_batch"] == 3.0 and stats["batches"] == 2
    assert stats["forward_ms"]["n"] == 2 and stats["queue_ms"]["n"] == 6 and stats["waiting"] == 0


def test_a_lone_item_waits_for_company_up_to_the_wait(executor):
    """With a long wait the first item does not run alone: the second, arriving later, joins its batch."""
    rec = Recorder()
    b = Batcher(rec, executor, max_batch=2, batch_wait_ms=60_000)

    async def main():
        first = asyncio.ensure_future(b.submit(1))
        for _ in range(5):
            await asyncio.sleep(0)  # the batcher is running and waiting now
        assert not rec.batches
        second = await b.submit(2)
        return await first, second

    (r1, i1), (r2, i2) = run_async(main())
    assert (r1, r2) == (2, 4) and i1["batch"] == i2["batch"] == 2 and rec.batches == [[1, 2]]


def test_items_arriving_during_a_batch_go_into_the_next(executor):
    rec = Recorder()
    b = Batcher(rec, executor, max_batch=8, batch_wait_ms=0)

    async def main():
        first = await hold_first_batch(b, rec)
        later = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        rec.release.set()
        return await first, await asyncio.gather(*later)

    run_async(main())
    assert rec.batches == [[0], [1, 2, 3]]


def test_a_cancelled_stream_leaves_the_queue_and_others_are_served(executor):
    rec = Recorder()
    b = Batcher(rec, executor, max_batch=8, batch_wait_ms=0)

    async def main():
        first = await hold_first_batch(b, rec)
        gone, kept = asyncio.ensure_future(b.submit(1)), asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0)
        gone.cancel()  # the client of stream 1 went away while its block waited
        await asyncio.sleep(0)
        rec.release.set()
        return await first, await kept, gone.cancelled()

    (_, _), (r2, info), cancelled = run_async(main())
    assert cancelled and r2 == 4 and info["batch"] == 1
    assert rec.batches == [[0], [2]]  # item 1 never reached the model


def test_a_failing_batch_fails_its_streams_only(executor):
    rec = Recorder(fail_on=1)
    b = Batcher(rec, executor, max_batch=2, batch_wait_ms=0)

    async def main():
        results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        return results, await b.submit(7)

    results, after = run_async(main())
    assert [isinstance(r, RuntimeError) for r in results] == [True, True, False, False]
    assert "bad item 1" in str(results[0]) and results[2][0] == 4 and after[0] == 14
    assert b.stats()["failed_batches"] == 1 and b.stats()["batch_sizes"] == {"1": 1, "2": 1}


@pytest.mark.parametrize("kwargs, key", [({"max_batch": 0, "batch_wait_ms": 0}, "serve.max_batch"),
                                         ({"max_batch": 2, "batch_wait_ms": -1}, "serve.batch_wait_ms"),
                                         ({"max_batch": 2, "batch_wait_ms": float("nan")}, "serve.batch_wait_ms")])
def test_bad_settings_name_their_key(executor, kwargs, key):
    with pytest.raises(ValueError, match=key):
        Batcher(Recorder(), executor, **kwargs)


def test_no_wait_for_company_that_cannot_come(executor):
    """With every open stream's item already queued the batch starts at once, however long ``batch_wait_ms``;
    while another stream is open the lone item still waits for it and the two share a batch."""
    rec = Recorder()
    open_streams = [1]
    b = Batcher(rec, executor, max_batch=8, batch_wait_ms=60_000, open_streams=lambda: open_streams[0])

    async def main():
        alone = await b.submit(0)  # would wait 60 s (and fail run_async's timeout) if it waited
        open_streams[0] = 3
        three = await asyncio.gather(*(b.submit(i) for i in (1, 2, 3)))  # all three queued: no wait
        first = asyncio.ensure_future(b.submit(5))
        for _ in range(5):
            await asyncio.sleep(0)
        waited = len(rec.batches)  # two more streams are open: the lone item waits for them
        open_streams[0] = 2
        last = await asyncio.gather(first, b.submit(6))  # the second stream's item joins the waiting one
        return alone, three, waited, *last

    (r0, i0), three, waited, (r1, i1), (r2, i2) = run_async(main())
    assert r0 == 0 and i0["batch"] == 1
    assert [x for x, _ in three] == [2, 4, 6] and all(info["batch"] == 3 for _, info in three)
    assert waited == 2
    assert (r1, r2) == (10, 12) and i1["batch"] == i2["batch"] == 2
    assert rec.batches == [[0], [1, 2, 3], [5, 6]]
