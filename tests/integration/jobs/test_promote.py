"""Registry promotion: the gate as a pure function, register/promote/rollback/status on a real MLflow registry
(SQLite, and an `mlflow server` subprocess on 127.0.0.1), with evaluations on the real local Ray cluster."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiar.config import load_config
from hiar.io.checksums import checksum_dir
from hiar.eval.gate import append_line, decide, gate_metric_keys, push_history, rollback_target
from tests.services import job_here, random_bundle, sample_table, set_args

ROOT = Path(__file__).resolve().parents[3]
# one seed and one actor: the tiny preset evaluates 32 prompts x 2 seeds on 2 actors
SMALL = ["eval.num_prompts=2", "eval.seeds=[0]", "eval.actors=1", "video.eval_horizon_factor=2", "eval.sample_videos=1"]
REJECT = ["registry.max_drift_increase=-1e9"]  # no challenger can pass: forces a rejection on real metrics
# every degradation tolerated and no improvement required: any challenger passes (the real evaluations of two
# random students cannot be relied on to differ beyond noise)
PASS = ["registry.max_drift_increase=1e9", "registry.max_dynamics_drop=1e9", "registry.max_quality_drop=1e9",
        "registry.gate_require_improvement=false"]
NAME = "hiar-student"



# ---------------------------------------------------------------------------------------------- the gate, pure
def _m(drift=None, dyn=None, cc=None, mode="hierarchical", n=3):
    """One evaluation's per-sample table: 4 samples, each with these values (paired differences without spread;
    the statistics themselves are tests/unit/eval/test_gate.py's)."""
    out = {f"{mode}/drift/score": drift, f"{mode}/dynamics/dynamic_degree": dyn, f"{mode}/drift/num_metrics": n,
           f"{mode}/oracle/caption_consistency": cc}
    return sample_table({k: v for k, v in out.items() if v is not None})


TINY_CHECKS = ["drift", "dynamics", "quality"]  # the tiny preset's registry.gate_metrics
TH = dict(checks=TINY_CHECKS, max_drift_increase=0.0, max_dynamics_drop=0.05, max_quality_drop=0.0, gate_margin_se=3.0)


def test_gate_passes_a_better_challenger_and_names_every_check():
    r = decide(_m(0.10, 0.50, 0.80), _m(0.20, 0.50, 0.70), **TH)
    assert r.passed and r.reason.startswith("gate passed")
    assert [c.name for c in r.checks] == ["drift", "dynamics", "quality"] and all(c.passed for c in r.checks)
    assert [c.name for c in r.checks if c.improved] == ["drift", "quality"]
    # equal is "not worse" and dynamics may drop by the margin, but nothing improved: not promoted ...
    same = decide(_m(0.2, 0.46, 0.7), _m(0.2, 0.5, 0.7), **TH)
    assert not same.passed and all(c.passed for c in same.checks) and not any(c.improved for c in same.checks)
    assert same.reason.startswith("gate failed: within noise: no gated check improved by more than 3 standard")
    # ... unless the gate only asks for "not worse"
    assert decide(_m(0.2, 0.46, 0.7), _m(0.2, 0.5, 0.7), require_improvement=False, **TH).passed


@pytest.mark.parametrize("challenger, failing", [
    (_m(0.25, 0.50, 0.80), "drift"),          # more drift
    (_m(0.10, 0.40, 0.80), "dynamics"),       # lost more motion than the margin (the low-motion shortcut)
    (_m(0.10, 0.50, 0.60), "quality"),        # follows captions worse
    (_m(float("nan"), 0.5, 0.8), "drift"),    # a broken evaluation never passes
])
def test_gate_rejects_a_worse_challenger_with_the_reason(challenger, failing):
    r = decide(challenger, _m(0.20, 0.50, 0.70), **TH)
    assert not r.passed
    assert [c.name for c in r.checks if not c.passed] == [failing]
    assert r.reason.startswith(f"gate failed: {failing}:")
    assert r.to_dict()["passed"] is False and json.dumps(r.to_dict())


