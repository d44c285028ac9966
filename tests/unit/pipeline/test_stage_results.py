"""A stage reads what its job hands back as a typed result (hiar.jobs.results), never the job's log lines: the
numbers it reports come from the result, and a missing or wrong result is a StageFailed that says what is wrong."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hiar.config import load_config
from hiar.jobs.results import DatasetResult, EvaluationResult, TrainResult, to_dict, write_result
from hiar.pipeline.console import StageConsole
from hiar.pipeline.outcome import Outcome, StageFailed, read_record, read_stage_result
from hiar.pipeline.stages import StageTools, dataset, run_for_result
from hiar.pipeline.supervisor import JobSupervisor


EVALUATION = to_dict(EvaluationResult(run_id="r", model_uri="m", checksum="c", eval_identity="e", modes=[],
                                     reused=False, metrics={}))


def dataset_result(identity="abc", **kw) -> DatasetResult:
    return DatasetResult(**{"kind": "ode_pairs", "uri": "/data/ode_pairs", "identity": identity, "count": 8,
                            "shards_written": 4, "samples_per_s": 1.5, "run_id": "run-1", **kw})


class FakeJobs(JobSupervisor):
    """The JobSupervisor with its child process replaced: ``run`` records the command and writes what the job would
    (or nothing); ``run_for_result`` is the supervisor's own."""

    def __init__(self, writes=None):  # no log directory, console or cluster: nothing is started
        self.writes, self.calls = writes, []

    def run(self, stage, job, args, env=None):
        self.calls.append((stage, job, args, env))
        print("[generate] done: 8 samples in 1.0 s, 999.0 samples/s")  # a log line: never what the stage reports
        if self.writes is not None:
            write_result(args[args.index("--output-json") + 1], self.writes)


def tools(tmp_path: Path, jobs: FakeJobs, identity="abc") -> StageTools:
    plans = SimpleNamespace(
        run_dir=tmp_path, cfg=load_config("tiny"), set_args=lambda: ["--preset", "tiny"],
        dataset_identity=lambda kind: identity,
        dataset_uri=lambda kind: str(tmp_path / "data" / kind),
        result_path=lambda name: tmp_path / "results" / f"{name}.json")
    runs = SimpleNamespace(linked=[], parent_run_id="parent")
    runs.link = runs.linked.append
    return StageTools(plans=plans, jobs=jobs, runs=runs, console=StageConsole(io.StringIO(), live=False))


def test_a_result_of_another_kind_is_a_stage_failure_naming_both_kinds(tmp_path):
    path = tmp_path / "results" / "distill.json"
    write_result(path, dataset_result())
    with pytest.raises(StageFailed, match=r"distill: .*expected a TrainResult, got .*'DatasetResult'"):
        read_stage_result("distill", path, TrainResult)


@pytest.mark.parametrize("content, message", [
    (None, "no EvaluationResult at"),
    ("not json", "is not JSON"),
    ({**EVALUATION, "schema_version": 99}, "schema_version 99"),
    ({k: v for k, v in EVALUATION.items() if k != "checksum"}, "lacks checksum"),
])
def test_a_missing_or_unreadable_result_is_a_stage_failure(tmp_path, content, message):
    path = tmp_path / "evaluate.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(StageFailed, match=message):
        read_stage_result("evaluate", path, EvaluationResult)
    assert read_record(path, EvaluationResult) is None  # as a skip record: not there, the stage runs again


def test_the_job_gets_output_json_and_an_earlier_attempts_result_does_not_pass_for_its_own(tmp_path):
    jobs = FakeJobs(writes=None)  # this attempt writes nothing ...
    t = tools(tmp_path, jobs)
    write_result(t.plans.result_path("ode_pairs-abc"), dataset_result())  # ... an earlier one did
    with pytest.raises(StageFailed, match="no DatasetResult at"):
        run_for_result(t, "ode_pairs", "generate", ["--kind", "ode_pairs"], DatasetResult, "ode_pairs-abc")
    stage, job, args, _ = jobs.calls[0]
    assert (stage, job) == ("ode_pairs", "generate")
    assert args[-2:] == ["--output-json", str(tmp_path / "results" / "ode_pairs-abc.json")]


def test_the_data_stage_reports_the_numbers_of_its_result(tmp_path):
    jobs = FakeJobs(writes=dataset_result(samples_per_s=1.5))
    t = tools(tmp_path, jobs)
    o = Outcome("ode_pairs")
    dataset(t, o, "ode_pairs")
    assert o.status == "ran"
    assert o.metrics == {"samples": 8, "samples_per_s": 1.5} and o.key == "8 samples, 1.50/s"
    assert t.runs.linked == ["run-1"]  # the job's MLflow run hangs under the pipeline's parent run
    assert jobs.calls[0][3] == {"MLFLOW_EXPERIMENT_NAME": "hiar-data"}


def test_a_dataset_of_another_identity_is_a_stage_failure(tmp_path):
    t = tools(tmp_path, FakeJobs(writes=dataset_result(identity="other")), identity="abc")
    with pytest.raises(StageFailed, match="generate made dataset other .* this config's dataset is abc"):
        dataset(t, Outcome("ode_pairs"), "ode_pairs")
