"""SIGTERM to a long-running deploy process shuts its Serve app down cleanly (issue 23): exit code 0, its process
tree gone, no Serve application or replica left on the cluster.

Before the fix, ray.init had replaced the process's SIGTERM handler (Ray's own Python handler behind a C++
failure-signal handler of the core worker): ``full.py --deploy`` and ``python -m hiar.serving.app`` exited 134 (an abort
in interpreter teardown), the latter leaving Serve's controller and proxy on the shared cluster.

Both tests deploy a real app (a random tiny bundle; minutes on a 2-core box), hence slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.services import free_port, random_bundle, wait_for

ROOT = Path(__file__).resolve().parents[3]
APP = "hiar-sigterm"
PROMPT = "a blue circle moves down quickly over a black background"


# ---------------------------------------------------------------------- processes
def preset_replicas() -> int:
    """Replica processes of the tiny preset's app: Ingress and Diagonal under ``serve.topology: diagonal`` (the
    preset's), Ingress, Decoder and one per step under ``per_step``."""
    from hiar.config import load_config

    cfg = load_config("tiny")
    return 2 if cfg.serve.topology == "diagonal" else cfg.schedule.num_steps + 2


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
    return out


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants now."""
    parents = _parents()
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def alive(pids) -> set[int]:
    """The processes of ``pids`` that still run (a zombie has finished running)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def replica_processes(app: str) -> set[int]:
    """Serve replica processes of ``app`` (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f"ServeReplica:{app}:".encode() in cmdline:
                found.add(int(entry))
    return found


def kill_all(pids) -> None:
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve_actors() -> list[str]:
    """Named Serve actors (controller, proxies, replicas) alive on the connected cluster."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_"))


class Deploy:
    """A deploy command in its own session, its output in a file; killed with its tree if a test fails."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.seen: set[int] = {self.proc.pid}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_serving(self, url: str, timeout: float = 900) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the deploy exited with {self.proc.returncode}:\n{self.text()[-5000:]}")
            try:
                return requests.get(f"{url}/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        assert wait_for(answers, timeout, 1.0), f"{url} never answered:\n{self.text()[-5000:]}"
        r = requests.post(f"{url}/v1/videos", json={"prompt": PROMPT, "num_blocks": 1, "stream": False}, timeout=300)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:500]

    def terminate(self, timeout: float = 300) -> int:
        self.seen |= process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        kill_all(self.seen)
        self.out.close()


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # a cluster that ray.init starts would otherwise turn token auth on and write ~/.ray/auth_token (DESIGN §8)
    return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


# ---------------------------------------------------------------------- tests
@pytest.mark.slow
def test_sigterm_to_serving_app_on_the_shared_cluster_removes_its_serve_and_exits_0(ray_head, tmp_path):
    """``python -m hiar.serving.app --address <the test cluster>``: Serve was not running there, so the process owns it
    and takes all of it down on SIGTERM: its app, its replica processes, the controller and the proxy."""
    import ray
    from ray import serve

    ray.init(address=ray_head.address, ignore_reinit_error=True, log_to_driver=False)
    assert not serve_actors(), "Serve is already running on the test cluster"
    bundle = random_bundle(tmp_path / "bundle")
    port = free_port()
    deploy = Deploy([sys.executable, "-m", "hiar.serving.app", "--model", str(bundle), "--address", ray_head.address,
                     "--port", str(port), "--name", APP, "--set", "serve.max_blocks=4"], tmp_path / "serve.log",
                    child_env())
    try:
        deploy.wait_until_serving(f"http://127.0.0.1:{port}")
        replicas = replica_processes(APP)
        assert len(replicas) == preset_replicas(), replicas
        actors = serve_actors()
        assert len([a for a in actors if a.startswith(f"SERVE_REPLICA::{APP}#")]) == preset_replicas(), actors
        assert "SERVE_CONTROLLER_ACTOR" in actors
        deploy.seen |= replicas

        returncode = deploy.terminate()
        assert returncode == 0, deploy.text()[-5000:]
        assert "stopping: Serve" in deploy.text()
        assert wait_for(lambda: not alive(deploy.seen), 60), f"still running: {alive(deploy.seen)}"
        assert wait_for(lambda: not serve_actors(), 60), serve_actors()
        # asked only now: serve.status() caches a client of the controller it finds, which SIGTERM took down
        assert not serve.status().applications and not serve.status().proxies
    finally:
        deploy.close()


@pytest.mark.slow
def test_sigterm_to_full_deploy_on_its_own_cluster_stops_serve_and_the_cluster_and_exits_0(tmp_path, monkeypatch):
    """``hiar/pipeline/full.py --stages deploy`` without RAY_ADDRESS: it starts a Ray cluster of its own, deploys the
    registry's champion and serves until SIGTERM; then the whole tree (GCS, raylet, replicas) is gone."""
    import mlflow

    from hiar.platform.registry import log_bundle

    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:  # a champion to deploy, without running the pipeline's other stages
        exp = mlflow.create_experiment("champion", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = log_bundle(random_bundle(tmp_path / "bundle"), registered_model_name="hiar-student")
        mlflow.MlflowClient().set_registered_model_alias("hiar-student", "champion", info.registered_model_version)
    finally:
        mlflow.set_tracking_uri(previous)

    port = free_port()
    deploy = Deploy([sys.executable, "-u", "-m", "hiar.pipeline.full", "--preset", "tiny", "--stages",
                     "deploy", "--run-dir", str(run_dir), "--set", f"serve.port={port}", "--set",
                     "serve.max_blocks=4"], tmp_path / "full.log", child_env())
    try:
        deploy.wait_until_serving(f"http://127.0.0.1:{port}")
        assert wait_for(lambda: "[full] serving at" in deploy.text(), 120), deploy.text()[-3000:]
        tree = process_tree(deploy.proc.pid)
        assert len(replica_processes("hiar") & tree) == preset_replicas(), deploy.text()[-3000:]

        returncode = deploy.terminate()
        assert returncode == 0, deploy.text()[-5000:]
        assert "[full] stopping: Serve and this process's Ray cluster" in deploy.text()
        assert "SIGTERM received" not in deploy.text()  # Ray's C++ handler did not run
        assert wait_for(lambda: not alive(deploy.seen), 60), f"still running: {alive(deploy.seen)}"
    finally:
        deploy.close()
