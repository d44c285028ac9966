"""Tests for the drift suite and dynamics (hiar.eval.drift): real math on constructed clips, no mocks."""

import colorsys
import math

import cv2
import numpy as np
import pytest

from hiar.eval import drift as D
from hiar.eval import dynamics as Y
from hiar.eval import frames as F
from hiar.eval import learned as L
from hiar.eval import plots as P
from hiar.eval import scorers as S
from hiar.tiny.world import SyntheticWorld


# ----------------------------------------------------------------- helpers


def wrap_blur(img, sigma):
    """Gaussian blur on the torus (pad periodically, blur, crop), so rolled frames stay seamless."""
    pad = int(math.ceil(4 * sigma))
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigma)[pad:-pad, pad:-pad]


def textured(h=32, w=32, seed=0, blur=1.5):
    """A smooth random RGB texture in [0, 1] (blurred noise, so a 1 px shift is a small change)."""
    img = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    img = wrap_blur(img, blur) if blur else img
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo)


def translating(img, frames, dx):
    """Frames of ``img`` rolled ``dx`` px per frame (wrap-around)."""
    return np.stack([np.roll(img, dx * t, axis=1) for t in range(frames)])


def saturation_ramp(frames, s0, ds, size=16, value=0.8):
    """Clip whose every pixel has HSV saturation ``s0 + ds * t`` (hues vary over the frame), built with colorsys."""
    hues = (np.arange(size * size) % 7) / 7.0
    video = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        rgb = [colorsys.hsv_to_rgb(h, s0 + ds * t, value) for h in hues]
        video[t] = np.asarray(rgb, np.float32).reshape(size, size, 3)
    return video


def progressively_blurred(video, max_sigma=2.0):
    out = video.copy()
    for t in range(1, len(video)):
        sigma = max_sigma * t / (len(video) - 1)
        out[t] = wrap_blur(video[t], sigma)
    return out


class MeanBrightness:
    """Test scorer: mean pixel value; lower is worse (a darkening clip degrades)."""

    name = "brightness"
    worse = "down"
    floor = 0.01

    def available(self):
        return True, ""

    def score_segment(self, frames):
        return float(frames.mean())


class Unavailable:
    name = "needs_gpu"

    def available(self):
        return False, "no accelerator in this test"

    def score_segment(self, frames):  # pragma: no cover - must never be called
        raise AssertionError("an unavailable scorer was asked to score")


class ReturnsNaN(MeanBrightness):
    name = "broken"

    def score_segment(self, frames):
        return float("nan")


LEARNED = ("dinov2_similarity", "lpips_distance", "musiq", "clip_iqa", "clip_text")  # clip_text: text-video alignment


# ----------------------------------------------------------------- input and segments


def test_as_video_layouts_and_dtypes():
    rng = np.random.default_rng(0)
    thwc = rng.random((6, 8, 10, 3)).astype(np.float32)
    assert np.array_equal(F.from_model_output(np.moveaxis(thwc, -1, 0)), thwc)
    u8 = (thwc * 255).round().astype(np.uint8)
    assert np.allclose(F.as_video(u8), u8 / 255.0)
    import torch

    assert np.array_equal(F.as_video(torch.from_numpy(thwc)), thwc)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        F.as_video(thwc * 2 - 1)
    with pytest.raises(ValueError, match="CTHW"):
        F.as_video(np.moveaxis(thwc, -1, 0))


def test_segments_drop_the_remainder_from_the_start():
    video = np.arange(23, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32)
    segs = F.split_segments(video, 5)
    assert [len(s) for s in segs] == [4] * 5
    assert segs[0][0, 0, 0, 0] == 3 and segs[-1][-1, 0, 0, 0] == 22  # frames 0..2 dropped, last kept
    with pytest.raises(ValueError, match=">= 10"):
        F.split_segments(video[:9], 5)


def test_fit_slope_matches_polyfit():
    y = [0.3, 0.1, 0.7, 0.2, 0.9]
    assert D.fit_slope(y) == pytest.approx(np.polyfit(np.arange(5), y, 1)[0])


# ----------------------------------------------------------------- the pixel metrics


