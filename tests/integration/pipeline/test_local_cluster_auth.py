"""A run without RAY_ADDRESS starts a local Ray cluster; Ray (>= 2.59) turns token authentication on for it unless
RAY_AUTH_MODE is set. The jobs the run starts must still join it: they get the environment *after* the cluster is up
(hiar.pipeline.supervisor.JobSupervisor.child_env). Before that fix the first job of `python -m hiar.pipeline.full`
(and of benchmarks/ablations.py) died with "Failed to connect to Ray cluster" whenever RAY_AUTH_MODE was unset."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import json, subprocess, sys, tempfile
    from pathlib import Path
    from hiar.pipeline.console import StageConsole
    from hiar.pipeline.supervisor import JobSupervisor, RayTarget

    console = StageConsole()
    jobs = JobSupervisor(Path(tempfile.mkdtemp()), console, RayTarget(console), None)
    env = jobs.child_env()
    child = "import ray; ray.init(address='auto'); print(int(ray.cluster_resources()['CPU']))"
    joined = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=180)
    print(json.dumps({"rc": joined.returncode, "out": joined.stdout.strip(), "err": joined.stderr[-2000:],
                      "auth_mode": env.get("RAY_AUTH_MODE")}))
""")


def test_a_job_joins_the_local_cluster_the_run_started_when_ray_auth_mode_is_unset(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["err"]
    assert int(result["out"]) >= 1
    assert result["auth_mode"] == "token"  # Ray's own default for a new local cluster, passed on, not turned off
