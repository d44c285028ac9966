"""Cross-stream batching: streams of different prompts, lengths, seeds and guidance, joining and leaving at different
blocks, advanced together in one forward per batch, each equal to its own ``hierarchical_rollout``."""

import pytest
import torch

from hiar.config import load_config
from hiar.core.batching import StreamCall, batched_forward, process_together
from hiar.core.diagonal import DiagonalRollout, advance_diagonals, diagonal_rollout
from hiar.core.kv_cache import CacheSegment, PackMember
from hiar.core.model import CausalWanTransformer3DModel
from hiar.core.rollout import StepStage, hierarchical_rollout, initial_block_noise
from hiar.core.velocity import GuidedVelocity
from tests.unit.core.test_diagonal import ForwardCounter

CFG = load_config("tiny")
K = CFG.rollout.frames_per_block
STEPS = CFG.schedule.num_steps
SIGMAS = CFG.schedule.sigmas()
SHAPE = (CFG.video.latent_channels, K, CFG.video.latent_height, CFG.video.latent_width)
TOL = 1e-4  # float round-off: the packed per-token layers group their sums differently

# (prompt tokens, guidance, seed, blocks, joins at tick): 8 mixed streams. Lengths 1..7 (the tiny window is 4
# blocks), one prompt longer than the others, three guided ones (a guided stream has 2 samples in the model).
STREAMS = [(6, 1.0, 11, 5, 0), (9, 3.0, 12, 2, 0), (6, 1.0, 13, 7, 1), (6, 2.0, 14, 1, 3),
           (6, 1.0, 15, 4, 4), (9, 1.0, 16, 3, 4), (6, 4.0, 17, 6, 6), (6, 1.0, 18, 2, 9)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanTransformer3DModel(**CFG.model.kwargs()).eval()


def velocity_for(model, tokens: int, guidance: float, seed: int) -> GuidedVelocity:
    g = torch.Generator().manual_seed(1000 + seed)
    text = torch.randn(1, tokens, CFG.model.text_dim, generator=g)
    neg = torch.randn(1, tokens, CFG.model.text_dim, generator=g) if guidance != 1.0 else None
    r = CFG.rollout
    return GuidedVelocity(model, text, neg, guidance_scale=guidance, frames_per_block=K,
                          window_frames=r.window_frames, sink_frames=r.sink_frames)


def reference(model, stream) -> torch.Tensor:
    tokens, guidance, seed, blocks, _ = stream
    noise = torch.cat([initial_block_noise([seed], n, SHAPE) for n in range(blocks)], dim=2)
    with torch.no_grad():
        return hierarchical_rollout(velocity_for(model, tokens, guidance, seed), noise, SIGMAS, [seed])


def run_per_step(model, streams, max_batch: int):
    """The per-step topology in one process: at each tick, step j takes (up to ``max_batch`` of) the streams that
    have a block waiting for it, oldest stream first, and denoises them in one ``process_together``. Returns
    each stream's clean blocks and the batch sizes used."""
    state = []
    for tokens, guidance, seed, blocks, _ in streams:
        vel = velocity_for(model, tokens, guidance, seed)
        stages = [StepStage(vel, SIGMAS, j, [seed]) for j in range(STEPS)]
        state.append({"stages": stages, "inbox": [[] for _ in range(STEPS + 1)], "fed": 0})
    sizes, tick = [], 0
    with torch.no_grad():
        while any(len(st["inbox"][STEPS]) < s[3] for st, s in zip(state, streams)):
            for st, (_, _, seed, blocks, join) in zip(state, streams):
                if tick >= join and st["fed"] < blocks:  # one new block per tick once the stream has joined
                    st["inbox"][0].append((st["fed"], initial_block_noise([seed], st["fed"], SHAPE)))
                    st["fed"] += 1
            for j in reversed(range(STEPS)):  # later steps first: a block moves one step per tick
                waiting = [st for st in state if st["inbox"][j]]
                for i in range(0, len(waiting), max_batch):
                    batch = waiting[i:i + max_batch]
                    items = [(st["stages"][j], *st["inbox"][j].pop(0)) for st in batch]
                    outs = process_together(items)
                    sizes.append(len(items))
                    for st, (_, n, _), out in zip(batch, items, outs):
                        st["inbox"][j + 1].append((n, out))
            tick += 1
    return [torch.cat([x for _, x in st["inbox"][STEPS]], dim=2) for st in state], sizes


def run_diagonal(model, streams):
    """The diagonal topology in one process: each tick, every joined stream advances one anti-diagonal, all in
    one ``advance_diagonals``; a stream leaves once it is done. Returns the clean blocks and the batch sizes."""
    rollouts, outs, fed = [], [[] for _ in streams], [0] * len(streams)
    for tokens, guidance, seed, _, _ in streams:
        rollouts.append(DiagonalRollout(velocity_for(model, tokens, guidance, seed), SIGMAS, [seed],
                                        trailing_writes=False))
    sizes, tick = [], 0
    with torch.no_grad():
        while not all(r.done for r in rollouts):
            pairs, owners = [], []
            for i, (r, (_, _, seed, blocks, join)) in enumerate(zip(rollouts, streams)):
                if tick < join or r.done:
                    continue
                x = initial_block_noise([seed], fed[i], SHAPE) if fed[i] < blocks else None
                fed[i] += x is not None
                pairs.append((r, x))
                owners.append(i)
            if pairs:
                sizes.append(len(pairs))
                for i, block in zip(owners, advance_diagonals(pairs)):
                    if block is not None:
                        outs[i].append(block)
            tick += 1
    return [torch.cat(o, dim=2) for o in outs], sizes, rollouts


def test_per_step_streams_batched_equal_each_alone(model):
    counter = ForwardCounter(model)
    try:
        got, sizes = run_per_step(model, STREAMS, max_batch=4)
    finally:
        counter.handle.remove()
    assert max(sizes) == 4 and counter.n == len(sizes), "one forward per batch, and batches of 4 happened"
    assert sum(sizes) == sum(s[3] for s in STREAMS) * STEPS
    for stream, out in zip(STREAMS, got):
        want = reference(model, stream)
        assert out.shape == want.shape
        assert (out - want).abs().max().item() <= TOL, stream


def test_per_step_batch_of_one_is_bit_identical(model):
    got, sizes = run_per_step(model, STREAMS[:3], max_batch=1)
    assert set(sizes) == {1}
    for stream, out in zip(STREAMS[:3], got):
        assert torch.equal(out, reference(model, stream)), stream


def test_diagonal_streams_batched_equal_each_alone(model):
    counter = ForwardCounter(model)
    try:
        got, sizes, rollouts = run_diagonal(model, STREAMS)
    finally:
        counter.handle.remove()
    assert counter.n == len(sizes) and max(sizes) >= 6, sizes  # one forward per tick; most streams together
    for stream, out, r in zip(STREAMS, got, rollouts):
        want = reference(model, stream)
        assert out.shape == want.shape
        assert (out - want).abs().max().item() <= TOL, stream
        assert r.forwards == stream[3] + STEPS - 1  # N + S - 1: no trailing context writes when serving
        assert [s.calls for s in r.stages] == [stream[3]] * STEPS


def test_one_stream_of_advance_diagonals_is_advance_diagonal(model):
    tokens, guidance, seed, blocks, _ = STREAMS[1]
    vel = velocity_for(model, tokens, guidance, seed)
    noise = torch.cat([initial_block_noise([seed], n, SHAPE) for n in range(blocks)], dim=2)
    with torch.no_grad():
        alone, _ = diagonal_rollout(vel, noise, SIGMAS, [seed])
        r, out = DiagonalRollout(vel, SIGMAS, [seed]), []
        for x in list(noise.split(K, dim=2)) + [None] * (STEPS + 1):
            if not r.done:
                out.extend(b for b in advance_diagonals([(r, x)]) if b is not None)
    assert torch.equal(torch.cat(out, dim=2), alone)


def test_multi_stream_forward_equals_separate_calls_and_writes_the_same_caches(model):
    """Members of different batch sizes (guided: 2 samples), prompt lengths and cache histories in one forward."""
    plain, guided = velocity_for(model, 6, 1.0, 1), velocity_for(model, 9, 3.0, 2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, SHAPE[0], 2 * K, *SHAPE[2:], generator=g)
    sig = torch.tensor([0.4] * K + [0.8] * K)
    with torch.no_grad():
        caches = {name: [v.new_cache(), v.new_cache()] for name, v in (("plain", plain), ("guided", guided))}
        for name, v in (("plain", plain), ("guided", guided)):  # some history: 2 blocks in one, 1 in the other
            for cache in caches[name]:
                v(x[:, :, :K], 0.3, cache=cache, frame_offset=0)
                if name == "plain":
                    v(x[:, :, K:], 0.2, cache=cache, frame_offset=K)
        a = plain(x, sig, cache=caches["plain"][0], frame_offset=K)
        b = guided(x[:, :, :K], sig[:K], cache=caches["guided"][0], frame_offset=K)
        both = batched_forward([StreamCall(plain, x, sig, [CacheSegment(caches["plain"][1], K, 2 * K)]),
                                StreamCall(guided, x[:, :, :K], sig[:K], [CacheSegment(caches["guided"][1], K, K)])])
    assert (both[0] - a).abs().max().item() <= 1e-5 and (both[1] - b).abs().max().item() <= 1e-5
    for name in caches:
        separate, packed = caches[name]
        assert packed.cached_blocks() == separate.cached_blocks()
        for start in separate.cached_blocks():
            for p, s in zip(packed.block_kv(start), separate.block_kv(start)):
                assert p.shape == s.shape and (p - s).abs().max().item() <= 1e-5


def test_bad_multi_stream_calls_are_refused(model):
    vel = velocity_for(model, 6, 1.0, 1)
    x = torch.zeros(1, SHAPE[0], 2 * K, *SHAPE[2:])
    t = torch.zeros(1, 2 * K)
    cache = vel.new_cache()
    same_cache = [PackMember(vel.context, (CacheSegment(cache, 0, K),)),
                  PackMember(vel.context, (CacheSegment(cache, K, K),))]
    with torch.no_grad():
        with pytest.raises(ValueError, match="own cache"):
            model(x, t, None, attention_mode="block_causal", kv_cache=same_cache)
        one = [PackMember(vel.context, (CacheSegment(cache, 0, 2 * K),))]
        with pytest.raises(ValueError, match="encoder_hidden_states=None"):
            model(x, t, vel.context, attention_mode="block_causal", kv_cache=one)
        with pytest.raises(ValueError, match="batch size 1"):
            model(torch.cat([x, x]), torch.cat([t, t]), None, attention_mode="block_causal", kv_cache=one)
        with pytest.raises(ValueError, match="cover"):
            model(x[:, :, :K], t[:, :K], None, attention_mode="block_causal", kv_cache=one)
        other = CausalWanTransformer3DModel(**CFG.model.kwargs()).eval()
        foreign = GuidedVelocity(other, vel.context, frames_per_block=K)
        calls = [StreamCall(v, x[:, :, :K], t[0, :K], [CacheSegment(v.new_cache(), 0, K)]) for v in (vel, foreign)]
        with pytest.raises(ValueError, match="share one transformer"):
            batched_forward(calls)
        r = DiagonalRollout(vel, SIGMAS, [1])
        with pytest.raises(ValueError, match="one diagonal per batch"):
            advance_diagonals([(r, x[:, :, :K]), (r, None)])
    assert cache.cached_blocks() == []  # refused before anything was written
