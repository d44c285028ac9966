"""The typed results jobs hand each other (hiar.jobs.results): round trip, and clear refusals of anything else."""

import json

import pytest

from hiar.jobs.results import (KINDS, SCHEMA_VERSION, DatasetResult, EvaluationResult, PromoteResult, RegisterResult,
                               ResultError, TeacherResult, TrainResult, read_result, write_result)

EXAMPLES = [
    TeacherResult(bundle="/t", steps=10, caption_consistency=0.7, run_id="r0"),
    DatasetResult(kind="ode_pairs", uri="s3://b/d", identity="abc", count=8, shards_written=2, samples_per_s=1.5,
                  run_id=None),
    TrainResult(stage="distill", output="/s", identity="def", steps=3, losses={"dmd_loss": 0.25}, run_id="r1"),
    EvaluationResult(run_id="r2", model_uri="/s", checksum="c", eval_identity="e", modes=["hierarchical"],
                     reused=False, metrics={"hierarchical/drift/score": 0.1, "hierarchical/drift/score_se": 0.01}),
    RegisterResult(name="m", version="3", checksum="c", reused=True, run_id="r3", model_uri="models:/m/3"),
    PromoteResult(name="m", version="3", decision="rejected", reason="within noise", champion_before="2",
                  champion="2", details={"diff": 0.0}),
]


def test_every_kind_has_an_example():
    assert {type(e).__name__ for e in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("result", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_json(result, tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_result(path, result)
    data = json.loads(path.read_text())
    assert data["result_type"] == type(result).__name__ and data["schema_version"] == SCHEMA_VERSION
    assert read_result(path, type(result)) == result
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left behind


def test_refusals_name_what_is_wrong(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ResultError, match="no TrainResult at"):
        read_result(path, TrainResult)
    write_result(path, EXAMPLES[1])
    with pytest.raises(ResultError, match="expected a TrainResult, got result_type 'DatasetResult'"):
        read_result(path, TrainResult)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ResultError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        read_result(path, DatasetResult)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "count"}))
    with pytest.raises(ResultError, match="lacks count"):
        read_result(path, DatasetResult)
    path.write_text("{not json")
    with pytest.raises(ResultError, match="not JSON"):
        read_result(path, DatasetResult)


def test_a_field_added_later_is_ignored_by_older_readers(tmp_path):
    """Unknown keys are dropped, so a newer writer with an extra optional field stays readable."""
    path = tmp_path / "r.json"
    write_result(path, EXAMPLES[2])
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "added_later": 1}))
    assert read_result(path, TrainResult) == EXAMPLES[2]
