"""Drift suite (paper §4.1) and VBench-style dynamics for generated videos.

The paper (§4.1, "Evaluation metrics") says, in full: each video "is evenly
divided into five temporal segments, and the following per-segment statistics
are computed: perceptual quality via MUSIQ and CLIP-IQA; temporal coherence via
DINOv2 consecutive-frame cosine similarity and LPIPS consecutive-frame
distance; and low-level statistics including HSV saturation mean and Laplacian
variance (sharpness).  For each metric, we report the slope of a linear fit
over the five segments as a measure of drift rate.  All per-metric slopes are
then normalised and aggregated via a weighted sum into a single Drift Score
(lower is better)."  It names the drifts it has in mind elsewhere:
over-saturation, over-sharpening, hue drift, loss of fine detail, motion
repetition (§1, §2.2, §4.3).

What follows the text exactly: segments (default 5, evenly divided), the six
metrics, one least-squares slope per metric over the segment index, a weighted
sum of normalised slopes, lower is better.  The text is silent on the
normalisation, the orientation of each slope and the weights; our choices:

* **Segments.**  ``L = T // segments`` frames each; the ``T % segments``
  remainder is dropped *from the start*: the end is where drift lives, so it
  must be kept, and Wan's causal VAE decodes ``1 + 4k`` frames whose lone first
  frame is the odd one out (a 20 s / 16 fps clip has 321 frames = 1 + 5 * 64,
  so exactly that frame goes).  Every segment needs >= 2 frames, because the
  coherence metrics compare consecutive frames *within* a segment.
* **Slope.**  Ordinary least squares of the per-segment values against the
  segment index ``0 .. segments-1``: units of the metric *per segment*.
* **Normalisation.**  ``normalised = slope / max(|v_0|, floor)``: the relative
  change per segment with respect to the first segment (the start of the
  rollout is the reference that later segments drift away from), so metrics in
  different units (saturation in [0, 1], Laplacian variance in intensity^2,
  MUSIQ in [0, 100]) become comparable.  ``floor`` is per metric (see
  :data:`METRIC_FLOORS`, or a scorer's ``floor``): a value below which
  "relative change" is meaningless (a grey clip has saturation 0; a flat frame
  has Laplacian variance 0), so a change there is measured against the floor
  instead of exploding.
* **Orientation** (``degradation``, always >= 0, what enters the score).  Each
  metric says which direction is worse (``worse``):

  - ``"both"`` -> ``|normalised|``.  Saturation (over-saturation *and*
    wash-out are both drift), sharpness (over-sharpening *and* loss of detail),
    and the coherence metrics (pixel / DINOv2 similarity, LPIPS distance): a
    falling coherence is flicker or semantic drift, a rising one is the motion
    freezing -- the low-motion shortcut of §3.3 -- so either departs from a
    stable rollout.
  - ``"down"`` -> ``max(0, -normalised)``; ``"up"`` -> ``max(0, normalised)``.
    For the perceptual quality scores (MUSIQ, CLIP-IQA: higher is better) a
    rising quality is not drift and must not cancel another metric's
    degradation, hence the clip at 0.  A constant clip therefore scores 0 and
    every score is >= 0, like the paper's reported values (0.18 .. 0.84).
* **Weights and the score.**  ``drift_score = sum_m w_m * degradation_m /
  sum_m w_m`` over the metrics that were actually computed: a weighted *mean*,
  so skipping a metric (its learned weights absent) renormalises the weights of
  the rest instead of silently counting the missing metric as 0.  Default
  weights (:data:`DEFAULT_WEIGHTS`) are 1.0 for every metric (the paper
  publishes none); a metric not in the table (a user scorer) also gets 1.0; a
  weight of 0 reports the metric but keeps it out of the score.  Scores are
  comparable only between reports with the same metric set and ``segments``
  (``to_metrics`` logs ``drift/num_metrics`` for that reason).

Metrics.  Three are weight-free and always computed (:func:`pixel_scorers`):

* ``saturation`` -- mean HSV S (``cv2.cvtColor(RGB2HSV)`` on float32 gives S in
  [0, 1]) over all pixels of the segment.
* ``sharpness`` -- variance of ``cv2.Laplacian`` (3x3 aperture) of the float
  grayscale frame in [0, 1], averaged over the segment's frames.
* ``pixel_similarity`` -- ``1 - mean |f_{t+1} - f_t|`` over the segment's
  consecutive pairs (all pixels and channels), in [0, 1].  A weight-free
  stand-in for the paper's DINOv2/LPIPS coherence pair: chosen over a
  correlation of centred frames because it is defined for flat frames (a
  centred flat frame is all zeros) and drops whenever frames are reordered.

Four are learned and never downloaded (:func:`learned_scorers`): each looks for
its weights under ``<weights_dir>/<subdir>`` where ``weights_dir`` is an
argument or the ``HIAR_SCORER_WEIGHTS`` environment variable: a local
directory, or an ``s3://bucket/prefix`` fetched on first use, once per node,
into a checksummed cache (``hiar.io.storage.local_dir``; never a model hub).  When
they are absent, cannot be fetched or loaded, or their
library is not importable, the metric is listed in ``DriftReport.skipped``
with the reason, never reported as 0 or NaN.  Formats, each the library's own:

* ``dinov2/`` -- ``dinov2_similarity``: a ``transformers`` ``Dinov2Model``
  ``save_pretrained`` directory;
* ``clip_iqa/`` -- ``clip_iqa``: a ``transformers`` ``CLIPModel`` plus its
  tokenizer;
* ``lpips/`` -- ``lpips_distance``: ``lpips.pth``, the ``state_dict`` of a whole
  ``lpips.LPIPS`` module (backbone included: nothing is fetched from the
  torchvision model zoo), and optionally ``config.json`` ``{"net": "alex",
  "version": "0.1"}``; needs the ``lpips`` package (and torchvision);
* ``musiq/`` -- ``musiq``: one pyiqa MUSIQ checkpoint ``*.pth`` (the files pyiqa
  publishes); needs the ``pyiqa`` package.

Plus one that needs the prompt and is not a drift metric: ``clip_text``
(:class:`ClipTextAlignmentScorer`, ``clip/``: a ``transformers`` ``CLIPModel``
plus tokenizer, optionally a ``CLIPProcessor`` for its image mean/std),
the text-video alignment -- mean cosine similarity of the prompt's CLIP text
embedding and each frame's image embedding (higher is better).  Its per-segment
values are in ``DriftReport.alignment`` (metrics ``alignment/clip_text``, the
mean, ``alignment/clip_text_slope`` and ``alignment/clip_text_seg<k>``) and never
enter the Drift Score; :func:`drift_report` computes it only when given
``prompt=``.  Any other metric has the loader hook (``loader=`` argument, or
any object following :class:`Scorer`).

Dynamics (:func:`dynamics`) follow VBench's ``dynamic_degree`` (see the
function) with OpenCV DIS optical flow in place of RAFT.

Input layout.  Videos are ``[T, H, W, 3]`` RGB, float in [0, 1] or uint8.
:func:`as_video` also takes ``layout="CTHW"`` (channels first, a per-sample
model tensor) and torch tensors.  Note: ``hiar.io.codec`` ``decode`` returns
``[B, T, H, W, 3]`` in [0, 1], so one decoded sample ``decode(z)[b]`` is
already ``THWC``.

Pure library: numpy, OpenCV, torch/transformers (learned scorers only, lazily
imported); never Ray, MLflow or boto3.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import cv2
import numpy as np

__all__ = [
    "WEIGHTS_ENV",
    "DEFAULT_WEIGHTS",
    "DEFAULT_WEIGHT",
    "METRIC_FLOORS",
    "Scorer",
    "SaturationScorer",
    "SharpnessScorer",
    "PixelSimilarityScorer",
    "WeightsScorer",
    "Dinov2SimilarityScorer",
    "LpipsDistanceScorer",
    "MusiqScorer",
    "ClipIqaScorer",
    "ClipTextAlignmentScorer",
    "pixel_scorers",
    "learned_scorers",
    "scorer_weights_dir",
    "as_video",
    "from_model_output",
    "split_segments",
    "fit_slope",
    "normalise_slope",
    "degradation",
    "dynamics",
    "DriftReport",
    "drift_report",
    "aggregate",
    "plot_segments",
]

#: Environment variable naming the directory that holds learned scorers' weights.
WEIGHTS_ENV = "HIAR_SCORER_WEIGHTS"

#: Default weight of each metric in the Drift Score (the paper publishes none: equal weights).
DEFAULT_WEIGHTS: Dict[str, float] = {
    "saturation": 1.0,
    "sharpness": 1.0,
    "pixel_similarity": 1.0,
    "dinov2_similarity": 1.0,
    "lpips_distance": 1.0,
    "musiq": 1.0,
    "clip_iqa": 1.0,
}
#: Weight of a metric missing from the weight table (e.g. a user-defined scorer).
DEFAULT_WEIGHT = 1.0

#: Per-metric floor of the normalisation denominator, in the metric's own units (why: module docstring).
METRIC_FLOORS: Dict[str, float] = {
    "saturation": 0.05,  # S in [0, 1]; below 0.05 a clip is essentially grey
    "sharpness": 1e-4,  # Laplacian variance of [0, 1] gray; 1e-4 = 6.5 on the 0..255 scale: very blurry
    "pixel_similarity": 0.05,  # in [0, 1], ~0.9+ for real videos
    "dinov2_similarity": 0.05,  # cosine, ~0.9 for consecutive frames
    "lpips_distance": 0.01,  # consecutive-frame LPIPS is small (~0.05 .. 0.3)
    "musiq": 1.0,  # MUSIQ is on a 0..100 scale
    "clip_iqa": 0.05,  # probability in [0, 1]
}
_DEFAULT_FLOOR = 1e-3  # a scorer without a ``floor`` attribute and not in the table

_WORSE = ("up", "down", "both")


# --------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------


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

    Why the start: module docstring ("Segments").  Raises when a segment would
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


# --------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------


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


class SaturationScorer:
    """Mean HSV saturation of every pixel of the segment."""

    name = "saturation"
    worse = "both"
    floor = METRIC_FLOORS["saturation"]

    def available(self) -> Tuple[bool, str]:
        return True, ""

    def score_segment(self, frames: np.ndarray) -> float:
        # HSV is per pixel, so the whole segment converts as one tall image (one cv2 call).
        tall = np.ascontiguousarray(frames, dtype=np.float32).reshape(-1, frames.shape[2], 3)
        return float(cv2.cvtColor(tall, cv2.COLOR_RGB2HSV)[..., 1].mean())


class SharpnessScorer:
    """Laplacian variance of the grayscale frame, averaged over the segment's frames."""

    name = "sharpness"
    worse = "both"
    floor = METRIC_FLOORS["sharpness"]

    def available(self) -> Tuple[bool, str]:
        return True, ""

    def score_segment(self, frames: np.ndarray) -> float:
        # Per frame, not as one tall image: the Laplacian must not see the seam between two frames.
        values = []
        for frame in frames:
            gray = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.float32), cv2.COLOR_RGB2GRAY)
            values.append(float(cv2.Laplacian(gray, cv2.CV_32F).var()))
        return float(np.mean(values))


