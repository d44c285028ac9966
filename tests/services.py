"""Real local services for tests, each on 127.0.0.1 with its own ports and temp dirs: a Ray head of our own, an S3
server (moto in server mode), an MLflow tracking server; and the random tiny model bundle several suites start from."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def set_args(overrides) -> list[str]:
    """``["a.b=1", "c.d=2"]`` -> ``["--set", "a.b=1", "--set", "c.d=2"]``: config overrides for a job's argv."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_main(main, argv: list[str]) -> int:
    """A job's ``main(argv)`` in this process, ending as its command line would: its exit code, also when argparse
    ends it with a usage error (``SystemExit``). Any other exception propagates: a traceback fails the test."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


def job_here(main, argv: list[str], capsys, env: dict | None = None) -> subprocess.CompletedProcess:
    """A job's command without an interpreter of its own: ``main(argv)`` in this process, with this process's
    environment plus ``env`` (a value of None unsets the variable), as the job's driver on the cluster that
    RAY_ADDRESS names (hiar.platform.ray_cluster.init_ray joins it). Afterwards this process is as before: the
    environment (and whatever the job exported into it: MLflow exports its tracking URI), no cluster connection and
    no active MLflow run, as if the job had had its own interpreter. Returns what ``subprocess.run(...,
    capture_output=True, text=True)`` would (stdout and stderr through capsys), plus ``joined``: whether the job
    joined the cluster. Saves each job an interpreter start-up and its imports (about 10 CPU-seconds here)."""
    import ray

    saved = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    connected = ray.is_initialized()
    capsys.readouterr()
    try:
        code = run_main(main, argv)
        joined = ray.is_initialized() and not connected
    finally:
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:  # a job that raised mid-run
            mlflow.end_run(status="FAILED")
        if ray.is_initialized() and not connected:
            ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    out = capsys.readouterr()
    done = subprocess.CompletedProcess(argv, code, out.out, out.err)
    done.joined = joined
    return done


def sample_table(means: dict, n: int = 4, offsets=None) -> dict:
    """An evaluation's per-sample table (``hiar.eval.gate.SampleTable``) over ``n`` (prompt, seed) keys whose every
    metric is ``means[key]`` plus ``offsets[i]`` (default 0: every sample equal, so a paired difference has no
    spread)."""
    offsets = [0.0] * n if offsets is None else list(offsets)
    return {"keys": [[f"prompt {i}", 0] for i in range(n)],
            "values": {k: [float(v) + float(o) for o in offsets] for k, v in means.items()}}


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and everything it spawned; SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def random_bundle(directory: Path, seed: int = 0, card: dict | None = None) -> Path:
    """A randomly initialised tiny model (the tiny world's text encoder and codec) in the bundle layout, for the
    suites that must not depend on a trained teacher or student."""
    import torch

    from hiar.io.bundle import save_bundle
    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.pretrain import build_world_components

    cfg = load_config("tiny")
    _, text, codec = build_world_components(cfg)
    torch.manual_seed(seed)
    model = CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()
    return save_bundle(directory, model, text, codec, card={"seed": seed, "preset": "tiny", **(card or {})},
                       config=cfg)


class RayHead:
    """``ray start --head --block`` in its own session with its own temp dir and ports; stopped by process group,
    never with ``ray stop`` (which would stop every Ray cluster on the machine)."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="hiar-ray-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = str(Path(sys.executable).with_name("ray"))
        # Auth off explicitly: `ray start` turns token auth on whenever ~/.ray/auth_token exists, while clients
        # default to off; this head listens on loopback only, for the tests of this session. No drain on SIGTERM:
        # `ray start --block` otherwise waits up to 30 s for Serve proxies to quiesce before it stops the node
        # (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S), which stop() then spent in every session's teardown.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={num_cpus}",
             f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--min-worker-port={free_port()}",
             # Ray's fixed default (52365) would collide with a second head on the machine (pytest -n, make run)
             f"--dashboard-agent-listen-port={free_port()}",
             "--max-worker-port=0", "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._wait()

    def _wait(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start --head exited early")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    time.sleep(2.0)  # the GCS accepts connections a moment before the raylet is registered
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the Ray head did not start in time")

    def stop(self) -> None:
        # SIGTERM reaches every process of the group at once; `ray start` then waits up to a second for each kind
        # of process in turn (about 4 s in all) although they are already going: one second, then SIGKILL
        stop_process_group(self.proc, timeout=1.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class S3Server:
    """moto's S3 as a real HTTP endpoint on 127.0.0.1, with the client environment that points at it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop(self) -> None:
        self.server.stop()


class MlflowServer:
    """``mlflow server`` (SQLite backend, proxied artifacts) in its own session; its log stays in ``state``."""

    def __init__(self, state: Path, timeout: float = 180.0):
        import urllib.request

        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_S3", "AWS_"))}
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        self.log = open(self.state / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}",
             "--artifacts-destination", str(self.state / "artifacts")],
            env=env, cwd=self.state, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("mlflow server exited: " + (self.state / "server.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("mlflow server did not come up in time")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process_group(self.proc)
        self.log.close()
