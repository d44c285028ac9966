"""The diagonal topology (``serve.topology: diagonal``): one deployment takes a stream from noise to MP4 chunks.

Graph (``hiar.serving.app``)::

    HTTP -> Ingress -> Diagonal      (per stream: a DiagonalRollout -- all S step caches -- and the Decoder stage)

The per-step topology pipelines the N x S grid across S deployments (a device each): at any moment stage j
works on block n - j. On ONE device the same anti-diagonal runs as one packed forward instead
(``hiar.core.diagonal``, StreamDiffusion's "Stream Batch" applied to HiAR): the stream's call feeds block n's
starting noise into the n-th diagonal and gets a clean block from every diagonal after the (S - 1)-th, N + S - 1
forwards in all (the trailing context writes that would complete the caches for a continuation are skipped: a
finished stream has none). A stream's ``DiagonalRollout`` -- its S KV caches and pending contexts -- is a local
of that call, created when the stream starts and dropped when it ends for any reason, exactly as a step stage
holds its ``StepStage``: a stream never leaves its replica.

The Decoder stage (``hiar.serving.stages._BlockEncoder``: codec decode + H.264) runs in the same replica, on
its own thread, while the compute thread denoises the next diagonal. Why not a Decoder deployment as in
``per_step``: on the tiny preset a block's hop into another process (Serve handle, object store, flow-control
report) cost about as much as its decode, and ~10 ms per block is what a whole tiny forward costs; one device
gains nothing from a second process. Between the two threads an ``asyncio.Queue`` of ``serve.max_buffered_blocks``
blocks is the back-pressure (the denoiser runs at most that many blocks, plus the one it is handing over, ahead
of the encoder); towards the ingress the Decoder stage produces boundary S as in ``per_step``.

Cross-stream batching (``serve.max_batch``, ``serve.batch_wait_ms``): the diagonals of the replica's streams
that wait at the same time go through ONE forward (``hiar.core.diagonal.advance_diagonals``, queued by
``hiar.serving.batcher``), whatever their prompts, guidance, lengths and progress. Results equal the offline
``hierarchical_rollout`` within float round-off (1e-4 on the tiny preset; the diagonal pack is not bit-identical
even alone, see ``hiar.core.diagonal``).

Every block's timing entries name this stage (with the forwards the stream has made so far, ``calls``, its batch
size and how long it queued) and then the Decoder stage.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from hiar.serving.stages import _BlockEncoder, _Denoiser, _Stream, as_tensor


@serve.deployment
class DiagonalDeployment(_BlockEncoder, _Denoiser):
    """All S denoising steps of every stream routed to this replica, one anti-diagonal per (batched) forward,
    and the Decoder stage of those streams."""

    def __init__(self, model: dict, serve_cfg: dict):
        root = self._open_denoiser(model, serve_cfg, None, self._advance_batch)
        self._open_encoder(root, self.device)
        self.num_steps = self.cfg.schedule.num_steps
        self._ready(f"all {self.num_steps} steps, one anti-diagonal per forward, and the decoder")

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
        """Yields the Decoder stage's records (``hiar.serving.stages._BlockEncoder._encoded``)."""
        async with _Stream(self.book, req["stream_id"]) as s:
            denoised: asyncio.Queue = asyncio.Queue(maxsize=req["window"])
            denoiser = asyncio.ensure_future(self._denoise(req, s, denoised))
            try:
                async for out in self._encoded(req, _drain(denoised)):
                    yield out
                await denoiser  # it has put its last item (None) and ends now: its own errors came through the queue
            finally:
                if not denoiser.done():
                    denoiser.cancel()
                    await asyncio.gather(denoiser, return_exceptions=True)

    async def _denoise(self, req: dict, s: _Stream, out: asyncio.Queue) -> None:
        """The stream's diagonals, each denoised block put into ``out``, then ``None``; an error is put there
        too, for the encoding side to raise."""
        try:
            loop = asyncio.get_running_loop()
            embeds = await req["embeds"]
            negative = await req["negative"] if req["negative"] is not None else None
            s.stage = await loop.run_in_executor(self.executor, self._make_rollout, embeds, negative,
                                                 req["guidance"], req["seed"])
            num_blocks, emitted = req["num_blocks"], 0
            for diagonal in range(num_blocks + self.num_steps - 1):
                entering = diagonal if diagonal < num_blocks else None
                x, info = await self.batcher.submit((s.stage, req["seed"], entering))
                if x is not None:
                    await out.put({"block": emitted, "x": x, "timings": [self._timing(info, s.stage.forwards)]})
                    emitted += 1
            if emitted != num_blocks or not s.stage.done:
                raise RuntimeError(f"stream {req['stream_id']}: {emitted} of {num_blocks} blocks left the diagonal")
            await out.put(None)
        except Exception as err:  # noqa: BLE001 - raised by the encoding side, which ends the stream
            await out.put(err)


async def _drain(queue: asyncio.Queue):
    """The items of ``queue`` until ``None``; an exception item is raised."""
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


__all__ = ["DiagonalDeployment"]