class PixelSimilarityScorer:
    """``1 - mean |f_{t+1} - f_t|`` over the segment's consecutive pairs, in [0, 1]."""

    name = "pixel_similarity"
    worse = "both"
    floor = METRIC_FLOORS["pixel_similarity"]

    def available(self) -> Tuple[bool, str]:
        return True, ""

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
    floor = _DEFAULT_FLOOR

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


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _to_model_input(frames: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray):
    """Frames -> normalised torch ``[t, 3, size, size]`` (whole frame resized, no crop: drift can be anywhere)."""
    import torch

    resized = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in frames])
    resized = (np.clip(resized, 0.0, 1.0) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(0, 3, 1, 2), dtype=np.float32))


def _mean_consecutive_cosine(features) -> float:
    import torch

    feats = torch.nn.functional.normalize(features.float(), dim=-1)
    return float((feats[1:] * feats[:-1]).sum(-1).mean())


class Dinov2SimilarityScorer(WeightsScorer):
    """Mean cosine similarity of DINOv2 CLS embeddings of consecutive frames.

    Weights: a ``transformers`` DINOv2 directory (``config.json`` + weights,
    e.g. a local copy of ``facebook/dinov2-base``) at ``<weights_dir>/dinov2``,
    loaded with ``local_files_only=True``.  Frames are resized to ``input_size``
    (a multiple of the patch size; 224 like DINOv2's evaluation) and
    ImageNet-normalised.
    """

    name = "dinov2_similarity"
    subdir = "dinov2"
    worse = "both"
    floor = METRIC_FLOORS["dinov2_similarity"]
    input_size = 224

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        patch = int(getattr(model.config, "patch_size", 14))
        size = max(patch, round(self.input_size / patch) * patch)

        def score(frames: np.ndarray) -> float:
            with torch.no_grad():
                out = model(pixel_values=_to_model_input(frames, size, _IMAGENET_MEAN, _IMAGENET_STD).to(device))
            return _mean_consecutive_cosine(out.pooler_output)

        return score


