"""hiar/jobs/evaluate.py: the actor's work without Ray, the whole job on the real local Ray cluster with a registry
URI, reuse of a finished evaluation, and the input errors that must come before any compute."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiar.config import load_config
from hiar.core.rollout import ROLLOUT_MODES as MODES
from tests.services import job_here, random_bundle, set_args

ROOT = Path(__file__).resolve().parents[3]
# one seed and one actor: the tiny preset evaluates 32 prompts x 2 seeds on 2 actors
SMALL = ["eval.num_prompts=2", "eval.seeds=[0]", "eval.actors=1", "video.eval_horizon_factor=2", "eval.sample_videos=2"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("eval-bundles") / "bundle-0")


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _env(ray_head):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # run_dir decides (SQLite)
    env["RAY_ADDRESS"] = ray_head.address
    return env


def test_actor_and_summary_without_ray(bundle, tmp_path):
    """The actor's per-item work and the driver's aggregation, called directly: every mode gets drift slopes,
    the Drift Score, dynamics and oracle scores; sample frames come back as uint8 for the flagged items only.
    Every mean comes with its standard error over the samples, and the per-sample table holds the values it is
    the mean of, keyed by (prompt, seed)."""
    from hiar.methods.pretrain import eval_prompts
    from hiar.eval.summary import summarize
    from hiar.platform.evaluation import EvalActor

    cfg = load_config("tiny")
    actor = EvalActor(str(bundle), cfg.to_dict(), list(MODES), num_blocks=4, segments=5, use_oracle=True,
                      weights_dir=None)
    out = actor({"index": [0, 1], "prompt": [eval_prompts(1)[0]] * 2,
                 "seed": [0, 1], "sample": [True, False]})
    assert out["frames"][1] == b"" and len(out["frames"][0]) > 0
    metrics, reports, samples, table = summarize([{k: v[i] for k, v in out.items()} for i in (1, 0)], list(MODES))
    for mode in MODES:
        for key in ("drift/score", "drift/saturation_slope", "drift/sharpness_slope", "drift/pixel_similarity_slope",
                    "drift/saturation_seg4", "dynamics/dynamic_degree", "oracle/caption_consistency",
                    "oracle/motion_accuracy", "oracle/static"):
            assert f"{mode}/{key}" in metrics, (mode, key)
        assert metrics[f"{mode}/oracle/static"] in (0.0, 0.5, 1.0)  # the share of the 2 videos that stand still
        assert reports[mode].num_videos == 2
        # learned scorers have no weights here: reported as skipped, never as a number
        assert "musiq" in reports[mode].skipped and f"{mode}/drift/musiq_slope" not in metrics
        assert samples[mode].shape == (1, 12, 16, 16, 3) and samples[mode].dtype.name == "uint8"
    assert metrics["eval/num_videos"] == 2

    prompt = eval_prompts(1)[0]
    assert table["keys"] == [[prompt, 0], [prompt, 1]]  # item order, whatever order the rows came back in
    means = [k for k in table["values"] if not k.endswith("/drift/num_metrics")]
    assert {f"{m}/drift/score" for m in MODES} <= set(means) and all(f"{k}_se" in metrics for k in means)
    for key in means:
        a, b = table["values"][key]
        assert metrics[key] == pytest.approx((a + b) / 2, rel=1e-9, abs=1e-12), key  # the logged mean ...
        assert metrics[f"{key}_se"] == pytest.approx(abs(a - b) / 2, rel=1e-9, abs=1e-12), key  # ... and its se
    assert not any(k.endswith("_n") or k.endswith("num_metrics_se") for k in metrics)  # every sample has every value
    assert metrics["hierarchical/drift/score_se"] > 0  # two seeds, two videos


def test_plan_defaults_to_four_times_the_training_horizon_on_held_out_prompts(bundle, tmp_path):
    """The plan (no Ray, no MLflow for a local bundle): the tiny preset evaluates 4 x 12 = 48 latent frames on the
    held-out prompts x eval.seeds in both modes, with the oracle; a prompt dataset (data.prompts, the Wan preset)
    gives the first N of its held-out split and no oracle.  Identity is about the settings: equal for any model, different for other settings."""
    from hiar.methods.pretrain import eval_prompts
    from hiar.platform.evaluation_plan import plan_evaluation

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    plan = plan_evaluation(cfg, str(bundle))
    assert plan.latent_frames == 48 == cfg.video.eval_horizon_factor * cfg.video.train_latent_frames
    assert plan.num_blocks == 16 and plan.modes == list(MODES) and plan.use_oracle
    assert plan.prompts == eval_prompts(cfg.eval.num_prompts, "heldout") and plan.seeds == cfg.eval.seeds
    assert len(plan.items()) == len(plan.prompts) * len(plan.seeds)
    more_seeds = f"eval.seeds={[*cfg.eval.seeds, max(cfg.eval.seeds) + 1]}".replace(" ", "")
    assert plan_evaluation(load_config("tiny", [f"run_dir={tmp_path}", more_seeds]),
                           str(bundle)).identity() != plan.identity()
    ablation = plan_evaluation(cfg, str(bundle), ["rollout.context_noise=current", "eval.actors=2"])
    assert ablation.gen_config["rollout"]["context_noise"] == "current"
    assert ablation.generation_hash() != plan.generation_hash()

    from hiar.io.prompts import load_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat surfing\n\na dog skiing\na fox running\na dog skiing\nan owl flying\n")
    wan_like = plan_evaluation(load_config("tiny", [f"run_dir={tmp_path}", f"data.prompts={prompts}",
                                                    "data.heldout_prompts=3", "eval.num_prompts=2"]), str(bundle))
    held = load_prompts(str(prompts), 3).heldout
    assert wan_like.prompts == list(held[:2]) and not wan_like.use_oracle


def test_registry_uri_end_to_end_on_the_cluster_then_reuse(ray_head, bundle, tmp_path, monkeypatch, capsys):
    """--model models:/hiar-student@champion: resolved driver-side to version 1, evaluated by the Ray Data actor pool
    in both modes; the run holds per-mode drift/dynamics/oracle metrics, the segment plot and sample MP4s; the JSON
    names run, URI and version.  The same weights as a local directory with --reuse find that run again."""
    import mlflow

    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs.mkdir()
    mlflow.set_tracking_uri(uri)
    from hiar.platform.registry import log_bundle
    from hiar.platform.tracking import experiment_id

    experiment_id("hiar-setup")
    with mlflow.start_run(experiment_id=experiment_id("hiar-setup")):
        info = log_bundle(bundle, registered_model_name="hiar-student")
    client = _client(uri)
    client.set_registered_model_alias("hiar-student", "champion", info.registered_model_version)

    # the job's main, here, as the cluster's driver for the job (run_dir decides the store: SQLite, as `uri`)
    from hiar.jobs import evaluate

    out = tmp_path / "eval.json"
    t0 = time.monotonic()
    r = job_here(evaluate.main, ["--preset", "tiny", "--model", "models:/hiar-student@champion", "--output-json",
                                 str(out), *set_args(SMALL + [f"run_dir={runs}"])], capsys,
                 env={"RAY_ADDRESS": ray_head.address, "MLFLOW_TRACKING_URI": None})  # run_dir's store: `uri`
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    print(f"evaluate: {time.monotonic() - t0:.1f} s")
    from hiar.jobs.results import EvaluationResult, read_result
    from hiar.platform.progress import parse

    typed = read_result(out, EvaluationResult)
    assert typed.model_uri == "models:/hiar-student@champion" and typed.version == "1" and not typed.reused
    result = json.loads(out.read_text())
    assert "drift/score" in r.stdout and "hierarchical" in r.stdout  # the summary table
    events = [e for e in map(parse, r.stdout.splitlines()) if e is not None and e.task == "evaluate"]
    assert events and (events[-1].done, events[-1].total, events[-1].unit) == (2, 2, "videos")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "hiar-eval"
    assert run.data.params["model_version"] == "1" and run.data.params["eval.num_prompts"] == "2"
    assert run.data.params["latent_frames"] == "24" and run.data.params["num_blocks"] == "8"
    m = run.data.metrics
    for mode in MODES:
        for key in ("drift/score", "drift/saturation_slope", "drift/sharpness_slope", "drift/pixel_similarity_slope",
                    "dynamics/dynamic_degree", "oracle/caption_consistency", "oracle/motion_accuracy"):
            assert f"{mode}/{key}" in m and f"{mode}/{key}_se" in m, (mode, key)
            assert m[f"{mode}/{key}"] == pytest.approx(result["metrics"][f"{mode}/{key}"])
    assert m["eval/num_videos"] == 2
    from hiar.platform.evaluation import load_sample_values

    table = load_sample_values(result["run_id"])  # the per-sample artifact the gate pairs
    assert [k[1] for k in table["keys"]] == [0, 0] and len({k[0] for k in table["keys"]}) == 2
    assert m["hierarchical/drift/score"] == pytest.approx(sum(table["values"]["hierarchical/drift/score"]) / 2)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    arts |= {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert arts == {"plots/drift_segments.png", "samples/hierarchical.mp4", "samples/block_first.mp4"}
    local = Path(client.download_artifacts(run.info.run_id, "samples/hierarchical.mp4", str(tmp_path / "dl")))
    from hiar.io.video import read_mp4

    assert read_mp4(local).shape[0] == 24  # 2 prompts tiled side by side, 24 frames
    png = Path(client.download_artifacts(run.info.run_id, "plots/drift_segments.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same weights from their local directory, same settings: --reuse returns that run without computing
    out2 = tmp_path / "eval2.json"
    t0 = time.monotonic()
    assert evaluate.main(["--preset", "tiny", "--model", str(bundle), "--reuse", "--output-json", str(out2),
                          *set_args(SMALL + [f"run_dir={runs}"])]) == 0
    again = json.loads(out2.read_text())
    assert again["run_id"] == result["run_id"] and again["reused"] is True and again["version"] is None
    assert time.monotonic() - t0 < 30


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines, err
    return lines[-1]


def test_bad_model_is_an_error_before_any_compute(bundle, tmp_path, monkeypatch, capsys):
    from hiar.jobs import evaluate

    runs = tmp_path / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{runs / 'mlflow.db'}")
    runs.mkdir()
    base = ["--preset", "tiny", *set_args(SMALL + [f"run_dir={runs}"])]
    t0 = time.monotonic()
    cases = {
        str(tmp_path / "no-such-dir"): "no such directory",
        str(tmp_path): "holds no model: missing ['transformer/']",
        "models:/hiar-student@champion": "cannot resolve model 'models:/hiar-student@champion'",
        "models:/no-such-model/3": "cannot resolve model",
    }
    for model, message in cases.items():
        assert evaluate.main([*base, "--model", model]) == 2, model
        err = _error_line(capsys.readouterr().err)
        assert message in err, (model, err)
    # an alias that does not exist on a model that does
    import mlflow

    from hiar.platform.registry import log_bundle

    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    from hiar.platform.tracking import experiment_id

    with mlflow.start_run(experiment_id=experiment_id("hiar-setup")):
        log_bundle(bundle, registered_model_name="hiar-student")
    assert evaluate.main([*base, "--model", "models:/hiar-student@champion"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "alias" in err and "champion" in err, err
    # settings: a horizon too short for 5 segments
    assert evaluate.main(["--preset", "tiny", "--model", str(bundle), "--set", "video.eval_horizon_factor=1",
                          "--set", "video.train_latent_frames=6", "--set", f"run_dir={runs}"]) == 2
    assert "segments" in _error_line(capsys.readouterr().err)
    assert time.monotonic() - t0 < 60
    exp = mlflow.get_experiment_by_name("hiar-eval")
    assert exp is None or not mlflow.MlflowClient().search_runs([exp.experiment_id])  # nothing was evaluated


@pytest.mark.slow
def test_local_bundle_nested_two_actors_and_a_rollout_ablation(ray_head, bundle, tmp_path):
    """A local bundle directory, two seeds, two actors, nested under a parent run, with t_c = t_j
    (rollout.context_noise=current) applied on top of the bundle's own config."""
    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    runs.mkdir()
    client = _client(uri)
    parent = client.create_run(client.create_experiment("hiar-full-test")).info.run_id
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "hiar.jobs.evaluate", "--preset", "tiny",
                        "--model", str(bundle), "--output-json", str(out), "--parent-run-id", parent,
                        "--run-name", "ablation-tc-current",
                        *set_args(SMALL + [f"run_dir={runs}", "eval.seeds=[0,1]", "eval.actors=2", "eval.batch_size=1",
                                        "rollout.context_noise=current"])],
                       env=_env(ray_head), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    result = json.loads(out.read_text())
    assert result["version"] is None and result["model_uri"] == str(bundle)
    run = client.get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["mlflow.runName"] == "ablation-tc-current"
    assert run.data.params["generation.rollout.context_noise"] == "current"
    assert run.data.metrics["eval/num_videos"] == 4
