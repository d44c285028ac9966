"""Video input of the evaluation suite: any supported video to float32 ``[T, H, W, 3]`` in [0, 1], and its
equal temporal segments.

Videos are ``[T, H, W, 3]`` RGB, float in [0, 1] or uint8.
:func:`as_video` also takes ``layout="CTHW"`` (channels first, a per-sample
model tensor) and torch tensors.  Note: ``hiar.io.codec`` ``decode`` returns
``[B, T, H, W, 3]`` in [0, 1], so one decoded sample ``decode(z)[b]`` is
already ``THWC``.

Pure library: numpy only.
"""

from __future__ import annotations

from typing import Any, List

import numpy as np

__all__ = ["as_video", "from_model_output", "split_segments"]


def as_video(video: Any, layout: str = "THWC") -> np.ndarray:
    """Any supported video -> float32 ``[T, H, W, 3]`` in [0, 1].

    Args:
        video: numpy array or torch tensor; uint8 (0..255) or float in [0, 1].
        layout: ``"THWC"`` (frames, channels last: our default and what
            ``codec.decode(z)[b]`` gives) or ``"CTHW"`` (channels first, a
            per-sample model tensor ``[C, T, H, W]``).

    Floats within 0.01 of [0, 1] are clipped (the codec's ``clamp=True`` does
    the same); farther out raises, because a [-1, 1] video passed by mistake
    would otherwise be clipped into plausible-looking but wrong metrics.
    """
    if hasattr(video, "detach"):  # torch tensor, without importing torch here
        video = video.detach().cpu().numpy()
    arr = np.asarray(video)
    if layout == "CTHW":
        if arr.ndim != 4:
            raise ValueError(f"layout CTHW needs a 4-d array, got shape {tuple(arr.shape)}")
        arr = np.moveaxis(arr, 0, -1)
    elif layout != "THWC":
        raise ValueError(f"layout must be 'THWC' or 'CTHW', got {layout!r}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        hint = " (channels first? pass layout='CTHW')" if arr.ndim == 4 and arr.shape[0] == 3 else ""
        raise ValueError(f"video must have shape [T, H, W, 3], got {tuple(arr.shape)}{hint}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"video must be uint8 or float, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("video contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"float video must be in [0, 1], got range [{lo:.3f}, {hi:.3f}] (a [-1, 1] video?)")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0))


def from_model_output(sample: Any) -> np.ndarray:
    """One model sample ``[C, T, H, W]`` float in [0, 1] (channels first) -> ``[T, H, W, 3]``."""
    return as_video(sample, layout="CTHW")


def split_segments(video: np.ndarray, segments: int) -> List[np.ndarray]:
    """``segments`` equal, consecutive chunks of ``T // segments`` frames; the remainder is dropped from the start.

    Why the start: ``hiar.eval.drift``'s module docstring ("Segments").  Raises when a segment would
    have fewer than 2 frames (consecutive-frame metrics need a pair).
    """
    if int(segments) < 2:
        raise ValueError(f"segments must be >= 2 to fit a slope, got {segments}")
    n = int(segments)
    length = video.shape[0] // n
    if length < 2:
        raise ValueError(f"{video.shape[0]} frames cannot make {n} segments of >= 2 frames; need >= {2 * n}")
    start = video.shape[0] - n * length
    return [video[start + k * length : start + (k + 1) * length] for k in range(n)]
