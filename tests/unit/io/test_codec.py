"""hiar.io.codec: PixelCodec (tiny preset) and WanVAECodec on a tiny random AutoencoderKLWan (offline, seconds)."""

import json

import numpy as np
import pytest
import torch

from hiar.io.codec import Codec, PixelCodec, WanVAECodec, load_codec
from hiar.tiny.world import SyntheticWorld

Z = 4
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.5, 2.0, 1.0]


def world_clips(n: int = 4, frames: int = 5, size: int = 16) -> np.ndarray:
    world = SyntheticWorld(frame_size=size, seed=0)
    return np.stack([world.clip(i, frames)[0] for i in range(n)])  # [B, T, H, W, 3]


# --------------------------------------------------------------------------- PixelCodec


def test_pixel_round_trip_layout_and_shapes():
    codec = PixelCodec(mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 2.0))
    assert isinstance(codec, Codec) and codec.latent_channels == 3
    video = torch.rand(2, 5, 8, 6, 3, generator=torch.Generator().manual_seed(0))
    lat = codec.encode(video)
    assert lat.shape == (2, 3, 5, 8, 6) == (2, *codec.latent_shape(5, 8, 6))
    assert codec.num_frames_for(5) == 5
    # channel c of the latents is (pixel[..., c] - mean[c]) / std[c]
    assert torch.isclose(lat[1, 2, 3, 4, 5], (video[1, 3, 4, 5, 2] - 0.6) / 2.0)
    torch.testing.assert_close(codec.decode(lat), video, rtol=0, atol=1e-6)
    # numpy input (what the world renders) works too
    torch.testing.assert_close(codec.encode(video.numpy()), lat)


def test_pixel_packs_consecutive_frames_into_channels():
    codec = PixelCodec(mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 2.0), frames_per_latent=2)
    assert codec.latent_channels == 6 and codec.num_frames_for(3) == 6
    video = torch.rand(2, 6, 8, 4, 3, generator=torch.Generator().manual_seed(1))
    lat = codec.encode(video)
    assert lat.shape == (2, 6, 3, 8, 4) == (2, *codec.latent_shape(6, 8, 4))
    # channel 3 * i + c of latent frame f is colour c of video frame 2 * f + i, normalised
    assert torch.isclose(lat[1, 3 * 1 + 2, 2, 5, 3], (video[1, 2 * 2 + 1, 5, 3, 2] - 0.6) / 2.0)
    assert torch.isclose(lat[0, 0, 1, 7, 0], (video[0, 2, 7, 0, 0] - 0.2) / 0.5)
    torch.testing.assert_close(codec.decode(lat), video, rtol=0, atol=1e-6)
    # packing k frames is the one-frame codec's latents with frames moved into channels
    flat = PixelCodec(codec.mean, codec.std).encode(video)  # [2, 3, 6, 8, 4]
    torch.testing.assert_close(lat, flat.view(2, 3, 3, 2, 8, 4).permute(0, 3, 1, 2, 4, 5).reshape(2, 6, 3, 8, 4))
    with pytest.raises(ValueError, match="multiple of 2"):
        codec.encode(video[:, :5])
    with pytest.raises(ValueError, match=r"\[B, 6, F"):
        codec.decode(torch.zeros(1, 3, 2, 8, 4))
    with pytest.raises(ValueError, match="frames_per_latent"):
        PixelCodec(frames_per_latent=0)


