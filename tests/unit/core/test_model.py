"""CausalWanTransformer3DModel against diffusers' WanTransformer3DModel and against its own cache-free forward."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from hiar.core.model import CausalWanTransformer3DModel
from tests.conftest import TINY_KW, perturbed


def inputs(b=2, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, 8, 8, generator=g)
    text = torch.randn(b, 7, 32, generator=g)
    return x, text


def test_loads_diffusers_checkpoint_and_matches_its_output(tmp_path):
    torch.manual_seed(0)
    ref = perturbed(WanTransformer3DModel(**TINY_KW))
    ref.save_pretrained(tmp_path / "ref")
    ours = CausalWanTransformer3DModel.from_pretrained(tmp_path / "ref").eval()
    x, text = inputs()
    t = torch.tensor([910.0, 250.0])
    with torch.no_grad():
        expected = ref(x, t, text).sample
        got = ours(x, t, text).sample
        got_tuple = ours(x, t, text, return_dict=False)[0]
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(got, got_tuple)
    # same parameter names, nothing missing or extra
    assert set(ref.state_dict()) == set(ours.state_dict())


def test_our_checkpoint_loads_in_diffusers(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["_class_name"] == "WanTransformer3DModel"
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    x, text = inputs(seed=3)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        assert (ref(x, t, text).sample - tiny_model(x, t, text).sample).abs().max() <= 1e-5
    again = CausalWanTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, text).sample, tiny_model(x, t, text).sample)


def test_per_frame_timesteps_equal_per_sample_when_constant(tiny_model):
    x, text = inputs()
    with torch.no_grad():
        a = tiny_model(x, torch.tensor([700.0, 300.0]), text).sample
        b = tiny_model(x, torch.tensor([[700.0] * 6, [300.0] * 6]), text).sample
    assert (a - b).abs().max() <= 1e-6


def test_per_frame_timesteps_act_per_frame(tiny_model):
    """Changing the timestep of the last block's frames must not change earlier frames under block-causal."""
    x, text = inputs(b=1)
    t1 = torch.tensor([[900.0] * 3 + [900.0] * 3])
    t2 = torch.tensor([[900.0] * 3 + [100.0] * 3])
    with torch.no_grad():
        a = tiny_model(x, t1, text, attention_mode="block_causal", frames_per_block=3).sample
        b = tiny_model(x, t2, text, attention_mode="block_causal", frames_per_block=3).sample
    assert torch.equal(a[:, :, :3], b[:, :, :3])
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-3


def test_block_causal_is_causal_and_bidirectional_is_not(tiny_model):
    x, text = inputs(b=1, f=9)
    y = x.clone()
    y[:, :, 6:] += 1.0  # change only the last block
    t = torch.tensor([600.0])
    with torch.no_grad():
        a = tiny_model(x, t, text, attention_mode="block_causal", frames_per_block=3).sample
        b = tiny_model(y, t, text, attention_mode="block_causal", frames_per_block=3).sample
        c = tiny_model(x, t, text).sample
        d = tiny_model(y, t, text).sample
    assert torch.equal(a[:, :, :6], b[:, :, :6])
    assert (c[:, :, :6] - d[:, :, :6]).abs().max() > 1e-3


def test_kv_cache_block_by_block_equals_full_block_causal_forward(tiny_model):
    x, text = inputs(b=2, f=12)
    t = torch.rand(2, 12, generator=torch.Generator().manual_seed(5)) * 1000
    with torch.no_grad():
        full = tiny_model(x, t, text, attention_mode="block_causal", frames_per_block=3).sample
        cache = tiny_model.new_kv_cache(frames_per_block=3)
        parts = [
            tiny_model(x[:, :, s : s + 3], t[:, s : s + 3], text, attention_mode="block_causal",
                       kv_cache=cache, frame_offset=s).sample
            for s in range(0, 12, 3)
        ]
    assert (torch.cat(parts, dim=2) - full).abs().max() <= 1e-5
    assert cache.cached_blocks() == [0, 3, 6, 9]


