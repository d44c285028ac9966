"""Summary statistics of an evaluation: the per-sample table, each mean with its standard error, the text table.

Plain Python and NumPy (no Ray, no MLflow). The input is the evaluation actors' rows (``hiar.platform.evaluation``):
one row per (prompt, seed) item with ``index``, ``prompt``, ``seed``, ``result`` (JSON: per mode the item's
``DriftReport`` as a dict and, for the tiny world, its oracle scores) and ``frames`` (an ``.npz`` of uint8 frames
per mode for the sample videos, else empty).
"""

from __future__ import annotations

import io
import json

#: The evaluation's headline question, HiAR against the block-first baseline, asked of the per-sample table: each
#: (prompt, seed) sample is rolled out in both modes, so the difference is paired and its noise is that of the
#: paired differences (far less than the two means' standard errors suggest when prompts differ in difficulty)
CONTRAST_MODES = ("hierarchical", "block_first")
CONTRAST_KEYS = ("drift/score", "oracle/caption_consistency")
SEPARATED_SE = 2.0  # a contrast is reported as separated beyond this many standard errors of the paired difference
NOT_MEANS = ("drift/num_metrics",)  # per-sample values that are counts, reported as such: no standard error
SUMMARY_KEYS = ("drift/score", "drift/num_metrics", "drift/saturation_slope", "drift/sharpness_slope",
                "drift/pixel_similarity_slope", "dynamics/dynamic_degree", "dynamics/magnitude_mean",
                "alignment/clip_text", "oracle/caption_consistency", "oracle/motion_accuracy")


def sample_values(rows: list[dict], modes: list[str]) -> dict:
    """The per-sample table (``hiar.eval.gate.SampleTable``) of actor rows: ``{"keys": [[prompt, seed], ...],
    "values": {"<mode>/<metric>": [value or None per sample]}}`` in item order, each sample's metrics as
    ``DriftReport.to_metrics`` of its own report plus its oracle scores."""
    from hiar.eval.drift import DriftReport

    rows = sorted(rows, key=lambda r: int(r["index"]))
    per: list[dict] = []
    for r in rows:
        result = json.loads(r["result"])
        one: dict = {}
        for mode in modes:
            one.update({f"{mode}/{k}": float(v) for k, v in DriftReport(**result[mode]["report"]).to_metrics().items()})
            one.update({f"{mode}/oracle/{k}": float(v) for k, v in result[mode].get("oracle", {}).items()})
        per.append(one)
    names = list(dict.fromkeys(k for one in per for k in one))
    return {"keys": [[str(r["prompt"]), int(r["seed"])] for r in rows],
            "values": {k: [one.get(k) for one in per] for k in names}}


def standard_errors(metrics: dict, table: dict) -> dict:
    """``<key>_se`` (n >= 2) for every metric of ``metrics`` that is a mean of ``table``'s per-sample values, and
    ``<key>_n`` where fewer samples than the table's had a value."""
    from hiar.eval.gate import mean_se

    out: dict[str, float] = {}
    for key, values in table["values"].items():
        if key not in metrics or key.split("/", 1)[-1] in NOT_MEANS:
            continue
        _, se, n = mean_se([v for v in values if v is not None])
        if n >= 2:
            out[f"{key}_se"] = se
        if n < len(values):
            out[f"{key}_n"] = float(n)
    return out


def mode_contrast(table: dict) -> dict:
    """``contrast/<key>`` (the mean over samples of hierarchical minus block-first, paired by sample), with its
    ``_se`` and ``_pairs`` (how many samples were paired), for each key of :data:`CONTRAST_KEYS` that both modes
    of ``table`` have on two or more samples."""
    from hiar.eval.gate import paired_difference

    a, b = CONTRAST_MODES
    out: dict[str, float] = {}
    for key in CONTRAST_KEYS:
        x, y = table["values"].get(f"{a}/{key}"), table["values"].get(f"{b}/{key}")
        if x is None or y is None:
            continue
        pairs = [(p, q) for p, q in zip(x, y) if p is not None and q is not None]
        if len(pairs) >= 2:  # "higher": the difference is hierarchical minus block-first, as the gate orients it
            out[f"contrast/{key}"], out[f"contrast/{key}_se"], n = paired_difference(
                [p for p, _ in pairs], [q for _, q in pairs], "higher")
            out[f"contrast/{key}_pairs"] = float(n)
    return out