def test_gate_thresholds_modes_and_incomparable_inputs():
    worse = _m(0.30, 0.30, 0.50)
    wide = dict(checks=TINY_CHECKS, max_drift_increase=0.2, max_dynamics_drop=0.3, max_quality_drop=0.3,
                gate_margin_se=3.0)
    assert decide(worse, _m(0.2, 0.5, 0.7), require_improvement=False, **wide).passed  # tolerated, not better
    assert not decide(worse, _m(0.2, 0.5, 0.7), **wide).passed
    assert not decide(_m(0.1, 0.5, 0.8), _m(0.2, 0.5, 0.7), **{**TH, "max_drift_increase": -1e9}).passed
    # without the oracle (a Wan model) quality is skipped, said so in the reason
    r = decide(_m(0.1, 0.5), _m(0.2, 0.5), **TH)
    assert r.passed and r.skipped and "skipped: quality" in r.reason and "tiny preset only" in r.reason
    # the gated mode is a setting
    assert gate_metric_keys("block_first")["drift"] == "block_first/drift/score"
    assert decide(_m(0.1, 0.5, mode="block_first"), _m(0.2, 0.5, mode="block_first"), rollout="block_first", **TH).passed
    with pytest.raises(ValueError, match="missing from the challenger"):
        decide(_m(), _m(0.2, 0.5), **TH)
    with pytest.raises(ValueError, match="caption_consistency.*missing from the champion"):
        decide(_m(0.1, 0.5, 0.8), _m(0.2, 0.5), **TH)
    with pytest.raises(ValueError, match="not comparable"):
        decide(_m(0.1, 0.5, n=3), _m(0.2, 0.5, n=7), **TH)


def test_history_and_description_helpers():
    assert push_history([], "1") == ["1"]
    assert push_history(["1"], "2", current="1") == ["1", "2"]
    assert push_history([], "3", current="2") == ["2", "3"]  # an alias set by hand is remembered
    assert rollback_target(["1", "2"], "2") == ("1", ["1"])
    assert rollback_target(["1", "2", "3"], "3", exists=lambda v: v != "2") == ("1", ["1"])  # 2 was deleted
    with pytest.raises(ValueError, match="no previous champion"):
        rollback_target(["1"], "1")
    text = "header"
    for i in range(400):
        text = append_line(text, f"line {i} " + "x" * 40, limit=2000)
    assert len(text) <= 2000 and text.startswith("header\n") and text.endswith("line 399 " + "x" * 40)


# ---------------------------------------------------------------------------------------------- registry
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote-bundles")
    return [random_bundle(root / f"bundle-{s}", seed=s) for s in (0, 1)]


def _version(client, version):
    return client.get_model_version(NAME, str(version))


def _champion(client):
    return str(client.get_registered_model(NAME).aliases.get("champion"))


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines, err
    return lines[-1]


def test_register_reuses_the_version_of_the_same_bundle_and_errors_are_exit_2(bundles, tmp_path, monkeypatch,
                                                                              capsys):
    """register: a version with alias challenger and its tags; the same content again (even copied elsewhere)
    is the same version, and nothing else changes; bad input is exit 2 with a clear message."""
    import shutil

    from mlflow import MlflowClient

    from hiar.jobs import promote

    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = ["--preset", "tiny", "--set", f"run_dir={runs}"]
    assert promote.main(["promote", *base]) == 2
    assert "no registered model 'hiar-student'" in _error_line(capsys.readouterr().err)

    out = tmp_path / "reg.json"
    assert promote.main(["register", "--model-dir", str(bundles[0]), "--data-manifest-hash", "abc123",
                         "--output-json", str(out), *base]) == 0
    first = json.loads(out.read_text())
    assert capsys.readouterr().out.strip().splitlines()[-1] == "1"  # prints the version
    client = MlflowClient(tracking_uri=uri)
    mv = _version(client, 1)
    cfg = load_config("tiny")
    assert mv.tags["checksum"] == checksum_dir(bundles[0]) == first["checksum"]
    assert mv.tags["config_hash"] == cfg.config_hash()
    assert mv.tags["data_manifest_hash"] == "abc123" and mv.tags["source_dir"] == str(bundles[0].resolve())
    assert str(client.get_registered_model(NAME).aliases["challenger"]) == "1"
    description = client.get_registered_model(NAME).description

    copy = shutil.copytree(bundles[0], tmp_path / "copy-of-0")
    assert promote.main(["register", "--model-dir", str(copy), "--eval-run-id", "run-42", "--output-json", str(out),
                         *base]) == 0
    again = json.loads(out.read_text())
    assert again["version"] == "1" and again["reused"] is True
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    assert _version(client, 1).tags["eval_run_id"] == "run-42"  # what the caller adds is kept
    assert client.get_registered_model(NAME).description == description  # no move, no log line
    # the same weights under another generation config are another model
    other = shutil.copytree(bundles[0], tmp_path / "other-config")
    (other / "hiar_config.yaml").write_text((other / "hiar_config.yaml").read_text().replace(
        "window_frames: 12", "window_frames: 6"))
    assert promote.main(["register", "--model-dir", str(other), "--output-json", str(out), *base]) == 0
    assert json.loads(out.read_text())["version"] == "2"
    assert str(client.get_registered_model(NAME).aliases["challenger"]) == "2"

    # errors, all before any change
    for args, message in [
        (["register", "--model-dir", str(tmp_path / "missing")], "does not exist"),
        (["register", "--model-dir", str(tmp_path)], "holds no model: missing ['transformer/']"),
        (["promote", "--version", "7"], "has no version 7"),
        (["rollback"], "has no 'champion'"),
        (["promote", "--parent-run-id", "0" * 32], "--parent-run-id"),
    ]:
        assert promote.main([*args, *base]) == 2, args
        assert message in _error_line(capsys.readouterr().err), args
    assert promote.main(["promote", *base]) == 0  # first model
    assert "first model" in capsys.readouterr().out
    assert promote.main(["rollback", *base]) == 2
    assert "no previous champion" in _error_line(capsys.readouterr().err)
    assert _champion(client) == "2"


