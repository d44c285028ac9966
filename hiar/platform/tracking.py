"""MLflow tracking defaults: which store (the user's, else SQLite under the run directory), experiments whose
artifacts live beside that store, config dicts as flat params."""

from __future__ import annotations

import os
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
