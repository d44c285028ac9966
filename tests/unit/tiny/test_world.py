"""Tests for the tiny synthetic world (hiar.tiny.world): determinism, rendering, captions, splits."""

import hashlib
import itertools

import numpy as np
import pytest

from hiar.tiny import captions as C
from hiar.tiny import world as W
from hiar.tiny.captions import parse_caption
from hiar.tiny.world import Scene, SyntheticWorld


@pytest.fixture(scope="module")
def wld():
    return SyntheticWorld(frame_size=32, seed=0)


# ----------------------------------------------------------------- determinism


def test_same_index_same_clip_across_instances():
    a, b = SyntheticWorld(seed=7), SyntheticWorld(seed=7)
    for split in ("train", "heldout"):
        for i in (0, 1, 123, 5000):
            fa, ca = a.clip(i, 12, split)
            fb, cb = b.clip(i, 12, split)
            assert ca == cb
            assert np.array_equal(fa, fb)


def test_different_index_or_seed_gives_different_clip():
    w = SyntheticWorld(seed=7)
    clips = [w.clip(i, 6)[0] for i in range(10)]
    for i, j in itertools.combinations(range(10), 2):
        assert not np.array_equal(clips[i], clips[j]), (i, j)
    other = SyntheticWorld(seed=8)
    differing = sum(not np.array_equal(w.clip(i, 6)[0], other.clip(i, 6)[0]) for i in range(10))
    assert differing >= 9


GOLDEN_DIGEST = "7ccd5f5e07b36c7f5cc38c052ac5ec4da0994029001a8efbbac26331109c6c81"


def test_golden_scene_and_pixels_are_pinned(wld):
    # Pins the dataset: if this changes, every stored dataset/checkpoint of the
    # tiny preset is silently out of date.  Update deliberately, never casually.
    scene = wld.sample_scene(0)
    assert scene == Scene(
        shape="triangle", color="green", background="brown", direction="up",
        speed="quickly", x0=28, y0=14, size=9,
    )
    digest = hashlib.sha256(wld.render(scene, 8).tobytes()).hexdigest()
    assert digest == GOLDEN_DIGEST


def test_scene_for_prompt_deterministic_and_prompt_independent_position(wld):
    p = "a red circle moves up quickly over a gray background"
    q = "a cyan triangle moves down slowly over a white background"
    s1, s2 = wld.scene_for_prompt(p, 5), wld.scene_for_prompt(p, 5)
    assert s1 == s2 and s1.caption == p
    s3 = wld.scene_for_prompt(q, 5)
    assert (s3.x0, s3.y0) == (s1.x0, s1.y0)
    positions = {(wld.scene_for_prompt(p, k).x0, wld.scene_for_prompt(p, k).y0) for k in range(20)}
    assert len(positions) > 10
    assert np.array_equal(wld.clip_for_prompt(p, 5, 4), wld.render(s1, 4))


# ------------------------------------------------------------------- rendering


def test_clip_shape_dtype_range_and_palette_values(wld):
    frames, caption = wld.clip(3, 16)
    assert frames.shape == (16, 32, 32, 3)
    assert frames.dtype == np.float32
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    attrs = parse_caption(caption)
    colours = {tuple(c) for c in frames.reshape(-1, 3).tolist()}
    expected = {
        tuple(np.float32(W.SHAPE_PALETTE[attrs.color]).tolist()),
        tuple(np.float32(W.BACKGROUND_PALETTE[attrs.background]).tolist()),
    }
    assert colours == expected


def test_non_square_frame_size():
    w = SyntheticWorld(frame_size=(24, 40), seed=1)
    frames, _ = w.clip(0, 5)
    assert frames.shape == (5, 24, 40, 3)


def _shape_mask(frames, scene):
    return np.all(frames == np.float32(W.SHAPE_PALETTE[scene.color]), axis=-1)


def test_long_clip_keeps_whole_shape_visible_and_wraps(wld):
    p = "a blue triangle moves left quickly over a white background"
    scene = wld.scene_for_prompt(p, 0)
    frames = wld.render(scene, 200)
    mask = _shape_mask(frames, scene)
    area = W.shape_stamp(scene.shape, scene.size).sum()
    # Every frame shows the complete shape (wrap-around: nothing leaves the frame).
    assert np.all(mask.reshape(200, -1).sum(axis=1) == area)
    # 200 frames at 3 px/frame cross the 32 px border many times, so some frames
    # show the shape split across the left/right seam.
    split_frames = mask[:, :, 0].any(axis=1) & mask[:, :, -1].any(axis=1)
    assert split_frames.sum() >= 10