def test_gate_decides_on_real_evaluations_rollback_and_serving_resolution(ray_head, bundles, tmp_path, monkeypatch,
                                                                         capsys):
    """First model -> champion; a challenger the gate rejects stays challenger with the reason recorded (tags,
    description, a run with both sides' metrics); one that passes becomes champion; the serving loader resolves
    models:/hiar-student@champion to it; rollback restores the previous version, and serving follows."""
    from mlflow import MlflowClient

    from hiar.jobs import promote
    from hiar.platform.registry import resolve_bundle
    from hiar.serving.app import pin_model

    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = ["--preset", "tiny", *set_args(SMALL + [f"run_dir={runs}"])]
    a, b = bundles
    assert promote.main(["register", "--model-dir", str(a), *base]) == 0
    assert promote.main(["promote", *base]) == 0
    client = MlflowClient(tracking_uri=uri)
    assert _champion(client) == "1" and _version(client, 1).tags["promotion.reason"].startswith("first model")
    assert promote.main(["register", "--model-dir", str(b), *base]) == 0
    assert str(client.get_registered_model(NAME).aliases["challenger"]) == "2"

    # the job's main on the cluster (as its driver, here): both versions evaluated on the same prompts and seeds,
    # the gate says no
    import ray

    out = tmp_path / "promote.json"
    parent = client.create_run(client.create_experiment("hiar-full-test")).info.run_id
    r = job_here(promote.main, ["promote", "--output-json", str(out), "--parent-run-id", parent, *base,
                                *set_args(REJECT)], capsys,
                 env={"RAY_ADDRESS": ray_head.address, "MLFLOW_TRACKING_URI": None})  # run_dir's store: `uri`
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "NOT PROMOTED" in r.stdout and "gate failed: drift" in r.stdout
    decision = json.loads(out.read_text())
    assert decision["decision"] == "rejected" and _champion(client) == "1"
    tags = _version(client, 2).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.against"] == "1"
    assert tags["promotion.reason"].startswith("gate failed: drift: hierarchical/drift/score")
    metrics = json.loads(tags["promotion.metrics"])
    assert set(metrics["challenger"]) == {"drift", "dynamics", "quality"} and metrics["thresholds"]["max_drift_increase"] == -1e9
    evals = metrics["eval_runs"]
    assert evals["challenger"] != evals["champion"]
    ev = {s: client.get_run(evals[s]) for s in evals}
    assert ev["challenger"].data.params["model_version"] == "2" and ev["champion"].data.params["model_version"] == "1"
    assert ev["challenger"].data.tags["hiar.eval_identity"] == ev["champion"].data.tags["hiar.eval_identity"]
    same = [json.loads(Path(client.download_artifacts(evals[s], "prompts.json", str(tmp_path))).read_text())
            for s in ("challenger", "champion")]
    assert same[0] == same[1] and len(same[0]["prompts"]) == 2  # the same held-out prompts and seeds
    # the gate paired the two evaluations' per-sample values: each check's numbers are in the record
    tables = {s: json.loads(Path(client.download_artifacts(evals[s], "per_sample.json", str(tmp_path / s)))
                            .read_text()) for s in evals}
    assert tables["challenger"]["keys"] == tables["champion"]["keys"] == [[p, 0] for p in same[0]["prompts"]]
    import numpy as np

    for check in metrics["checks"]:
        key, sign = check["metric"], (1.0 if check["better"] == "higher" else -1.0)
        d = sign * (np.array(tables["challenger"]["values"][key]) - np.array(tables["champion"]["values"][key]))
        assert check["n"] == 2 and check["diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert check["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(2), abs=1e-12)
        assert check["threshold"] == pytest.approx(3.0 * check["se"], abs=1e-12)
        assert check["challenger"] == pytest.approx(ev["challenger"].data.metrics[key])
        assert ev["challenger"].data.metrics[f"{key}_se"] == pytest.approx(
            np.std(tables["challenger"]["values"][key], ddof=1) / np.sqrt(2))
    assert [c["passed"] for c in metrics["checks"]][0] is False and metrics["thresholds"]["gate_margin_se"] == 3.0
    assert "promote v2 vs champion v1: REJECTED: gate failed" in client.get_registered_model(NAME).description
    promote_run = client.get_run(decision["details"]["run_id"])  # PromoteResult: the promote run in its details
    assert promote_run.data.tags["mlflow.parentRunId"] == parent
    assert {ev[s].data.tags["mlflow.parentRunId"] for s in ev} == {decision["details"]["run_id"]}
    assert promote_run.data.tags["promotion.decision"] == "rejected"
    assert "challenger/drift" in promote_run.data.metrics and "champion/drift" in promote_run.data.metrics
    assert promote_run.data.metrics["gate/drift/diff"] == pytest.approx(metrics["checks"][0]["diff"])
    assert promote_run.data.metrics["gate/drift/n"] == 2 and promote_run.data.metrics["gate/drift/passed"] == 0

    # a rerun of the same decision changes nothing
    description = client.get_registered_model(NAME).description
    assert promote.main(["promote", *base, *set_args(REJECT)]) == 0
    assert client.get_registered_model(NAME).description == description

    # thresholds that pass: the finished evaluations are reused (no Ray needed in this process), champion moves
    t0 = time.monotonic()
    joined = ray.is_initialized()
    assert promote.main(["promote", "--output-json", str(out), *base, *set_args(PASS)]) == 0
    assert time.monotonic() - t0 < 60
    assert ray.is_initialized() == joined  # nothing was evaluated again: the cluster was not even joined
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promoted" and decision["details"]["eval_runs"] == evals
    assert _champion(client) == "2" and _version(client, 2).tags["promotion.decision"] == "promoted"
    assert json.loads(client.get_registered_model(NAME).tags["champion.history"]) == ["1", "2"]
    assert promote.main(["promote", *base]) == 0 and "already champion" in capsys.readouterr().out

    pinned = pin_model(f"models:/{NAME}@champion")  # what Ray Serve loads
    assert pinned["pinned"] == f"models:/{NAME}/2" and checksum_dir(pinned["path"]) == checksum_dir(b)
    assert checksum_dir(resolve_bundle(f"models:/{NAME}@champion", cache_dir=tmp_path / "r1")) == checksum_dir(b)

    assert promote.main(["rollback", "--reason", "flicker after 15 s", *base]) == 0
    assert _champion(client) == "1"
    assert json.loads(_version(client, 2).tags["champion.demoted"])["reason"] == "flicker after 15 s"
    assert json.loads(client.get_registered_model(NAME).tags["rollback.last"])["to"] == "1"
    assert "rollback: champion v2 -> v1: flicker after 15 s" in client.get_registered_model(NAME).description
    pinned = pin_model(f"models:/{NAME}@champion")
    assert pinned["pinned"] == f"models:/{NAME}/1" and checksum_dir(pinned["path"]) == checksum_dir(a)
    # a rolled-back version is not promoted again silently
    assert promote.main(["promote", *base, *set_args(PASS)]) == 0 and _champion(client) == "1"

    capsys.readouterr()
    assert promote.main(["status", *base]) == 0
    text = capsys.readouterr().out
    assert "challenger -> v2" in text and "champion -> v1" in text and "rolled back: flicker after 15 s" in text


