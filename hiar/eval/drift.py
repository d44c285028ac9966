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
  ``hiar.eval.scorers.METRIC_FLOORS``, or a scorer's ``floor``): a value below which
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

The metrics are scorers (``hiar.eval.scorers``: the :class:`~hiar.eval.scorers.Scorer` protocol and the three
weight-free pixel metrics, always computed; ``hiar.eval.learned``: DINOv2, LPIPS, MUSIQ, CLIP-IQA and the
text-video alignment ``clip_text``, from local or ``s3://`` weights, listed in ``DriftReport.skipped`` with the
reason when they cannot run, never reported as 0 or NaN).  ``clip_text`` needs the prompt and is not a drift
metric: its per-segment values are in ``DriftReport.alignment`` (metrics ``alignment/clip_text``, the mean,
``alignment/clip_text_slope`` and ``alignment/clip_text_seg<k>``) and never enter the Drift Score;
:func:`drift_report` computes it only when given ``prompt=``.  Dynamics (``hiar.eval.dynamics``) follow VBench's
``dynamic_degree``; inputs are read by ``hiar.eval.frames``; ``hiar.eval.plots`` draws reports.

Pure library: numpy, OpenCV, torch/transformers (learned scorers only, lazily imported); never Ray, MLflow or boto3.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hiar.eval.dynamics import dynamics
from hiar.eval.frames import as_video, split_segments
from hiar.eval.learned import learned_scorers
from hiar.eval.scorers import WORSE, Scorer, floor_of, pixel_scorers, worse_of

__all__ = [
    "DEFAULT_WEIGHTS",
    "DEFAULT_WEIGHT",
    "fit_slope",
    "normalise_slope",
    "degradation",
    "DriftReport",
    "drift_report",
    "aggregate",
]

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
    raise ValueError(f"worse must be one of {WORSE}, got {worse!r}")


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
            orient[scorer.name] = (worse_of(scorer), floor_of(scorer))

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

