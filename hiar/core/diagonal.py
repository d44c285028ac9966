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

``StepStage`` stays the one definition of what a step does to a block: each stage plans its call
(``StepStage.planned_call``) and then runs its own ``process`` / ``finish`` with a velocity that hands back the
slice of the packed forward computed for exactly that call (``hiar.core.batching.supplied_velocity``). The
diagonal only decides when the calls are computed, and how.

Several streams. ``advance_diagonals`` advances the diagonals of several streams (different prompts, lengths,
seeds, guidance) in ONE forward: each stream's diagonal is one member of a multi-stream pack
(``hiar.core.batching``), which equals each stream advanced alone to float round-off. A stream joins by
starting its first diagonal in some batch and leaves when it is ``done``; the others never notice. One stream
alone is exactly ``advance_diagonal``.

Serving skips the trailing context writes (``trailing_writes=False``): they only complete the caches for a
continuation that a finished stream never makes, so a served stream takes N + S - 1 forwards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from hiar.core.batching import StreamCall, batched_forward, supplied_velocity
from hiar.core.kv_cache import CacheSegment
from hiar.core.rollout import StepStage, _check_options, _split_blocks


class DiagonalRollout:
    """The S per-step stages of one stream, advanced one anti-diagonal (one packed forward) per call.

    Feed block n's starting noise on the n-th call of ``advance_diagonal``; from the S-th call on, each call
    returns one clean block, in order. ``advance_diagonal(None)`` ends the stream: keep calling it until
    ``done`` to drain the remaining blocks (and, with ``trailing_writes``, write every step's last context).
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
        trailing_writes: bool = True,
    ):
        _check_options(step_rule, context_noise, sigmas)
        self.velocity = velocity
        self.k = velocity.frames_per_block
        self.stages = [
            StepStage(velocity, sigmas, j, seeds, step_rule=step_rule, context_noise=context_noise, fused=True)
            for j in range(sigmas.numel() - 1)
        ]
        self.on_visit = on_visit
        self.trailing_writes = trailing_writes
        # inbox[j]: (block, latents) that step j runs on the next diagonal, produced by step j - 1 on this one.
        self.inbox: list[tuple[int, torch.Tensor] | None] = [None] * len(self.stages)
        self.blocks_in = 0
        self.closed = False
        self.forwards = 0

    @property
    def done(self) -> bool:
        return self.closed and all(self._finished(stage) for stage in self.stages) and not any(self.inbox)

    def _finished(self, stage: StepStage) -> bool:
        return stage.next_block == self.blocks_in and (stage.pending is None or not self.trailing_writes)

    def _trailing_write_due(self, stage: StepStage) -> bool:
        # a step's last context is written once no further block can reach it
        return self.trailing_writes and self.closed and stage.next_block == self.blocks_in and stage.pending is not None

    def advance_diagonal(self, incoming: torch.Tensor | None) -> torch.Tensor | None:
        """Run one anti-diagonal: ``incoming`` (the next block's noise, or None to end the stream) enters step 0.

        Returns the block that left the last step on this diagonal (clean latents), or None.
        """
        return advance_diagonals([(self, incoming)])[0]

    def _plan(self, incoming: torch.Tensor | None) -> list[tuple[int, int | None, torch.Tensor | None]]:
        """Take ``incoming`` and return this diagonal's work: (step, block or None for a trailing write, latents)."""
        if incoming is not None:
            if self.closed:
                raise ValueError("the stream was ended (advance_diagonal(None)); no block may follow")
            self.inbox[0] = (self.blocks_in, incoming)
            self.blocks_in += 1
        else:
            self.closed = True
        # Plan every stage's call of this diagonal from the state before any of them runs: step j consumes what
        # step j - 1 produced on the previous diagonal, never what it produces now.
        work = []
        for j, stage in enumerate(self.stages):
            if self.inbox[j] is not None:
                work.append((j, *self.inbox[j]))
                self.inbox[j] = None
            elif self._trailing_write_due(stage):
                work.append((j, None, None))
        if work and self.on_visit is not None:
            for j, n, _ in work:
                if n is not None:
                    self.on_visit(j, n)
        return work

    def _stream_call(self, work) -> StreamCall:
        """The diagonal's packed call: one segment per stage of ``work``, in step order."""
        planned = [self.stages[j].planned_call(x) for j, _, x in work]
        x = torch.cat([xp for xp, _, _ in planned], dim=2)
        sigma = torch.tensor([s for _, sig, _ in planned for s in sig], dtype=torch.float32, device=x.device)
        segments = [CacheSegment(self.stages[j].cache, offset, xp.shape[2])
                    for (j, _, _), (xp, _, offset) in zip(work, planned)]
        return StreamCall(self.velocity, x, sigma, segments)

    def _complete(self, work, call: StreamCall, v: torch.Tensor) -> torch.Tensor | None:
        """Run each stage's process / finish on its slice of ``v`` (the packed call's velocity); the block that left."""
        self.forwards += 1
        finished = None
        slices = v.split([seg.num_frames for seg in call.segments], dim=2)
        for (j, n, x), seg, vj in zip(work, call.segments, slices):
            stage = self.stages[j]
            with supplied_velocity(stage, seg.frame_offset, vj):
                if n is None:
                    stage.finish()
                    continue
                x_next = stage.process(n, x)
            if j + 1 < len(self.stages):
                self.inbox[j + 1] = (n, x_next)
            else:
                finished = x_next
        return finished


def advance_diagonals(
    pairs: Sequence[tuple[DiagonalRollout, torch.Tensor | None]]
) -> list[torch.Tensor | None]:
    """``[rollout.advance_diagonal(incoming) for rollout, incoming in pairs]``, all diagonals in ONE forward.

    The streams may differ in prompt, guidance, seeds, length and progress (one may be on its first diagonal,
    another draining its last); they must share the transformer. Each stream appears at most once.
    """
    if len({id(r) for r, _ in pairs}) != len(pairs):
        raise ValueError("a stream can advance only one diagonal per batch")
    if any(r.closed and incoming is not None for r, incoming in pairs):  # checked before any stream moves
        raise ValueError("the stream was ended (advance_diagonal(None)); no block may follow")
    plans = [(r, r._plan(incoming)) for r, incoming in pairs]
    active = [(r, work, r._stream_call(work)) for r, work in plans if work]
    velocities = batched_forward([call for _, _, call in active])
    out = {id(r): r._complete(work, call, v) for (r, work, call), v in zip(active, velocities)}
    return [out.get(id(r)) for r, _ in pairs]


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