class ClipIqaScorer(WeightsScorer):
    """CLIP-IQA (Wang et al. 2023): softmax over the antonym prompts "Good photo." / "Bad photo.", mean over frames.

    Weights: a ``transformers`` CLIP directory (model + tokenizer) at
    ``<weights_dir>/clip_iqa``.  The original uses a ResNet-50 CLIP without
    positional embeddings at native resolution; a ViT CLIP here sees the frame
    resized to its ``image_size``, so values are close to, not identical with,
    the reference implementation.
    """

    name = "clip_iqa"
    subdir = "clip_iqa"
    worse = "down"
    floor = METRIC_FLOORS["clip_iqa"]
    prompts = ("Good photo.", "Bad photo.")

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokens = tokenizer(list(self.prompts), padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            text = model.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)  # some versions return an output object
            text = torch.nn.functional.normalize(text.float(), dim=-1)
        size = int(model.config.vision_config.image_size)

        def score(frames: np.ndarray) -> float:
            with torch.no_grad():
                pixels = _to_model_input(frames, size, _CLIP_MEAN, _CLIP_STD).to(device)
                image = model.get_image_features(pixel_values=pixels)
                image = getattr(image, "pooler_output", image)
                image = torch.nn.functional.normalize(image.float(), dim=-1)
                probs = (100.0 * image @ text.T).softmax(dim=-1)  # CLIP's logit scale, as in CLIP-IQA
            return float(probs[:, 0].mean())

        return score


