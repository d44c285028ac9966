"""MLflow tracking for the jobs: which store (the user's, else SQLite under the run directory), experiments whose
artifacts live beside that store, config dicts as flat params, new (nested) runs and runs found again by an
identity tag."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

# MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI itself, so the variable alone cannot tell "the user
# pointed us at a server" from "we chose SQLite earlier in this process": remember what we chose.
_DEFAULT_WE_SET = ""


def tracking_uri(run_dir: str) -> str:
    """MLFLOW_TRACKING_URI when set (a server), else SQLite under the run directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env and env != _DEFAULT_WE_SET:
        return env
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def mlflow_experiment(name: str, run_dir: str) -> str:
    """Create/get an experiment whose artifacts live under the run directory (not the worker's cwd)."""
    import mlflow

    global _DEFAULT_WE_SET
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    users = bool(env) and env != _DEFAULT_WE_SET  # the user's store (a server, or a SQLite file of theirs)
    uri = tracking_uri(run_dir)
    server = not uri.startswith("sqlite:")
    mlflow.set_tracking_uri(uri)
    if not users:  # only our own default: a user's SQLite URI must stay the user's for later tracking_uri() calls
        _DEFAULT_WE_SET = uri
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None if server else str(Path(run_dir).resolve() / "mlartifacts")
    return mlflow.create_experiment(name, artifact_location=artifacts)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> flat ``section.field`` params for MLflow."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def setup_tracking(run_dir: str) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI (a server) or the SQLite store under ``run_dir``; returns the URI."""
    import mlflow

    from hiar.io.storage import resolve_path

    uri = tracking_uri(resolve_path(run_dir))
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Create/get an experiment on the current tracking URI.  With the SQLite default its artifacts live next to
    the database (``<run_dir>/mlartifacts``, like :func:`mlflow_experiment`), never in the cwd; decided from the
    URI itself, because MLflow exports MLFLOW_TRACKING_URI once it has been set."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 - created concurrently by another job
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def new_run(experiment: str, run_name: str, parent_run_id: str | None, tags: dict | None = None):
    """A new run of experiment ``experiment`` (by name; nested under ``parent_run_id`` when given, even across
    experiments)."""
    from mlflow import MlflowClient

    tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return MlflowClient().create_run(experiment_id(experiment), tags=tags, run_name=run_name)


@contextmanager
def resumed_run(run_id: str):
    """``mlflow.start_run(run_id=run_id)`` that also works where this process made another experiment active
    (``mlflow.set_experiment`` in a notebook or a caller's script): MLflow refuses to resume a run of another
    experiment then, so the run's experiment is active inside the block and the caller's again after it."""
    import mlflow

    before = os.environ.get("MLFLOW_EXPERIMENT_ID")  # mlflow.set_experiment exports the active experiment here
    own = mlflow.get_run(run_id).info.experiment_id
    switch = before is not None and before != own
    if switch:
        mlflow.set_experiment(experiment_id=own)
    try:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
    finally:
        if switch:
            mlflow.set_experiment(experiment_id=before)


def find_or_create_run(experiment_id: str, identity_tag: str, identity: str, name: str, parent_run_id: str | None,
                       params: dict) -> tuple[str, bool]:
    """``(run id, resumed)``: the unfinished run tagged ``identity_tag = identity`` (a rerun of work that stopped
    keeps writing to it), else a new one (nested under ``parent_run_id``) with ``params``."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{identity_tag}` = '{identity}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id, True
    tags = {identity_tag: identity, "mlflow.runName": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    return run.info.run_id, False


def log_video(frames, file_name: str, artifact_path: str, fps: int, columns: int, upscale: int = 1) -> None:
    """Tile videos ``[N, T, H, W, 3]`` side by side into one MP4 and log it as an artifact of the active run."""
    import tempfile

    import mlflow

    from hiar.io.video import tile, write_mp4

    with tempfile.TemporaryDirectory() as tmp:
        path = write_mp4(tile(frames, columns=columns, upscale=upscale), Path(tmp) / file_name, fps=fps)
        mlflow.log_artifact(str(path), artifact_path)