def contrast(metrics: dict, key: str = "drift/score") -> tuple[float, float, int, bool] | None:
    """``(difference, standard error, n, separated)`` of ``contrast/<key>`` in ``metrics`` (None without it):
    separated when the difference is further from zero than :data:`SEPARATED_SE` standard errors."""
    if f"contrast/{key}" not in metrics:
        return None
    d, se, n = metrics[f"contrast/{key}"], metrics[f"contrast/{key}_se"], int(metrics[f"contrast/{key}_pairs"])
    return d, se, n, abs(d) > SEPARATED_SE * se


def contrast_text(metrics: dict, key: str = "drift/score") -> str | None:
    """The :func:`contrast` of ``key`` in one line, saying so when the modes are not told apart."""
    c = contrast(metrics, key)
    if c is None:
        return None
    d, se, n, separated = c
    verdict = (f"separated (> {SEPARATED_SE:g} SE)" if separated else
               f"NOT separated (within {SEPARATED_SE:g} SE): at n = {n} the two modes are not told apart")
    return f"hierarchical - block_first {key}: {d:+.4g} ± {se:.2g} (paired, n = {n}), {verdict}"


def summarize(rows: list[dict], modes: list[str]) -> tuple[dict, dict, dict, dict]:
    """``(metrics, aggregated DriftReport per mode, sample frames per mode [N, T, H, W, 3] uint8, per-sample table)``
    from actor rows; ``metrics`` holds each mean's standard error (:func:`standard_errors`)."""
    import numpy as np

    from hiar.eval.drift import DriftReport, aggregate

    rows = sorted(rows, key=lambda r: int(r["index"]))
    parsed = [json.loads(r["result"]) for r in rows]
    metrics: dict[str, float] = {}
    reports: dict = {}
    for mode in modes:
        reps = [DriftReport(**p[mode]["report"]) for p in parsed]
        reports[mode] = aggregate(reps)
        metrics.update({f"{mode}/{k}": float(v) for k, v in reports[mode].to_metrics().items()})
        oracles = [p[mode]["oracle"] for p in parsed if "oracle" in p[mode]]
        if oracles:
            for key in oracles[0]:
                metrics[f"{mode}/oracle/{key}"] = float(np.mean([o[key] for o in oracles]))
    samples: dict = {mode: [] for mode in modes}
    for r in rows:
        blob = r["frames"]
        if blob:
            with np.load(io.BytesIO(bytes(blob))) as z:
                for mode in modes:
                    if mode in z:
                        samples[mode].append(z[mode])
    samples = {m: np.stack(v) for m, v in samples.items() if v}
    table = sample_values(rows, modes)
    metrics.update(standard_errors(metrics, table))
    metrics.update(mode_contrast(table))
    metrics["eval/num_videos"] = float(len(rows))
    return metrics, reports, samples, table


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "-"
    se = metrics.get(f"{key}_se")
    return f"{metrics[key]:.5g}" + (f" ± {se:.2g}" if se is not None else "")


def summary_table(metrics: dict, modes: list[str]) -> str:
    """Means (± standard error over the samples) of the headline metrics, one column per mode."""
    keys = [k for k in SUMMARY_KEYS if any(f"{m}/{k}" in metrics for m in modes)]
    width = max(len(k) for k in keys) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{m:>24}" for m in modes)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{_cell(metrics, f'{m}/{k}'):>24}" for m in modes))
    lines.append(f"(mean ± standard error over n = {metrics.get('eval/num_videos', 0):g} (prompt, seed) samples)")
    lines += [t for t in (contrast_text(metrics, k) for k in CONTRAST_KEYS) if t]
    return "\n".join(lines)
