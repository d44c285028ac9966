"""hiar/pipeline/full.py: bad input before anything is written (fast); the whole tiny pipeline on a real Ray cluster,
its rerun, a deleted stage output and a SIGKILL mid-distillation (slow).

The slow tests share one pipeline run (module fixture, small budgets, a random tiny teacher: speed and
behaviour do not depend on the teacher's quality). ``pipeline_run`` is also used by ``tests/integration/infra/test_notebook.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiar.pipeline.full import main as full_main
from tests.services import free_port, run_main, set_args

ROOT = Path(__file__).resolve().parents[3]
FULL = ("-m", "hiar.pipeline.full")
STAGES = ["teacher", "ode_pairs", "trajectories", "ode_init", "distill", "evaluate", "register", "promote", "deploy"]
# Small budgets: every stage does real work on the real services, in minutes on 2 shared cores.
SMALL = ["data.num_ode_pairs=4", "data.num_trajectories=4", "teacher.num_steps=4", "data.trajectory_steps=5",
         "data.shard_size=2", "data.batch_size=2", "data.actors=1",
         "distill.num_workers=1", "distill.micro_batch_size=1", "distill.ode_micro_batch_size=null",
         "distill.batch_size=2", "distill.ode_batch_size=2",
         "distill.ode_steps=4", "distill.steps=4", "distill.critic_ratio=2", "distill.checkpoint_every=2",
         "distill.sample_every=0", "distill.sample_prompts=1",
         "eval.num_prompts=1", "eval.seeds=[0]", "eval.actors=1", "eval.sample_videos=1", "eval.batch_size=1"]



def full_cmd(*args) -> list[str]:
    return [sys.executable, "-u", *FULL, "--preset", "tiny", *args]


def run_full(args, ray_address=None, timeout=1200, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    if ray_address:
        e["RAY_ADDRESS"] = ray_address
    return subprocess.run(full_cmd(*args), env={**e, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def log_since(path: Path, offset: int) -> str:
    """What a stage's log (``<run_dir>/logs/<stage>.log``, appended per attempt) gained after ``offset`` bytes."""
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def statuses(summary: dict) -> dict:
    return {s["stage"]: s["status"] for s in summary["stages"]}


def make_teacher(directory: Path) -> Path:
    """A randomly initialised tiny teacher bundle (the shipped one is not needed to test the plumbing)."""
    import torch

    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.pretrain import build_world_components, save_teacher

    cfg = load_config("tiny")
    _, text, codec = build_world_components(cfg)
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()
    return save_teacher(directory, model, text, codec, {"preset": "tiny"}, cfg)


def shutdown_serve(ray_address: str) -> None:
    """Remove every Serve app from the shared test cluster (other test modules start their own)."""
    code = ("import ray; from ray import serve; ray.init(address=%r, log_to_driver=False); serve.shutdown()"
            % ray_address)
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=180)


