"""Tests for the analytic oracle (hiar.tiny.oracle): exact on real clips, hard to fool, fast."""

import time

import numpy as np
import pytest

from hiar.tiny import oracle as O
from hiar.tiny.oracle import Oracle, score_batch, score_clip
from hiar.tiny.world import SyntheticWorld

LEFT = "a red square moves left slowly over a black background"


@pytest.fixture(scope="module")
def wld():
    return SyntheticWorld(frame_size=32, seed=0)


def _box_blur(frames):
    """3x3 circular box blur: a stand-in for a small model's soft edges."""
    return sum(np.roll(frames, (a, b), axis=(1, 2)) for a in (-1, 0, 1) for b in (-1, 0, 1)) / 9.0


# ----------------------------------------------------------- real clips score ~1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ground_truth_clips_are_consistent(seed, split):
    w = SyntheticWorld(seed=seed)
    for i in range(12):
        frames, caption = w.clip(i, 24, split)
        s = score_clip(frames, caption)
        assert s["caption_consistency"] >= 0.95, (caption, s)
        assert s["motion_accuracy"] >= 0.95, (caption, s)
        assert s["shape_present"] == 1.0 and s["shape_ok"] == 1.0, (caption, s)
        for k in O.SCORE_KEYS:
            if k != "motion":
                assert 0.0 <= s[k] <= 1.0, k


def test_long_wrapping_clip_stays_consistent(wld):
    p = "a magenta circle moves down quickly over a white background"
    frames = wld.clip_for_prompt(p, 4, 200)
    s = score_clip(frames, p)
    assert s["caption_consistency"] == 1.0
    assert s["motion"] == pytest.approx(3.0)
    assert np.all(O.consistency_curve(frames, p) == 1.0)


def test_static_caption_matches_static_clip(wld):
    p = "a cyan triangle stays still over a brown background"
    s = score_clip(wld.clip_for_prompt(p, 0, 16), p)
    assert s["caption_consistency"] == 1.0 and s["motion"] == 0.0


def test_tolerates_blur_and_mild_noise(wld):
    rng = np.random.default_rng(0)
    for i in range(10):
        frames, caption = wld.clip(i, 24)
        assert score_clip(_box_blur(frames), caption)["caption_consistency"] >= 0.95, caption
        noisy = frames + rng.normal(0.0, 0.05, frames.shape).astype(np.float32)
        assert score_clip(noisy, caption)["caption_consistency"] >= 0.95, caption


# -------------------------------------------------------------- hard to fool


@pytest.mark.parametrize(
    "make",
    [
        lambda r: np.clip(r.normal(0.5, 0.3, (24, 32, 32, 3)), 0, 1),
        lambda r: r.normal(0.0, 1.0, (24, 32, 32, 3)),
        lambda r: r.uniform(0.0, 1.0, (24, 32, 32, 3)),
    ],
    ids=["normal(0.5,0.3)", "normal(0,1)", "uniform"],
)
def test_noise_scores_low(make):
    rng = np.random.default_rng(123)
    frames = make(rng).astype(np.float32)
    for caption in (LEFT, "a blue circle moves up quickly over a gray background",
                    "a yellow triangle moves right slowly over a white background"):
        assert score_clip(frames, caption)["caption_consistency"] <= 0.2


def test_background_only_clip_has_no_shape(wld):
    frames = np.broadcast_to(np.float32([0.05, 0.05, 0.05]), (12, 32, 32, 3)).copy()
    s = score_clip(frames, LEFT)
    assert s["shape_present"] == 0.0 and s["caption_consistency"] == 0.0
    assert s["background_ok"] == 1.0


@pytest.mark.parametrize(
    "wrong",
    [
        "a blue square moves left slowly over a black background",  # colour
        "a red square moves right slowly over a black background",  # direction
        "a red square moves up slowly over a black background",  # direction (axis)
        "a red square moves left slowly over a white background",  # background
        "a red square stays still over a black background",  # motion vs static
    ],
)
def test_wrong_caption_scores_low(wld, wrong):
    frames = wld.clip_for_prompt(LEFT, 2, 24)
    assert score_clip(frames, LEFT)["caption_consistency"] == 1.0
    assert score_clip(frames, wrong)["caption_consistency"] <= 0.2


def test_wrong_shape_or_speed_reported_but_not_in_consistency(wld):
    frames = wld.clip_for_prompt(LEFT, 2, 24)
    s = score_clip(frames, "a red circle moves left quickly over a black background")
    assert s["shape_ok"] == 0.0
    assert s["speed_ok"] == 0.0 and s["motion_accuracy"] == 0.0
    assert s["caption_consistency"] == 1.0  # documented: colour, background, direction only


