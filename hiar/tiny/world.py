"""The tiny world: a deterministic synthetic captioned-video domain.

The ``tiny`` preset needs a video domain that a small model can learn on two
CPU cores, whose prompts have a *checkable* meaning, and in which long-video
drift (colour shift, motion dying out, the object dissolving) is measurable
without any learned evaluator.  This module is that domain; ``hiar.tiny.oracle``
is its analytic judge.

A scene is one coloured shape moving at constant integer velocity over a flat
background, described by a caption of fixed grammar (``hiar.tiny.captions``: the grammar, its parser, the
attribute values and the train / held-out prompt sets)::

    a <colour> <shape> moves <direction> <speed> over a <background> background
    a <colour> <shape> stays still over a <background> background

Design choices (and why):

* **Wrap-around (toroidal) motion.**  The shape leaves one border and
  re-enters at the opposite one, drawn split across the seam.  A caption such
  as "moves left" therefore stays true, and the shape stays fully visible,
  for *any* clip length -- long rollouts (4x the training horizon and beyond)
  are still in-domain, so any degradation there is the model's drift, not the
  world running out of frame.
* **Integer-exact rendering.**  Positions are integers (start position plus
  integer velocity times frame index, modulo the frame size) and shapes are
  boolean stamps computed with integer arithmetic, so the same
  ``(world seed, split, index)`` gives bit-identical clips on every machine.
  Pixels are exactly a palette colour; crisp masks also make the oracle exact.
* **Palette.**  Six saturated shape colours (the six hue sextants) and four
  unsaturated/dark background colours, disjoint sets, every pair at least
  0.44 apart in RGB (Euclidean), so nearest-palette matching is unambiguous
  and a colour is never both shape and background in one scene.
* **Speeds.**  "slowly" = 1 px/frame, "quickly" = 3 px/frame: clearly visible
  at 32x32 with a 9 px shape, far enough apart that the oracle's speed class
  (threshold 2 px/frame) is unambiguous, and small enough that consecutive
  frames overlap, which makes the motion easy to learn.  A static scene
  ("stays still", speed 0) can be parsed and rendered -- the oracle's motion
  score needs it -- but it is *not* part of the train or held-out prompt sets,
  so a model that stops moving is always wrong.

Pure numpy, no global RNG: every random draw comes from a
``numpy.random.Generator`` seeded from explicit integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple, Union

import numpy as np

from hiar.tiny.captions import (BACKGROUNDS, COLORS, SHAPES, STILL, Attributes, heldout_prompts, parse_caption,
                                prompt_sets, train_prompts, vocabulary)

__all__ = [
    "SHAPE_PALETTE",
    "BACKGROUND_PALETTE",
    "SPEED_PX",
    "DIRECTION_VECTORS",
    "Scene",
    "SyntheticWorld",
    "shape_size_for",
    "shape_stamp",
    "palette_arrays",
]

#: Shape colours: the six hue sextants, saturated.
SHAPE_PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.90, 0.85, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.10, 0.80, 0.90),
    "blue": (0.10, 0.25, 0.95),
    "magenta": (0.90, 0.15, 0.85),
}
#: Background colours: dark / light / neutral / earthy, far from every shape colour.
BACKGROUND_PALETTE = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.45, 0.28, 0.12),
}

#: Pixels per frame for each speed word.
SPEED_PX = {"slowly": 1, "quickly": 3, STILL: 0}
#: Unit step (dx, dy) in image coordinates: x = column (right), y = row (down).
DIRECTION_VECTORS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    STILL: (0, 0),
}

_SPLITS = {"train": 0, "heldout": 1}
_PROMPT_STREAM = 2  # RNG stream id for scene_for_prompt (distinct from the splits)


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------


def shape_size_for(height: int, width: int) -> int:
    """Side of a shape's bounding box for a frame size: 9 px at 32x32.

    Scales with the smaller frame side (~28 %), at least 3 px, so the shape is
    large enough to read but covers < 10 % of the frame (the oracle relies on
    the background being the dominant colour).
    """
    return max(3, (9 * min(int(height), int(width))) // 32)


@lru_cache(maxsize=64)
def _stamp(shape: str, size: int) -> np.ndarray:
    i, j = np.mgrid[0:size, 0:size]
    # Doubled coordinates keep every test integer: 2*i - (size-1) is the offset from
    # the centre in half-pixels.
    di = 2 * i - (size - 1)
    dj = 2 * j - (size - 1)
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = di * di + dj * dj <= size * (size - 1)
    elif shape == "triangle":  # isosceles, apex up, base on the bottom row
        m = np.abs(dj) <= i
    else:
        raise ValueError(f"{shape!r} is not a valid shape; expected one of {list(SHAPES)}")
    m.setflags(write=False)
    return m


def shape_stamp(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape (a copy; integer-exact)."""
    if int(size) < 3:
        raise ValueError(f"shape size must be >= 3, got {size}")
    return _stamp(shape, int(size)).copy()


