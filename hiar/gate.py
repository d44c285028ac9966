"""The promotion gate and the champion history: pure functions, no MLflow (``pipelines/promote.py`` records them).

Gate (DESIGN §5, issue 6).  A challenger replaces the champion only when, on the *same* held-out prompts, seeds
and horizon, for the gated rollout mode (``registry.gate_rollout``, default ``hierarchical``), every check named in
``registry.gate_metrics`` (the preset decides; names from :data:`GATE_CHECKS`) passes:

* **drift** -- Drift Score (lower is better) not worse by more than ``max_drift_increase``:
  ``challenger <= champion + max_drift_increase``;
* **dynamics** -- dynamic degree (higher is better: the low-motion shortcut shows up as a drop) not worse by
  more than ``max_dynamics_drop``: ``challenger >= champion - max_dynamics_drop``;
* **quality** -- the tiny world's oracle caption consistency (higher is better) not worse by more than
  ``max_quality_drop``.  The oracle exists for the ``tiny`` preset only;
* **alignment** -- text-video alignment, the mean CLIP cosine similarity of prompt and frames
  (``alignment/clip_text``, higher is better, :class:`hiar.drift.ClipTextAlignmentScorer`) not worse by more
  than ``max_alignment_drop``;
* **dinov2**, **lpips**, **clip_iqa**, **musiq** -- one learned drift scorer's degradation (its oriented,
  normalised slope, ``drift/<metric>_degradation``, lower is better; the Drift Score already averages them)
  not worse by more than ``max_degradation_increase``.

``drift`` and ``dynamics`` are always gated (:data:`REQUIRED`: a list without them is an error) and their metrics
must be in both evaluations.  Every other check rests on a scorer that may be absent (learned weights not
given, no oracle for the preset): when its metric is in *neither* evaluation the check is listed in
``GateResult.skipped`` with the reason and does not gate -- never compared as 0.  A metric in one evaluation
only, or Drift Scores computed over different metric sets (``drift/num_metrics``; the score is a mean over the
computed metrics, so the two would not be comparable), is an error, not a decision.  A non-finite value fails
its check (a broken evaluation is never promoted).

History.  ``champion.history`` is the list of versions that held the ``champion`` alias, oldest first, the
current holder last; a promotion appends, a rollback drops the current holder and returns the one before it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

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
#: Why a check's metric can be absent from both evaluations, when the evaluations do not say.
_ABSENT = {"oracle": "the oracle scores the tiny preset only"}
DESCRIPTION_LIMIT = 4500  # MLflow's registered-model description column holds 5000 characters


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    challenger: float
    champion: float
    margin: float
    passed: bool
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


def decide(challenger: Mapping[str, float], champion: Mapping[str, float], *, checks: Sequence[str],
           max_drift_increase: float, max_dynamics_drop: float, max_quality_drop: float = 0.0,
           max_alignment_drop: float = 0.0, max_degradation_increase: float = 0.0, rollout: str = "hierarchical",
           skip_reasons: Mapping[str, str] | None = None) -> GateResult:
    """Apply the gated ``checks`` (names from :data:`GATE_CHECKS`) to two evaluations' metric dicts (keys like
    ``hierarchical/drift/score``).

    ``skip_reasons`` maps a scorer name (``clip_text``, ``dinov2_similarity``, ...: the evaluations'
    ``DriftReport.skipped``) to why it was skipped; it only words the ``skipped`` entries.  Raises ``ValueError``
    for an unknown or missing-required check name, and when the evaluations cannot be compared (a required
    metric missing, an optional one on one side only, Drift Scores over different metric sets).
    """
    gated = validate_checks(checks)
    margins = {"max_drift_increase": float(max_drift_increase), "max_dynamics_drop": float(max_dynamics_drop),
               "max_quality_drop": float(max_quality_drop), "max_alignment_drop": float(max_alignment_drop),
               "max_degradation_increase": float(max_degradation_increase)}
    reasons = dict(skip_reasons or {})
    n_key = f"{rollout}/drift/num_metrics"
    if n_key in challenger and n_key in champion and challenger[n_key] != champion[n_key]:
        raise ValueError(f"Drift Scores are not comparable: the challenger's is over {challenger[n_key]:g} metrics, "
                         f"the champion's over {champion[n_key]:g} (same scorers for both evaluations?)")
    checks: list[Check] = []
    skipped: list[str] = []
    for name, metric, better, margin_name, scorer in GATE_CHECKS:
        if name not in gated:
            continue
        key = f"{rollout}/{metric}"
        have = (key in challenger, key in champion)
        if not all(have):
            if name not in REQUIRED and not any(have):
                why = reasons.get(scorer) or _ABSENT.get(scorer) or "its scorer was skipped (no weights?)"
                skipped.append(f"{name} ({key}: in neither evaluation, not gated: {scorer} skipped: {why})")
                continue
            side = "challenger" if not have[0] else "champion"
            raise ValueError(f"gate metric {key!r} is missing from the {side}'s evaluation")
        ch, cp, margin = float(challenger[key]), float(champion[key]), margins[margin_name]
        if better == "lower":
            limit = cp + margin
            ok = ch <= limit
            text = f"{name}: {key} {_fmt(ch)} {'<=' if ok else '>'} {_fmt(cp)} + {_fmt(margin)} (champion + {margin_name})"
        else:
            limit = cp - margin
            ok = ch >= limit
            text = f"{name}: {key} {_fmt(ch)} {'>=' if ok else '<'} {_fmt(cp)} - {_fmt(margin)} (champion - {margin_name})"
        if not (math.isfinite(ch) and math.isfinite(cp) and math.isfinite(margin)):
            ok = False
            text = f"{name}: {key} not finite (challenger {ch}, champion {cp}, {margin_name} {margin})"
        checks.append(Check(name, key, ch, cp, margin, bool(ok), text))
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "gate failed: " + "; ".join(c.text for c in failed)
        passed_checks = [c.text for c in checks if c.passed]
        if passed_checks:
            reason += " | passed: " + "; ".join(passed_checks)
    else:
        reason = "gate passed: " + "; ".join(c.text for c in checks)
    if skipped:
        reason += " | skipped: " + "; ".join(skipped)
    return GateResult(not failed, reason, checks, skipped)


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


__all__ = ["GATE_CHECKS", "CHECK_NAMES", "REQUIRED", "Check", "GateResult", "validate_checks", "gate_metric_keys",
           "decide", "push_history", "rollback_target",
           "append_line", "DESCRIPTION_LIMIT"]
