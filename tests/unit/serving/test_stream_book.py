"""A replica's stream book (``hiar.serving.stages._StreamBook``) counts the per-stream stages still alive: none once
a stream has ended, however it ended, unless something still holds one (what the load test asserts after its
rounds, where resident memory cannot tell a kept KV cache from the allocator's noise)."""

from __future__ import annotations

import asyncio

import pytest

from hiar.serving.stages import _Stream, _StreamBook


class FakeKV:
    """Stands in for a StepStage: any object a stream holds for its lifetime."""

    def __init__(self, cyclic: bool = False):
        self.me = self if cyclic else None  # a reference cycle: freed only by the garbage collector


async def _run(book: _StreamBook, cyclic: bool = False, fail: bool = False) -> dict:
    async with _Stream(book, "s1") as s:
        s.stage = FakeKV(cyclic)  # made here, as the deployments do: no other local holds it (a traceback would)
        during = book.stats()
        if fail:
            raise RuntimeError("boom")
    return during


@pytest.mark.parametrize("cyclic", [False, True])
def test_a_finished_streams_stage_is_not_live(cyclic):
    book = _StreamBook("Step1", "r1")
    during = asyncio.run(_run(book, cyclic))
    after = book.stats()
    assert during["live_stages"] == 1 and during["active"] == ["s1"]
    assert after["live_stages"] == 0 and after["active"] == [] and after["completed"] == 1


def test_a_failed_streams_stage_is_not_live():
    book = _StreamBook("Step1", "r1")
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(_run(book, fail=True))
    assert book.stats()["live_stages"] == 0 and book.stats()["failed"] == 1


def test_a_stage_kept_after_its_stream_shows_as_live():
    book, kept = _StreamBook("Step1", "r1"), []

    async def leaky():
        async with _Stream(book, "s1") as s:
            s.stage = FakeKV()
            kept.append(s.stage)

    asyncio.run(leaky())
    assert book.stats()["live_stages"] == 1 and book.stats()["active"] == []
    kept.clear()
    assert book.stats()["live_stages"] == 0
