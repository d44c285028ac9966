"""The end of a pipeline run: a table of the stages (status, seconds, job log, key metric), where the logs are, how
to open MLflow; and the same as JSON for ``--summary-json``, ``<run_dir>/pipeline/last-summary.json`` and the
parent run."""

from __future__ import annotations

import os
from pathlib import Path

from hiar.pipeline.outcome import Outcome


def summary_dict(outcomes: list[Outcome], seconds: float, ok: bool, *, parent_run_id: str | None, run_dir: Path,
                 tracking_uri: str, ray_logs: str) -> dict:
    return {"parent_run_id": parent_run_id, "run_dir": str(run_dir), "seconds": seconds, "ok": ok,
            "stages": [o.__dict__ for o in outcomes], "tracking_uri": tracking_uri, "ray_logs": ray_logs}


def summary_text(outcomes: list[Outcome], seconds: float, *, run_dir: Path, ray_logs: str, mlflow_ui: str) -> str:
    def log_of(o: Outcome) -> str:
        return os.path.relpath(o.log, run_dir) if o.log else "-"

    rows = [("stage", "status", "seconds", "log", "key metric")]
    rows += [(o.stage, o.status, f"{o.seconds:.1f}", log_of(o), o.key) for o in outcomes]
    rows.append(("total", "", f"{seconds:.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["", "[full] summary"]
    for i, (stage, status, secs, log, key) in enumerate(rows):
        lines.append(f"  {stage:<{widths[0]}}  {status:<{widths[1]}}  {secs:>{widths[2]}}  {log:<{widths[3]}}  "
                     f"{key}".rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 10)
    lines.append(f"Job logs (the log column): under {run_dir}")
    lines.append(f"Ray's own logs: {ray_logs}")
    lines.append(mlflow_ui)
    return "\n".join(lines)
