"""Real local services for tests: a Ray head of our own and an S3 server (moto in server mode) on 127.0.0.1."""

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


class RayHead:
    """``ray start --head --block`` in its own session with its own temp dir and ports; stopped by process group,
    never with ``ray stop`` (which would stop every Ray cluster on the machine)."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="hiar-ray-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = str(Path(sys.executable).with_name("ray"))
        # Auth off explicitly: `ray start` turns token auth on whenever ~/.ray/auth_token exists, while clients
        # default to off; this head listens on loopback only, for the tests of this session.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={num_cpus}",
             f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--min-worker-port={free_port()}",
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
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
