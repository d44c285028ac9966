"""The promotion gate and the champion history: pure functions, no MLflow (``hiar/jobs/promote.py`` records them).

Gate (DESIGN §5, issues 6 and 22).  A challenger replaces the champion only when, on the *same* held-out prompts,
seeds and horizon, for the gated rollout mode (``registry.gate_rollout``, default ``hierarchical``), the checks
named in ``registry.gate_metrics`` (the preset decides; names from :data:`GATE_CHECKS`) show that it is **not
worse** on any of them **and better, beyond noise, on at least one**:

* **drift** -- Drift Score (lower is better), tolerated degradation ``max_drift_increase``;
* **dynamics** -- dynamic degree (higher is better: the low-motion shortcut shows up as a drop), tolerated
  degradation ``max_dynamics_drop``;
* **quality** -- the tiny world's oracle caption consistency (higher is better), ``max_quality_drop``.  The
  oracle exists for the ``tiny`` preset only;
* **alignment** -- text-video alignment, the mean CLIP cosine similarity of prompt and frames
  (``alignment/clip_text``, higher is better, :class:`hiar.eval.drift.ClipTextAlignmentScorer`), ``max_alignment_drop``;
* **dinov2**, **lpips**, **clip_iqa**, **musiq** -- one learned drift scorer's degradation (its oriented,
  normalised slope, ``drift/<metric>_degradation``, lower is better; the Drift Score already averages them),
  ``max_degradation_increase``.

Paired.  Every metric above is a mean over the evaluation's (prompt, seed) samples, and both evaluations ran the
same samples, so the gate compares them sample by sample: the inputs are the evaluations' per-sample tables
(:data:`SampleTable`, ``per_sample.json`` of an evaluation run, written by ``hiar/jobs/evaluate.py``), matched by
(prompt, seed) -- different sample keys (another prompt set, other seeds, a duplicate key) are an error, not a
decision.  For each check ``d_i = s * (challenger_i - champion_i)`` with ``s = +1`` when higher is better and
``-1`` when lower is better, so ``d_i > 0`` means the challenger did better on sample ``i``; the check reports
``diff = mean(d)``, its standard error ``se = stdev(d) / sqrt(n)`` (sample standard deviation, ``n - 1`` in the
denominator) and ``n``.  Pairing removes what the two evaluations share (a hard prompt is hard for both), so the
noise left is the model difference's own: the same ``n`` tells much smaller differences apart than comparing the
two means' separate errors would.  ``diff`` equals the difference of the two means, so the tolerances below keep
their old meaning.

* **Not worse** (``Check.passed``): ``diff >= -margin``, the margin being the check's tolerated degradation in
  the metric's own units (``registry.max_*``, 0 for no degradation at all; dynamics tolerates 0.05 by default).
  The margins keep their meaning from before pairing and stay: they say how much degradation is acceptable, which
  noise cannot say.  This is judged on ``diff`` itself, not on ``diff`` plus some standard errors: a check that
  got worse on average by more than its tolerance fails even when the drop is within noise -- the champion keeps
  the benefit of the doubt.  The price: with a tolerance of 0 a check on which the challenger is truly equal
  comes out below the champion's about half the time and fails, so a challenger better on one check and equal
  on another is promoted at most about half the time (``tests/unit/eval/test_gate.py`` measures it); give each check the
  degradation you accept (a few of its standard errors) when that matters.  A non-finite value fails its check
  (a broken evaluation is never promoted).
* **Improved** (``Check.improved``): ``diff > gate_margin_se * se`` (``registry.gate_margin_se``) with ``n >= 2``
  (one sample has no standard error and can never show an improvement), on a check that is not worse (a failed
  check never counts as improved).  With ``se = 0`` (every sample moved by exactly the same amount) any
  ``diff > 0`` counts.
* **Promoted** when every check is not worse and at least one (any gated, compared check: drift, dynamics,
  quality, alignment or a learned scorer) improved.  A challenger of the same true quality as the champion is
  therefore not promoted (barring a rare excursion beyond noise, below): its differences sit within noise and
  the reason says ``gate failed: within noise``.
  ``registry.gate_require_improvement: false`` drops the second condition (promote what is merely not worse: a
  challenger wanted for another reason, a smaller or faster model); never the default.

Default ``gate_margin_se = 3``.  With the default evaluation (8 prompts x 1 seed: ``se`` itself is estimated from
8 differences, so Student-t tails with 7 degrees of freedom, not the normal's) and the tiny preset's three gated
checks, two simulated students of equal quality are promoted about 5 % of the time at 2 standard errors and about
1 % at 3 (``tests/unit/eval/test_gate.py``: 4.8 % and 0.95 % of 2000 simulated pairs); any of the checks may carry the
improvement, which is why the per-check bar sits above the usual 2.  Promoting an equal model churns the champion
for nothing, so the default is 3; more prompts or seeds (``eval.num_prompts``, ``eval.seeds``) shrink ``se`` and
are the way to detect smaller improvements, not a lower margin.

``drift`` and ``dynamics`` are always gated (:data:`REQUIRED`: a list without them is an error) and their metrics
must be in both evaluations.  Every other check rests on a scorer that may be absent (learned weights not
given, no oracle for the preset): when its metric is in *neither* evaluation the check is listed in
``GateResult.skipped`` with the reason and does not gate -- never compared as 0.  A metric in one evaluation
only, missing on some samples of one side only (its scorer failed on them), or Drift Scores computed over
different metric sets (``drift/num_metrics`` of a pair differs; the score is a mean over the computed metrics, so
the two would not be comparable), is an error, not a decision.  Samples where *both* sides lack a metric are left
out of that check's pairs (its ``n`` says how many remain).

History.  ``champion.history`` is the list of versions that held the ``champion`` alias, oldest first, the
current holder last; a promotion appends, a rollback drops the current holder and returns the one before it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

#: (check name, metric key under the mode prefix, direction where larger is "better", margin field, scorer):
#: the closed set of checks ``registry.gate_metrics`` may name.  ``scorer`` is the name under which an evaluation
#: reports the metric's source as skipped (``DriftReport.skipped``), or None for the always-computed metrics.
GATE_CHECKS = (
    ("drift", "drift/score", "lower", "max_drift_increase", None),
    ("dynamics", "dynamics/dynamic_degree", "higher", "max_dynamics_drop", None),
    ("quality", "oracle/caption_consistency", "higher", "max_quality_drop", "oracle"),
    ("alignment", "alignment/clip_text", "higher", "max_alignment_drop", "clip_text"),
    ("dinov2", "drift/dinov2_similarity_degradation", "lower", "max_degradation_increase", "dinov2_similarity"),
    ("lpips", "drift/lpips_distance_degradation", "lower", "max_degradation_increase", "lpips_distance"),
    ("clip_iqa", "drift/clip_iqa_degradation", "lower", "max_degradation_increase", "clip_iqa"),
    ("musiq", "drift/musiq_degradation", "lower", "max_degradation_increase", "musiq"),
)
CHECK_NAMES = tuple(c[0] for c in GATE_CHECKS)
REQUIRED = ("drift", "dynamics")  # always gated, never skipped: computed without any learned weights
MARGIN_FIELDS = tuple(dict.fromkeys(c[3] for c in GATE_CHECKS))  # the tolerated degradations, registry.max_*
#: Why a check's metric can be absent from both evaluations, when the evaluations do not say.
_ABSENT = {"oracle": "the oracle scores the tiny preset only"}
DESCRIPTION_LIMIT = 4500  # MLflow's registered-model description column holds 5000 characters

#: One evaluation's per-sample values: ``{"keys": [[prompt, seed], ...], "values": {metric key: [value or None,
#: one per key]}}``, metric keys as in the evaluation's metrics (``hierarchical/drift/score``); None where the
#: sample has no value for the metric (its scorer failed on that video).
SampleTable = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- statistics
def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, standard error of the mean, n)`` of per-sample values: ``se = s / sqrt(n)`` with ``s`` the sample
    standard deviation (``n - 1`` in the denominator); ``se`` is NaN for ``n = 1`` (undefined).  ``ValueError``
    for no values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else float("nan")
    return float(x.mean()), se, int(x.size)


def pair_samples(challenger: SampleTable, champion: SampleTable) -> list[int]:
    """For each challenger sample, the index of the champion's sample with the same (prompt, seed) key.
    ``ValueError`` when a key repeats or the two key sets differ (the evaluations are not paired)."""
    sides = {"challenger": challenger, "champion": champion}
    keys = {}
    for side, table in sides.items():
        if "keys" not in table or "values" not in table:
            raise ValueError(f"the {side}'s evaluation has no per-sample values (keys and values)")
        keys[side] = [tuple(k) for k in table["keys"]]
        dup = sorted({k for k in keys[side] if keys[side].count(k) > 1}, key=str)
        if dup:
            raise ValueError(f"the {side}'s evaluation repeats sample key(s) {dup[:3]}: samples cannot be paired")
    ch, cp = keys["challenger"], keys["champion"]
    if set(ch) != set(cp):
        only_ch = sorted(set(ch) - set(cp), key=str)
        only_cp = sorted(set(cp) - set(ch), key=str)
        raise ValueError(f"the evaluations are not paired: {len(only_ch)} (prompt, seed) sample(s) only in the "
                         f"challenger's (e.g. {only_ch[:2]}), {len(only_cp)} only in the champion's (e.g. "
                         f"{only_cp[:2]}); evaluate both on the same prompts and seeds")
    where = {k: i for i, k in enumerate(cp)}
    return [where[k] for k in ch]


def paired_values(challenger: SampleTable, champion: SampleTable, key: str,
                  order: Sequence[int]) -> tuple[list[float], list[float]]:
    """The two evaluations' values of ``key`` as pairs (challenger order; ``order`` from :func:`pair_samples`),
    samples without a value on both sides left out.  ``ValueError`` when one side lacks a value the other has."""
    a, theirs = list(challenger["values"][key]), list(champion["values"][key])
    if len(a) != len(order) or len(theirs) != len(order):
        raise ValueError(f"gate metric {key!r}: {len(a)} and {len(theirs)} values for {len(order)} samples")
    b = [theirs[j] for j in order]
    for side, mine, other in (("challenger", a, b), ("champion", b, a)):
        lost = [tuple(challenger["keys"][i]) for i, (x, y) in enumerate(zip(mine, other))
                if x is None and y is not None]
        if lost:
            raise ValueError(f"gate metric {key!r} is missing for {len(lost)} sample(s) of the {side}'s evaluation "
                             f"(e.g. {lost[0]}: its scorer failed there) but not the other's")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def paired_difference(challenger: Sequence[float], champion: Sequence[float],
                      better: str) -> tuple[float, float, int]:
    """``(mean, standard error, n)`` of ``d_i = s * (challenger_i - champion_i)``, ``s = +1`` when ``better`` is
    ``"higher"``, ``-1`` when ``"lower"``: positive means the challenger did better."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    return mean_se((a - b) if better == "higher" else (b - a))


