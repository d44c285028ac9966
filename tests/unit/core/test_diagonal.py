"""Diagonal rollout: each anti-diagonal as one packed forward equals the hierarchical sweep, in N + S forwards."""

import pytest
import torch

from hiar.config import load_config
from hiar.core.diagonal import DiagonalRollout, diagonal_rollout
from hiar.core.kv_cache import CacheSegment
from hiar.core.model import CausalWanTransformer3DModel
from hiar.core.rollout import hierarchical_rollout, initial_noise, pipelined_rollout
from hiar.core.velocity import GuidedVelocity

CFG = load_config("tiny")
K = CFG.rollout.frames_per_block
STEPS = CFG.schedule.num_steps
TOL = 1e-4  # float round-off of the packed matmuls; the orders compute the same calls


class ForwardCounter:
    """Counts real forward passes of the transformer (a forward pre-hook), whatever calls it."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanTransformer3DModel(**CFG.model.kwargs()).eval()


def make_velocity(model, guidance=1.0, window=CFG.rollout.window_frames, sinks=0, batch=1):
    g = torch.Generator().manual_seed(3)
    text = torch.randn(batch, 6, CFG.model.text_dim, generator=g)
    neg = torch.randn(batch, 6, CFG.model.text_dim, generator=g) if guidance != 1.0 else None
    return GuidedVelocity(
        model, text, neg, guidance_scale=guidance, frames_per_block=K, window_frames=window, sink_frames=sinks
    )


def make_noise(seeds, num_blocks):
    v = CFG.video
    return initial_noise(seeds, num_blocks, (v.latent_channels, K, v.latent_height, v.latent_width))


def both_orders(model, vel, num_blocks, seeds=(5,), **options):
    noise = make_noise(list(seeds), num_blocks)
    sigmas = CFG.schedule.sigmas()
    counter = ForwardCounter(model)
    try:
        with torch.no_grad():
            hier = hierarchical_rollout(vel, noise, sigmas, list(seeds), **options)
            hier_forwards, counter.n = counter.n, 0
            diag, stages = diagonal_rollout(vel, noise, sigmas, list(seeds), **options)
    finally:
        counter.handle.remove()
    return hier, hier_forwards, diag, counter.n, stages


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("context_noise", ["next", "current", "clean"])
@pytest.mark.parametrize("step_rule", ["euler", "x0_renoise"])
def test_diagonal_equals_hierarchical_under_every_option(model, step_rule, context_noise, guidance):
    num_blocks = 5  # 15 latent frames: longer than the tiny preset's 12-frame window
    vel = make_velocity(model, guidance=guidance)
    hier, hier_forwards, diag, diag_forwards, stages = both_orders(
        model, vel, num_blocks, step_rule=step_rule, context_noise=context_noise
    )
    assert (hier - diag).abs().max().item() <= TOL
    assert hier_forwards == STEPS * (num_blocks + 1)
    assert diag_forwards == num_blocks + STEPS  # N + S - 1 diagonals + the last step's trailing context write
    assert [s.calls for s in stages] == [num_blocks + 1] * STEPS  # the same per-step calls, packed


@pytest.mark.parametrize("num_blocks", [2, STEPS, 7])  # N < S, N = S, N > S
def test_diagonal_equals_hierarchical_for_any_length_with_window_and_sinks(model, num_blocks):
    vel = make_velocity(model, window=2 * K, sinks=K, batch=2)
    hier, _, diag, diag_forwards, _ = both_orders(model, vel, num_blocks, seeds=(5, 6))
    assert (hier - diag).abs().max().item() <= TOL
    assert diag_forwards == num_blocks + STEPS


def test_diagonal_leaves_each_step_cache_as_the_pipelined_order_does(model):
    vel = make_velocity(model, window=2 * K, sinks=K)
    noise, sigmas = make_noise([9], 6), CFG.schedule.sigmas()
    with torch.no_grad():
        _, pipe_stages = pipelined_rollout(vel, noise, sigmas, [9])
        _, diag_stages = diagonal_rollout(vel, noise, sigmas, [9])
    for pipe, diag in zip(pipe_stages, diag_stages):
        assert diag.pending is None and diag.next_block == pipe.next_block
        for layer in range(model.config.num_layers):
            assert diag.cache.cached_blocks(layer) == pipe.cache.cached_blocks(layer)
            for start in pipe.cache.cached_blocks(layer):
                for a, b in zip(diag.cache.block_kv(start, layer), pipe.cache.block_kv(start, layer)):
                    assert (a - b).abs().max().item() <= TOL
            assert diag.cache.cross_kv(layer) is not None


def test_diagonal_visits_cells_in_pipelined_order(model):
    vel = make_velocity(model)
    noise, sigmas = make_noise([1], 3), CFG.schedule.sigmas()
    pipe_visits, diag_visits = [], []
    with torch.no_grad():
        pipelined_rollout(vel, noise, sigmas, [1], on_visit=lambda j, n: pipe_visits.append((j, n)))
        diagonal_rollout(vel, noise, sigmas, [1], on_visit=lambda j, n: diag_visits.append((j, n)))
    assert diag_visits == pipe_visits


def test_streaming_returns_blocks_in_order_after_s_diagonals(model):
    vel = make_velocity(model)
    num_blocks, sigmas = 3, CFG.schedule.sigmas()
    noise = make_noise([2], num_blocks)
    rollout = DiagonalRollout(vel, sigmas, [2])
    with torch.no_grad():
        fed = [rollout.advance_diagonal(x) for x in noise.split(K, dim=2)]
        drained = []
        while not rollout.done:
            drained.append(rollout.advance_diagonal(None))
        reference = hierarchical_rollout(vel, noise, sigmas, [2])
    assert all(x is None for x in fed)  # num_blocks < S: nothing is clean before the stream ends
    out = [x for x in drained if x is not None]
    assert len(out) == num_blocks and rollout.forwards == num_blocks + STEPS
    assert (torch.cat(out, dim=2) - reference).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="ended"):
        rollout.advance_diagonal(noise[:, :, :K])


def test_packed_forward_equals_separate_calls(model):
    """The model-level contract the diagonal rests on: a packed call is its segments' calls side by side."""
    vel = make_velocity(model, window=2 * K)
    v = CFG.video
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, v.latent_channels, 3 * K, v.latent_height, v.latent_width, generator=gen)
    sigma = torch.tensor([0.9] * K + [0.5] * 2 * K)
    with torch.no_grad():
        separate, packed = vel.new_cache(), vel.new_cache()
        other_separate, other_packed = vel.new_cache(), vel.new_cache()
        for cache in (separate, packed, other_separate, other_packed):  # some history at different positions
            vel(x[:, :, :K], 0.3, cache=cache, frame_offset=0)
        vel(x[:, :, K:], 0.2, cache=other_separate, frame_offset=K)
        vel(x[:, :, K:], 0.2, cache=other_packed, frame_offset=K)
        a = vel(x[:, :, :K], sigma[:K], cache=separate, frame_offset=K)
        b = vel(x[:, :, K:], sigma[K:], cache=other_separate, frame_offset=2 * K)
        both = vel(x, sigma, cache=[CacheSegment(packed, K, K), CacheSegment(other_packed, 2 * K, 2 * K)])
    assert (torch.cat([a, b], dim=2) - both).abs().max().item() <= 1e-5
    for cache, ref in ((packed, separate), (other_packed, other_separate)):
        assert cache.cached_blocks() == ref.cached_blocks()


def test_bad_packed_calls_are_refused(model):
    vel = make_velocity(model)
    v = CFG.video
    x = torch.zeros(1, v.latent_channels, 2 * K, v.latent_height, v.latent_width)
    cache = vel.new_cache()
    with torch.no_grad(), pytest.raises(ValueError, match="own cache"):
        vel(x, 0.5, cache=[CacheSegment(cache, 0, K), CacheSegment(cache, K, K)])
    with torch.no_grad(), pytest.raises(ValueError, match="cover"):
        vel(x, 0.5, cache=[CacheSegment(cache, 0, K)])
    with torch.no_grad(), pytest.raises(ValueError, match="frame_offset"):
        vel(x, 0.5, cache=[CacheSegment(cache, 0, 2 * K)], frame_offset=K)
    assert cache.cached_blocks() == []  # refused before anything was written
