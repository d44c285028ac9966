"""Running a job as a child process: ``sys.executable -u -m hiar.jobs.<job>``, on the Ray cluster the pipeline uses.

Each job is its own process, so Ray and MLflow state stay per job and a crash of one job is an exit code here. The
child dies with this process (``PR_SET_PDEATHSIG``): killing the pipeline kills the whole tree, and a resubmission
resumes from the outputs and checkpoints on disk.

The child's stdout and stderr go to ``<run_dir>/logs/<stage>.log`` (appended, one header line per attempt with
the time and the command); of its output only the progress events (``hiar.platform.progress``) reach the console,
as the stage's progress line.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TypeVar

from hiar.pipeline.console import StageConsole
from hiar.pipeline.outcome import StageFailed, read_stage_result
from hiar.platform import progress
from hiar.platform.ray_cluster import interrupt_on_sigterm

R = TypeVar("R")
TAIL_LINES = 15  # of a failed job's log, in the error


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (a SIGKILLed pipeline takes its job with it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RayTarget:
    """The cluster the jobs join: RAY_ADDRESS, or a local one this process starts the first time a job needs it
    (and which ends with this process)."""

    def __init__(self, console: StageConsole):
        self.console = console
        self.address = os.environ.get("RAY_ADDRESS") or None
        self.owned = False
        self.session_dir: str | None = None

    def ensure(self) -> str:
        if self.address:
            return self.address
        import ray

        ctx = ray.init(include_dashboard=False, log_to_driver=False)  # the jobs' workers log to the jobs
        interrupt_on_sigterm()  # ray.init replaced it (hiar.platform.ray_cluster)
        self.address, self.owned = ctx.address_info["gcs_address"], True
        self.session_dir = ctx.address_info.get("session_dir")
        self.console.say(f"[{self.console.label}] no RAY_ADDRESS: started a local Ray cluster at {self.address} for this run")
        return self.address

    def logs(self) -> str:
        """Where Ray's own logs (raylet, GCS, workers) are, for the summary: the session this process started, or
        the one named by ``HIAR_RAY_LOGS_DIR`` (``make run`` sets it to the head ``make ray-up`` started)."""
        if self.owned and self.session_dir:
            return f"{Path(self.session_dir) / 'logs'} (the local cluster this run started)"
        named = os.environ.get("HIAR_RAY_LOGS_DIR")
        if self.address and named:
            return f"{named} (the head node of the cluster at {self.address})"
        if self.address:
            return (f"on the cluster at {self.address}: its head node's Ray session logs (by default "
                    f"/tmp/ray/session_latest/logs) or the dashboard's Logs page")
        return "none: no job ran on Ray"


class JobSupervisor:
    """Runs one job at a time and can stop it (Ctrl-C, SIGTERM, ``ray job stop``)."""

    def __init__(self, log_dir: Path, console: StageConsole, ray: RayTarget, user_tracking_uri: str | None):
        self.log_dir, self.console, self.ray = log_dir, console, ray
        self.user_tracking_uri = user_tracking_uri
        self.child: subprocess.Popen | None = None

    def log_path(self, stage: str) -> Path:
        return self.log_dir / f"{stage}.log"

    def child_env(self) -> dict:
        # the cluster first: a local one started here turns Ray's token auth on by setting RAY_AUTH_MODE=token in
        # this process's environment (Ray >= 2.59, unless the user set it), and its jobs must inherit that to join
        address = self.ray.ensure()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # MLflow exports MLFLOW_TRACKING_URI when set_tracking_uri is called; the jobs must not mistake our SQLite
        # store for a server (they pick SQLite under run_dir themselves): pass on only what the user set.
        if self.user_tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.user_tracking_uri
        else:
            env.pop("MLFLOW_TRACKING_URI", None)
        # the console's mode is ours: a job run by us prints plain lines into its log
        env.pop("HIAR_PROGRESS", None)
        env["RAY_ADDRESS"] = address
        return env

    def run(self, stage: str, job: str, args: list[str], env: dict | None = None) -> None:
        """``python -u -m hiar.jobs.<job> args`` to completion; a non-zero exit is a :class:`StageFailed` that names
        the log and carries its last lines."""
        cmd = [sys.executable, "-u", "-m", f"hiar.jobs.{job}", *args]
        child_env = {**self.child_env(), **(env or {})}
        log_path = self.log_path(stage)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.console.say(f"[{self.console.label}] {stage}: running hiar.jobs.{job}; log {log_path}")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        with open(log_path, "a", buffering=1, errors="replace") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          bufsize=1, errors="replace", env=child_env, preexec_fn=_die_with_parent)
            try:
                for line in self.child.stdout:
                    log.write(line)
                    tail.append(line.rstrip("\n"))
                    event = progress.parse(line)
                    if event is not None:
                        self.console.progress(stage, event)
                rc = self.child.wait()
            finally:
                self.child = None
                self.console.end_stage(stage)
        if rc != 0:
            lines = "\n".join(tail)
            raise StageFailed(f"hiar.jobs.{job} exited with code {rc}; log {log_path}; its last lines:\n{lines}")

    def run_for_result(self, stage: str, job: str, args: list[str], kind: type[R], path: Path,
                       env: dict | None = None) -> R:
        """:meth:`run` with ``--output-json path``; returns the ``kind`` result the job wrote there."""
        path.unlink(missing_ok=True)  # an earlier attempt's result must not pass for this one's
        self.run(stage, job, [*args, "--output-json", str(path)], env=env)
        return read_stage_result(stage, path, kind)

    def stop(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
