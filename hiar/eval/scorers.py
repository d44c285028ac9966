"""The drift suite's per-segment metrics: the :class:`Scorer` protocol, the three weight-free pixel scorers and
the base of the learned ones (weights from a local directory or an ``s3://`` prefix, never a model hub).

Three are weight-free and always computed (:func:`pixel_scorers`):

* ``saturation`` -- mean HSV S (``cv2.cvtColor(RGB2HSV)`` on float32 gives S in
  [0, 1]) over all pixels of the segment.
* ``sharpness`` -- variance of ``cv2.Laplacian`` (3x3 aperture) of the float
  grayscale frame in [0, 1], averaged over the segment's frames.
* ``pixel_similarity`` -- ``1 - mean |f_{t+1} - f_t|`` over the segment's
  consecutive pairs (all pixels and channels), in [0, 1].  A weight-free
  stand-in for the paper's DINOv2/LPIPS coherence pair: chosen over a
  correlation of centred frames because it is defined for flat frames (a
  centred flat frame is all zeros) and drops whenever frames are reordered.


The learned scorers (``hiar.eval.learned``) derive from :class:`WeightsScorer`: each looks for its weights under
``<weights_dir>/<subdir>`` where ``weights_dir`` is an argument or the ``HIAR_SCORER_WEIGHTS`` environment
variable: a local directory, or an ``s3://bucket/prefix`` fetched on first use, once per node, into a checksummed
cache (``hiar.io.storage.local_dir``).  When they are absent, cannot be fetched or loaded, the scorer says so in
``available()`` and the metric is listed as skipped with the reason, never reported as 0 or NaN.

Pure library: numpy and OpenCV; never Ray, MLflow or boto3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import cv2
import numpy as np

__all__ = [
    "WEIGHTS_ENV",
    "METRIC_FLOORS",
    "DEFAULT_FLOOR",
    "WORSE",
    "Scorer",
    "PixelScorer",
    "SaturationScorer",
    "SharpnessScorer",
    "PixelSimilarityScorer",
    "WeightsScorer",
    "Loader",
    "pixel_scorers",
    "scorer_weights_dir",
    "floor_of",
    "worse_of",
]

#: Environment variable naming the directory that holds learned scorers' weights.
WEIGHTS_ENV = "HIAR_SCORER_WEIGHTS"

#: Per-metric floor of the normalisation denominator, in the metric's own units (why: ``hiar.eval.drift``).
METRIC_FLOORS: Dict[str, float] = {
    "saturation": 0.05,  # S in [0, 1]; below 0.05 a clip is essentially grey
    "sharpness": 1e-4,  # Laplacian variance of [0, 1] gray; 1e-4 = 6.5 on the 0..255 scale: very blurry
    "pixel_similarity": 0.05,  # in [0, 1], ~0.9+ for real videos
    "dinov2_similarity": 0.05,  # cosine, ~0.9 for consecutive frames
    "lpips_distance": 0.01,  # consecutive-frame LPIPS is small (~0.05 .. 0.3)
    "musiq": 1.0,  # MUSIQ is on a 0..100 scale
    "clip_iqa": 0.05,  # probability in [0, 1]
}
DEFAULT_FLOOR = 1e-3  # a scorer without a ``floor`` attribute and not in the table

#: Directions of degradation a scorer may declare (``worse``); rules: ``hiar.eval.drift.degradation``.
WORSE = ("up", "down", "both")


@runtime_checkable
class Scorer(Protocol):
    """One per-segment metric.

    ``name`` is the metric's key in reports.  ``worse`` is the direction of
    degradation (``"up"``, ``"down"`` or ``"both"``) and ``floor`` the
    normalisation floor; both are optional on user scorers (defaults
    ``"both"`` and the :data:`METRIC_FLOORS` entry or 1e-3).
    ``available()`` says whether the scorer can run here, with the reason when
    not; it may load weights (and should cache them).  ``score_segment`` gets
    one segment, float32 ``[t, H, W, 3]`` in [0, 1] with ``t >= 2``, and
    returns one finite float.
    """

    name: str

    def available(self) -> Tuple[bool, str]: ...

    def score_segment(self, frames: np.ndarray) -> float: ...


class PixelScorer:
    """Base of the weight-free metrics: always available; both directions of change are drift."""

    name = "pixel"
    worse = "both"
    floor = DEFAULT_FLOOR

    def available(self) -> Tuple[bool, str]:
        return True, ""

    def score_segment(self, frames: np.ndarray) -> float:
        raise NotImplementedError


class SaturationScorer(PixelScorer):
    """Mean HSV saturation of every pixel of the segment."""

    name = "saturation"
    floor = METRIC_FLOORS["saturation"]

    def score_segment(self, frames: np.ndarray) -> float:
        # HSV is per pixel, so the whole segment converts as one tall image (one cv2 call).
        tall = np.ascontiguousarray(frames, dtype=np.float32).reshape(-1, frames.shape[2], 3)
        return float(cv2.cvtColor(tall, cv2.COLOR_RGB2HSV)[..., 1].mean())


class SharpnessScorer(PixelScorer):
    """Laplacian variance of the grayscale frame, averaged over the segment's frames."""

    name = "sharpness"
    floor = METRIC_FLOORS["sharpness"]

    def score_segment(self, frames: np.ndarray) -> float:
        # Per frame, not as one tall image: the Laplacian must not see the seam between two frames.
        values = []
        for frame in frames:
            gray = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.float32), cv2.COLOR_RGB2GRAY)
            values.append(float(cv2.Laplacian(gray, cv2.CV_32F).var()))
        return float(np.mean(values))


