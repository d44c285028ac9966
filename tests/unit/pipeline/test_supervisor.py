"""Where the run's summary says Ray's own logs are (hiar.pipeline.supervisor.RayTarget.logs)."""

from __future__ import annotations

from hiar.pipeline.console import StageConsole
from hiar.pipeline.supervisor import RayTarget


def _target(monkeypatch, address: str | None, logs_dir: str | None) -> RayTarget:
    for name, value in (("RAY_ADDRESS", address), ("HIAR_RAY_LOGS_DIR", logs_dir)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return RayTarget(StageConsole())


def test_a_named_head_session_is_the_path_printed(monkeypatch):
    # what `make run` passes: the session of the head `make ray-up` started
    target = _target(monkeypatch, "127.0.0.1:6390", "/tmp/hiar-ray-head/session_2026-12-01_x/logs")
    assert target.logs().startswith("/tmp/hiar-ray-head/session_2026-12-01_x/logs ")
    assert "127.0.0.1:6390" in target.logs()


def test_an_unnamed_cluster_points_at_its_head_node(monkeypatch):
    # a cluster make did not start: the Makefile passes an empty value, and the line says where to look
    for logs_dir in (None, ""):
        text = _target(monkeypatch, "10.0.0.5:6379", logs_dir).logs()
        assert text.startswith("on the cluster at 10.0.0.5:6379")
        assert "session_latest/logs" in text


def test_the_cluster_this_process_started_wins_over_a_name(monkeypatch):
    target = _target(monkeypatch, None, "/elsewhere/logs")
    target.address, target.owned, target.session_dir = "127.0.0.1:1234", True, "/tmp/ray/session_abc"
    assert target.logs() == "/tmp/ray/session_abc/logs (the local cluster this run started)"


def test_no_ray_no_logs(monkeypatch):
    assert _target(monkeypatch, None, None).logs().startswith("none")