def test_pixel_history_adds_the_previous_frames_and_stays_causal():
    codec = PixelCodec(mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 2.0), history_frames=1)
    assert codec.latent_channels == 6 and codec.num_frames_for(5) == 5
    video = torch.rand(2, 5, 8, 4, 3, generator=torch.Generator().manual_seed(2))
    lat = codec.encode(video)
    assert lat.shape == (2, 6, 5, 8, 4) == (2, *codec.latent_shape(5, 8, 4))
    own = PixelCodec(codec.mean, codec.std).encode(video)
    torch.testing.assert_close(lat[:, :3], own)
    # channels 3..5 of latent frame f are frame f - 1; before the clip starts, frame 0 is repeated
    torch.testing.assert_close(lat[:, 3:, 1:], own[:, :, :-1])
    torch.testing.assert_close(lat[:, 3:, 0], own[:, :, 0])
    torch.testing.assert_close(codec.decode(lat), video, rtol=0, atol=1e-6)
    # decode reads only each latent frame's own frame: the history channels cannot change the video
    torch.testing.assert_close(codec.decode(torch.cat([lat[:, :3], torch.randn_like(lat[:, 3:])], 1)), video)
    # latent frame f depends on frames up to f only, so causal rollouts and streaming decode stay valid
    later = video.clone()
    later[:, 3:] = torch.rand_like(later[:, 3:])
    torch.testing.assert_close(codec.encode(later)[:, :, :3], lat[:, :, :3])
    assert not torch.equal(codec.encode(later)[:, :, 3:], lat[:, :, 3:])

    # with packing too: frames 2f, 2f+1 then 2f-1, 2f-2 (clamped to frame 0)
    both = PixelCodec(codec.mean, codec.std, frames_per_latent=2, history_frames=2)
    video = torch.rand(1, 6, 4, 4, 3, generator=torch.Generator().manual_seed(3))
    lat, flat = both.encode(video), PixelCodec(codec.mean, codec.std).encode(video)
    assert lat.shape == (1, 12, 3, 4, 4) and both.latent_channels == 12
    for f, frames in enumerate([(0, 1, 0, 0), (2, 3, 1, 0), (4, 5, 3, 2)]):
        torch.testing.assert_close(lat[0, :, f], torch.cat([flat[0, :, t] for t in frames]))
    torch.testing.assert_close(both.decode(lat), video, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="history_frames"):
        PixelCodec(history_frames=-1)
    with pytest.raises(ValueError, match=r"\[B, 6, F"):
        codec.decode(torch.zeros(1, 3, 2, 8, 4))


def test_pixel_decode_clamps_only_when_asked():
    codec = PixelCodec()
    lat = torch.full((1, 3, 1, 2, 2), 3.0)  # 3 * 0.5 + 0.5 = 2.0 in pixel space
    assert codec.decode(lat).max() == 1.0
    assert codec.decode(lat, clamp=False).max() == 2.0


def test_pixel_fit_standardises_world_clips():
    clips = world_clips()
    codec = PixelCodec.fit(clips)
    flat = clips.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(codec.mean, flat.mean(0), atol=1e-6)
    np.testing.assert_allclose(codec.std, flat.std(0), atol=1e-6)
    lat = codec.encode(clips)
    per_channel = lat.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), rtol=0, atol=1e-4)
    # an iterable of single clips gives the same statistics as the stacked batch
    streamed = PixelCodec.fit(iter(list(clips)))
    np.testing.assert_allclose(streamed.mean, codec.mean, atol=1e-9)
    # a constant channel cannot produce a zero std
    assert min(PixelCodec.fit(np.full((2, 3), 0.5, dtype=np.float32)).std) > 0


def test_pixel_save_load_and_load_codec(tmp_path):
    codec = PixelCodec.fit(world_clips(n=2))
    codec.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "codec.json").read_text())
    assert payload["type"] == "pixel" and len(payload["mean"]) == len(payload["std"]) == 3
    for loaded in (PixelCodec.from_pretrained(tmp_path), load_codec(tmp_path), load_codec(str(tmp_path))):
        assert isinstance(loaded, PixelCodec)
        assert (loaded.mean, loaded.std) == (codec.mean, codec.std)
    default = load_codec("pixel")
    assert isinstance(default, PixelCodec) and default.mean == (0.5, 0.5, 0.5)
    assert loaded.frames_per_latent == default.frames_per_latent == 1
    packed = PixelCodec.fit(world_clips(n=2, frames=4), frames_per_latent=2)
    packed.save_pretrained(tmp_path / "packed")
    assert load_codec(tmp_path / "packed").frames_per_latent == 2
    PixelCodec.fit(world_clips(n=2), history_frames=1).save_pretrained(tmp_path / "history")
    assert load_codec(tmp_path / "history").history_frames == 1
    # a codec.json written before these keys existed holds one frame per latent frame and no history
    del payload["frames_per_latent"], payload["history_frames"]
    (tmp_path / "codec.json").write_text(json.dumps(payload))
    old = load_codec(tmp_path)
    assert (old.frames_per_latent, old.history_frames, old.latent_channels) == (1, 0, 3)