def test_fused_call_equals_write_then_denoise(tiny_model):
    x, text = inputs(b=1, f=12)
    ctx_level, level = 625.0, 833.3
    history = x[:, :, :6]  # blocks 0, 1 already in the cache
    ctx = x[:, :, 6:9] * 0.5  # context of block 2
    nxt = x[:, :, 9:12]  # block 3, to denoise
    kw = dict(attention_mode="block_causal")

    def primed():
        cache = tiny_model.new_kv_cache(frames_per_block=3)
        tiny_model(history, torch.tensor([[ctx_level] * 6]), text, kv_cache=cache, frame_offset=0, **kw)
        return cache

    with torch.no_grad():
        two = primed()
        tiny_model(ctx, torch.tensor([[ctx_level] * 3]), text, kv_cache=two, frame_offset=6, **kw)
        separate = tiny_model(nxt, torch.tensor([[level] * 3]), text, kv_cache=two, frame_offset=9, **kw).sample
        one = primed()
        fused = tiny_model(torch.cat([ctx, nxt], dim=2), torch.tensor([[ctx_level] * 3 + [level] * 3]), text,
                           kv_cache=one, frame_offset=6, **kw).sample
    assert (fused[:, :, 3:] - separate).abs().max() <= 1e-5
    for layer in range(len(tiny_model.blocks)):
        k1, v1 = two.block_kv(6, layer)
        k2, v2 = one.block_kv(6, layer)
        assert (k1 - k2).abs().max() <= 1e-5 and (v1 - v2).abs().max() <= 1e-5
    # and block 2's keys did not see block 3: its fused output equals a call without block 3
    with torch.no_grad():
        alone = tiny_model(ctx, torch.tensor([[ctx_level] * 3]), text, kv_cache=primed(), frame_offset=6, **kw).sample
    assert (fused[:, :, :3] - alone).abs().max() <= 1e-5


def test_later_write_overwrites_block(tiny_model):
    x, text = inputs(b=1, f=6)
    kw = dict(attention_mode="block_causal")
    with torch.no_grad():
        cache = tiny_model.new_kv_cache(frames_per_block=3)
        tiny_model(x[:, :, :3] + 5.0, torch.tensor([[900.0] * 3]), text, kv_cache=cache, frame_offset=0, **kw)
        tiny_model(x[:, :, :3], torch.tensor([[400.0] * 3]), text, kv_cache=cache, frame_offset=0, **kw)
        a = tiny_model(x[:, :, 3:], torch.tensor([[700.0] * 3]), text, kv_cache=cache, frame_offset=3, **kw).sample
        clean = tiny_model.new_kv_cache(frames_per_block=3)
        tiny_model(x[:, :, :3], torch.tensor([[400.0] * 3]), text, kv_cache=clean, frame_offset=0, **kw)
        b = tiny_model(x[:, :, 3:], torch.tensor([[700.0] * 3]), text, kv_cache=clean, frame_offset=3, **kw).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("sinks", [0, 3])
def test_sliding_window_ignores_older_frames(tiny_model, sinks):
    x, text = inputs(b=1, f=15)
    y = x.clone()
    y[:, :, 3:6] += 3.0  # block 1: outside a 6-frame window of block 4 (frames 9..14 visible), 3 hops > 2 layers
    kw = dict(attention_mode="block_causal")

    def run(video, window):
        cache = tiny_model.new_kv_cache(frames_per_block=3, window_frames=window, sink_frames=sinks)
        with torch.no_grad():
            outs = [tiny_model(video[:, :, s : s + 3], torch.tensor([[500.0] * 3]), text, kv_cache=cache,
                               frame_offset=s, **kw).sample for s in range(0, 15, 3)]
        return outs, cache

    (a, ca), (b, _) = run(x, 6), run(y, 6)
    assert torch.equal(a[4], b[4])  # block 4 sees frames 9..14 (+ sinks 0..2), never block 1
    assert not torch.equal(a[2], b[2])  # block 2's window (3..8) does contain block 1
    (c, _), (d, _) = run(x, None), run(y, None)
    assert not torch.equal(c[4], d[4])  # without a window the change does propagate
    # memory stays bounded: evicted blocks are gone, sinks stay
    kept = ca.cached_blocks()
    assert 3 not in kept and (0 in kept) == (sinks > 0)