@pytest.mark.parametrize(
    "direction,speed,shift",
    [
        ("left", "slowly", (0, -1)),
        ("right", "quickly", (0, 3)),
        ("up", "quickly", (-3, 0)),
        ("down", "slowly", (1, 0)),
    ],
)
def test_motion_is_exact_toroidal_translation(wld, direction, speed, shift):
    p = f"a green square moves {direction} {speed} over a black background"
    scene = wld.scene_for_prompt(p, 3)
    assert scene.velocity == (shift[1], shift[0])
    mask = _shape_mask(wld.render(scene, 40), scene)
    for t in range(39):
        assert np.array_equal(mask[t + 1], np.roll(mask[t], shift, axis=(0, 1)))


def test_static_scene_does_not_move(wld):
    scene = wld.scene_for_prompt("a red square stays still over a gray background", 1)
    frames = wld.render(scene, 10)
    assert scene.velocity == (0, 0)
    assert all(np.array_equal(frames[0], f) for f in frames)


def test_palette_is_disjoint_and_well_separated():
    # The oracle's colour tolerance (0.2) relies on every pair being >= 0.44 apart.
    assert not set(W.SHAPE_PALETTE) & set(W.BACKGROUND_PALETTE)
    colours = list(W.SHAPE_PALETTE.values()) + list(W.BACKGROUND_PALETTE.values())
    gaps = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(colours, 2)]
    assert min(gaps) >= 0.44


def test_shapes_are_distinct_and_plausibly_sized():
    stamps = {s: W.shape_stamp(s, 9) for s in C.SHAPES}
    areas = {s: int(m.sum()) for s, m in stamps.items()}
    assert len(set(areas.values())) == len(C.SHAPES)
    assert all(30 <= a <= 81 for a in areas.values())
    assert W.shape_size_for(32, 32) == 9


def test_bad_render_and_sample_arguments(wld):
    scene = wld.sample_scene(0)
    with pytest.raises(ValueError):
        wld.render(scene, 0)
    with pytest.raises(ValueError, match="split"):
        wld.sample_scene(0, split="test")
    with pytest.raises(ValueError):
        wld.sample_scene(-1)
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "black", "left", "slowly", 0, 0, 9)
    with pytest.raises(ValueError):
        Scene("square", "red", "black", "left", C.STILL, 0, 0, 9)



# -------------------------------------------------------------- prompt splits


def test_train_heldout_disjoint_sorted_and_sized():
    train, held = C.train_prompts(), C.heldout_prompts()
    assert train == sorted(train) and held == sorted(held)
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not set(train) & set(held)
    total = len(C.COLORS) * len(C.SHAPES) * len(C.DIRECTIONS) * len(C.SPEEDS) * len(C.BACKGROUNDS)
    assert len(train) + len(held) == total
    assert 0.15 <= len(held) / total <= 0.20


def test_heldout_is_a_set_of_colour_direction_background_triples():
    held_triples = {(a.color, a.direction, a.background) for a in map(parse_caption, C.heldout_prompts())}
    train_triples = {(a.color, a.direction, a.background) for a in map(parse_caption, C.train_prompts())}
    assert not held_triples & train_triples
    # every held-out triple is held out for every shape and speed
    assert len(C.heldout_prompts()) == len(held_triples) * len(C.SHAPES) * len(C.SPEEDS)


def test_every_attribute_value_and_pair_appears_in_training():
    attrs = [parse_caption(p) for p in C.train_prompts()]
    fields = {
        "color": C.COLORS, "shape": C.SHAPES, "background": C.BACKGROUNDS,
        "direction": C.DIRECTIONS, "speed": C.SPEEDS,
    }
    for name, values in fields.items():
        assert {getattr(a, name) for a in attrs} == set(values), name
    for f1, f2 in itertools.combinations(fields, 2):
        seen = {(getattr(a, f1), getattr(a, f2)) for a in attrs}
        assert seen == set(itertools.product(fields[f1], fields[f2])), (f1, f2)


