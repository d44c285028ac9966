"""Autoregressive rollouts of the block-causal student: block-first, hierarchical (Alg. 1), pipelined order.

The video is N blocks of k latent frames; the student denoises on S steps ``sigmas[0] > ... > sigmas[S] = 0``.

* ``block_first_rollout`` (Self-Forcing): finish block n in S steps, then write its clean prediction into the
  cache at t_c = 0, then start block n + 1. N * (S + 1) model calls.
* ``hierarchical_rollout`` (Alg. 1): for each step j, sweep all blocks causally; block n sees the blocks before
  it at the context level ``context_noise`` (t_c = t_{j+1} by default). One ``StepStage`` per step owns that
  step's KV cache.
* ``pipelined_rollout``: the same stages visited along the anti-diagonals of the N x S grid, the order in which
  the per-step serving stages run. Each stage sees the same calls with the same inputs in the same order as in
  the hierarchical sweep, so both orders give bit-identical results.

``StepStage`` is the unit that serving wraps: it consumes the blocks of one stream in order and returns each one
denoised by one step. With ``fused=True`` (default) the context write of block n and the denoising of block n + 1
are one forward call ``[context of n at t_c, x of n + 1 at t_j]``, so a stage makes N + 1 calls for N blocks: one
standalone denoise, N - 1 fused calls and a trailing context write (the paper's text says "N + 2" while listing
exactly these three terms). Unfused it makes 2N: a denoise and a context write per block.

Step rules (``step_rule``):

* ``"euler"``: eq. 3, ``x_{j+1} = x_j + v * (sigma_{j+1} - sigma_j)``; Alg. 1 as written.
* ``"x0_renoise"``: the few-step rule of DMD students in the public Self-Forcing / HiAR code: predict
  ``x0 = x_j - sigma_j * v`` and re-noise it to ``sigma_{j+1}`` with fresh noise. The noise of block n at step j
  comes from a generator seeded by ``(seed of the sample, n, j)``, so any execution order, process or replica
  draws the same noise.

Context levels (``context_noise``, the paper's Table 2): ``"next"`` (t_c = t_{j+1}, the default: the block's
output of step j, which is also its input at step j + 1), ``"current"`` (t_c = t_j: the block's input of step
j, so block n cannot see step j's result on block n - 1) and ``"clean"`` (t_c = 0: step j's x0 prediction).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from hiar.core.schedule import x0_from_velocity
from hiar.seeding import seeded_generator

#: The rollout modes: HiAR's hierarchical sweep (Alg. 1) and Self-Forcing's block-first order (the baseline).
ROLLOUT_MODES = ("hierarchical", "block_first")
STEP_RULES = ("euler", "x0_renoise")
CONTEXT_NOISE = ("next", "current", "clean")

# Purposes in the noise seed, so initial noise and re-noising never share a stream.
_INITIAL, _RENOISE = 0, 1


def block_noise(
    seeds: Sequence[int],
    block: int,
    step: int,
    shape: Sequence[int],
    *,
    purpose: int = _RENOISE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gaussian noise ``[len(seeds), *shape]`` for (sample seed, block, step), independent of execution order."""
    out = []
    for seed in seeds:
        gen = seeded_generator(seed, purpose, block, step)
        out.append(torch.randn(*shape, generator=gen, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


def initial_block_noise(
    seeds: Sequence[int], block: int, block_shape: Sequence[int], *, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """Starting noise ``[B, C, k, H, W]`` of one block: what a streaming server draws block by block."""
    return block_noise(seeds, block, 0, block_shape, purpose=_INITIAL, dtype=dtype, device=device)


def initial_noise(
    seeds: Sequence[int], num_blocks: int, block_shape: Sequence[int], *, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """Starting noise ``[B, C, N * k, H, W]``, one independent draw per (sample, block)."""
    blocks = [initial_block_noise(seeds, n, block_shape, dtype=dtype, device=device) for n in range(num_blocks)]
    return torch.cat(blocks, dim=2)


def advance(
    x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, step_rule: str, seeds, block: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of block ``block`` from ``sigma`` to ``sigma_next`` under ``step_rule``; returns (x_next, x0)."""
    x0 = x0_from_velocity(x, v, sigma)
    if sigma_next == 0.0:
        return x0, x0
    if step_rule == "euler":
        return x + v * (sigma_next - sigma), x0
    noise = block_noise(seeds, block, step, x.shape[1:], dtype=x.dtype, device=x.device)
    return (1.0 - sigma_next) * x0 + sigma_next * noise, x0


def _check_options(step_rule: str, context_noise: str, sigmas: torch.Tensor) -> None:
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
    if context_noise not in CONTEXT_NOISE:
        raise ValueError(f"context_noise must be one of {CONTEXT_NOISE}, got {context_noise!r}")
    if sigmas.ndim != 1 or sigmas.numel() < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must be the S + 1 grid points of the student schedule, ending at 0")


def _split_blocks(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    if x.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] % k:
        raise ValueError(f"the number of latent frames ({x.shape[2]}) must be divisible by frames_per_block ({k})")
    return list(x.split(k, dim=2))


class StepStage:
    """One denoising step ``sigmas[step] -> sigmas[step + 1]`` applied to the blocks of one stream, in order."""

    def __init__(
        self,
        velocity,
        sigmas: torch.Tensor,
        step: int,
        seeds: Sequence[int],
        *,
        step_rule: str = "x0_renoise",
        context_noise: str = "next",
        fused: bool = True,
    ):
        _check_options(step_rule, context_noise, sigmas)
        if not 0 <= step < sigmas.numel() - 1:
            raise ValueError(f"step must be in [0, {sigmas.numel() - 2}], got {step}")
        self.velocity, self.step, self.seeds = velocity, step, list(seeds)
        self.sigma, self.sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        self.step_rule, self.context_noise, self.fused = step_rule, context_noise, fused
        self.k = velocity.frames_per_block
        self.cache = velocity.new_cache()
        self.next_block = 0
        self.pending: tuple[torch.Tensor, float] | None = None  # context of block next_block - 1
        self.last_x0: torch.Tensor | None = None
        self.calls = 0

    def _call(self, x: torch.Tensor, sigma_per_frame: list[float], frame_offset: int) -> torch.Tensor:
        self.calls += 1
        sig = torch.tensor(sigma_per_frame, dtype=torch.float32, device=x.device)
        return self.velocity(x, sig, cache=self.cache, frame_offset=frame_offset)

    def planned_call(self, x: torch.Tensor | None) -> tuple[torch.Tensor, list[float], int]:
        """(input, sigma per frame, frame offset) of the model call ``process(next_block, x)`` makes next -- or
        ``finish()``, when ``x`` is None. ``hiar.core.batching`` computes such calls of several stages (streams,
        steps) in one forward and hands each stage its slice."""
        k = self.k
        if x is None:
            ctx, ctx_sigma = self.pending
            return ctx, [ctx_sigma] * k, (self.next_block - 1) * k
        if self.pending is None:
            return x, [self.sigma] * k, self.next_block * k
        if not self.fused:
            raise ValueError("an unfused stage writes its pending context in a call of its own first")
        ctx, ctx_sigma = self.pending
        return torch.cat([ctx, x], dim=2), [ctx_sigma] * k + [self.sigma] * k, (self.next_block - 1) * k

    def process(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Denoise block ``block`` (at ``sigmas[step]``) by one step; blocks must come as 0, 1, 2, ..."""
        if block != self.next_block:
            raise ValueError(f"stage {self.step} expected block {self.next_block}, got block {block}")
        k = self.k
        if x.shape[2] != k:
            raise ValueError(f"a block has {k} latent frames, got {x.shape[2]}")
        if self.pending is not None and not self.fused:
            self._write_pending()
        # fused with a pending context: [context of block - 1, x of block], whose last k frames are this block's
        v = self._call(*self.planned_call(x))[:, :, -k:]
        x_next, x0 = advance(x, v, self.sigma, self.sigma_next, self.step_rule, self.seeds, block, self.step)
        self.last_x0 = x0  # the clean estimate: training's exit step takes its gradient from here
        # Detached: the next block reads this context through attention, and training allows no gradient
        # through context (the paper's "no gradient through the KV cache"), fused call or not.
        self.pending = {
            "next": (x_next.detach(), self.sigma_next),
            "current": (x.detach(), self.sigma),
            "clean": (x0.detach(), 0.0),
        }[self.context_noise]
        self.next_block += 1
        return x_next

    def _write_pending(self) -> None:
        self._call(*self.planned_call(None))
        self.pending = None

    def finish(self) -> None:
        """Write the last block's context, so the cache is complete (a stream can continue from it)."""
        if self.pending is not None:
            self._write_pending()


def hierarchical_rollout(
    velocity, noise: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], *, step_rule: str = "x0_renoise",
    context_noise: str = "next", fused: bool = True, on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Alg. 1. ``noise`` ``[B, C, N * k, H, W]`` at ``sigmas[0]``; returns the clean latents, same shape.

    ``on_step(j, x)`` is called with the whole video after each step (used by training and trajectory tests).
    """
    _check_options(step_rule, context_noise, sigmas)
    blocks = _split_blocks(noise, velocity.frames_per_block)
    for j in range(sigmas.numel() - 1):
        stage = StepStage(velocity, sigmas, j, seeds, step_rule=step_rule, context_noise=context_noise, fused=fused)
        blocks = [stage.process(n, xb) for n, xb in enumerate(blocks)]
        stage.finish()
        if on_step is not None:
            on_step(j, torch.cat(blocks, dim=2))
    return torch.cat(blocks, dim=2)


def pipelined_rollout(
    velocity, noise: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], *, step_rule: str = "x0_renoise",
    context_noise: str = "next", on_visit: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[StepStage]]:
    """Alg. 1 visited along anti-diagonals: cell (n, j) runs at time n + j, one ``StepStage`` (cache) per step.

    Returns the clean latents and the stages (their ``calls`` counters give the per-stage call counts).
    ``on_visit(step, block)`` is called before each cell, in execution order.
    """
    _check_options(step_rule, context_noise, sigmas)
    inputs = _split_blocks(noise, velocity.frames_per_block)
    num_blocks, num_steps = len(inputs), sigmas.numel() - 1
    stages = [
        StepStage(velocity, sigmas, j, seeds, step_rule=step_rule, context_noise=context_noise, fused=True)
        for j in range(num_steps)
    ]
    # carry[j][n]: block n's input of stage j; stage j + 1 can only run block n once stage j produced it.
    carry: list[dict[int, torch.Tensor]] = [dict() for _ in range(num_steps + 1)]
    carry[0] = dict(enumerate(inputs))
    for diagonal in range(num_blocks + num_steps - 1):
        for j in range(num_steps):
            n = diagonal - j
            if not 0 <= n < num_blocks:
                continue
            if on_visit is not None:
                on_visit(j, n)
            carry[j + 1][n] = stages[j].process(n, carry[j].pop(n))
            if n == num_blocks - 1:
                stages[j].finish()
    out = torch.cat([carry[num_steps][n] for n in range(num_blocks)], dim=2)
    return out, stages


def block_first_rollout(
    velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    step_rule: str = "x0_renoise",
) -> torch.Tensor:
    """Self-Forcing's order: each block fully denoised (S calls), then its clean output cached at t_c = 0."""
    _check_options(step_rule, "clean", sigmas)
    k = velocity.frames_per_block
    cache = velocity.new_cache()
    out = []
    for n, x in enumerate(_split_blocks(noise, k)):
        for j in range(sigmas.numel() - 1):
            s, s_next = float(sigmas[j]), float(sigmas[j + 1])
            v = velocity(x, s, cache=cache, frame_offset=n * k)
            x, _ = advance(x, v, s, s_next, step_rule, seeds, n, j)
        velocity(x, 0.0, cache=cache, frame_offset=n * k)  # context write at t_c = 0
        out.append(x)
    return torch.cat(out, dim=2)