def test_window_reads_only_visible_cache_entries():
    """Per layer, a query reads only cache entries inside its window. With one layer the cached K/V are functions
    of their own frames, so the windowed output equals a cache that only ever held the visible blocks. (With L
    layers information still travels one window per layer through the cached K/V, as in Self-Forcing.)"""
    torch.manual_seed(1)
    one_layer = perturbed(CausalWanTransformer3DModel(**{**TINY_KW, "num_layers": 1}))
    x, text = inputs(b=1, f=15)
    kw = dict(attention_mode="block_causal")
    t = torch.tensor([[500.0] * 3])
    for sinks in (0, 3):
        with torch.no_grad():
            full = one_layer.new_kv_cache(frames_per_block=3, window_frames=6, sink_frames=sinks)
            for s in range(0, 15, 3):
                a = one_layer(x[:, :, s : s + 3], t, text, kv_cache=full, frame_offset=s, **kw).sample
            only = one_layer.new_kv_cache(frames_per_block=3, window_frames=6, sink_frames=sinks)
            for s in ([0] if sinks else []) + [9, 12]:
                b = one_layer(x[:, :, s : s + 3], t, text, kv_cache=only, frame_offset=s, **kw).sample
        assert (a - b).abs().max() <= 1e-5


def test_cross_attention_kv_cached_per_prompt(tiny_model):
    x, text = inputs(b=1, f=6)
    other = text + 1.0
    kw = dict(attention_mode="block_causal")
    with torch.no_grad():
        cache = tiny_model.new_kv_cache(frames_per_block=3)
        tiny_model(x[:, :, :3], torch.tensor([[500.0] * 3]), text, kv_cache=cache, frame_offset=0, **kw)
        k_before = cache.cross_kv(0)[0].clone()
        tiny_model(x[:, :, 3:], torch.tensor([[500.0] * 3]), text.clone(), kv_cache=cache, frame_offset=3, **kw)
        assert torch.equal(cache.cross_kv(0)[0], k_before)
        # a different prompt in the same cache is recomputed, not silently reused
        out = tiny_model(x[:, :, 3:], torch.tensor([[500.0] * 3]), other, kv_cache=cache, frame_offset=3, **kw).sample
        assert not torch.equal(cache.cross_kv(0)[0], k_before)
        fresh = tiny_model.new_kv_cache(frames_per_block=3)
        tiny_model(x[:, :, :3], torch.tensor([[500.0] * 3]), other, kv_cache=fresh, frame_offset=0, **kw)
        ref = tiny_model(x[:, :, 3:], torch.tensor([[500.0] * 3]), other, kv_cache=fresh, frame_offset=3, **kw).sample
    # only the cross-attention changed: the self-attention cache still holds block 0 under `text`
    assert out.shape == ref.shape


def test_gradient_flows_to_live_block_not_through_cache(tiny_model):
    x, text = inputs(b=1, f=6)
    ctx = x[:, :, :3].clone().requires_grad_(True)
    cur = x[:, :, 3:].clone().requires_grad_(True)
    cache = tiny_model.new_kv_cache(frames_per_block=3)
    kw = dict(attention_mode="block_causal")
    tiny_model(ctx, torch.tensor([[500.0] * 3]), text, kv_cache=cache, frame_offset=0, **kw)
    out = tiny_model(cur, torch.tensor([[800.0] * 3]), text, kv_cache=cache, frame_offset=3, **kw).sample
    out.sum().backward()
    assert ctx.grad is None
    assert cur.grad is not None and cur.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors(tiny_model):
    x, text = inputs(b=2, f=6)
    t = torch.tensor([500.0, 500.0])
    with pytest.raises(ValueError, match="channels"):
        tiny_model(x[:, :8], t, text)
    with pytest.raises(ValueError, match="divisible by frames_per_block"):
        tiny_model(x[:, :, :5], t, text, attention_mode="block_causal", frames_per_block=3)
    with pytest.raises(ValueError, match="frames_per_block"):
        tiny_model(x, t, text, attention_mode="block_causal")
    with pytest.raises(ValueError, match="attention_mode"):
        tiny_model(x, t, text, attention_mode="causal")
    with pytest.raises(ValueError, match="text_dim"):
        tiny_model(x, t, text[..., :8])
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(x, torch.tensor([1.0, 2.0, 3.0]), text)
    cache = tiny_model.new_kv_cache(frames_per_block=3)
    with torch.no_grad():
        tiny_model(x[:, :, :3], t, text, attention_mode="block_causal", kv_cache=cache, frame_offset=0)
        with pytest.raises(ValueError, match="batch size 2"):
            tiny_model(x[:1, :, 3:], t[:1], text[:1], attention_mode="block_causal", kv_cache=cache, frame_offset=3)
        with pytest.raises(ValueError, match="frame_offset"):
            tiny_model(x[:, :, 3:], t, text, attention_mode="block_causal", kv_cache=cache, frame_offset=4)
    with pytest.raises(ValueError, match="block_causal"):
        tiny_model(x, t, text, kv_cache=cache)


