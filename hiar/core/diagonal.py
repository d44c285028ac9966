"""HiAR's pipelined order on one device: each anti-diagonal of the N x S grid as ONE packed model forward.

On anti-diagonal d the cells (block d - j, step j) for j = 0..S-1 are independent: each step j reads only its
own KV cache and the block step j - 1 produced on diagonal d - 1. So, as StreamDiffusion's "Stream Batch" does
for its denoising steps, their S model calls can run as one forward. ``DiagonalRollout`` holds the S
``StepStage``s of one stream (their KV caches, pending contexts and counters: exactly the per-step state of
``hiar.core.rollout``) and advances one anti-diagonal per call.

How the S calls become one forward (a ragged pack, ``hiar.core.kv_cache.CacheSegment``). The members of a
diagonal differ in step (per-frame timesteps), in position (frame offset, hence RoPE), in their cache (and so
its length and sliding window) and in length: the first block of a step is a k-frame denoise, the others are
2k-frame fused calls ``[context of block n - 1 at t_c, x of block n at t_j]``, a step's trailing context write
is k frames. They are all one stream (same samples, same prompt), so they share the batch axis and are
concatenated along the frame axis: ``[B, C, sum of member frames, H, W]``. Every per-token layer (patch
embedding, projections, norms, modulation, FFN, cross-attention to the shared prompt K/V, output head) then
runs once over the pack; only the self-attention product is taken member by member, each member's queries
against its own cache's gathered keys plus its own live keys under its own block-causal / window mask
(``hiar.core.model.PackedSelfAttentionPlan``).

Cost, against the alternatives the brief named. A block-diagonal mask over the concatenated caches would score
every query against all S caches (S times the attention FLOPs, and a dense ``L_q x L_k`` mask that at Wan's
1.3B size is gigabytes); padding the members to a common length along the batch axis would pad the k-frame
members to 2k queries and every cache to the longest one (up to S - 1 blocks of keys per member without a
window) and would need a key-padding mask. The pack pays neither: no padded token, no cross-member score. What
it pays is S attention kernel launches per layer instead of one (on a GPU a varlen flash-attention kernel
would fold them into one) and one ``torch.cat`` of the member outputs per layer.

Calls: N + S packed forwards for N blocks (N + S - 1 diagonals with work to denoise, plus one for the last
step's trailing context write, which the earlier steps' trailing writes share a forward with), instead of the
S * (N + 1) of the fused hierarchical sweep. Results equal ``hierarchical_rollout`` to float round-off (the
packed matmuls group the sums differently), not bit for bit as ``pipelined_rollout`` does.

``StepStage`` stays the one definition of what a step does to a block: each stage is driven through its own
``process`` / ``finish``, with a velocity that hands back the slice of the packed forward computed for exactly
that call (``PrecomputedVelocity``). The diagonal only decides when the calls are computed, and how.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from hiar.core.kv_cache import CacheSegment
from hiar.core.rollout import StepStage, _check_options, _split_blocks


class PrecomputedVelocity:
    """The velocity a ``StepStage`` calls inside a diagonal: returns what the packed forward computed for it.

    The real velocity still makes the stage's cache (``new_cache``); only the forward is moved out of the stage.
    """

    def __init__(self, velocity):
        self.velocity = velocity
        self.frames_per_block = velocity.frames_per_block
        self.ready: tuple[int, torch.Tensor] | None = None  # (frame_offset of the call, its velocity)

    def new_cache(self):
        return self.velocity.new_cache()

    def __call__(self, x: torch.Tensor, sigma, *, cache=None, frame_offset: int = 0) -> torch.Tensor:
        if self.ready is None:
            raise RuntimeError("the stage made a model call the diagonal did not plan")
        offset, v = self.ready
        self.ready = None
        # Guards the one thing that could silently go wrong: the diagonal planning a different call than the
        # stage then makes (the stage's own logic decides fused / standalone / context write).
        if frame_offset != offset or x.shape != v.shape:
            raise RuntimeError(
                f"planned a call at frame {offset} of shape {tuple(v.shape)}, the stage made one at frame "
                f"{frame_offset} of shape {tuple(x.shape)}"
            )
        return v


class DiagonalRollout:
    """The S per-step stages of one stream, advanced one anti-diagonal (one packed forward) per call.

    Feed block n's starting noise on the n-th call of ``advance_diagonal``; from the S-th call on, each call
    returns one clean block, in order. ``advance_diagonal(None)`` ends the stream: keep calling it until
    ``done`` to drain the remaining blocks and write every step's last context.
    """

    def __init__(
        self,
        velocity,
        sigmas: torch.Tensor,
        seeds: Sequence[int],
        *,
        step_rule: str = "x0_renoise",
        context_noise: str = "next",
        on_visit: Callable[[int, int], None] | None = None,
    ):
        _check_options(step_rule, context_noise, sigmas)
        self.velocity = velocity
        self.k = velocity.frames_per_block
        self.replays = [PrecomputedVelocity(velocity) for _ in range(sigmas.numel() - 1)]
        self.stages = [
            StepStage(replay, sigmas, j, seeds, step_rule=step_rule, context_noise=context_noise, fused=True)
            for j, replay in enumerate(self.replays)
        ]
        self.on_visit = on_visit
        # inbox[j]: (block, latents) that step j runs on the next diagonal, produced by step j - 1 on this one.
        self.inbox: list[tuple[int, torch.Tensor] | None] = [None] * len(self.stages)
        self.blocks_in = 0
        self.closed = False
        self.forwards = 0

    @property
    def done(self) -> bool:
        return self.closed and all(self._finished(stage) for stage in self.stages) and not any(self.inbox)

    def _finished(self, stage: StepStage) -> bool:
        return stage.next_block == self.blocks_in and stage.pending is None

    def _trailing_write_due(self, stage: StepStage) -> bool:
        # a step's last context is written once no further block can reach it
        return self.closed and stage.next_block == self.blocks_in and stage.pending is not None

    def _planned_call(self, stage: StepStage, x: torch.Tensor | None) -> tuple[torch.Tensor, list[float], int]:
        """(input, sigma per frame, frame offset) of the call ``stage.process`` (or ``finish`` if x is None) makes."""
        k = self.k
        if x is None:
            ctx, ctx_sigma = stage.pending
            return ctx, [ctx_sigma] * k, (stage.next_block - 1) * k
        if stage.pending is None:
            return x, [stage.sigma] * k, stage.next_block * k
        ctx, ctx_sigma = stage.pending
        return torch.cat([ctx, x], dim=2), [ctx_sigma] * k + [stage.sigma] * k, (stage.next_block - 1) * k

    def advance_diagonal(self, incoming: torch.Tensor | None) -> torch.Tensor | None:
        """Run one anti-diagonal: ``incoming`` (the next block's noise, or None to end the stream) enters step 0.

        Returns the block that left the last step on this diagonal (clean latents), or None.
        """
        if incoming is not None:
            if self.closed:
                raise ValueError("the stream was ended (advance_diagonal(None)); no block may follow")
            self.inbox[0] = (self.blocks_in, incoming)
            self.blocks_in += 1
        else:
            self.closed = True
        # Plan every stage's call of this diagonal from the state before any of them runs: step j consumes what
        # step j - 1 produced on the previous diagonal, never what it produces now.
        work = []  # (step, block or None for the trailing write, latents)
        for j, stage in enumerate(self.stages):
            if self.inbox[j] is not None:
                work.append((j, *self.inbox[j]))
                self.inbox[j] = None
            elif self._trailing_write_due(stage):
                work.append((j, None, None))
        if not work:
            return None
        if self.on_visit is not None:
            for j, n, _ in work:
                if n is not None:
                    self.on_visit(j, n)
        planned = [self._planned_call(self.stages[j], x) for j, _, x in work]
        velocities = self._packed_forward(planned, [self.stages[j].cache for j, _, _ in work])
        finished = None
        for (j, n, x), (_, _, offset), v in zip(work, planned, velocities):
            self.replays[j].ready = (offset, v)
            if n is None:
                self.stages[j].finish()
                continue
            x_next = self.stages[j].process(n, x)
            if j + 1 < len(self.stages):
                self.inbox[j + 1] = (n, x_next)
            else:
                finished = x_next
        return finished

    def _packed_forward(self, planned, caches) -> list[torch.Tensor]:
        """One model forward over all planned calls; returns each call's velocity, shaped like its input."""
        self.forwards += 1
        x = torch.cat([xp for xp, _, _ in planned], dim=2)
        sigma = torch.tensor([s for _, sig, _ in planned for s in sig], dtype=torch.float32, device=x.device)
        segments = [CacheSegment(cache, offset, xp.shape[2]) for (xp, _, offset), cache in zip(planned, caches)]
        v = self.velocity(x, sigma, cache=segments)
        return list(v.split([xp.shape[2] for xp, _, _ in planned], dim=2))


def diagonal_rollout(
    velocity, noise: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], **options
) -> tuple[torch.Tensor, list[StepStage]]:
    """``pipelined_rollout`` with each anti-diagonal as one packed forward; same arguments, same results.

    ``options`` are ``DiagonalRollout``'s keywords, which are ``pipelined_rollout``'s: ``step_rule``,
    ``context_noise`` and ``on_visit(step, block)`` (called before each cell, in execution order). Returns the
    clean latents and the stages (their ``calls`` count the per-step calls packed into the forwards: N + 1
    each, as in the pipelined order).
    """
    rollout = DiagonalRollout(velocity, sigmas, seeds, **options)
    out = []
    for x in _split_blocks(noise, velocity.frames_per_block):
        out.append(rollout.advance_diagonal(x))
    while not rollout.done:
        out.append(rollout.advance_diagonal(None))
    return torch.cat([x for x in out if x is not None], dim=2), rollout.stages
