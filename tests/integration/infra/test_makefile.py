"""The Makefile's `submit` tells the run where Ray's own logs are (read by hiar.pipeline.supervisor.RayTarget.logs).

`make -n` runs make for real (its $(shell ...) included) and prints the `ray job submit` command without running it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _submitted_env_vars(ray_tmp: Path) -> dict:
    out = subprocess.run(["make", "-n", "-s", "submit", f"RAY_TMP={ray_tmp}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    words = shlex.split(out.replace("\\\n", " "))
    runtime_env = json.loads(words[words.index("--runtime-env-json") + 1])
    return runtime_env["env_vars"]


def test_a_head_make_started_names_its_session_logs(tmp_path):
    session = tmp_path / "session_2026-12-01_01-02-03_1234"
    session.mkdir()
    (tmp_path / "session_latest").symlink_to(session)
    (tmp_path / "head.pid").write_text(f"{os.getpid()}\n")  # a live process stands for the head
    env_vars = _submitted_env_vars(tmp_path)
    # the session itself, not the symlink a restarted head would move
    assert env_vars["HIAR_RAY_LOGS_DIR"] == f"{session.resolve()}/logs"
    assert env_vars["HIAR_PROGRESS"] == "plain"


def test_no_head_of_ours_names_nothing(tmp_path):
    session = tmp_path / "session_old"
    session.mkdir()
    (tmp_path / "session_latest").symlink_to(session)
    assert _submitted_env_vars(tmp_path)["HIAR_RAY_LOGS_DIR"] == ""  # no head.pid: a cluster make did not start
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "head.pid").write_text(f"{dead.pid}\n")
    assert _submitted_env_vars(tmp_path)["HIAR_RAY_LOGS_DIR"] == ""  # a head that is gone