def test_missing_checkpoint_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        CausalWanTransformer3DModel.from_pretrained(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CausalWanTransformer3DModel.from_pretrained(tmp_path / "empty")


def test_image_to_video_config_is_rejected():
    with pytest.raises(ValueError, match="text-to-video"):
        CausalWanTransformer3DModel(**{**TINY_KW, "image_dim": 32, "added_kv_proj_dim": 32})


@pytest.mark.parametrize("sink_frames", [0, 1])
def test_masked_attention_equals_sdpa_with_the_mask(sink_frames):
    """The split attention against torch's masked SDPA, on a block-causal mask with a sliding window over a cache
    (sink frames make a query block's keys non-contiguous: the gather branch)."""
    import torch.nn.functional as F

    from hiar.core.model import masked_attention

    g = torch.Generator().manual_seed(0)
    k_frames, tpf, cache_frames, live_frames, window = 2, 3, 8, 4, 6
    key_frames = torch.arange(cache_frames + live_frames).repeat_interleave(tpf)
    query_frames = torch.arange(cache_frames, cache_frames + live_frames).repeat_interleave(tpf)
    qb, kb = (query_frames // k_frames)[:, None], (key_frames // k_frames)[None, :]
    in_window = key_frames[None, :] >= (qb + 1) * k_frames - window
    mask = (kb <= qb) & (in_window | (key_frames[None, :] < sink_frames))
    q = torch.randn(2, 4, query_frames.numel(), 8, generator=g)
    k = torch.randn(2, 4, key_frames.numel(), 8, generator=g)
    v = torch.randn(2, 4, key_frames.numel(), 8, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = masked_attention(q, k, v, mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-6
    rows = mask.unique(dim=0)
    assert len(rows) == live_frames // k_frames  # one run per query block
    if sink_frames:  # the keys of the last block are the sink and a window that no longer touches it
        last = rows[-1].nonzero().flatten()
        assert last.numel() != int(last[-1] - last[0]) + 1


def test_batched_attention_equals_one_call_each():
    """Calls that share their runs and shapes are stacked on the batch axis; every call's result (in its own order
    and batch size) equals its own attention, whatever the groups: two block-causal patterns, full attention, and a
    call whose key length matches no other."""
    import torch.nn.functional as F

    from hiar.core.model import attend_runs, attention_runs, batched_attention

    g = torch.Generator().manual_seed(0)
    def runs(rows):  # 4 queries, 4 key frames of 3 tokens
        return attention_runs(torch.tensor(rows, dtype=torch.bool).repeat_interleave(3, dim=1))

    causal = runs([[1, 1, 0, 0]] * 2 + [[1, 1, 1, 1]] * 2)
    window = runs([[1, 1, 0, 0]] * 2 + [[0, 1, 1, 1]] * 2)
    assert causal != window and len(causal) == len(window) == 2
    calls = []
    for batch, pattern, keys in [(1, causal, 12), (2, window, 12), (1, causal, 12), (3, None, 12), (1, window, 12),
                              (2, causal, 12), (1, None, 5)]:
        q = torch.randn(batch, 2, 4, 8, generator=g)
        k, v = (torch.randn(batch, 2, keys, 8, generator=g) for _ in range(2))
        calls.append((q, k, v, pattern))
    out = batched_attention(calls)
    for (q, k, v, pattern), got in zip(calls, out):
        ref = F.scaled_dot_product_attention(q, k, v) if pattern is None else attend_runs(q, k, v, pattern)
        ref = ref.transpose(1, 2).flatten(2)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < 1e-6
