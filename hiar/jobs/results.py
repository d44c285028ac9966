"""What each job hands the next: typed results, written as JSON with a schema version.

Every job takes ``--output-json PATH`` and, when it succeeds, writes exactly one of these there (atomically: a
temporary file renamed into place, so a reader never sees half a result). The orchestrator reads them with
:func:`read_result`, which refuses a file of another kind or of a schema version it does not know, naming both:
no job's log lines are parsed anywhere.

On disk: ``{"result_type": "<class name>", "schema_version": N, ...the fields}``. A field added later gets a default, so
older files still read; a field removed or changed in meaning bumps :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hiar.io.storage import write_local_json

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TeacherResult:
    """``hiar.jobs.pretrain_teacher``: the trained tiny teacher."""
    bundle: str  # the teacher's model directory
    steps: int
    caption_consistency: float | None  # its oracle score on held-out captions (card.json)
    run_id: str | None  # the MLflow run of the training


@dataclass(frozen=True)
class DatasetResult:
    """``hiar.jobs.generate``: a dataset of ODE pairs or teacher trajectories, every shard committed."""
    kind: str  # "ode_pairs" | "trajectories"
    uri: str
    identity: str  # the dataset identity in its manifest
    count: int  # the samples asked for, every one committed (a dataset grows by index: its manifest may count more)
    shards_written: int  # by this run (0 when every shard was already committed)
    samples_per_s: float | None  # generation rate of this run, None when nothing was generated
    run_id: str | None


@dataclass(frozen=True)
class TrainResult:
    """``hiar.jobs.train``: one training stage (ODE init or distillation) and the bundle it exported."""
    stage: str  # "ode_init" | "distill"
    output: str  # the exported bundle directory
    identity: str  # the stage identity in the bundle's card
    steps: int
    losses: dict[str, float] = field(default_factory=dict)  # last logged value of each loss
    run_id: str | None = None


@dataclass(frozen=True)
class EvaluationResult:
    """``hiar.jobs.evaluate``: the drift suite (and oracle, dynamics) on one generator."""
    model_uri: str
    modes: list[str]  # the rollout modes scored (hierarchical, block_first)
    checksum: str
    eval_identity: str
    metrics: dict[str, float]  # "<mode>/<group>/<metric>" -> mean, and "<...>_se" -> its standard error
    reused: bool
    run_id: str
    model_name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class RegisterResult:
    """``hiar.jobs.promote register``: the generator as a version of the registered model (the challenger)."""
    name: str
    version: str
    checksum: str
    reused: bool  # the same weights and config were registered before: that version is returned
    run_id: str
    model_uri: str
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromoteResult:
    """``hiar.jobs.promote promote``: the gate's decision on one version against the champion."""
    name: str
    version: str
    decision: str  # "promoted" | "rejected" | "skipped" | "noop"
    reason: str
    champion_before: str | None
    champion: str | None  # after the decision
    details: dict = field(default_factory=dict)  # the gate's per-check numbers, history, ...


Result = TeacherResult | DatasetResult | TrainResult | EvaluationResult | RegisterResult | PromoteResult
KINDS = {cls.__name__: cls for cls in (TeacherResult, DatasetResult, TrainResult, EvaluationResult, RegisterResult,
                                       PromoteResult)}
R = TypeVar("R")


class ResultError(ValueError):
    """A result file that is missing, of another kind, or of a schema version this code does not read."""


def to_dict(result) -> dict:
    return {"result_type": type(result).__name__, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(result)}


def write_result(path: str | Path | None, result) -> None:
    """Write ``result`` to ``path`` (nothing when path is None), atomically."""
    if path is not None:
        write_local_json(path, to_dict(result))


def from_dict(data: dict, kind: type[R]) -> R:
    if not isinstance(data, dict):
        raise ResultError(f"a {kind.__name__} must be a JSON object, got {type(data).__name__}")
    if data.get("result_type") != kind.__name__:
        raise ResultError(f"expected a {kind.__name__}, got result_type {data.get('result_type')!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultError(f"{kind.__name__} has schema_version {data.get('schema_version')!r}; this code reads "
                          f"version {SCHEMA_VERSION}")
    names = {f.name for f in dataclasses.fields(kind)}
    required = {f.name for f in dataclasses.fields(kind)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    if missing:
        raise ResultError(f"{kind.__name__} lacks {', '.join(missing)}")
    return kind(**{k: v for k, v in data.items() if k in names})


def read_result(path: str | Path, kind: type[R]) -> R:
    """The ``kind`` result at ``path``; :class:`ResultError` when it is missing or not that kind and version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"no {kind.__name__} at {path}") from None
    except ValueError as err:
        raise ResultError(f"{path} is not JSON: {err}") from None
    return from_dict(data, kind)