# ---------------------------------------------------------------------------------------------- a real server
def test_register_promote_and_resolve_through_an_mlflow_server(mlflow_server, bundles, tmp_path, monkeypatch,
                                                               capsys):
    """The CLI with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT in its environment: register (a fresh interpreter
    whose only hint is that variable), promote (first model; its main, here, with the same variable); registering
    the same bundle again adds no version; models:/hiar-student@champion resolves through the server to that
    bundle, for the serving loader too."""
    from mlflow import MlflowClient

    from hiar.jobs import promote

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_S3", "AWS_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    base = ["--preset", "tiny", "--set", f"run_dir={tmp_path / 'runs'}"]
    script = "-m", "hiar.jobs.promote"
    r = subprocess.run([sys.executable, *script, "register", "--model-dir", str(bundles[1]), *base], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    capsys.readouterr()
    assert promote.main(["promote", *base]) == 0
    assert "first model" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # the server was used, not the SQLite default

    assert promote.main(["register", "--model-dir", str(bundles[1]), *base]) == 0
    assert promote.main(["status", *base]) == 0
    assert "champion -> v1" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_server)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    assert _champion(client) == "1"
    assert client.get_model_version(NAME, "1").tags["checksum"] == checksum_dir(bundles[1])

    from hiar.platform.registry import resolve_bundle
    from hiar.serving.app import pin_model

    local = resolve_bundle(f"models:/{NAME}@champion", cache_dir=tmp_path / "dl")
    assert checksum_dir(local) == checksum_dir(bundles[1])
    pinned = pin_model(f"models:/{NAME}@champion")
    assert pinned["pinned"] == f"models:/{NAME}/1" and checksum_dir(pinned["path"]) == checksum_dir(bundles[1])