def test_rising_saturation_gives_the_analytic_slope():
    s0, ds, frames, segments = 0.2, 0.015, 40, 5
    report = D.drift_report(saturation_ramp(frames, s0, ds), fps=8, segments=segments, scorers=[])
    length = frames // segments
    # Segment k holds frames kL .. kL+L-1, so its mean saturation is s0 + ds * (kL + (L-1)/2): a line with slope ds*L.
    expected_values = [s0 + ds * (k * length + (length - 1) / 2) for k in range(segments)]
    assert report.per_segment["saturation"] == pytest.approx(expected_values, abs=1e-4)
    assert report.slopes["saturation"] == pytest.approx(ds * length, abs=1e-4)
    assert report.normalised_slopes["saturation"] == pytest.approx(ds * length / expected_values[0], rel=1e-3)
    assert report.degradation["saturation"] > 0


def test_constant_clip_has_no_drift():
    frame = textured(seed=1)
    report = D.drift_report(np.repeat(frame[None], 20, axis=0), fps=8, scorers=[])
    assert set(report.slopes) == {"saturation", "sharpness", "pixel_similarity"}
    for m in report.slopes:
        assert report.slopes[m] == pytest.approx(0.0, abs=1e-9)
        assert report.degradation[m] == pytest.approx(0.0, abs=1e-9)
    assert report.drift_score == pytest.approx(0.0, abs=1e-9)
    assert report.per_segment["pixel_similarity"] == pytest.approx([1.0] * 5)


def test_shuffling_frames_lowers_consecutive_similarity():
    video = translating(textured(seed=2), 30, dx=1)
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    smooth = D.drift_report(video, fps=8, scorers=[]).per_segment["pixel_similarity"]
    jumbled = D.drift_report(shuffled, fps=8, scorers=[]).per_segment["pixel_similarity"]
    assert all(a > b for a, b in zip(smooth, jumbled)), (smooth, jumbled)


def test_progressive_blur_is_sharpness_drift():
    video = translating(textured(seed=3, blur=0.7), 30, dx=1)
    original = D.drift_report(video, fps=8, scorers=[])
    blurred = D.drift_report(progressively_blurred(video), fps=8, scorers=[])
    assert blurred.slopes["sharpness"] < 0
    assert blurred.normalised_slopes["sharpness"] < -0.1  # loses >10 % of the first segment's sharpness per segment
    assert blurred.degradation["sharpness"] > 10 * original.degradation["sharpness"]
    assert blurred.drift_score > original.drift_score + 0.05


# ----------------------------------------------------------------- dynamics (VBench rule)


def test_translating_texture_is_dynamic_and_constant_is_static():
    img = textured(64, 64, seed=4)
    moving = Y.dynamics(translating(img, 16, dx=4), fps=8)
    still = Y.dynamics(np.repeat(img[None], 16, axis=0), fps=8)
    assert moving["threshold"] == pytest.approx(6.0 * 64 / 256)
    assert moving["count_required"] == 4  # round(4 * 16 / 16)
    assert moving["dynamic"] and moving["dynamic_degree"] == 1.0
    assert moving["magnitude_median"] == pytest.approx(4.0, abs=0.5)  # flow recovers the 4 px shift
    assert not still["dynamic"] and still["dynamic_degree"] == 0.0 and still["count"] == 0


def test_fps_sampling_follows_vbench():
    img = textured(64, 64, seed=5)
    clip = translating(img, 32, dx=1)
    at16 = Y.dynamics(clip, fps=16)
    assert at16["sample_interval"] == 2 and at16["num_pairs"] == 15  # every 2nd frame of 32: 16 kept
    assert at16["count_required"] == 4
    assert at16["magnitude_median"] == pytest.approx(2.0, abs=0.3)  # 1 px/frame, 2 frames apart
    at4 = Y.dynamics(clip, fps=4)
    assert at4["threshold"] == pytest.approx(2.0 * 6.0 * 64 / 256)  # below 8 fps the bar rises by 8/fps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_world_still_vs_quick_at_16px(seed):
    world = SyntheticWorld(16, 0)
    still = world.render(world.scene_for_prompt("a red square stays still over a black background", seed), 16)
    quick = world.render(world.scene_for_prompt("a red square moves left quickly over a black background", seed), 16)
    slow = world.render(world.scene_for_prompt("a blue circle moves up slowly over a gray background", seed), 16)
    d_still, d_quick, d_slow = (Y.dynamics(v, fps=8) for v in (still, quick, slow))
    assert d_quick["threshold"] == pytest.approx(0.375)
    assert not d_still["dynamic"] and d_still["magnitude_max"] < 0.05
    assert d_quick["dynamic"] and d_quick["magnitude_median"] == pytest.approx(3.0, abs=0.5)
    assert d_slow["dynamic"] and d_slow["magnitude_median"] == pytest.approx(1.0, abs=0.3)


