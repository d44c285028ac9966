"""Plots of drift reports: per-segment curves, one panel per metric, one line per label; matplotlib when it is
importable (not a declared dependency), else OpenCV drawing."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Tuple

import cv2
import numpy as np

from hiar.eval.drift import DriftReport

__all__ = ["plot_segments"]


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
