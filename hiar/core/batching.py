"""Cross-stream batching: the model calls of several streams (different prompts, caches, positions) as ONE forward.

A server runs many streams at once. At any moment several of them wait at the same point (the same denoising
step in the per-step topology, their next anti-diagonal in the diagonal one), each with one model call to
make: its own latents, its own per-frame noise levels, its own position in its own KV cache(s), its own prompt
and guidance. ``batched_forward`` makes all of those calls one transformer forward and hands every stream the
velocity its own call would have returned.

How (a ragged pack, ``hiar.core.kv_cache.PackMember``). The streams' calls differ in nearly everything that has
a shape: frames (a step's first block is a k-frame call, the others are 2k-frame fused calls, a diagonal is a
sum of those), cache length (a young stream has fewer cached blocks; the window caps the old ones), prompt
length, and batch size (classifier-free guidance doubles a stream's samples, and guidance is per request). So
each stream is one member of a pack along the frame axis of a batch-of-one forward: its samples one after
another (``[B', C, F, H, W] -> [1, C, B' * F, H, W]``), per-frame timesteps alike. Every per-token layer
(patch embedding, projections, norms, modulation, FFN, output head) runs once over the whole pack; the two
attention products are taken per member -- self-attention per segment, against that segment's own cache under
its own block-causal / window mask, and cross-attention against the member's own prompt K/V
(``hiar.core.model.PackedSelfAttentionPlan``). Nothing is padded and no query is scored against another
stream's keys.

Why not stack the streams along the batch axis: that needs equal shapes, which concurrent streams almost never
have (different block indices give different cache lengths until the window is full, fused and first calls
differ in length, guided and unguided streams differ in batch); padding them to the longest with a key-padding
mask wastes the padded scores and memory. Stacking would pay off only for streams in lock step with full
windows -- the pack handles that case too, at the price of one attention launch per segment and member per
layer instead of one (a varlen flash-attention kernel would fold those into one on a GPU).

Exactness. The per-token layers compute the same sums on different row groupings, so a stream's velocity in a
batch equals its own call to float round-off (checked: ``tests/unit/core/test_stream_batching.py``, within 1e-4 on
the tiny preset), not bit for bit. A batch of ONE is the stream's own call, unchanged: ``process_together``
with one stage calls ``StepStage.process`` itself (bit-identical to ``hierarchical_rollout``), and
``batched_forward`` with one call makes that call as it is (for the diagonal: its single-stream pack).

Who calls this: ``process_together`` (per-step topology: several streams' stages, one block each) and
``hiar.core.diagonal.advance_diagonals`` (diagonal topology: several streams' anti-diagonals). ``StepStage``
stays the one definition of what a step does to a block: a stage plans its next call (``planned_call``), the
batch computes it, and the stage then runs its own ``process`` / ``finish`` with a velocity that hands back
that precomputed slice (``supplied_velocity``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from hiar.core.kv_cache import CacheSegment, PackMember
from hiar.core.rollout import StepStage


@dataclass
class StreamCall:
    """One stream's model call: ``velocity(x, sigma, cache=segments)`` (``x`` ``[B, C, F, H, W]``, ``sigma`` one
    level per frame, ``segments`` covering the F frames, each in its own cache)."""

    velocity: object  # a hiar.core.velocity.GuidedVelocity
    x: torch.Tensor
    sigma: torch.Tensor
    segments: list[CacheSegment]


def stage_call(stage: StepStage, x: torch.Tensor | None) -> StreamCall:
    """The call ``stage.process(next_block, x)`` (or ``stage.finish()`` for x None) makes, as a ``StreamCall``."""
    xin, sigma, offset = stage.planned_call(x)
    sig = torch.tensor(sigma, dtype=torch.float32, device=xin.device)
    return StreamCall(stage.velocity, xin, sig, [CacheSegment(stage.cache, offset, xin.shape[2])])


def batched_forward(calls: Sequence[StreamCall]) -> list[torch.Tensor]:
    """Every call's velocity (shaped like its ``x``), all computed in one transformer forward.

    The calls must share one transformer (and block size); no two segments may share a cache (a stream enters a
    batch once). One call is made as it is.
    """
    if not calls:
        return []
    if len(calls) == 1:
        c = calls[0]
        return [c.velocity(c.x, c.sigma, cache=list(c.segments))]
    first = calls[0].velocity
    for c in calls[1:]:
        if c.velocity.transformer is not first.transformer:
            raise ValueError("the streams of one batch must share one transformer")
        if c.velocity.frames_per_block != first.frames_per_block:
            raise ValueError("the streams of one batch must share frames_per_block")
    xs, timesteps, members = [], [], []
    for c in calls:
        x, t = c.velocity.model_inputs(c.x, c.sigma)  # [B', C, F, H, W], [B', F]
        rows, channels, frames = x.shape[:3]
        xs.append(x.transpose(0, 1).reshape(1, channels, rows * frames, *x.shape[3:]))
        timesteps.append(t.reshape(1, rows * frames))
        members.append(PackMember(c.velocity.context, tuple(c.segments)))
    out = first.transformer(
        torch.cat(xs, dim=2),
        torch.cat(timesteps, dim=1),
        None,
        return_dict=False,
        attention_mode="block_causal",
        frames_per_block=first.frames_per_block,
        kv_cache=members,
    )[0]
    velocities = []
    for c, part in zip(calls, out.split([x.shape[2] for x in xs], dim=2)):
        channels, frames = part.shape[1], c.x.shape[2]
        part = part.reshape(channels, part.shape[2] // frames, frames, *part.shape[3:]).transpose(0, 1)
        velocities.append(c.velocity.velocity_from(part, c.x.dtype))
    return velocities


class PrecomputedVelocity:
    """The velocity a ``StepStage`` calls inside a batch: returns, once, what the batched forward computed for it.

    The real velocity still makes the stage's caches (``new_cache``); only the forward is moved out of the stage.
    """

    def __init__(self, velocity, frame_offset: int, v: torch.Tensor):
        self.velocity = velocity
        self.frames_per_block = velocity.frames_per_block
        self.ready: tuple[int, torch.Tensor] | None = (frame_offset, v)

    def new_cache(self):
        return self.velocity.new_cache()

    def __call__(self, x: torch.Tensor, sigma, *, cache=None, frame_offset: int = 0) -> torch.Tensor:
        if self.ready is None:
            raise RuntimeError("the stage made a model call the batch did not plan")
        offset, v = self.ready
        self.ready = None
        # Guards the one thing that could silently go wrong: the batch planning a different call than the stage
        # then makes (the stage's own logic decides fused / standalone / context write).
        if frame_offset != offset or x.shape != v.shape:
            raise RuntimeError(
                f"planned a call at frame {offset} of shape {tuple(v.shape)}, the stage made one at frame "
                f"{frame_offset} of shape {tuple(x.shape)}"
            )
        return v


@contextlib.contextmanager
def supplied_velocity(stage: StepStage, frame_offset: int, v: torch.Tensor):
    """Within the block, ``stage`` makes exactly its planned call (at ``frame_offset``) and gets ``v`` for it
    instead of a forward."""
    real = stage.velocity
    replay = PrecomputedVelocity(real, frame_offset, v)
    stage.velocity = replay
    try:
        yield
    finally:
        stage.velocity = real
    if replay.ready is not None:
        raise RuntimeError("the stage did not make the model call the batch planned for it")


def process_together(steps: Sequence[tuple[StepStage, int, torch.Tensor]]) -> list[torch.Tensor]:
    """``[stage.process(block, x) for stage, block, x in steps]``, their model calls as one forward.

    For the per-step topology: the stages of several streams (each its own cache and prompt), one block each.
    One step is ``stage.process`` itself, bit for bit.
    """
    if len(steps) == 1:
        stage, block, x = steps[0]
        return [stage.process(block, x)]
    calls = [stage_call(stage, x) for stage, _, x in steps]
    velocities = batched_forward(calls)
    out = []
    for (stage, block, x), call, v in zip(steps, calls, velocities):
        with supplied_velocity(stage, call.segments[0].frame_offset, v):
            out.append(stage.process(block, x))
    return out


__all__ = ["StreamCall", "stage_call", "batched_forward", "PrecomputedVelocity", "supplied_velocity",
           "process_together"]