def test_world_clip_report_end_to_end():
    frames, caption = SyntheticWorld(16, 0).clip(3, 20)
    report = D.drift_report((frames * 255).round().astype(np.uint8), fps=8, scorers=[])
    assert "still" not in caption and report.dynamics["dynamic"]
    assert report.drift_score < 0.05  # the world itself does not drift


# ----------------------------------------------------------------- learned scorers and the score


def test_missing_learned_scorers_are_skipped_not_zero(tmp_path, monkeypatch):
    monkeypatch.delenv(S.WEIGHTS_ENV, raising=False)
    video = translating(textured(seed=6), 20, dx=1)
    no_dir = D.drift_report(video, fps=8)
    assert set(no_dir.skipped) == set(LEARNED)
    assert all(S.WEIGHTS_ENV in why for why in no_dir.skipped.values())

    monkeypatch.setenv(S.WEIGHTS_ENV, str(tmp_path))  # the env var is honoured; the directory is empty
    report = D.drift_report(video, fps=8)
    assert set(report.skipped) == set(LEARNED)
    assert all(str(tmp_path) in why for why in report.skipped.values())
    metrics = report.to_metrics()
    for name in LEARNED:
        assert name not in report.per_segment and name not in report.weights
        assert not any(name in key for key in metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["drift/num_metrics"] == 3.0
    assert sum(report.weights.values()) == pytest.approx(1.0)


def test_weights_dir_present_but_no_loader_is_skipped_with_reason(tmp_path):
    (tmp_path / "lpips").mkdir()
    (tmp_path / "learned").mkdir()
    ok, why = S.WeightsScorer(tmp_path).available()  # a scorer without a built-in loader
    assert not ok and "no built-in offline loader" in why
    ok, why = L.LpipsDistanceScorer(tmp_path).available()  # built-in loader, but no lpips package / no lpips.pth
    assert not ok and "could not be loaded" in why and ("not importable" in why or "lpips.pth" in why)
    hooked = L.LpipsDistanceScorer(tmp_path, loader=lambda path, device: (lambda frames: 0.25))
    assert hooked.available() == (True, "") and hooked.score_segment(np.zeros((2, 8, 8, 3), np.float32)) == 0.25


def test_available_user_scorer_enters_the_score():
    base = translating(textured(seed=7), 30, dx=1)
    darkening = base * np.linspace(1.0, 0.6, len(base), dtype=np.float32)[:, None, None, None]
    without = D.drift_report(darkening, fps=8, scorers=[])
    with_it = D.drift_report(darkening, fps=8, scorers=[MeanBrightness(), Unavailable(), ReturnsNaN()])

    assert with_it.skipped == {
        "needs_gpu": "no accelerator in this test",
        "broken": "returned a non-finite value (nan) on segment 0",
    }
    values = with_it.per_segment["brightness"]
    assert len(values) == 5 and all(a > b for a, b in zip(values, values[1:]))
    assert with_it.slopes["brightness"] == pytest.approx(D.fit_slope(values))
    assert with_it.normalised_slopes["brightness"] < 0
    assert with_it.degradation["brightness"] == pytest.approx(-with_it.normalised_slopes["brightness"])
    # Equal default weights, renormalised over the 4 computed metrics: the score is their mean degradation.
    assert with_it.weights == pytest.approx({m: 0.25 for m in with_it.per_segment})
    assert with_it.drift_score == pytest.approx(np.mean(list(with_it.degradation.values())))
    assert with_it.drift_score != pytest.approx(without.drift_score)
    assert with_it.to_metrics()["drift/brightness_slope"] == pytest.approx(with_it.slopes["brightness"])
    # A brightening clip is not "brightness" drift (worse = down), whatever its size.
    brightening = D.drift_report(darkening[::-1].copy(), fps=8, scorers=[MeanBrightness()])
    assert brightening.degradation["brightness"] == 0.0


def test_weights_override_and_zero_weight():
    video = progressively_blurred(translating(textured(seed=8, blur=0.7), 20, dx=1))
    only_sharpness = D.drift_report(video, fps=8, scorers=[], weights={"saturation": 0, "pixel_similarity": 0})
    assert only_sharpness.drift_score == pytest.approx(only_sharpness.degradation["sharpness"])
    assert "saturation" in only_sharpness.per_segment  # still reported, just not scored
    with pytest.raises(ValueError, match="zero total weight"):
        D.drift_report(video, fps=8, scorers=[], weights={"saturation": 0, "pixel_similarity": 0, "sharpness": 0})


def _tiny_hf_weights(root):
    """Random tiny DINOv2 and CLIP saved in transformers format: exercises the real offline loaders, no download."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, PreTrainedTokenizerFast

    torch.manual_seed(0)
    dino = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8)
    Dinov2Model(dino).save_pretrained(root / "dinov2")
    vocab = {"[UNK]": 0, "good": 1, "bad": 2, "photo": 3, ".": 4, "[PAD]": 5}
    clip = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, eos_token_id=4, pad_token_id=5),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(clip).save_pretrained(root / "clip_iqa")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root / "clip_iqa")


def test_builtin_learned_loaders_run_offline(tmp_path):
    _tiny_hf_weights(tmp_path)
    video = translating(textured(seed=9), 20, dx=2)
    report = D.drift_report(video, fps=8, weights_dir=tmp_path)
    assert set(report.skipped) == {"lpips_distance", "musiq", "clip_text"}  # no lpips/pyiqa package, no clip/ folder
    assert {"dinov2_similarity", "clip_iqa"} <= set(report.per_segment)
    assert all(0.0 <= v <= 1.0 for v in report.per_segment["clip_iqa"])
    dino = L.Dinov2SimilarityScorer(tmp_path)
    assert dino.score_segment(np.repeat(video[:1], 3, axis=0)) == pytest.approx(1.0, abs=1e-5)
    assert dino.score_segment(video[:3]) < 1.0


# ----------------------------------------------------------------- aggregation, metrics, plot


def test_aggregate_and_to_metrics():
    img = textured(seed=10)
    still = D.drift_report(np.repeat(img[None], 20, axis=0), fps=8, scorers=[])
    moving = D.drift_report(progressively_blurred(translating(img, 20, dx=2)), fps=8, scorers=[])
    mean = D.aggregate([still, moving])
    assert mean.num_videos == 2
    assert mean.per_segment["sharpness"] == pytest.approx(
        list((np.array(still.per_segment["sharpness"]) + moving.per_segment["sharpness"]) / 2)
    )
    assert mean.drift_score == pytest.approx((still.drift_score + moving.drift_score) / 2)
    assert mean.dynamics["dynamic"] == pytest.approx(0.5)  # fraction of dynamic videos, as in VBench
    metrics = mean.to_metrics()
    assert metrics["drift/sharpness_seg4"] == pytest.approx(mean.per_segment["sharpness"][4])
    assert {"drift/score", "drift/saturation_slope", "dynamics/dynamic_degree"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", ["matplotlib", "cv2"])
def test_plot_segments_writes_png(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    img = textured(seed=11)
    reports = {
        "still": D.drift_report(np.repeat(img[None], 20, axis=0), fps=8, scorers=[]),
        "blurring": D.drift_report(progressively_blurred(translating(img, 20, dx=1)), fps=8, scorers=[MeanBrightness()]),
    }
    out = P.plot_segments(reports, tmp_path / "sub" / "drift.png", backend=backend)
    png = cv2.imread(str(out))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 300
    assert png.std() > 10  # something was drawn