def test_bad_inputs_raise_clearly():
    codec = PixelCodec()
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        codec.encode(torch.rand(5, 8, 8, 3))  # unbatched
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.rand(1, 4, 2, 8, 8))  # wrong channel count
    with pytest.raises(ValueError, match="std"):
        PixelCodec(std=(1.0, 0.0, 1.0))


def test_load_codec_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here") as info:
        load_codec(tmp_path / "nothing_here")
    assert "codec.json" in str(info.value) and "vae/" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="AutoencoderKLWan"):
        load_codec(tmp_path / "empty")


# --------------------------------------------------------------------------- WanVAECodec


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory):
    """A pipeline root holding a tiny random AutoencoderKLWan in vae/ (x4 temporal, x8 spatial like Wan2.1)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=Z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    root = tmp_path_factory.mktemp("pipeline")
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def wan(vae_root) -> WanVAECodec:
    return WanVAECodec.from_pretrained(vae_root)


def test_wan_shapes_and_geometry(wan):
    assert isinstance(wan, Codec) and wan.latent_channels == Z
    assert (wan.temporal_factor, wan.spatial_factor) == (4, 8)
    video = torch.rand(1, 9, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    lat = wan.encode(video)
    assert lat.shape == (1, Z, 3, 4, 4) == (1, *wan.latent_shape(9, 32, 32))
    assert lat.dtype == torch.float32
    out = wan.decode(lat)
    assert out.shape == (1, 9, 32, 32, 3) and out.min() >= 0 and out.max() <= 1
    assert wan.num_frames_for(3) == 9 and wan.num_frames_for(1) == 1
    assert wan.latent_shape(81, 480, 832) == (Z, 21, 60, 104)  # Wan2.1's 5 s 480p geometry


def test_wan_normalisation_matches_wanpipeline(wan):
    """encode = (posterior mode - latents_mean) / latents_std on 2x-1 pixels; decode inverts it."""
    video = torch.rand(2, 5, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(LATENTS_MEAN).view(1, Z, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, Z, 1, 1, 1)
    with torch.no_grad():
        raw = wan.vae.encode(video.permute(0, 4, 1, 2, 3) * 2 - 1).latent_dist.mode()
        lat = wan.encode(video)
        torch.testing.assert_close(lat, (raw - mean) / std)
        pixels = wan.vae.decode(lat * std + mean).sample
    torch.testing.assert_close(wan.decode(lat), ((pixels + 1) / 2).permute(0, 2, 3, 4, 1).clamp(0, 1))


def test_wan_encode_is_deterministic(wan):
    video = torch.rand(1, 5, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(wan.encode(video), wan.encode(video))


def test_wan_rejects_bad_geometry(wan):
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        wan.encode(torch.rand(1, 8, 16, 16, 3))
    with pytest.raises(ValueError, match="divisible by 8"):
        wan.latent_shape(9, 30, 32)
    with pytest.raises(ValueError, match="latents"):
        wan.decode(torch.rand(1, 3, 2, 4, 4))


def test_wan_loads_from_vae_folder_pipeline_root_and_load_codec(wan, vae_root, tmp_path):
    video = torch.rand(1, 5, 16, 16, 3, generator=torch.Generator().manual_seed(4))
    ref = wan.encode(video)
    for codec in (WanVAECodec.from_pretrained(vae_root / "vae"), load_codec(vae_root), load_codec(vae_root / "vae")):
        assert isinstance(codec, WanVAECodec)
        assert torch.equal(codec.encode(video), ref)
    wan.save_pretrained(tmp_path)
    assert (tmp_path / "vae" / "config.json").is_file()
    assert torch.equal(load_codec(tmp_path).encode(video), ref)


@pytest.mark.parametrize("frames_per_latent, history_frames, lead", [(1, 0, 0), (1, 1, 1), (1, 2, 2), (2, 0, 0),
                                                                     (2, 1, 2), (2, 3, 4)])
def test_history_lead_is_the_history_rounded_up_to_whole_latent_frames(frames_per_latent, history_frames, lead):
    codec = PixelCodec(frames_per_latent=frames_per_latent, history_frames=history_frames)
    assert codec.history_lead == lead