# --------------------------------------------------------------------------
# Scenes and the world
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One clip's full description: caption attributes plus start position.

    ``(x0, y0)`` is the top-left corner of the shape's ``size x size`` box at
    frame 0 (column, row), on the torus; at frame ``t`` it is
    ``((x0 + vx*t) mod W, (y0 + vy*t) mod H)``.  ``frozen``: the shape stands
    still whatever the caption says (``SyntheticWorld(static_share=...)``).
    """

    shape: str
    color: str
    background: str
    direction: str
    speed: str
    x0: int
    y0: int
    size: int
    frozen: bool = False

    def __post_init__(self) -> None:
        self.attributes  # validates the attribute values
        for name in ("x0", "y0", "size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"Scene.{name} must be an integer, got {v!r}")
        if self.size < 3:
            raise ValueError(f"Scene.size must be >= 3, got {self.size}")

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.color, self.shape, self.background, self.direction, self.speed)

    @property
    def caption(self) -> str:
        return self.attributes.caption

    @property
    def velocity(self) -> Tuple[int, int]:
        """(vx, vy) in pixels per frame; integers so rendering is exact."""
        if self.frozen:
            return 0, 0
        ux, uy = DIRECTION_VECTORS[self.direction]
        s = SPEED_PX[self.speed]
        return ux * s, uy * s

    @classmethod
    def from_attributes(cls, attrs: Attributes, x0: int, y0: int, size: int, frozen: bool = False) -> "Scene":
        return cls(
            shape=attrs.shape,
            color=attrs.color,
            background=attrs.background,
            direction=attrs.direction,
            speed=attrs.speed,
            x0=int(x0),
            y0=int(y0),
            size=int(size),
            frozen=bool(frozen),
        )


FrameSize = Union[int, Tuple[int, int]]


class SyntheticWorld:
    """Seedable generator of captioned clips.

    Everything is a pure function of ``(seed, split, index)`` or
    ``(seed, prompt, prompt_seed)``; the world holds no mutable RNG state, so
    clips can be generated in any order, in parallel, and reproduced later.

    Args:
        frame_size: ``S`` for ``S x S`` frames or ``(H, W)``; default 32.
        seed: world seed (changes start positions and the prompt order of
            :meth:`sample_scene`, never the prompt sets or the held-out split).
        start_jitter: ``None``, shapes start anywhere; ``k``, within ``k`` px of the centre.
        static_share: the share of *training* scenes whose shape stands still although the caption says it
            moves (``Scene.frozen``).  0 (the default) is the world as described above.  Above 0 it is a world
            where a static video is a cheap mode of every caption: the teacher learns that mixture, and a
            mode-seeking distillation loss (DMD's reverse KL) can settle on the static mode -- the low-motion
            shortcut the paper's forward-KL term counters.  Held-out scenes and :meth:`scene_for_prompt` (the
            oracle's reference) always move as captioned.
    """

    def __init__(self, frame_size: FrameSize = 32, seed: int = 0, start_jitter: int | None = None,
                 static_share: float = 0.0) -> None:
        if isinstance(frame_size, (tuple, list)):
            if len(frame_size) != 2:
                raise ValueError(f"frame_size must be an int or (H, W), got {frame_size!r}")
            h, w = (int(v) for v in frame_size)
        else:
            h = w = int(frame_size)
        size = shape_size_for(h, w)
        if h < 8 or w < 8:
            raise ValueError(f"frame size must be at least 8x8, got {h}x{w}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.height, self.width, self.shape_size, self.seed = h, w, size, int(seed)
        if start_jitter is not None and int(start_jitter) < 0:
            raise ValueError(f"start_jitter must be >= 0 or None, got {start_jitter}")
        self.start_jitter = None if start_jitter is None else int(start_jitter)
        if not 0.0 <= float(static_share) < 1.0:
            raise ValueError(f"static_share must be in [0, 1), got {static_share!r}")
        self.static_share = float(static_share)

    def __repr__(self) -> str:
        return (f"SyntheticWorld(frame_size=({self.height}, {self.width}), seed={self.seed}, "
                f"start_jitter={self.start_jitter}, static_share={self.static_share})")

    # -- prompt sets (same for every world; methods for convenience) --------
    @staticmethod
    def train_prompts() -> list:
        return train_prompts()

    @staticmethod
    def heldout_prompts() -> list:
        return heldout_prompts()

    @staticmethod
    def vocabulary() -> list:
        return vocabulary()

    @staticmethod
    def parse_caption(text: str) -> Attributes:
        return parse_caption(text)

    # -- scenes -------------------------------------------------------------
    def _position(self, rng: np.random.Generator) -> Tuple[int, int]:
        """Anywhere in the frame, or within ``start_jitter`` px of the centre.

        Why a centred start exists: with the start anywhere, a small denoiser must first break the symmetry of
        "where is the one shape" at high noise; a ~1M-parameter teacher on 2 CPU cores drew colour-correct but
        scattered blobs after 30 minutes.  A near-centre start removes that ambiguity, so what is left to learn
        is the prompt -> (colour, background, motion) mapping, and the shape still wraps around in long clips.
        """
        if self.start_jitter is None:
            return int(rng.integers(0, self.width)), int(rng.integers(0, self.height))
        j, size = self.start_jitter, self.shape_size
        cx, cy = (self.width - size) // 2, (self.height - size) // 2
        return cx + int(rng.integers(-j, j + 1)), cy + int(rng.integers(-j, j + 1))

    def sample_scene(self, index: int, split: str = "train") -> Scene:
        """Deterministic scene number ``index`` of ``split`` ("train" | "heldout").

        Prompts are dealt in epochs: indices ``[k*n, (k+1)*n)`` cover each of
        the split's ``n`` prompts exactly once, in an order shuffled per epoch
        (so any dataset of ``m*n`` samples is perfectly balanced).  The start
        position comes from a generator seeded by ``(seed, split, index)``,
        and so does whether a training scene is ``frozen`` (``static_share``).
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        prompts = prompt_sets()[_SPLITS[split]]
        epoch, slot = divmod(index, len(prompts))
        order = np.random.default_rng([self.seed, _SPLITS[split], 0, epoch]).permutation(len(prompts))
        attrs = parse_caption(prompts[int(order[slot])])
        x0, y0 = self._position(np.random.default_rng([self.seed, _SPLITS[split], 1, index]))
        # its own stream, so static_share = 0 leaves every scene (and position) exactly as before
        frozen = split == "train" and self.static_share > 0 and (
            np.random.default_rng([self.seed, _SPLITS[split], 3, index]).random() < self.static_share)
        return Scene.from_attributes(attrs, x0, y0, self.shape_size, frozen=frozen)

    def scene_for_prompt(self, prompt: str, seed: int) -> Scene:
        """Scene for any valid caption (train, held-out or static); ``seed`` picks the start position.

        The position depends on ``(world seed, seed)`` only, not the prompt,
        so two prompts with the same seed start at the same place (controlled
        comparisons).
        """
        attrs = parse_caption(prompt)
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        x0, y0 = self._position(np.random.default_rng([self.seed, _PROMPT_STREAM, int(seed)]))
        return Scene.from_attributes(attrs, x0, y0, self.shape_size)

    # -- rendering ------------------------------------------------------------
    def render(self, scene: Scene, num_frames: int) -> np.ndarray:
        """Render ``num_frames`` frames: float32 ``[T, H, W, 3]``, values exactly palette colours.

        The shape's box is placed at integer positions modulo the frame size,
        so it wraps across borders and is fully visible in every frame.
        """
        t_count = int(num_frames)
        if t_count < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        h, w, s = self.height, self.width, scene.size
        if s > min(h, w):
            raise ValueError(f"shape size {s} does not fit a {h}x{w} frame")
        vx, vy = scene.velocity
        t = np.arange(t_count, dtype=np.int64)
        x = (scene.x0 + vx * t) % w  # [T]
        y = (scene.y0 + vy * t) % h
        offs = np.arange(s, dtype=np.int64)
        rows = (y[:, None] + offs[None, :]) % h  # [T, s]
        cols = (x[:, None] + offs[None, :]) % w  # [T, s]
        stamp = _stamp(scene.shape, s)
        mask = np.zeros((t_count, h, w), dtype=bool)
        mask[t[:, None, None], rows[:, :, None], cols[:, None, :]] = stamp[None]
        frames = np.empty((t_count, h, w, 3), dtype=np.float32)
        frames[...] = np.asarray(BACKGROUND_PALETTE[scene.background], dtype=np.float32)
        frames[mask] = np.asarray(SHAPE_PALETTE[scene.color], dtype=np.float32)
        return frames

    def clip(self, index: int, num_frames: int, split: str = "train") -> Tuple[np.ndarray, str]:
        """``(frames, caption)`` for scene ``index`` of ``split``."""
        scene = self.sample_scene(index, split)
        return self.render(scene, num_frames), scene.caption

    def clip_for_prompt(self, prompt: str, seed: int, num_frames: int) -> np.ndarray:
        """Frames for ``prompt`` with start position from ``seed`` (the reference clip)."""
        return self.render(self.scene_for_prompt(prompt, seed), num_frames)


def _palette_array(names: Sequence[str], palette: dict) -> np.ndarray:
    return np.asarray([palette[n] for n in names], dtype=np.float32)


def palette_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """``(shape colours [6,3], background colours [4,3])`` in ``COLORS`` / ``BACKGROUNDS`` order."""
    return _palette_array(COLORS, SHAPE_PALETTE), _palette_array(BACKGROUNDS, BACKGROUND_PALETTE)

