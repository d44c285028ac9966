"""Analytic oracle for the tiny world: does a clip show what its caption says?

Over 400 lines because it is one judge: the per-frame analysis, the pairwise
displacement and the scores are one :class:`Oracle` and its few helpers, whose
tolerances only make sense together.

No learned weights: the tiny world (``hiar.tiny.world``) is a flat background plus
one palette-coloured shape moving at constant speed on a torus, so every
caption attribute can be read off the pixels directly.  The oracle is used to
score model rollouts (prompt following, motion, drift over long horizons), so
it must be (a) exact on the world's own clips, (b) hard to fool with noise,
(c) tolerant of the blur and colour error of a small model, and (d) fast.

Per frame (after clipping values to [0, 1]):

* **background** -- the per-channel median (the shape covers < 10 % of the
  frame, so the median is the background colour even for blurred outputs).
  It counts as the caption's background only with *evidence*: the median is
  within ``color_tol`` of that palette colour, that colour is the nearest
  background colour, and at least ``min_background_fraction`` of the pixels
  are within ``pixel_tol`` of the median.  Noise has a median too (0.5 gray
  for N(0.5, s)), but few pixels near it, so it fails here.
* **shape mask** -- pixels farther than ``mask_tol`` from the background
  estimate.  A shape is *present* when the mask's area is plausible for the
  world's shapes and it is compact on the torus (circular mean resultant
  length on both axes >= ``min_compactness``; a 9 px blob on a 32 px circle
  scores ~0.88, scattered pixels ~0).  The circular statistic is what makes
  this work under wrap-around, where a shape split across the border has a
  large ordinary bounding box.
* **shape colour** -- mean of the mask's core (the third of its pixels
  farthest from the background, so blurred rims do not dilute it), matched to
  the nearest shape palette colour, 'unknown' beyond ``color_tol``.
* **shape kind** -- the world template (square/circle/triangle) with the best
  IoU at the best circular shift (reported as ``shape_ok``; not part of
  ``caption_consistency``, see below).

Per consecutive pair: **displacement** ``(dx, dy)`` = the peak of the
circular cross-correlation of the two shape masks (FFT), mapped to the signed
range ``[-W/2, W/2)``.  Circular correlation is exact under wrap-around,
where centroid differences jump by a frame width at the seam.  Valid only when
the shape is present in both frames.

``caption_consistency`` (the headline number): the fraction of the ``T-1``
consecutive pairs ``(t, t+1)`` for which background and shape colour match the
caption in *both* frames *and* the displacement's direction matches.  It is
~1 only when colour AND background AND direction all match nearly throughout,
and it reads directly as "fraction of the clip's transitions that show the
caption" -- so :func:`consistency_curve`, the same indicator per pair, gives a
drift-over-time curve for long rollouts.  Speed and shape kind are reported
separately (``motion_accuracy``, ``shape_ok``) so that the headline number
stays aligned with the three cues a blurry small-model output shows most
reliably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from hiar.tiny import captions as _captions
from hiar.tiny import world as _world

__all__ = [
    "Oracle",
    "FrameAnalysis",
    "analyze",
    "score_clip",
    "score_batch",
    "consistency_curve",
    "SCORE_KEYS",
]

#: Keys of the dict returned by :meth:`Oracle.score` (all floats).
SCORE_KEYS: Tuple[str, ...] = (
    "caption_consistency",
    "background_ok",
    "color_ok",
    "direction_ok",
    "shape_present",
    "shape_ok",
    "motion",
    "static",
    "motion_accuracy",
    "speed_ok",
    "mean_saturation",
    "mean_intensity",
)

_UNKNOWN = "unknown"


@dataclass
class FrameAnalysis:
    """Everything the oracle reads from a clip, independent of any caption.

    Shapes: ``T`` frames, ``T-1`` pairs.  Colour names are palette names or
    ``"unknown"``.
    """

    frames: np.ndarray  # [T, H, W, 3] float32 in [0, 1]
    background_rgb: np.ndarray  # [T, 3] per-channel median
    background_name: List[str]  # [T] nearest background colour within tolerance
    background_evidence: np.ndarray  # [T] bool: enough pixels agree with the median
    background_fraction: np.ndarray  # [T] fraction of pixels near the median
    mask: np.ndarray  # [T, H, W] bool shape mask
    area: np.ndarray  # [T] int pixels in the mask
    compactness: np.ndarray  # [T] min over axes of the circular resultant length
    present: np.ndarray  # [T] bool: plausible compact shape
    shape_rgb: np.ndarray  # [T, 3] mean colour of the mask's core (NaN when empty)
    color_name: List[str]  # [T] nearest shape colour within tolerance
    shape_name: List[str]  # [T] best-matching template ("unknown" when absent)
    centroid: np.ndarray  # [T, 2] circular centroid (x, y) in px, NaN when absent
    displacement: np.ndarray  # [T-1, 2] (dx, dy) px between frames t and t+1
    pair_valid: np.ndarray  # [T-1] bool: shape present in both frames
    saturation: np.ndarray  # [T] mean HSV saturation
    intensity: np.ndarray  # [T] mean value over pixels and channels


class Oracle:
    """Caption checker for tiny-world clips; thresholds are constructor arguments.

    Defaults are set from the world's palette: backgrounds are >= 0.44 apart
    and shape colours >= 0.48 from every background (RGB Euclidean), so
    ``color_tol = 0.2`` never confuses two palette colours and ``mask_tol =
    0.25`` separates shape from background with margin.
    """

    def __init__(
        self,
        *,
        color_tol: float = 0.2,
        pixel_tol: float = 0.15,
        mask_tol: float = 0.25,
        min_background_fraction: float = 0.6,
        min_compactness: float = 0.6,
        area_range: Tuple[float, float] = (0.5, 1.6),
        static_px: float = 0.5,
        fast_px: float = 2.0,
        min_shape_iou: float = 0.5,
    ) -> None:
        self.color_tol = float(color_tol)
        self.pixel_tol = float(pixel_tol)
        self.mask_tol = float(mask_tol)
        self.min_background_fraction = float(min_background_fraction)
        self.min_compactness = float(min_compactness)
        self.area_range = (float(area_range[0]), float(area_range[1]))
        self.static_px = float(static_px)
        self.fast_px = float(fast_px)
        self.min_shape_iou = float(min_shape_iou)
        self._shape_rgb, self._bg_rgb = _world.palette_arrays()

    # ------------------------------------------------------------------ input
    @staticmethod
    def _as_frames(frames: np.ndarray, min_frames: int = 1) -> np.ndarray:
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            channel_first = arr.ndim == 4 and arr.shape[1] == 3
            hint = " (channel-first? expected channels last)" if channel_first else ""
            raise ValueError(f"frames must have shape [T, H, W, 3], got {tuple(arr.shape)}{hint}")
        if arr.shape[0] < min_frames:
            raise ValueError(f"need at least {min_frames} frame(s), got {arr.shape[0]}")
        if min(arr.shape[1], arr.shape[2]) < 8:
            raise ValueError(f"frames must be at least 8x8, got {arr.shape[1]}x{arr.shape[2]}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"frames must be numeric, got dtype {arr.dtype}")
        arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(arr, 0.0, 1.0)

    # --------------------------------------------------------------- analysis
    def analyze(self, frames: np.ndarray) -> FrameAnalysis:
        """Caption-independent per-frame and per-pair readings of a clip."""
        x = self._as_frames(frames)
        t_count, h, w, _ = x.shape
        flat = x.reshape(t_count, h * w, 3)

        # Background: per-channel median, then evidence = fraction of pixels near it.
        bg = np.median(flat, axis=1)  # [T, 3]
        dist_bg = np.linalg.norm(x - bg[:, None, None, :], axis=-1)  # [T, H, W]
        bg_frac = (dist_bg <= self.pixel_tol).reshape(t_count, -1).mean(axis=1)
        bg_evidence = bg_frac >= self.min_background_fraction
        bg_name = self._nearest_names(bg, self._bg_rgb, _captions.BACKGROUNDS)

        # Shape mask and its statistics.
        mask = dist_bg > self.mask_tol
        area = mask.reshape(t_count, -1).sum(axis=1)
        cx, rx = _circular_mean(mask.sum(axis=1), w)  # column profile -> x
        cy, ry = _circular_mean(mask.sum(axis=2), h)  # row profile -> y
        compact = np.minimum(rx, ry)
        size = _world.shape_size_for(h, w)
        areas = [int(_world.shape_stamp(s, size).sum()) for s in _captions.SHAPES]
        lo, hi = self.area_range[0] * min(areas), self.area_range[1] * max(areas)
        present = (area >= lo) & (area <= hi) & (compact >= self.min_compactness)

        # Colour from the mask's core (the third of its pixels farthest from the
        # background), so blurred edges -- half shape, half background -- do not
        # drag the estimate toward the background colour.
        d_flat = np.where(mask, dist_bg, -1.0).reshape(t_count, -1)
        rank = np.argsort(np.argsort(-d_flat, axis=1, kind="stable"), axis=1, kind="stable")
        core = rank < np.maximum(1, -(-area // 3))[:, None]
        core &= mask.reshape(t_count, -1)
        n_core = core.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            shape_rgb = (flat * core[..., None]).sum(axis=1) / n_core[:, None]
        color_name = self._nearest_names(shape_rgb, self._shape_rgb, _captions.COLORS)
        color_name = [n if p else _UNKNOWN for n, p in zip(color_name, present)]
        centroid = np.stack([cx, cy], axis=1)
        centroid[~present] = np.nan

        mask_f = np.fft.rfft2(mask.astype(np.float32), axes=(1, 2))  # [T, H, W//2+1]
        shape_name = self._classify_shapes(mask_f, area, present, h, w, size)
        if t_count >= 2:
            disp = _circular_shift(mask_f[:-1], mask_f[1:], h, w)
            pair_valid = present[:-1] & present[1:]
        else:
            disp = np.zeros((0, 2), dtype=np.float32)
            pair_valid = np.zeros((0,), dtype=bool)

        mx, mn = x.max(axis=-1), x.min(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sat = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1.0), 0.0)
        return FrameAnalysis(
            frames=x,
            background_rgb=bg,
            background_name=bg_name,
            background_evidence=bg_evidence,
            background_fraction=bg_frac,
            mask=mask,
            area=area,
            compactness=compact,
            present=present,
            shape_rgb=shape_rgb,
            color_name=color_name,
            shape_name=shape_name,
            centroid=centroid,
            displacement=disp,
            pair_valid=pair_valid,
            saturation=sat.reshape(t_count, -1).mean(axis=1),
            intensity=x.reshape(t_count, -1).mean(axis=1),
        )

    def _nearest_names(self, rgb: np.ndarray, palette: np.ndarray, names: Sequence[str]) -> List[str]:
        d = np.linalg.norm(rgb[:, None, :] - palette[None, :, :], axis=-1)  # [T, K]
        d = np.where(np.isfinite(d), d, np.inf)
        k = d.argmin(axis=1)
        best = d[np.arange(len(k)), k]
        return [names[i] if b <= self.color_tol else _UNKNOWN for i, b in zip(k, best)]

    def _classify_shapes(self, mask_f, area, present, h, w, size) -> List[str]:
        """Template with the best IoU at the best circular shift, if IoU >= ``min_shape_iou``."""
        best_iou = np.full(len(area), -1.0)
        best_k = np.zeros(len(area), dtype=np.int64)
        for k, name in enumerate(_captions.SHAPES):
            stamp = _world.shape_stamp(name, size)
            tpl = np.zeros((h, w), dtype=np.float32)
            tpl[:size, :size] = stamp
            corr = np.fft.irfft2(mask_f * np.conj(np.fft.rfft2(tpl))[None], s=(h, w), axes=(1, 2))
            overlap = np.rint(corr.reshape(len(area), -1).max(axis=1))
            iou = overlap / np.maximum(area + stamp.sum() - overlap, 1)
            better = iou > best_iou
            best_iou[better], best_k[better] = iou[better], k
        return [
            _captions.SHAPES[k] if (p and i >= self.min_shape_iou) else _UNKNOWN
            for k, i, p in zip(best_k, best_iou, present)
        ]

    # ---------------------------------------------------------------- scoring
    def _checks(self, a: FrameAnalysis, caption: str):
        attrs = _captions.parse_caption(caption)
        bg_ok = a.background_evidence & np.array([n == attrs.background for n in a.background_name])
        color_ok = a.present & np.array([n == attrs.color for n in a.color_name])
        shape_ok = a.present & np.array([n == attrs.shape for n in a.shape_name])

        dx, dy = a.displacement[:, 0], a.displacement[:, 1]
        mag = np.hypot(dx, dy)
        if attrs.is_static:
            dir_ok = mag < self.static_px
            speed_ok = dir_ok
        else:
            ux, uy = _world.DIRECTION_VECTORS[attrs.direction]
            along = dx * ux + dy * uy  # signed displacement along the caption's direction
            across = np.abs(dx * uy) + np.abs(dy * ux)
            dir_ok = (along >= self.static_px) & (along > across)
            if attrs.speed == "slowly":
                speed_ok = (mag >= self.static_px) & (mag < self.fast_px)
            else:
                speed_ok = mag >= self.fast_px
        dir_ok = dir_ok & a.pair_valid
        speed_ok = speed_ok & a.pair_valid
        return bg_ok, color_ok, shape_ok, dir_ok, speed_ok

    def consistency_curve(
        self, frames: np.ndarray, caption: str, analysis: Optional[FrameAnalysis] = None
    ) -> np.ndarray:
        """Per-pair indicator ``[T-1]`` (float 0/1): frames t and t+1 show background and
        colour of the caption and the step between them has its direction.

        Its mean is ``caption_consistency``; plotted against t it shows drift.
        """
        a = analysis if analysis is not None else self.analyze(self._as_frames(frames, min_frames=2))
        if a.frames.shape[0] < 2:
            raise ValueError("need at least 2 frames to judge motion")
        bg_ok, color_ok, _, dir_ok, _ = self._checks(a, caption)
        frame_ok = bg_ok & color_ok
        return (frame_ok[:-1] & frame_ok[1:] & dir_ok).astype(np.float32)

    def score(self, frames: np.ndarray, caption: str) -> Dict[str, float]:
        """Score one clip against its caption; returns floats keyed by :data:`SCORE_KEYS`.

        Frame-level fractions (``background_ok``, ``color_ok``, ``shape_present``,
        ``shape_ok``) are over T frames; pair-level ones (``direction_ok``,
        ``speed_ok``, ``motion_accuracy`` = direction and speed class both
        right, ``caption_consistency``) over T-1 pairs.  ``motion`` is the mean
        displacement magnitude (px/frame) over pairs with the shape present in
        both frames (0 if none).  Speed classes: static < 0.5 px, slow
        [0.5, 2), fast >= 2.  ``static`` is 1 when the clip as a whole stands
        still: a shape present in some frame pair and a mean ``motion`` in the
        static class (a clip with no shape is broken, not static); its mean
        over clips is the share of videos that stopped moving (the low-motion
        shortcut).
        """
        x = self._as_frames(frames, min_frames=2)
        _captions.parse_caption(caption)  # fail fast on a bad caption
        a = self.analyze(x)
        bg_ok, color_ok, shape_ok, dir_ok, speed_ok = self._checks(a, caption)
        curve = self.consistency_curve(x, caption, analysis=a)
        mag = np.hypot(a.displacement[:, 0], a.displacement[:, 1])
        motion = float(mag[a.pair_valid].mean()) if a.pair_valid.any() else 0.0
        out = {
            "caption_consistency": float(curve.mean()),
            "background_ok": float(bg_ok.mean()),
            "color_ok": float(color_ok.mean()),
            "direction_ok": float(dir_ok.mean()),
            "shape_present": float(a.present.mean()),
            "shape_ok": float(shape_ok.mean()),
            "motion": motion,
            "static": float(bool(a.pair_valid.any()) and motion < self.static_px),
            "motion_accuracy": float((dir_ok & speed_ok).mean()),
            "speed_ok": float(speed_ok.mean()),
            "mean_saturation": float(a.saturation.mean()),
            "mean_intensity": float(a.intensity.mean()),
        }
        return out

    def score_batch(self, items: Iterable[Tuple[np.ndarray, str]]) -> Dict[str, float]:
        """Mean of :meth:`score` over ``(frames, caption)`` pairs, plus ``"n"`` (the count)."""
        scores = [self.score(f, c) for f, c in items]
        if not scores:
            raise ValueError("score_batch needs at least one (frames, caption) pair")
        out = {k: float(np.mean([s[k] for s in scores])) for k in SCORE_KEYS}
        out["n"] = float(len(scores))
        return out


# ----------------------------------------------------------------- helpers


def _circular_mean(profile: np.ndarray, period: int) -> Tuple[np.ndarray, np.ndarray]:
    """Circular mean position and resultant length of ``[T, period]`` mass profiles.

    Returns (position in [0, period), R in [0, 1]); R = 0 for empty profiles.
    Treating pixel coordinates as angles makes the statistic indifferent to
    where the torus seam cuts the shape.
    """
    ang = 2.0 * np.pi * np.arange(period) / period
    mass = profile.sum(axis=1).astype(np.float64)
    c = profile @ np.cos(ang)
    s = profile @ np.sin(ang)
    safe = np.where(mass > 0, mass, 1.0)
    r = np.where(mass > 0, np.hypot(c, s) / safe, 0.0)
    pos = (np.arctan2(s, c) % (2.0 * np.pi)) * period / (2.0 * np.pi)
    return pos, r


def _circular_shift(f0: np.ndarray, f1: np.ndarray, h: int, w: int) -> np.ndarray:
    """Integer (dx, dy) maximising the circular cross-correlation of frame t+1 with frame t.

    ``f0``/``f1`` are rfft2 spectra ``[N, H, W//2+1]``; shifts are mapped to
    ``[-(W//2), W - W//2)`` x ``[-(H//2), H - H//2)`` (so speeds below half the frame are
    unambiguous).  Ties (e.g. empty masks) resolve to the first maximum,
    which is shift 0.
    """
    corr = np.fft.irfft2(f1 * np.conj(f0), s=(h, w), axes=(1, 2))  # [N, H, W]
    flat = corr.reshape(corr.shape[0], -1)
    # Masks are binary, so overlaps are integers: round away FFT noise so that
    # equal overlaps tie exactly and argmax picks the first (deterministic).
    idx = np.rint(flat).argmax(axis=1)
    dy, dx = np.divmod(idx, w)
    dx = (dx + w // 2) % w - w // 2
    dy = (dy + h // 2) % h - h // 2
    return np.stack([dx, dy], axis=1).astype(np.float32)


_DEFAULT: Optional[Oracle] = None


def _default() -> Oracle:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Oracle()
    return _DEFAULT


def analyze(frames: np.ndarray) -> FrameAnalysis:
    """:meth:`Oracle.analyze` with default thresholds."""
    return _default().analyze(frames)


def score_clip(frames: np.ndarray, caption: str) -> Dict[str, float]:
    """:meth:`Oracle.score` with default thresholds."""
    return _default().score(frames, caption)


def score_batch(items: Iterable[Tuple[np.ndarray, str]]) -> Dict[str, float]:
    """:meth:`Oracle.score_batch` with default thresholds."""
    return _default().score_batch(items)


def consistency_curve(frames: np.ndarray, caption: str) -> np.ndarray:
    """:meth:`Oracle.consistency_curve` with default thresholds."""
    return _default().consistency_curve(frames, caption)