def test_train_clips_never_use_heldout_prompts(wld):
    held = set(C.heldout_prompts())
    captions = [wld.clip(i, 1, "train")[1] for i in range(500)]
    assert not held & set(captions)
    # prompts are dealt in balanced epochs: the first 480 indices cover every train prompt once
    assert sorted(captions[:480]) == C.train_prompts()
    held_caps = {wld.sample_scene(i, "heldout").caption for i in range(96)}
    assert held_caps == held


# -------------------------------------------------------------------- captions


def test_parse_caption_round_trips_every_prompt():
    for p in C.train_prompts() + C.heldout_prompts():
        assert parse_caption(p).caption == p
    a = parse_caption("  A Red   Circle stays still over a GRAY background ")
    assert a.is_static and a.color == "red" and a.shape == "circle" and a.background == "gray"
    assert a.caption == "a red circle stays still over a gray background"


def test_vocabulary_is_exactly_the_caption_words():
    vocab = C.vocabulary()
    assert vocab == sorted(set(vocab))
    words = {w for p in C.train_prompts() + C.heldout_prompts() for w in p.split()}
    words |= set("a red circle stays still over a gray background".split())
    assert set(vocab) == words


@pytest.mark.parametrize(
    "caption,match",
    [
        ("a purple square moves left quickly over a black background", "unknown word 'purple'"),
        ("a red square moves left quickly over a black background!", "unknown word 'background!'"),
        ("a red square moves left over a black background", "malformed"),
        ("a red square moves left quickly over the black background", "unknown word 'the'"),
        ("a red square left moves quickly over a black background", "malformed"),
        ("a blue square moves left quickly over a red background", "'red' is not a background"),
        ("a red square moves quickly left over a black background", "'quickly' is not a direction"),
        ("", "malformed"),
    ],
)
def test_parse_caption_errors(caption, match):
    with pytest.raises(ValueError, match=match):
        parse_caption(caption)


def test_scene_for_prompt_rejects_bad_prompt(wld):
    with pytest.raises(ValueError, match="'dog'"):
        wld.scene_for_prompt("a red dog moves left quickly over a black background", 0)


# ------------------------------------------------------------------- static_share


def test_static_share_zero_is_the_unchanged_world(wld):
    default = SyntheticWorld(frame_size=32, seed=0)
    explicit = SyntheticWorld(frame_size=32, seed=0, static_share=0.0)
    for i in range(50):
        assert default.sample_scene(i) == explicit.sample_scene(i)
        assert not default.sample_scene(i).frozen


def test_static_share_freezes_that_share_of_training_scenes_and_keeps_their_captions():
    base = SyntheticWorld(frame_size=16, seed=0, start_jitter=2)
    mixed = SyntheticWorld(frame_size=16, seed=0, start_jitter=2, static_share=0.3)
    n = 2000
    frozen = 0
    for i in range(n):
        scene, plain = mixed.sample_scene(i), base.sample_scene(i)
        # the same caption and start: only the motion differs, so the caption now also names static clips
        assert (scene.caption, scene.x0, scene.y0) == (plain.caption, plain.x0, plain.y0)
        assert not scene.attributes.is_static
        if scene.frozen:
            frozen += 1
            frames = mixed.render(scene, 5)
            assert all(np.array_equal(frames[0], f) for f in frames[1:])
        else:
            assert np.array_equal(mixed.render(scene, 5), base.render(plain, 5))
    # binomial(2000, 0.3): SE 0.0102, so 0.3 +- 0.05 fails only on a wrong share
    assert abs(frozen / n - 0.3) < 0.05


def test_static_share_never_touches_heldout_scenes_or_the_oracle_reference():
    mixed = SyntheticWorld(frame_size=16, seed=0, start_jitter=2, static_share=0.9)
    base = SyntheticWorld(frame_size=16, seed=0, start_jitter=2)
    assert not any(mixed.sample_scene(i, "heldout").frozen for i in range(200))
    p = "a red circle moves up quickly over a gray background"
    assert mixed.scene_for_prompt(p, 3) == base.scene_for_prompt(p, 3)


@pytest.mark.parametrize("share", [-0.1, 1.0, float("nan")])
def test_static_share_out_of_range_is_rejected(share):
    with pytest.raises(ValueError, match="static_share"):
        SyntheticWorld(frame_size=16, static_share=share)
