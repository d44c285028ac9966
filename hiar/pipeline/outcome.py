"""What a stage ends with: its outcome for the summary and MLflow, the two ways it can fail, and the typed result a
job hands back (``hiar.jobs.results``) read as part of the stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hiar.jobs.results import ResultError, read_result

R = TypeVar("R")


class StageFailed(RuntimeError):
    """A stage could not produce its output: a job exited non-zero, handed back no (or the wrong) result, or an
    input it needs is missing. The pipeline stops at this stage with exit code 1."""


class InputError(ValueError):
    """Bad input found before anything ran (exit code 2), or found by a stage's own check (then a StageFailed-like
    end of the run: the summary names it)."""


@dataclass
class Outcome:
    stage: str
    status: str = "failed"  # ran | skipped | failed
    seconds: float = 0.0
    key: str = ""  # the key metric, as text for the summary
    metrics: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    log: str = ""  # the stage's job log (<run_dir>/logs/<stage>.log), when it has one


def read_stage_result(stage: str, path: str | Path, kind: type[R]) -> R:
    """The ``kind`` result a stage's job wrote to ``path``; a missing file, another kind or an unknown schema
    version is a :class:`StageFailed` that names the stage, the file and what was wrong."""
    try:
        return read_result(path, kind)
    except ResultError as err:
        raise StageFailed(f"{stage}: the job's result is unusable: {err}") from None


def read_record(path: str | Path, kind: type[R]) -> R | None:
    """A result kept earlier as a skip record (``<run_dir>/eval/...``, ``<run_dir>/registry/...``), or None when
    there is none or it is not a readable ``kind``: the stage then runs again."""
    try:
        return read_result(path, kind)
    except ResultError:
        return None