def registry_snapshot(run_dir: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    out = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        out[rm.name] = {"aliases": dict(rm.aliases or {}), "tags": dict(rm.tags), "description": rm.description,
                        "versions": sorted((int(v.version), tuple(sorted(v.tags.items()))) for v in versions)}
    return out


# ---------------------------------------------------------------------------------------------- fast: bad input
@pytest.mark.parametrize("args, expected", [
    (["--preset", "nope"], ["unknown preset 'nope'", "tiny", "wan2.1-1.3b"]),
    (["--stages", "ode_pairs,foo"], ["unknown stage(s) ['foo']", *STAGES]),
    (["--set", "data.storage=/proc/nope"], ["cannot write to '/proc/nope'"]),
    (["--set", "distill.storage_path=/proc/nope/ckpt"], ["cannot write to '/proc/nope/ckpt'"]),
    (["--run-dir", "s3://bucket/runs"], ["run_dir must be a local directory"]),
    (["--set", "distill.nope=1"], ["unknown field(s) ['nope'] in distill", "valid fields"]),
    (["--preset", "wan2.1-1.3b", "--set", "teacher.path=/nonexistent/wan"], ["teacher.path '/nonexistent/wan'"]),
])
def test_bad_input_is_an_error_naming_the_choices_before_anything_is_written(tmp_path, args, expected, monkeypatch,
                                                                             capsys):
    """The command's ``main`` in this process (the checks are the same; a separate interpreter per case only added
    its start-up): exit code 2 through argparse, never an exception. The command line itself, with its interpreter:
    test_s3_storage_that_cannot_be_written_is_refused_up_front."""
    run_dir = tmp_path / "runs"
    cmd = ["--run-dir", str(run_dir), *args] if "--run-dir" not in args else args
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # as run_full's environment
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    t0 = time.monotonic()
    code = run_main(full_main, ["--preset", "tiny", *cmd])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    for text in expected:
        assert text in err, (text, err[-2000:])
    assert "Traceback" not in err
    assert not run_dir.exists() and not list(tmp_path.iterdir())  # nothing written, not even the run dir
    assert time.monotonic() - t0 < 120  # refused up front, not after a stage


def test_s3_storage_that_cannot_be_written_is_refused_up_front(tmp_path, s3_server):
    r = run_full(["--run-dir", str(tmp_path / "runs"), "--set", "data.storage=s3://no-such-bucket/hiar"],
                 env=s3_server.env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no-such-bucket" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_stage_selection_is_in_pipeline_order_and_deploy_is_opt_in():
    from hiar.pipeline.full import InputError, parse_stages

    assert parse_stages(None, deploy=False) == STAGES[:-1]
    assert parse_stages(None, deploy=True) == STAGES
    assert parse_stages(["evaluate,ode_init", "register"], deploy=False) == ["ode_init", "evaluate", "register"]
    assert parse_stages(["deploy"], deploy=False) == ["deploy"]
    with pytest.raises(InputError, match="valid stages"):
        parse_stages(["train"], deploy=False)


# ---------------------------------------------------------------------------------------------- slow: end to end
def pipeline_args(root: Path, port: int, extra=()) -> list[str]:
    return ["--run-dir", str(root / "runs"), *set_args([f"teacher.path={root / 'teacher'}", *SMALL,
                                                     f"serve.port={port}", *extra])]


def ensure_pipeline(base: Path, ray_address: str) -> dict:
    """Run (or rerun: then every stage is skipped) the small tiny pipeline with --deploy under ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "teacher" / "card.json").exists():
        make_teacher(base / "teacher")
    port_file = base / "port"
    if not port_file.exists():
        port_file.write_text(str(free_port()))
    port = int(port_file.read_text())
    t0 = time.monotonic()
    r = run_full([*pipeline_args(base, port), "--deploy", "--summary-json", str(base / "summary.json")],
                 ray_address=ray_address)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
    summary = json.loads((base / "summary.json").read_text())
    first = base / "first-summary.json"  # the run that ran every stage (another module may have made it)
    if not first.exists():
        first.write_text(json.dumps(summary))
    return {"root": base, "run_dir": base / "runs", "port": port, "url": f"http://127.0.0.1:{port}",
            "summary": summary, "first_summary": json.loads(first.read_text()), "stdout": r.stdout,
            "seconds": seconds}


@pytest.fixture(scope="module")
def pipeline_run(ray_head, tmp_path_factory):
    """The whole small pipeline, deployed; Serve is removed from the shared cluster when the module ends."""
    base = tmp_path_factory.getbasetemp() / "hiar-full-pipeline"
    first = not (base / "summary.json").exists()
    run = ensure_pipeline(base, ray_head.address)
    run["first"] = first
    yield run
    shutdown_serve(ray_head.address)


@pytest.mark.slow
def test_whole_pipeline_ends_with_a_champion_and_an_endpoint_that_returns_a_playable_mp4(pipeline_run):
    import av
    import requests
    from mlflow import MlflowClient

    run, summary = pipeline_run, pipeline_run["summary"]
    got = statuses(summary)
    assert list(got) == STAGES
    if run["first"]:
        assert got == {**{s: "ran" for s in STAGES}, "teacher": "skipped"}, got  # teacher.path holds a bundle
    assert summary["ok"] and summary["parent_run_id"]
    assert "[full] summary" in run["stdout"] and "mlflow ui --backend-store-uri sqlite:///" in run["stdout"]
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\s+(ran|skipped)\s+\d+\.\d", run["stdout"], re.M), stage
    # the console: the orchestrator's own lines; each job's output went to its stage's log, listed in the summary
    assert "Ray's own logs:" in run["stdout"] and "[train:" not in run["stdout"]
    assert len(run["stdout"].splitlines()) < 300, run["stdout"][-6000:]
    for s in summary["stages"]:
        if s["status"] == "ran" and s["stage"] != "deploy":
            assert Path(s["log"]) == run["run_dir"] / "logs" / f"{s['stage']}.log" and Path(s["log"]).stat().st_size

    # the registry: one version, the champion, tagged with the bundle it came from
    client = MlflowClient(tracking_uri=f"sqlite:///{run['run_dir'] / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("hiar-student", "champion")
    assert str(champion.version) == "1"
    distilled = next(s for s in summary["stages"] if s["stage"] == "distill")["detail"]["output"]
    assert champion.tags["source_dir"] == distilled

    # MLflow: a parent run per pipeline run with a nested run per stage; the jobs' own runs hang under the parent
    # of the run that ran them (the first one: a rerun, e.g. when tests/integration/infra/test_notebook.py made the
    # pipeline before this module, skips every stage)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and "summary.txt" in {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    exps = [e.experiment_id for e in client.search_experiments()]

    def nested(parent_id: str) -> tuple[dict, set]:
        children = client.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        records = {c.data.tags.get("hiar.stage"): c for c in children if "hiar.stage" in c.data.tags}
        jobs = {client.get_experiment(c.info.experiment_id).name for c in children if "hiar.stage" not in c.data.tags}
        return records, jobs

    assert set(nested(parent.info.run_id)[0]) == set(STAGES)
    ran = run["first_summary"]["parent_run_id"]
    assert statuses(run["first_summary"]) == {**{s: "ran" for s in STAGES}, "teacher": "skipped"}
    records, jobs = nested(ran)
    assert set(records) == set(STAGES)
    assert {"hiar-train", "hiar-eval", "hiar-registry", "hiar-data"} <= jobs, jobs
    for stage in ("ode_init", "distill"):
        linked = records[stage].data.tags.get("hiar.stage_run_id")
        assert linked and client.get_run(linked).data.tags["mlflow.parentRunId"] == ran

    # the endpoint: a real POST, a real decoder, the right number of frames
    r = requests.post(f"{run['url']}/v1/videos", json={"prompt": "a red square moves left slowly over a black "
                                                                 "background", "num_blocks": 3, "stream": False},
                      timeout=300)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:500]
    with av.open(io.BytesIO(r.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 * 3 == int(r.headers["X-HiAR-Num-Frames"])
    assert frames[0].shape[:2] == (16, 16)
    limits = requests.get(f"{run['url']}/v1/limits", timeout=30).json()
    assert limits["model"]["pinned"] == "models:/hiar-student/1"


@pytest.mark.slow
def test_rerun_skips_every_stage_in_seconds_and_changes_nothing_in_the_registry(pipeline_run, ray_head):
    before = registry_snapshot(pipeline_run["run_dir"])
    again = ensure_pipeline(pipeline_run["root"], ray_head.address)
    assert statuses(again["summary"]) == {s: "skipped" for s in STAGES}
    assert again["summary"]["seconds"] < 60, again["summary"]  # the stages' own time: checks, no compute
    assert again["seconds"] < 120  # the whole command, imports and Ray/MLflow start-up included (shared CPU)
    assert registry_snapshot(pipeline_run["run_dir"]) == before


@pytest.mark.slow
def test_deleting_the_evaluation_reruns_only_it_and_the_stages_after_it(pipeline_run, ray_head):
    run_dir = pipeline_run["run_dir"]
    evals = list((run_dir / "eval").glob("*.json"))
    assert len(evals) == 1
    before = registry_snapshot(run_dir)
    evals[0].unlink()
    again = ensure_pipeline(pipeline_run["root"], ray_head.address)
    got = statuses(again["summary"])
    assert all(got[s] == "skipped" for s in STAGES[:STAGES.index("evaluate")]), got
    assert got["evaluate"] == "ran" and got["register"] == "ran", got  # register: new evaluation run id
    assert evals[0].exists()
    after = registry_snapshot(run_dir)
    # the same bundle: the same single version and champion; only its eval_run_id tag follows the new evaluation
    assert [v for v, _ in after["hiar-student"]["versions"]] == [v for v, _ in before["hiar-student"]["versions"]]
    assert after["hiar-student"]["aliases"] == before["hiar-student"]["aliases"]
    new_eval = json.loads(evals[0].read_text())["run_id"]
    assert dict(after["hiar-student"]["versions"][0][1])["eval_run_id"] == new_eval


@pytest.mark.slow
def test_sigkill_mid_distillation_then_resubmit_resumes_from_the_last_checkpoint(pipeline_run, ray_head):
    """The driver (full.py) is SIGKILLed mid-distillation, right after a checkpoint: its train.py child dies with
    it; the resubmitted command skips the finished stages, resumes distillation from the last checkpoint Ray Train
    had committed in the same MLflow run (one continuous loss curve) and continues the same parent run.

    "Last committed": a worker prints "checkpoint at step N" once its report() returns, and the controller
    records the checkpoint a moment later, so a kill in between resumes from N - checkpoint_every."""
    from mlflow import MlflowClient

    root, port = pipeline_run["root"], pipeline_run["port"]
    extra = ["distill.steps=12", "distill.checkpoint_every=2"]  # a new distill identity; data + ode_init are reused
    args = [*pipeline_args(root, port, extra), "--stages", "ode_pairs,trajectories,ode_init,distill"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # the train job's output goes to the stage's log (appended per attempt): read what this attempt adds
    log = pipeline_run["run_dir"] / "logs" / "distill.log"
    start = log.stat().st_size if log.exists() else 0
    console = root / "sigkill-console.txt"
    with open(console, "w") as out:
        proc = subprocess.Popen(full_cmd(*args), env={**env, "RAY_ADDRESS": ray_head.address}, stdout=out,
                                stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    killed_at = None
    deadline = time.monotonic() + 1200
    while killed_at is None and proc.poll() is None:
        steps = [int(x) for x in re.findall(r"\[train:distill\] checkpoint at step (\d+)", log_since(log, start))]
        if steps and max(steps) >= 6:  # mid-run, with earlier checkpoints and logged losses behind it
            killed_at = max(steps)
            os.kill(proc.pid, signal.SIGKILL)
        assert time.monotonic() < deadline, log_since(log, start)[-5000:]
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 12, (console.read_text()[-3000:], log_since(log, start)[-5000:])
    assert proc.returncode == -signal.SIGKILL
    parent = re.search(r"MLflow parent run (\w+)", console.read_text()).group(1)

    summary_path = root / "resume-summary.json"
    resubmitted_ms = int(time.time() * 1000)
    resubmitted_at = log.stat().st_size
    r = run_full([*args, "--summary-json", str(summary_path)], ray_address=ray_head.address)
    out = r.stdout
    assert r.returncode == 0, (out[-6000:], r.stderr[-3000:])
    got = statuses(json.loads(summary_path.read_text()))
    assert got == {"ode_pairs": "skipped", "trajectories": "skipped", "ode_init": "skipped", "distill": "ran"}, got
    resumed_log = log_since(log, resubmitted_at)
    resumed = set(int(x) for x in re.findall(r"resumed from checkpoint at step (\d+)", resumed_log))
    assert len(resumed) == 1, [ln for ln in resumed_log.splitlines() if "step" in ln][-40:]
    resumed_at = resumed.pop()
    assert killed_at - 2 <= resumed_at <= killed_at  # the last committed checkpoint, not step 0
    assert f"continuing the unfinished pipeline run {parent}" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_run['run_dir'] / 'mlflow.db'}")
    identity = json.loads(summary_path.read_text())["stages"][-1]["detail"]["identity"]
    exp = client.get_experiment_by_name("hiar-train")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`hiar.train_identity` = '{identity}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run across the kill
    assert runs[0].data.tags["mlflow.parentRunId"] == parent
    history = client.get_metric_history(runs[0].info.run_id, "critic_loss")
    before = [m.step for m in history if m.timestamp < resubmitted_ms]
    after = [m.step for m in history if m.timestamp >= resubmitted_ms]
    assert before and max(before) <= killed_at  # the curve's first part, logged before the kill ...
    assert after and min(after) > resumed_at and max(after) == 12  # ... continued from the checkpoint, not from 0
    assert json.loads((Path(json.loads(summary_path.read_text())["stages"][-1]["detail"]["output"]) /
                       "card.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_data_on_s3_and_runs_on_an_mlflow_server(ray_head, s3_server, mlflow_server, tmp_path):
    """The cluster configuration on one box: datasets on S3 (moto), tracking on an MLflow server; a rerun skips."""
    from mlflow import MlflowClient

    s3_server.client().create_bucket(Bucket="hiar-full")
    teacher = make_teacher(tmp_path / "teacher")
    args = ["--run-dir", str(tmp_path / "runs"), "--stages", "ode_pairs,trajectories",
            *set_args([f"teacher.path={teacher}", "data.storage=s3://hiar-full/data", *SMALL]),
            "--summary-json", str(tmp_path / "summary.json")]
    env = {**s3_server.env, "MLFLOW_TRACKING_URI": mlflow_server}
    r = run_full(args, ray_address=ray_head.address, env=env)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    first = json.loads((tmp_path / "summary.json").read_text())
    assert statuses(first) == {"ode_pairs": "ran", "trajectories": "ran"}
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="hiar-full")["Contents"]}
    assert {"data/ode_pairs/manifest.json", "data/trajectories/manifest.json"} <= keys
    assert {"data/ode_pairs/shard-00000.parquet", "data/trajectories/shard-00001.parquet"} <= keys
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # tracking went to the server
    assert f"MLflow UI: {mlflow_server}" in r.stdout

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["hiar.stage"]: c.data.tags["hiar.stage_status"] for c in children} == \
        {"ode_pairs": "ran", "trajectories": "ran"}

    r = run_full(args, ray_address=ray_head.address, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert statuses(json.loads((tmp_path / "summary.json").read_text())) == {"ode_pairs": "skipped",
                                                                             "trajectories": "skipped"}
