"""Rollouts: execution orders agree, call counts, context levels (Table 2), step rules, CFG, bad input."""

import pytest
import torch

from hiar.core.rollout import (
    StepStage,
    block_first_rollout,
    block_noise,
    hierarchical_rollout,
    initial_noise,
    pipelined_rollout,
)
from hiar.core.schedule import student_sigmas
from hiar.core.velocity import GuidedVelocity

K = 3  # frames per block


class CallCounter:
    """Counts real forward passes of the transformer (a forward pre-hook), whatever calls it."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def make_velocity(model, b=2, guidance=1.0, window=None):
    g = torch.Generator().manual_seed(7)
    text = torch.randn(b, 5, 32, generator=g)
    neg = torch.zeros(b, 5, 32) if guidance != 1.0 else None
    return GuidedVelocity(model, text, neg, guidance_scale=guidance, frames_per_block=K, window_frames=window)


@pytest.mark.parametrize("step_rule", ["x0_renoise", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_pipelined_equals_hierarchical_bit_for_bit(tiny_model, step_rule, guidance):
    vel = make_velocity(tiny_model, guidance=guidance)
    seeds, n_blocks = [11, 12], 4
    noise = initial_noise(seeds, n_blocks, (16, K, 8, 8))
    sig = student_sigmas()
    with torch.no_grad():
        hier = hierarchical_rollout(vel, noise, sig, seeds, step_rule=step_rule)
        pipe, _ = pipelined_rollout(vel, noise, sig, seeds, step_rule=step_rule)
    assert torch.equal(hier, pipe)
    assert hier.shape == noise.shape and torch.isfinite(hier).all()


def test_call_counts_fused_unfused_block_first(tiny_model):
    counter = CallCounter(tiny_model)
    vel = make_velocity(tiny_model)
    seeds, n_blocks = [1, 2], 5
    noise = initial_noise(seeds, n_blocks, (16, K, 8, 8))
    sig = student_sigmas()
    steps = sig.numel() - 1
    with torch.no_grad():
        _, stages = pipelined_rollout(vel, noise, sig, seeds)
        pipelined_calls = counter.n
        counter.n = 0
        fused = hierarchical_rollout(vel, noise, sig, seeds, fused=True)
        fused_calls = counter.n
        counter.n = 0
        unfused = hierarchical_rollout(vel, noise, sig, seeds, fused=False)
        unfused_calls = counter.n
        counter.n = 0
        block_first_rollout(vel, noise, sig, seeds)
        block_first_calls = counter.n
    # one standalone denoise + (N - 1) fused calls + one trailing context write per stage
    assert [s.calls for s in stages] == [n_blocks + 1] * steps
    assert pipelined_calls == fused_calls == steps * (n_blocks + 1)
    assert unfused_calls == steps * 2 * n_blocks
    assert block_first_calls == n_blocks * (steps + 1)
    # fusing is an exact rewrite of the computation up to float round-off
    assert (fused - unfused).abs().max() <= 1e-5


def test_pipelined_visits_anti_diagonals_in_dependency_order(tiny_model):
    vel = make_velocity(tiny_model, b=1)
    seeds, n_blocks = [3], 4
    noise = initial_noise(seeds, n_blocks, (16, K, 8, 8))
    visits = []
    with torch.no_grad():
        pipelined_rollout(vel, noise, student_sigmas(), seeds, on_visit=lambda j, n: visits.append((j, n)))
    assert sorted(visits) == [(j, n) for j in range(4) for n in range(n_blocks)]
    diagonals = [j + n for j, n in visits]
    assert diagonals == sorted(diagonals)  # anti-diagonal by anti-diagonal
    pos = {v: i for i, v in enumerate(visits)}
    for j, n in visits:
        if j > 0:
            assert pos[(j - 1, n)] < pos[(j, n)]
        if n > 0:
            assert pos[(j, n - 1)] < pos[(j, n)]


def test_sliding_window_rollouts_agree(tiny_model):
    vel = make_velocity(tiny_model, window=6)
    seeds = [5, 6]
    noise = initial_noise(seeds, 5, (16, K, 8, 8))
    with torch.no_grad():
        hier = hierarchical_rollout(vel, noise, student_sigmas(), seeds)
        pipe, stages = pipelined_rollout(vel, noise, student_sigmas(), seeds)
    assert torch.equal(hier, pipe)
    assert all(len(s.cache.cached_blocks()) <= 3 for s in stages)  # bounded by the window


def test_guided_velocity_is_uncond_plus_scaled_difference(tiny_model):
    g = torch.Generator().manual_seed(2)
    text, neg = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    x = torch.randn(1, 16, K, 8, 8, generator=g)
    with torch.no_grad():
        guided = GuidedVelocity(tiny_model, text, neg, guidance_scale=5.0, frames_per_block=K)(x, 0.7)
        cond = GuidedVelocity(tiny_model, text, frames_per_block=K)(x, 0.7)
        uncond = GuidedVelocity(tiny_model, neg, frames_per_block=K)(x, 0.7)
    assert (guided - (uncond + 5.0 * (cond - uncond))).abs().max() <= 1e-5


def test_renoise_noise_depends_only_on_seed_block_step():
    a = block_noise([1, 2], block=3, step=1, shape=(2, 2))
    assert torch.equal(a, block_noise([1, 2], block=3, step=1, shape=(2, 2)))
    assert torch.equal(a[1], block_noise([2], block=3, step=1, shape=(2, 2))[0])  # per sample, not per batch
    assert not torch.equal(a, block_noise([1, 2], block=3, step=2, shape=(2, 2)))
    assert not torch.equal(a, block_noise([1, 2], block=4, step=1, shape=(2, 2)))
    init = initial_noise([1], 2, (2, K, 2, 2))
    assert not torch.equal(init[:, :, :K], init[:, :, K:])


# ---------------------------------------------------------------------------------------------------------
# Context levels against a hand-written Alg. 1, on a field whose output is a known function of its context.


class ToyCache:
    def __init__(self):
        self.blocks = {}  # start frame -> (x, sigma)


class ContextSumField:
    """v(block at p) = sum over cached blocks q < p of (mean(x_q) + 10 * sigma_q). Handles fused calls."""

    frames_per_block = K

    def new_cache(self):
        return ToyCache()

    def __call__(self, x, sigma, *, cache, frame_offset, attention_mode="block_causal"):
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        sig = sig.expand(x.shape[2]) if sig.numel() == 1 else sig
        out = []
        for i in range(x.shape[2] // K):
            start = frame_offset + i * K
            blk = x[:, :, i * K : (i + 1) * K]
            cache.blocks[start] = (blk.clone(), float(sig[i * K]))
            v = sum((c.mean() + 10.0 * s for q, (c, s) in cache.blocks.items() if q < start), torch.tensor(0.0))
            out.append(torch.full_like(blk, float(v)))
        return torch.cat(out, dim=2)


def reference_hierarchical(noise_blocks, sigmas, context_noise):
    """Alg. 1 with Euler, written out: block n at step j sees blocks < n at the chosen context level."""
    x = list(noise_blocks)
    for j in range(len(sigmas) - 1):
        s, s_next = sigmas[j], sigmas[j + 1]
        new, x0s = [], []
        for n in range(len(x)):
            if context_noise == "next":
                ctx = [(new[m], s_next) for m in range(n)]
            elif context_noise == "current":
                ctx = [(x[m], s) for m in range(n)]
            else:
                ctx = [(x0s[m], 0.0) for m in range(n)]
            v = sum((float(c.mean()) + 10.0 * cs for c, cs in ctx), 0.0)
            x0s.append(x[n] - s * v)
            new.append(x[n] + v * (s_next - s) if s_next > 0 else x[n] - s * v)
        x = new
    return torch.cat(x, dim=2)


@pytest.mark.parametrize("context_noise", ["next", "current", "clean"])
def test_context_levels_follow_alg1_and_table2(context_noise):
    seeds = [4]
    noise = initial_noise(seeds, 4, (2, K, 2, 2), dtype=torch.float64)
    sigmas = student_sigmas()
    got = hierarchical_rollout(ContextSumField(), noise, sigmas, seeds, step_rule="euler", context_noise=context_noise)
    pipe, _ = pipelined_rollout(ContextSumField(), noise, sigmas, seeds, step_rule="euler", context_noise=context_noise)
    expected = reference_hierarchical(list(noise.split(K, dim=2)), sigmas.tolist(), context_noise)
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.allclose(pipe, expected, atol=1e-9)


def test_context_levels_differ_and_block_first_uses_clean_final_context():
    seeds = [4]
    noise = initial_noise(seeds, 3, (2, K, 2, 2), dtype=torch.float64)
    sigmas = student_sigmas()
    outs = {c: hierarchical_rollout(ContextSumField(), noise, sigmas, seeds, step_rule="euler", context_noise=c)
            for c in ("next", "current", "clean")}
    assert not torch.allclose(outs["next"], outs["current"]) and not torch.allclose(outs["next"], outs["clean"])
    # the first block never sees context, so it is the same under every choice
    assert torch.equal(outs["next"][:, :, :K], outs["clean"][:, :, :K])
    # block-first: block n sees the *final* clean outputs of earlier blocks at sigma 0
    bf = block_first_rollout(ContextSumField(), noise, sigmas, seeds, step_rule="euler")
    blocks = list(noise.split(K, dim=2))
    done = []
    for xb in blocks:
        v = sum((float(c.mean()) for c in done), 0.0)
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            xb = xb + v * (s_next - s)
        done.append(xb)
    assert torch.allclose(bf, torch.cat(done, dim=2), atol=1e-9)


def test_x0_renoise_rule_uses_seeded_noise():
    seeds = [9]
    noise = initial_noise(seeds, 2, (2, K, 2, 2), dtype=torch.float64)
    sig = student_sigmas([1000, 500], warp=False)  # 1.0 -> 0.5 -> 0
    got = hierarchical_rollout(ContextSumField(), noise, sig, seeds, step_rule="x0_renoise", context_noise="next")
    b0, b1 = noise.split(K, dim=2)
    # step 0: block 0 has no context: v = 0, x0 = b0, re-noised to 0.5 with noise (seed, block 0, step 0)
    e00 = block_noise(seeds, 0, 0, b0.shape[1:], dtype=torch.float64)
    x0_next = 0.5 * b0 + 0.5 * e00
    v1 = float(x0_next.mean()) + 10 * 0.5
    x1_x0 = b1 - 1.0 * v1
    x1_next = 0.5 * x1_x0 + 0.5 * block_noise(seeds, 1, 0, b1.shape[1:], dtype=torch.float64)
    # step 1 (to 0): block 0 again context-free, block 1 sees block 0's clean output at sigma 0
    y0 = x0_next
    y1 = x1_next - 0.5 * (float(y0.mean()) + 0.0)
    assert torch.allclose(got, torch.cat([y0, y1], dim=2), atol=1e-9)


def test_bad_rollout_inputs(tiny_model):
    vel = make_velocity(tiny_model)
    sig = student_sigmas()
    with pytest.raises(ValueError, match="divisible by frames_per_block"):
        hierarchical_rollout(vel, torch.randn(2, 16, 5, 8, 8), sig, [1, 2])
    with pytest.raises(ValueError, match="step_rule"):
        hierarchical_rollout(vel, torch.randn(2, 16, 6, 8, 8), sig, [1, 2], step_rule="heun")
    with pytest.raises(ValueError, match="context_noise"):
        pipelined_rollout(vel, torch.randn(2, 16, 6, 8, 8), sig, [1, 2], context_noise="half")
    with pytest.raises(ValueError, match="batch size"):
        hierarchical_rollout(vel, torch.randn(3, 16, 6, 8, 8), sig, [1, 2, 3])
    stage = StepStage(vel, sig, 0, [1, 2])
    with pytest.raises(ValueError, match="expected block 0"):
        stage.process(1, torch.randn(2, 16, K, 8, 8))
    with pytest.raises(ValueError, match="ending at 0"):
        StepStage(vel, torch.tensor([1.0, 0.5]), 0, [1, 2])