class PixelSimilarityScorer(PixelScorer):
    """``1 - mean |f_{t+1} - f_t|`` over the segment's consecutive pairs, in [0, 1]."""

    name = "pixel_similarity"
    floor = METRIC_FLOORS["pixel_similarity"]

    def score_segment(self, frames: np.ndarray) -> float:
        return float(1.0 - np.abs(np.diff(frames.astype(np.float32), axis=0)).mean())


def pixel_scorers() -> List[Scorer]:
    """The three weight-free metrics, always available."""
    return [SaturationScorer(), SharpnessScorer(), PixelSimilarityScorer()]


def _weights_source(weights_dir: Optional[os.PathLike | str]) -> Optional[str]:
    """The argument, else ``$HIAR_SCORER_WEIGHTS``, else None (as given: a local path or an ``s3://`` URI)."""
    if weights_dir is not None:
        return str(weights_dir)
    return os.environ.get(WEIGHTS_ENV, "").strip() or None


def _fetch_weights(source: str) -> Path:
    """A local directory for ``source``: a local path as it is; an ``s3://`` prefix fetched once per node into a
    checksummed cache (:func:`hiar.io.storage.local_dir`)."""
    if "://" not in source:
        return Path(source)
    from hiar.io.storage import local_dir

    return local_dir(source, what="scorer weights")


def scorer_weights_dir(weights_dir: Optional[os.PathLike | str] = None) -> Optional[Path]:
    """The learned scorers' weight root: the argument, else ``$HIAR_SCORER_WEIGHTS``, else None.

    An ``s3://bucket/prefix`` is fetched (once per node, :func:`hiar.io.storage.local_dir`) and its local copy returned.
    """
    source = _weights_source(weights_dir)
    return None if source is None else _fetch_weights(source)


#: A loader turns a weights directory and a torch device name into a per-segment scoring function.
Loader = Callable[[Path, str], Callable[[np.ndarray], float]]


class WeightsScorer:
    """Base of the learned scorers: weights from local disk only, loaded once, lazily.

    Subclasses set ``name``, ``subdir``, ``worse``, ``floor`` and may override
    :meth:`default_loader`.  The ``loader`` argument is the hook for plugging
    in an implementation (e.g. LPIPS from a local ``lpips`` install): it is
    called as ``loader(weights_path, device)`` and returns ``fn(frames) ->
    float``.  ``available()`` is True only once loading has *succeeded*, so a
    corrupt or unsupported weights directory is reported as skipped with the
    loader's error, not scored.
    """

    name = "learned"
    subdir = "learned"
    worse = "both"
    floor = DEFAULT_FLOOR

    def __init__(
        self,
        weights_dir: Optional[os.PathLike | str] = None,
        device: str = "cpu",
        loader: Optional[Loader] = None,
    ) -> None:
        self.source = _weights_source(weights_dir)  # a local path or an s3:// URI, fetched lazily (on first use)
        self._root: Optional[Path] = None if self.source is None or "://" in self.source else Path(self.source)
        self.device = device
        self._loader = loader or self.default_loader
        self._fn: Optional[Callable[[np.ndarray], float]] = None
        self._status: Optional[Tuple[bool, str]] = None

    @property
    def root(self) -> Optional[Path]:
        """The local weights root (an ``s3://`` source is fetched on first access, once per node)."""
        if self._root is None and self.source is not None:
            self._root = _fetch_weights(self.source)
        return self._root

    @property
    def weights_path(self) -> Optional[Path]:
        return None if self.root is None else self.root / self.subdir

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        raise NotImplementedError(
            f"no built-in offline loader for {self.name}; pass loader=... or your own Scorer named {self.name!r}"
        )

    def available(self) -> Tuple[bool, str]:
        if self._status is None:
            self._status = self._try_load()
        return self._status

    def _try_load(self) -> Tuple[bool, str]:
        try:
            path = self.weights_path
        except Exception as exc:  # an s3:// source that cannot be listed or fetched: reported, not raised
            return False, f"scorer weights {self.source} could not be fetched: {type(exc).__name__}: {exc}"
        if path is None:
            return False, f"no weights directory: set ${WEIGHTS_ENV} or pass weights_dir (expects <dir>/{self.subdir})"
        if not path.is_dir():
            return False, f"weights not found at {path}"
        try:
            self._fn = self._loader(path, self.device)
        except Exception as exc:  # any loader failure means "cannot score here", reported, not raised
            return False, f"weights at {path} could not be loaded: {type(exc).__name__}: {exc}"
        return True, ""

    def score_segment(self, frames: np.ndarray) -> float:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(f"{self.name} is not available: {reason}")
        assert self._fn is not None
        return float(self._fn(frames))



def floor_of(scorer: Scorer) -> float:
    """The scorer's normalisation floor: its ``floor``, else the :data:`METRIC_FLOORS` entry, else the default."""
    return float(getattr(scorer, "floor", METRIC_FLOORS.get(scorer.name, DEFAULT_FLOOR)))


def worse_of(scorer: Scorer) -> str:
    """The scorer's direction of degradation (``worse``, default ``"both"``), checked."""
    worse = getattr(scorer, "worse", "both")
    if worse not in WORSE:
        raise ValueError(f"scorer {scorer.name!r}: worse must be one of {WORSE}, got {worse!r}")
    return worse
