"""The diagonal topology (``serve.topology: diagonal``): one deployment denoises a stream through all S steps.

Graph (``hiar.serving.app``)::

    HTTP -> Ingress -> Decoder -> Diagonal      (one DiagonalRollout per stream: all S step caches of it)

The per-step topology pipelines the N x S grid across S deployments (a device each): at any moment stage j
works on block n - j. On ONE device the same anti-diagonal runs as one packed forward instead
(``hiar.core.diagonal``, StreamDiffusion's "Stream Batch" applied to HiAR): the stream's call is one async
generator on one replica that feeds block n's starting noise into the n-th diagonal and yields a clean block
from every diagonal after the (S - 1)-th, N + S - 1 forwards in all (the trailing context writes that would
complete the caches for a continuation are skipped: a finished stream has none). A stream's ``DiagonalRollout``
-- its S KV caches and pending contexts -- is a local of that call, created when the stream starts and dropped
when it ends for any reason, exactly as a step stage holds its ``StepStage``: a stream never leaves its replica.

Cross-stream batching (``serve.max_batch``, ``serve.batch_wait_ms``): the diagonals of the replica's streams
that wait at the same time go through ONE forward (``hiar.core.diagonal.advance_diagonals``, queued by
``hiar.serving.batcher``), whatever their prompts, guidance, lengths and progress. Results equal the offline
``hierarchical_rollout`` within float round-off (1e-4 on the tiny preset; the diagonal pack is not bit-identical
even alone, see ``hiar.core.diagonal``).

Back-pressure: this deployment is the producer of boundary S - 1 (the decoder consumes it, as from the last step
stage): it starts the diagonal that finishes block m only once the decoder has taken block m - window.
Every block's timing entry names this stage, the forwards the stream has made so far (``calls``), its batch
size and how long it queued.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from hiar.serving.flow import Producer
from hiar.serving.stages import _Denoiser, _Stream, as_tensor


@serve.deployment
class DiagonalDeployment(_Denoiser):
    """All S denoising steps of every stream routed to this replica, one anti-diagonal per (batched) forward."""

    def __init__(self, model: dict, serve_cfg: dict):
        self._open_denoiser(model, serve_cfg, None, self._advance_batch)
        self.num_steps = self.cfg.schedule.num_steps
        self._ready(f"all {self.num_steps} steps, one anti-diagonal per forward")

    # -- compute (executor thread)
    def _make_rollout(self, embeds: np.ndarray, negative: np.ndarray | None, guidance: float, seed: int):
        from hiar.core.diagonal import DiagonalRollout

        r = self.cfg.rollout
        return DiagonalRollout(self._velocity(embeds, negative, guidance), self.sigmas, [seed],
                               step_rule=r.step_rule, context_noise=r.context_noise, trailing_writes=False)

    def _advance_batch(self, items: list) -> list[np.ndarray | None]:
        """One diagonal of each of several streams (``(rollout, seed, block or None)``: the block whose noise
        enters, None once the stream is draining), one forward; each stream's block that left, or None."""
        from hiar.core.diagonal import advance_diagonals

        with torch.no_grad():
            pairs = [(rollout, None if n is None else as_tensor(self._noise(seed, n), self.device))
                     for rollout, seed, n in items]
            return [None if out is None else out.to("cpu").numpy() for out in advance_diagonals(pairs)]

    # -- the stream
    async def __call__(self, req: dict):
        stream, loop, flow = req["stream_id"], asyncio.get_running_loop(), req["flow"]
        async with _Stream(self.book, stream) as s:
            producer = Producer(flow, stream, self.num_steps - 1, req["window"], self.serve_cfg.stall_timeout_s)
            embeds = await req["embeds"]
            negative = await req["negative"] if req["negative"] is not None else None
            s.stage = await loop.run_in_executor(self.executor, self._make_rollout, embeds, negative,
                                                 req["guidance"], req["seed"])
            num_blocks, emitted = req["num_blocks"], 0
            for diagonal in range(num_blocks + self.num_steps - 1):
                leaving = diagonal - (self.num_steps - 1)  # the block this diagonal finishes, if any
                if leaving >= 0:
                    await producer.acquire(leaving)
                    self.book.max_lead = max(self.book.max_lead, producer.max_lead)
                entering = diagonal if diagonal < num_blocks else None
                x, info = await self.batcher.submit((s.stage, req["seed"], entering))
                if x is not None:
                    yield {"block": emitted, "x": x, "timings": [self._timing(info, s.stage.forwards)]}
                    emitted += 1
            if emitted != num_blocks or not s.stage.done:
                raise RuntimeError(f"stream {stream}: {emitted} of {num_blocks} blocks left the diagonal")


__all__ = ["DiagonalDeployment"]
