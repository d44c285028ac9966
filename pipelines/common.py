"""What every Ray job entrypoint shares: environment hygiene, Ray start-up, MLflow defaults."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# No telemetry, no hub access: set before ray / mlflow / transformers are imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI itself, so the variable alone cannot tell "the user
# pointed us at a server" from "we chose SQLite earlier in this process": remember what we chose.
_DEFAULT_WE_SET = ""


def resolve_path(path: str) -> str:
    """URIs and absolute paths as they are; a relative path is taken from the project root when it exists
    there (shipped assets such as the tiny teacher), else from the working directory."""
    if "://" in path or os.path.isabs(path):
        return path
    candidate = PROJECT_ROOT / path
    return str(candidate if candidate.exists() else Path(path).resolve())


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), else start a small local one in-process."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": _quiet_train_placement_group_cleaner()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does: the process runs its own cleanup (ends
    its child job and MLflow runs, takes down the Serve app it deployed) and exits with its own code.

    Call it again after every ``ray.init``, which replaces the handler twice: with Ray's Python one
    (``sys.exit(15)`` from inside the handler) and, in the driver's core worker, with a C++ failure-signal handler
    in front of it. A SIGTERM then ends the process without any cleanup of ours: exit 15, or 134 when the
    interpreter aborts in teardown after Serve was used (``full.py --deploy`` measured 134; a script with one
    deployment 134 or 15 from run to run), and an app deployed on a shared cluster stays there with its replicas."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _quiet_train_placement_group_cleaner():
    """A worker setup hook that keeps Ray Train's placement-group cleaner to errors.

    The cleaner (a detached actor of every Train run) asks the State API once a second whether the Train controller
    is alive. The State API lives in the dashboard, which the local clusters here run without (DESIGN §8), so every
    query failed with a warning: ~1,000 lines in a 20-minute teacher run. Its only other warning is about cleaning
    up after a controller crash, which it still does. The hook is a nested function so that Ray pickles it by value:
    workers need not be able to import ``pipelines``.
    """

    def quiet_train_placement_group_cleaner() -> None:
        import logging

        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

    return quiet_train_placement_group_cleaner


def train_worker_env() -> dict:
    """``RunConfig(worker_runtime_env=...)`` for Ray Train jobs: the storage variables (workers do not inherit the
    job's environment) and Train's print patch off. Ray core wraps a worker's stdout, and the patch then tees every
    ``print`` to both that stream and Train's logger, so each worker line reached the driver twice."""
    from hiar.data import storage_env

    return {"env_vars": {**storage_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


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