def _import_library(module: str, metric: str):
    """``import module``, or ImportError saying which metric needs it (the scorer then reports itself skipped)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency (torchvision) failing at import time
        raise ImportError(f"the {module!r} package is not importable here ({type(exc).__name__}: {exc}); "
                          f"{metric} needs it, or pass loader=...") from exc


class LpipsDistanceScorer(WeightsScorer):
    """LPIPS distance of consecutive frames (lower = more alike), mean over the segment's pairs.

    Weights: ``<weights_dir>/lpips/lpips.pth`` = ``torch.save(lpips.LPIPS(net=...).state_dict())`` (the whole
    module, backbone included, so nothing is fetched from the torchvision model zoo) and optionally
    ``config.json`` ``{"net": "alex" | "vgg" | "squeeze", "version": "0.1"}``.  Needs the ``lpips`` package.
    """

    name = "lpips_distance"
    subdir = "lpips"
    worse = "both"
    floor = METRIC_FLOORS["lpips_distance"]

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import json

        import torch

        lpips = _import_library("lpips", self.name)
        conf = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        state_file = path / "lpips.pth"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} (a state_dict of lpips.LPIPS) is missing")
        # pretrained=False, pnet_rand=True: build the architecture only -- no download of any kind
        model = lpips.LPIPS(net=conf.get("net", "alex"), version=conf.get("version", "0.1"), pretrained=False,
                            pnet_rand=True, verbose=False)
        model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        model = model.to(device).eval()

        def score(frames: np.ndarray) -> float:
            x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)) * 2.0 - 1.0
            with torch.no_grad():
                return float(model(x[1:].to(device), x[:-1].to(device)).mean())

        return score


class MusiqScorer(WeightsScorer):
    """MUSIQ image quality (0..100), mean over frames.

    Weights: exactly one pyiqa MUSIQ checkpoint ``<weights_dir>/musiq/*.pth`` (pyiqa's own release format, e.g.
    ``musiq_koniq_ckpt-*.pth``), loaded with ``pretrained_model_path`` so pyiqa downloads nothing.  Needs the
    ``pyiqa`` package.
    """

    name = "musiq"
    subdir = "musiq"
    worse = "down"
    floor = METRIC_FLOORS["musiq"]

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray], float]:
        import torch

        _import_library("pyiqa", self.name)
        from pyiqa.archs.musiq_arch import MUSIQ

        ckpts = sorted(path.glob("*.pth"))
        if len(ckpts) != 1:
            raise FileNotFoundError(f"expected exactly one pyiqa MUSIQ checkpoint (*.pth) in {path}, found "
                                    f"{[c.name for c in ckpts]}")
        model = MUSIQ(pretrained_model_path=str(ckpts[0])).to(device).eval()

        def score(frames: np.ndarray) -> float:
            x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32))
            with torch.no_grad():
                return float(model(x.to(device)).mean())

        return score


def _clip_normalisation(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``image_mean`` / ``image_std`` of a saved image processor, else CLIP's: ``preprocessor_config.json`` (an
    image processor's ``save_pretrained``) or ``processor_config.json``'s ``image_processor`` (a ``CLIPProcessor``'s,
    transformers >= 5).  Read as JSON: the processor class itself would need torchvision."""
    import json

    conf: Dict[str, Any] = {}
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if (path / name).is_file():
            data = json.loads((path / name).read_text())
            conf = data.get(key, {}) if key else data
            if "image_mean" in conf:
                break
    mean = np.asarray(conf.get("image_mean", _CLIP_MEAN), dtype=np.float32)
    std = np.asarray(conf.get("image_std", _CLIP_STD), dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f"{path}: image_mean / image_std must be 3 values (std > 0)")
    return mean, std


class ClipTextAlignmentScorer(WeightsScorer):
    """Text-video alignment: mean cosine similarity of the prompt's CLIP text embedding and the frames' image
    embeddings (in [-1, 1], higher is better), per segment.

    Weights: a ``transformers`` ``CLIPModel`` plus its tokenizer at ``<weights_dir>/clip`` (``save_pretrained``
    of both, or of a ``CLIPProcessor``, whose ``image_mean`` / ``image_std`` are then used), loaded with
    ``local_files_only=True``.  Frames are resized whole to the vision tower's ``image_size`` (no crop: drift can
    be anywhere); prompts longer than the text tower's positions are truncated.  Needs the prompt, so it is
    scored through :meth:`score_prompt_segment` (``needs_prompt``), and it is not a drift metric: its values go to
    ``DriftReport.alignment``, never into the Drift Score.
    """

    name = "clip_text"
    subdir = "clip"
    worse = "down"
    floor = 0.05
    needs_prompt = True

    def default_loader(self, path: Path, device: str) -> Callable[[np.ndarray, str], float]:
        import torch
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        mean, std = _clip_normalisation(path)
        size = int(model.config.vision_config.image_size)
        max_length = int(model.config.text_config.max_position_embeddings)
        texts: Dict[str, Any] = {}

        def text_embedding(prompt: str):
            if prompt not in texts:
                tokens = tokenizer([prompt], padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt").to(device)
                with torch.no_grad():
                    text = model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens.get("attention_mask"))
                text = getattr(text, "pooler_output", text)  # some versions return an output object
                texts[prompt] = torch.nn.functional.normalize(text.float(), dim=-1)[0]
            return texts[prompt]

        def score(frames: np.ndarray, prompt: str) -> float:
            text = text_embedding(prompt)
            with torch.no_grad():
                image = model.get_image_features(pixel_values=_to_model_input(frames, size, mean, std).to(device))
                image = getattr(image, "pooler_output", image)
                image = torch.nn.functional.normalize(image.float(), dim=-1)
            return float((image @ text).mean())

        return score

    def score_segment(self, frames: np.ndarray) -> float:
        raise TypeError(f"{self.name} needs the prompt: call score_prompt_segment(frames, prompt)")

    def score_prompt_segment(self, frames: np.ndarray, prompt: str) -> float:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(f"{self.name} is not available: {reason}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{self.name} needs a non-empty prompt, got {prompt!r}")
        assert self._fn is not None
        return float(self._fn(frames, prompt))


def learned_scorers(weights_dir: Optional[os.PathLike | str] = None, device: str = "cpu") -> List[Scorer]:
    """The paper's four learned metrics plus the text-video alignment (``clip_text``), each looking for its weights
    under ``weights_dir`` (or ``$HIAR_SCORER_WEIGHTS``)."""
    return [
        cls(weights_dir, device)
        for cls in (Dinov2SimilarityScorer, LpipsDistanceScorer, MusiqScorer, ClipIqaScorer, ClipTextAlignmentScorer)
    ]


# --------------------------------------------------------------------------
# Slopes and the Drift Score
# --------------------------------------------------------------------------


def fit_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index ``0 .. n-1`` (closed form)."""
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2:
        raise ValueError(f"need >= 2 values for a slope, got {y.size}")
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2.0
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def normalise_slope(slope: float, first: float, floor: float) -> float:
    """Relative change per segment: ``slope / max(|first|, floor)``."""
    return float(slope / max(abs(float(first)), float(floor)))


def degradation(normalised: float, worse: str) -> float:
    """A normalised slope oriented so that it is >= 0 and larger = more drift (rules: module docstring)."""
    if worse == "both":
        return abs(normalised)
    if worse == "down":
        return max(0.0, -normalised)
    if worse == "up":
        return max(0.0, normalised)
    raise ValueError(f"worse must be one of {_WORSE}, got {worse!r}")


def _floor_of(scorer: Scorer) -> float:
    return float(getattr(scorer, "floor", METRIC_FLOORS.get(scorer.name, _DEFAULT_FLOOR)))


def _worse_of(scorer: Scorer) -> str:
    worse = getattr(scorer, "worse", "both")
    if worse not in _WORSE:
        raise ValueError(f"scorer {scorer.name!r}: worse must be one of {_WORSE}, got {worse!r}")
    return worse


def _resolve_weights(names: Sequence[str], weights: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """Weights of the computed metrics, renormalised to sum to 1 (so skipped metrics drop out, not count as 0)."""
    table = {**DEFAULT_WEIGHTS, **(weights or {})}
    raw = {n: float(table.get(n, DEFAULT_WEIGHT)) for n in names}
    if any(w < 0 or not math.isfinite(w) for w in raw.values()):
        raise ValueError(f"weights must be finite and >= 0, got {raw}")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"the computed metrics {list(names)} have zero total weight")
    return {n: w / total for n, w in raw.items()}


# --------------------------------------------------------------------------
# Dynamics (VBench dynamic degree)
# --------------------------------------------------------------------------

_FLOW_MIN_SIDE = 128  # frames with a shorter side are upscaled to at least this before flow


def _gray_u8(frame: np.ndarray, scale: int) -> np.ndarray:
    gray = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.float32), cv2.COLOR_RGB2GRAY)
    if scale > 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)


def _top5_mean(flow: np.ndarray) -> float:
    """Mean of the largest 5 % flow magnitudes (VBench ``get_score``); at least one pixel."""
    mag = np.sqrt((flow.astype(np.float64) ** 2).sum(axis=-1)).ravel()
    k = max(1, int(mag.size * 0.05))
    return float(np.partition(mag, mag.size - k)[mag.size - k :].mean())


def dynamics(video: Any, fps: float, *, layout: str = "THWC") -> Dict[str, Any]:
    """VBench's dynamic-degree rule with OpenCV DIS optical flow.

    VBench (``vbench/dynamic_degree.py``, Vchitect/VBench): keep every
    ``interval = max(1, round(fps / 8))``-th frame (~8 fps); per consecutive
    pair of kept frames, score = mean of the top 5 % optical-flow magnitudes
    (``cut_index = int(h * w * 0.05)``); ``thres = max(1, 8 / fps) * 6.0 *
    min(H, W) / 256`` (the first factor raises the bar for clips below 8 fps,
    whose per-pair motion is larger); ``count_num = round(4 * n_kept / 16)``
    (Python's round); a video moves when ``count(score > thres) >=
    count_num``.

    Differences, and why:

    * Flow is DIS (``cv2.DISOpticalFlow``, medium preset) on grayscale instead
      of RAFT on RGB: no learned weights.  Edges of equal luminance are
      invisible to it; on the tiny world's palette every shape differs from
      its background in luminance.
    * Frames with ``min(H, W) < 128`` are upscaled by an integer factor ``s``
      (bilinear) first: DIS works on 8x8 patches over a pyramid and returns
      nothing useful on 16x16 frames.  Magnitudes are divided by ``s`` again,
      so magnitudes and threshold are both in *native* pixels and the
      comparison is unchanged by the upscale (the threshold at 16x16 is 0.375
      px, below the world's 1 px/frame "slowly").
    * ``count_num`` is at least 1: VBench's ``round(4 * 2 / 16) = 0`` would
      call every two-frame clip dynamic without looking at it.

    Returns a dict: ``dynamic`` (bool, VBench's per-video verdict),
    ``dynamic_degree`` (fraction of pairs over the threshold, in [0, 1]: a
    continuous version for averaging), ``count``, ``count_required``,
    ``num_pairs``, ``threshold`` (native px), ``magnitude_mean`` /
    ``_median`` / ``_min`` / ``_max`` of the per-pair scores (native px),
    ``pair_magnitudes`` (list), ``sample_interval`` and ``upscale``.
    """
    frames = as_video(video, layout=layout)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    interval = max(1, round(fps / 8.0))
    kept = frames[::interval]
    if kept.shape[0] < 2:
        raise ValueError(f"need >= 2 frames after sampling every {interval}th, got {kept.shape[0]}")
    height, width = frames.shape[1:3]
    scale = max(1, math.ceil(_FLOW_MIN_SIDE / min(height, width)))
    threshold = max(1.0, 8.0 / fps) * 6.0 * (min(height, width) / 256.0)
    count_required = max(1, round(4 * (kept.shape[0] / 16.0)))

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grays = [_gray_u8(f, scale) for f in kept]
    scores = [_top5_mean(dis.calc(a, b, None)) / scale for a, b in zip(grays[:-1], grays[1:])]
    count = sum(s > threshold for s in scores)
    return {
        "dynamic": bool(count >= count_required),
        "dynamic_degree": count / len(scores),
        "count": int(count),
        "count_required": int(count_required),
        "num_pairs": len(scores),
        "threshold": float(threshold),
        "magnitude_mean": float(np.mean(scores)),
        "magnitude_median": float(np.median(scores)),
        "magnitude_min": float(np.min(scores)),
        "magnitude_max": float(np.max(scores)),
        "pair_magnitudes": [float(s) for s in scores],
        "sample_interval": int(interval),
        "upscale": int(scale),
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class DriftReport:
    """Drift suite result for one video (or, from :func:`aggregate`, the mean over several).

    ``per_segment[m]`` are the segment values, ``slopes[m]`` their
    least-squares slope per segment, ``normalised_slopes[m]`` the relative
    slope (signed: the actual direction), ``degradation[m]`` the oriented
    version that enters the score (>= 0), ``weights[m]`` the renormalised
    weight used.  ``skipped[m]`` is the reason a metric was not computed; such
    metrics appear in no other field.  In an aggregate, ``dynamics["dynamic"]``
    is the fraction of dynamic videos (VBench's dynamic-degree score of a set).
    ``alignment[m]`` are the per-segment values of a prompt scorer (``clip_text``:
    text-video alignment, higher is better): reported, not part of the Drift Score.
    """

    per_segment: Dict[str, List[float]]
    slopes: Dict[str, float]
    normalised_slopes: Dict[str, float]
    degradation: Dict[str, float]
    weights: Dict[str, float]
    drift_score: float
    skipped: Dict[str, str] = field(default_factory=dict)
    dynamics: Dict[str, Any] = field(default_factory=dict)
    segments: int = 5
    num_videos: int = 1
    alignment: Dict[str, List[float]] = field(default_factory=dict)

    def to_metrics(self) -> Dict[str, float]:
        """Flat ``{key: float}`` for ``mlflow.log_metrics``; skipped metrics are absent, never 0 or NaN."""
        out: Dict[str, float] = {
            "drift/score": float(self.drift_score),
            "drift/num_metrics": float(len(self.slopes)),
        }
        for m, values in self.per_segment.items():
            out[f"drift/{m}_slope"] = float(self.slopes[m])
            out[f"drift/{m}_slope_norm"] = float(self.normalised_slopes[m])
            out[f"drift/{m}_degradation"] = float(self.degradation[m])
            for k, v in enumerate(values):
                out[f"drift/{m}_seg{k}"] = float(v)
        for key, value in self.dynamics.items():
            if isinstance(value, (bool, int, float, np.integer, np.floating)):
                out[f"dynamics/{key}"] = float(value)
        for m, values in self.alignment.items():
            out[f"alignment/{m}"] = float(np.mean(values))
            out[f"alignment/{m}_slope"] = fit_slope(values)
            for k, v in enumerate(values):
                out[f"alignment/{m}_seg{k}"] = float(v)
        return out


def _resolve_scorers(scorers: Optional[Sequence[Scorer]], weights_dir: Optional[os.PathLike | str]) -> List[Scorer]:
    """Pixel scorers plus ``scorers`` (default: the learned registry); a later scorer replaces an earlier one of the same name."""
    extra = learned_scorers(weights_dir) if scorers is None else list(scorers)
    by_name: Dict[str, Scorer] = {}
    for s in pixel_scorers() + extra:
        by_name[s.name] = s
    return list(by_name.values())


def _score_segments(scorer: Scorer, segs: Sequence[np.ndarray],
                    prompt: Optional[str] = None) -> Tuple[Optional[List[float]], str]:
    """Per-segment values, or ``(None, reason)`` when the scorer is unavailable, needs a prompt that was not given,
    or returns a non-finite value."""
    ok, reason = scorer.available()
    if not ok:
        return None, reason or "not available"
    needs_prompt = bool(getattr(scorer, "needs_prompt", False))
    if needs_prompt and not prompt:
        return None, "needs the prompt (drift_report(..., prompt=...))"
    values = []
    for k, seg in enumerate(segs):
        v = float(scorer.score_prompt_segment(seg, prompt) if needs_prompt else scorer.score_segment(seg))
        if not math.isfinite(v):
            return None, f"returned a non-finite value ({v}) on segment {k}"
        values.append(v)
    return values, ""


def drift_report(
    video: Any,
    fps: float,
    segments: int = 5,
    scorers: Optional[Sequence[Scorer]] = None,
    weights: Optional[Mapping[str, float]] = None,
    *,
    layout: str = "THWC",
    weights_dir: Optional[os.PathLike | str] = None,
    prompt: Optional[str] = None,
) -> DriftReport:
    """Drift suite + dynamics of one video.

    Args:
        video: ``[T, H, W, 3]`` uint8 or float in [0, 1] (or ``layout="CTHW"``).
        fps: frames per second of ``video`` (for the dynamics' 8 fps sampling).
        segments: number of equal temporal segments (paper: 5).
        scorers: metrics besides the three pixel ones; None = the four learned
            ones (:func:`learned_scorers` with ``weights_dir``), ``[]`` = pixel
            metrics only.  A scorer named like a built-in replaces it.
        weights: per-metric weights overriding :data:`DEFAULT_WEIGHTS`.
        prompt: the video's prompt, for scorers with ``needs_prompt`` (text-video
            alignment, ``clip_text``): their per-segment values go to
            ``DriftReport.alignment``, not into the Drift Score; without a prompt
            they are skipped.
    """
    frames = as_video(video, layout=layout)
    segs = split_segments(frames, segments)
    per_segment: Dict[str, List[float]] = {}
    alignment: Dict[str, List[float]] = {}
    skipped: Dict[str, str] = {}
    orient: Dict[str, Tuple[str, float]] = {}
    for scorer in _resolve_scorers(scorers, weights_dir):
        values, reason = _score_segments(scorer, segs, prompt)
        if values is None:
            skipped[scorer.name] = reason
        elif getattr(scorer, "needs_prompt", False):
            alignment[scorer.name] = values
        else:
            per_segment[scorer.name] = values
            orient[scorer.name] = (_worse_of(scorer), _floor_of(scorer))

    slopes = {m: fit_slope(v) for m, v in per_segment.items()}
    normalised = {m: normalise_slope(slopes[m], per_segment[m][0], orient[m][1]) for m in per_segment}
    degr = {m: degradation(normalised[m], orient[m][0]) for m in per_segment}
    w = _resolve_weights(list(per_segment), weights)
    return DriftReport(
        per_segment=per_segment,
        slopes=slopes,
        normalised_slopes=normalised,
        degradation=degr,
        weights=w,
        drift_score=float(sum(w[m] * degr[m] for m in per_segment)),
        skipped=skipped,
        dynamics=dynamics(frames, fps),
        segments=int(segments),
        alignment=alignment,
    )


def _mean_over(dicts: Sequence[Mapping[str, Any]], key: str) -> Any:
    values = [d[key] for d in dicts if key in d]
    if isinstance(values[0], list):
        return np.mean(np.asarray(values, dtype=np.float64), axis=0).tolist()
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def aggregate(reports: Sequence[DriftReport]) -> DriftReport:
    """Mean over videos: every field is the mean over the reports that computed it.

    ``drift_score`` is the mean of the per-video scores (not the score of the
    mean slopes: orientation takes absolute values, so those differ).  A
    metric is skipped only if every report skipped it.  Dynamics: scalar
    fields are averaged, so ``dynamic`` becomes the fraction of dynamic videos;
    the per-pair list is dropped (lengths may differ).
    """
    if not reports:
        raise ValueError("aggregate needs at least one report")
    if len({r.segments for r in reports}) != 1:
        raise ValueError(f"reports have different segment counts: {sorted({r.segments for r in reports})}")
    names = list(dict.fromkeys(m for r in reports for m in r.per_segment))
    fields = ("per_segment", "slopes", "normalised_slopes", "degradation", "weights")
    merged = {f: {m: _mean_over([getattr(r, f) for r in reports], m) for m in names} for f in fields}
    aligned = list(dict.fromkeys(m for r in reports for m in r.alignment))
    alignment = {m: _mean_over([r.alignment for r in reports], m) for m in aligned}
    skipped = {m: why for r in reports for m, why in r.skipped.items() if m not in names and m not in aligned}
    dyn_keys = [k for k, v in reports[0].dynamics.items() if not isinstance(v, list)]
    dyn = {k: _mean_over([r.dynamics for r in reports], k) for k in dyn_keys}
    return DriftReport(
        **merged,
        drift_score=float(np.mean([r.drift_score for r in reports])),
        skipped=skipped,
        dynamics=dyn,
        segments=reports[0].segments,
        num_videos=sum(r.num_videos for r in reports),
        alignment=alignment,
    )


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------


def plot_segments(reports_by_label: Mapping[str, DriftReport], path: os.PathLike | str, backend: str = "auto") -> Path:
    """PNG of per-segment curves: one panel per metric, one line per label (legend shows each drift score).

    ``backend``: ``"matplotlib"``, ``"cv2"`` or ``"auto"`` (matplotlib when
    importable -- it is not a declared dependency -- else OpenCV drawing).
    """
    if not reports_by_label:
        raise ValueError("nothing to plot")
    if backend not in ("auto", "matplotlib", "cv2"):
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'cv2', got {backend!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # alignment curves (e.g. alignment/clip_text) get panels too: their drift over the rollout is the point
    reports_by_label = {label: replace(r, per_segment={**r.per_segment, **{f"alignment/{m}": v for m, v in
                                                                          r.alignment.items()}})
                        for label, r in reports_by_label.items()}
    metrics = list(dict.fromkeys(m for r in reports_by_label.values() for m in r.per_segment))
    if backend in ("auto", "matplotlib"):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            _plot_matplotlib(reports_by_label, metrics, path, Figure, FigureCanvasAgg)
            return path
    _plot_cv2(reports_by_label, metrics, path)
    return path


def _grid(n: int) -> Tuple[int, int]:
    cols = min(3, n)
    return -(-n // cols), cols


def _plot_matplotlib(reports, metrics, path: Path, Figure, FigureCanvasAgg) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    rows, cols = _grid(len(metrics))
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, rep in reports.items():
            if m in rep.per_segment:
                vals = rep.per_segment[m]
                ax.plot(range(1, len(vals) + 1), vals, marker="o", label=f"{label} (drift {rep.drift_score:.3f})")
        ax.set_title(m)
        ax.set_xlabel("segment")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


_CV2_COLORS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]  # BGR


def _plot_cv2(reports, metrics, path: Path) -> None:
    pw, ph, pad = 320, 220, 30
    rows, cols = _grid(len(metrics))
    legend_h = 18 * len(reports) + 10
    img = np.full((rows * ph + legend_h, cols * pw, 3), 255, np.uint8)
    for i, m in enumerate(metrics):
        x0, y0 = (i % cols) * pw, (i // cols) * ph
        cv2.rectangle(img, (x0 + pad, y0 + pad), (x0 + pw - 10, y0 + ph - pad), (0, 0, 0), 1)
        cv2.putText(img, m, (x0 + pad, y0 + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        series = [r.per_segment[m] for r in reports.values() if m in r.per_segment]
        lo = min(min(s) for s in series)
        hi = max(max(s) for s in series)
        span = hi - lo if hi > lo else 1.0
        for j, rep in enumerate(reports.values()):
            if m not in rep.per_segment:
                continue
            vals = rep.per_segment[m]
            xs = np.linspace(x0 + pad + 5, x0 + pw - 15, len(vals))
            ys = y0 + ph - pad - 5 - (np.asarray(vals) - lo) / span * (ph - 2 * pad - 10)
            pts = np.stack([xs, ys], axis=1).round().astype(np.int32)
            cv2.polylines(img, [pts], False, _CV2_COLORS[j % len(_CV2_COLORS)], 2, cv2.LINE_AA)
        cv2.putText(img, f"{lo:.3g} .. {hi:.3g}", (x0 + pad, y0 + ph - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for j, (label, rep) in enumerate(reports.items()):
        y = rows * ph + 15 + 18 * j
        color = _CV2_COLORS[j % len(_CV2_COLORS)]
        cv2.line(img, (10, y - 4), (40, y - 4), color, 2)
        text = f"{label} (drift {rep.drift_score:.3f})"
        cv2.putText(img, text, (48, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