def validate_margin_se(value: float) -> float:
    """``registry.gate_margin_se`` as a float, or ``ValueError``: it must be finite and > 0 (at 0 every positive
    difference, however noisy, would count as an improvement)."""
    k = float(value)
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"gate_margin_se must be a finite number > 0 (standard errors), got {value!r}")
    return k


# ---------------------------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    better: str  # "higher" | "lower"
    challenger: float  # means over the paired samples
    champion: float
    n: int  # paired samples
    diff: float  # mean of d_i (positive = challenger better)
    se: float  # its standard error (NaN for n = 1)
    margin: float  # tolerated degradation (metric units): passed = diff >= -margin
    threshold: float  # gate_margin_se * se: improved = diff > threshold
    passed: bool  # not worse beyond the margin
    improved: bool  # better beyond noise
    text: str


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "checks": [asdict(c) for c in self.checks],
                "skipped": list(self.skipped)}


def validate_checks(checks: Sequence[str]) -> list[str]:
    """``checks`` as a list, or ``ValueError`` naming the problem: an unknown name (listing the valid ones), a
    duplicate, or a required check (``drift``, ``dynamics``) left out."""
    if isinstance(checks, str):
        raise ValueError(f"gate checks must be a list of names, got the string {checks!r}")
    names = [str(c) for c in checks]
    unknown = [c for c in names if c not in CHECK_NAMES]
    if unknown:
        raise ValueError(f"unknown gate check(s) {unknown}; valid: {list(CHECK_NAMES)}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"gate check(s) {dup} named more than once")
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(f"gate checks must include {list(REQUIRED)} (always gated); missing {missing}")
    return names


def gate_metric_keys(rollout: str = "hierarchical", checks: Sequence[str] | None = None) -> dict[str, str]:
    """``{check name: full metric key}`` for one rollout mode (``checks``: those named, else every known check),
    e.g. ``drift -> hierarchical/drift/score``."""
    wanted = CHECK_NAMES if checks is None else validate_checks(checks)
    return {name: f"{rollout}/{metric}" for name, metric, _, _, _ in GATE_CHECKS if name in wanted}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _check(name: str, key: str, better: str, margin_name: str, margin: float, k: float,
           ch_values: Sequence[float], cp_values: Sequence[float]) -> Check:
    """One gated check on paired values (rules: module docstring)."""
    if not ch_values:
        raise ValueError(f"gate metric {key!r} has no sample with a value in either evaluation")
    ch, cp = float(np.mean(ch_values)), float(np.mean(cp_values))
    diff, se, n = paired_difference(ch_values, cp_values, better)
    threshold = k * se
    head = (f"{name}: {key} {_fmt(ch)} vs champion {_fmt(cp)} ({better} is better): improvement {diff:+.4g} "
            f"± {_fmt(se) if n >= 2 else 'n/a'} (se, n={n})")
    finite = all(map(math.isfinite, (ch, cp, diff, margin))) and (n < 2 or math.isfinite(se))
    passed = finite and diff >= -margin
    improved = passed and n >= 2 and diff > threshold
    if not finite:
        text = f"{name}: {key} not finite (challenger {ch}, champion {cp}, se {se}, {margin_name} {margin})"
    elif not passed:
        text = f"{head} < -{margin_name} {_fmt(margin)}: worse beyond the tolerated degradation"
    elif improved:
        text = f"{head} > {k:g} se = {_fmt(threshold)}: improved"
    elif n < 2:
        text = f"{head}: one sample has no standard error: cannot tell an improvement from noise"
    else:
        text = f"{head} <= {k:g} se = {_fmt(threshold)}: within noise"
        if diff < 0:
            text += f" (worse, within {margin_name} {_fmt(margin)})"
    return Check(name, key, better, ch, cp, n, diff, se, margin, threshold, bool(passed), bool(improved), text)


def decide(challenger: SampleTable, champion: SampleTable, *, checks: Sequence[str], gate_margin_se: float,
           max_drift_increase: float, max_dynamics_drop: float, max_quality_drop: float = 0.0,
           max_alignment_drop: float = 0.0, max_degradation_increase: float = 0.0, require_improvement: bool = True,
           rollout: str = "hierarchical", skip_reasons: Mapping[str, str] | None = None) -> GateResult:
    """Apply the gated ``checks`` (names from :data:`GATE_CHECKS`) to two evaluations' per-sample tables
    (:data:`SampleTable`, metric keys like ``hierarchical/drift/score``), paired by (prompt, seed).

    ``gate_margin_se``: how many standard errors of the paired difference an improvement must exceed;
    ``max_*``: each check's tolerated degradation; ``require_improvement``: promote only with an improvement
    beyond noise (the default; rules in the module docstring).  ``skip_reasons`` maps a scorer name
    (``clip_text``, ``dinov2_similarity``, ...: the evaluations' ``DriftReport.skipped``) to why it was skipped;
    it only words the ``skipped`` entries.  Raises ``ValueError`` for an unknown or missing-required check name, a
    bad margin, and when the evaluations cannot be compared (samples not paired, a required metric missing, an
    optional one on one side only, Drift Scores over different metric sets).
    """
    gated = validate_checks(checks)
    k = validate_margin_se(gate_margin_se)
    margins = {"max_drift_increase": float(max_drift_increase), "max_dynamics_drop": float(max_dynamics_drop),
               "max_quality_drop": float(max_quality_drop), "max_alignment_drop": float(max_alignment_drop),
               "max_degradation_increase": float(max_degradation_increase)}
    reasons = dict(skip_reasons or {})
    order = pair_samples(challenger, champion)
    have_ch, have_cp = challenger["values"], champion["values"]
    n_key = f"{rollout}/drift/num_metrics"
    if n_key in have_ch and n_key in have_cp:
        a, b = paired_values(challenger, champion, n_key, order)
        if a != b:
            raise ValueError(f"Drift Scores are not comparable: the challenger's are over {sorted(set(a))} metrics, "
                             f"the champion's over {sorted(set(b))} (same scorers for both evaluations?)")
    done: list[Check] = []
    skipped: list[str] = []
    for name, metric, better, margin_name, scorer in GATE_CHECKS:
        if name not in gated:
            continue
        key = f"{rollout}/{metric}"
        have = (key in have_ch, key in have_cp)
        if not all(have):
            if name not in REQUIRED and not any(have):
                why = reasons.get(scorer) or _ABSENT.get(scorer) or "its scorer was skipped (no weights?)"
                skipped.append(f"{name} ({key}: in neither evaluation, not gated: {scorer} skipped: {why})")
                continue
            side = "challenger" if not have[0] else "champion"
            raise ValueError(f"gate metric {key!r} is missing from the {side}'s evaluation")
        a, b = paired_values(challenger, champion, key, order)
        done.append(_check(name, key, better, margin_name, margins[margin_name], k, a, b))
    failed = [c for c in done if not c.passed]
    improved = [c for c in done if c.improved]
    passed = not failed and (bool(improved) or not require_improvement)
    if failed:
        reason = "gate failed: " + "; ".join(c.text for c in failed)
        rest = [c.text for c in done if c.passed]
        if rest:
            reason += " | passed: " + "; ".join(rest)
    elif not passed:
        reason = (f"gate failed: within noise: no gated check improved by more than {k:g} standard errors of its "
                  f"paired difference: " + "; ".join(c.text for c in done))
    else:
        head = "gate passed: " if improved else "gate passed (no improvement required): "
        reason = head + "; ".join(c.text for c in done)
    if skipped:
        reason += " | skipped: " + "; ".join(skipped)
    return GateResult(passed, reason, done, skipped)


# ---------------------------------------------------------------------------------------------- champion history
def push_history(history: Sequence[str], new: str, current: str | None = None) -> list[str]:
    """History after ``new`` becomes champion; ``current`` (the alias before the move) is recorded first when the
    history does not end with it (an alias set by hand, or a registry from before the history existed)."""
    out = [str(v) for v in history]
    if current is not None and (not out or out[-1] != str(current)):
        out.append(str(current))
    if not out or out[-1] != str(new):
        out.append(str(new))
    return out


def rollback_target(history: Sequence[str], current: str,
                    exists=lambda version: True) -> tuple[str, list[str]]:
    """``(previous holder, new history)`` for a rollback from ``current``.

    Trailing entries equal to ``current`` are dropped, then versions for which ``exists(version)`` is False
    (deleted since); the last remaining entry is the previous holder.  ``ValueError`` when there is none.
    """
    out = [str(v) for v in history]
    while out and out[-1] == str(current):
        out.pop()
    while out and not exists(out[-1]):
        out.pop()
    if not out:
        raise ValueError(f"no previous champion to roll back to (champion history: {list(map(str, history)) or 'empty'},"
                         f" current champion: version {current})")
    return out[-1], out


def append_line(description: str | None, line: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``description`` plus one line, dropping the oldest *log* lines (after the first line) to stay within
    ``limit`` characters; a single line longer than the limit is cut."""
    lines = (description or "").splitlines()
    line = line.replace("\n", " ")
    if len(line) > limit // 2:
        line = line[: limit // 2 - 3] + "..."
    lines.append(line)
    while len("\n".join(lines)) > limit and len(lines) > 2:
        del lines[1]
    return "\n".join(lines)


__all__ = ["GATE_CHECKS", "CHECK_NAMES", "REQUIRED", "MARGIN_FIELDS", "SampleTable", "Check", "GateResult",
           "mean_se", "pair_samples", "paired_values", "paired_difference", "validate_margin_se", "validate_checks",
           "gate_metric_keys", "decide", "push_history", "rollback_target", "append_line", "DESCRIPTION_LIMIT"]
