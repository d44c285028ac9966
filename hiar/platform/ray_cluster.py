"""Ray start-up for the jobs: join the submitted-to cluster or start a local one, keep SIGTERM ours, quiet workers
and Ray Data's progress bars."""

from __future__ import annotations

import os
import signal


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), else start a small local one in-process."""
    import ray

    quiet_data_progress()
    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": _quiet_train_placement_group_cleaner()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)


def quiet_data_progress() -> None:
    """Ray Data's progress bars off (the whole-dataset bar and one per operator): redrawn as log lines they were most
    of a job's output (~11,500 lines in one tiny pipeline). The jobs report their own progress instead
    (``hiar.platform.progress``). A dataset copies the driver's ``DataContext`` when it is created, so this runs
    before any is."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


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
    workers need not import this module.
    """

    def quiet_train_placement_group_cleaner() -> None:
        import logging

        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

    return quiet_train_placement_group_cleaner


def train_worker_env() -> dict:
    """``RunConfig(worker_runtime_env=...)`` for Ray Train jobs: the storage variables (workers do not inherit the
    job's environment) and Train's print patch off. Ray core wraps a worker's stdout, and the patch then tees every
    ``print`` to both that stream and Train's logger, so each worker line reached the driver twice."""
    from hiar.io.storage import storage_env

    return {"env_vars": {**storage_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


