"""The jobs reopen their MLflow runs in the caller's process (an evaluation's, a registration's, a promotion
decision's), where the caller may have made another experiment active: a notebook that ran
``mlflow.set_experiment`` before calling them. A file-based MLflow (SQLite under tmp_path)."""

import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import fluent

from hiar.platform.tracking import new_run, resumed_run


def fresh_process_state(tmp_path, monkeypatch) -> None:
    """A SQLite store and no active experiment, as in a new process; all of it restored after the test (set
    first, then deleted, so that monkeypatch also removes what MLflow exports during the test)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def notebook(tmp_path, monkeypatch):
    """The caller's own experiment "notebook" is active, as after mlflow.set_experiment."""
    fresh_process_state(tmp_path, monkeypatch)
    mlflow.set_experiment("notebook")
    yield mlflow.get_experiment_by_name("notebook").experiment_id
    mlflow.set_tracking_uri(None)


def test_a_job_run_reopens_where_the_caller_made_another_experiment_active(notebook):
    job = new_run("hiar-eval", "eval-student", None)  # how evaluation and promotion create their runs
    assert job.info.experiment_id != notebook
    with pytest.raises(MlflowException, match="active experiment ID"):  # what MLflow alone does here
        with mlflow.start_run(run_id=job.info.run_id):
            pass
    with resumed_run(job.info.run_id) as run:
        assert run.info.run_id == job.info.run_id
        mlflow.log_metric("caption_consistency", 0.5)
    assert mlflow.get_run(job.info.run_id).data.metrics == {"caption_consistency": 0.5}
    # the caller's experiment is active again: its next run lands there
    assert os.environ["MLFLOW_EXPERIMENT_ID"] == notebook
    with mlflow.start_run() as own:
        pass
    assert own.info.experiment_id == notebook


def test_the_fixtures_leave_no_experiment_behind():
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ and fluent._active_experiment_id is None


def test_a_job_run_reopens_with_no_experiment_chosen(tmp_path, monkeypatch):
    fresh_process_state(tmp_path, monkeypatch)
    job = new_run("hiar-eval", "eval-student", None)
    with resumed_run(job.info.run_id):
        mlflow.log_param("model_uri", "runs/students/x")
    assert mlflow.get_run(job.info.run_id).data.params == {"model_uri": "runs/students/x"}
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # nothing chosen for the caller
    mlflow.set_tracking_uri(None)