def test_horizontally_flipped_clip_fails_direction(wld):
    frames = wld.clip_for_prompt(LEFT, 9, 24)
    flipped = frames[:, :, ::-1]  # now it moves right
    s = score_clip(flipped, LEFT)
    assert s["direction_ok"] == 0.0 and s["caption_consistency"] <= 0.2
    assert score_clip(flipped, LEFT.replace("left", "right"))["caption_consistency"] == 1.0


def test_reversed_time_fails_direction(wld):
    p = "a green triangle moves up quickly over a gray background"
    frames = wld.clip_for_prompt(p, 1, 24)[::-1]
    assert score_clip(frames, p)["direction_ok"] == 0.0


# -------------------------------------------------------------------- motion


def test_motion_orders_static_slow_fast(wld):
    base = "a yellow circle {} over a brown background"
    m = {
        k: score_clip(wld.clip_for_prompt(base.format(v), 3, 24), base.format(v))["motion"]
        for k, v in [("static", "stays still"), ("slow", "moves right slowly"), ("fast", "moves right quickly")]
    }
    assert m["static"] < m["slow"] < m["fast"]
    assert m == {"static": 0.0, "slow": 1.0, "fast": 3.0}


def test_displacement_is_signed_and_wrap_safe(wld):
    p = "a blue square moves up quickly over a white background"
    a = O.analyze(wld.clip_for_prompt(p, 0, 40))  # crosses the top border several times
    assert a.pair_valid.all()
    assert np.all(a.displacement == np.float32([0, -3]))


def test_consistency_curve_localises_drift(wld):
    frames = wld.clip_for_prompt(LEFT, 5, 20)
    frames[10:] = np.random.default_rng(0).uniform(0, 1, frames[10:].shape)
    curve = O.consistency_curve(frames, LEFT)
    assert curve.shape == (19,)
    assert np.all(curve[:9] == 1.0) and np.all(curve[10:] == 0.0)
    assert score_clip(frames, LEFT)["caption_consistency"] == pytest.approx(9 / 19)


# --------------------------------------------------------- input handling, API


def test_out_of_range_values_are_clipped(wld):
    frames = wld.clip_for_prompt(LEFT, 0, 12)
    wild = frames * 3.0 - 1.0  # far outside [0, 1]
    assert score_clip(wild, LEFT) == score_clip(np.clip(wild, 0, 1), LEFT)
    with_nan = frames.copy()
    with_nan[0, 0, 0, 0] = np.nan
    assert np.isfinite(list(score_clip(with_nan, LEFT).values())).all()


@pytest.mark.parametrize(
    "shape",
    [(12, 32, 32), (12, 3, 32, 32), (32, 32, 3), (1, 32, 32, 3), (12, 32, 32, 4), (12, 4, 4, 3)],
)
def test_bad_array_shape_raises(shape):
    with pytest.raises(ValueError):
        score_clip(np.zeros(shape, dtype=np.float32), LEFT)


def test_bad_caption_raises(wld):
    frames = wld.clip_for_prompt(LEFT, 0, 4)
    with pytest.raises(ValueError, match="'octagon'"):
        score_clip(frames, "a red octagon moves left slowly over a black background")


def test_score_batch_means(wld):
    items = [wld.clip(i, 12) for i in range(3)]
    noise = np.random.default_rng(1).uniform(0, 1, (12, 32, 32, 3))
    out = score_batch(items + [(noise, items[0][1])])
    assert set(O.SCORE_KEYS) <= set(out) and out["n"] == 4.0
    assert out["caption_consistency"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        score_batch([])


def test_custom_thresholds_change_verdicts(wld):
    frames, caption = wld.clip(0, 12)
    strict = Oracle(min_background_fraction=0.99)  # the shape covers > 1 % of the frame
    assert strict.score(frames, caption)["background_ok"] == 0.0


def test_scoring_is_fast(wld):
    frames, caption = wld.clip(0, 48)
    score_clip(frames, caption)
    t0 = time.perf_counter()
    for _ in range(5):
        score_clip(frames, caption)
    assert (time.perf_counter() - t0) / 5 < 0.25  # ~8 ms here; generous for a loaded box


def test_static_marks_a_shape_that_stands_still_not_a_moving_or_missing_one(wld):
    moving = wld.clip_for_prompt(LEFT, 0, 12)
    still = np.repeat(moving[:1], 12, axis=0)  # the same first frame held: a shape that never moves
    blank = np.repeat(moving[:1, :1, :1], 12, axis=0) * np.ones_like(moving)  # background only
    assert score_clip(moving, LEFT)["static"] == 0.0
    assert score_clip(still, LEFT)["static"] == 1.0
    assert score_clip(blank, LEFT)["static"] == 0.0
    assert score_batch([(moving, LEFT), (still, LEFT)])["static"] == pytest.approx(0.5)
