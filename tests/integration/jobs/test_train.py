"""hiar/jobs/train.py on the real local Ray cluster: ODE init + distillation end to end, resume, worker kill,
and the errors that must come before the first step.

Over 400 lines because every test here shares one module-scoped world (a teacher and its two datasets, built once)
and the ODE-init student the first test leaves: split, each file would build them again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiar.io.bundle import load_bundle
from tests.services import job_here, random_bundle, set_args

ROOT = Path(__file__).resolve().parents[3]
DATA_FAST = ["teacher.num_steps=4", "data.trajectory_steps=5", "data.shard_size=2", "data.batch_size=2",
             "data.threads_per_actor=1", "data.num_ode_pairs=4", "data.num_trajectories=4"]
TRAIN_FAST = ["distill.num_workers=2", "distill.micro_batch_size=1", "distill.ode_micro_batch_size=null",
              "distill.batch_size=2", "distill.ode_batch_size=2", "distill.ode_steps=4", "distill.steps=4", "distill.critic_ratio=2",
              "distill.checkpoint_every=2", "distill.sample_every=2", "distill.sample_prompts=1",
              "distill.lr_ode=1.0e-4", "distill.lr_generator=1.0e-5", "distill.lr_critic=1.0e-5"]



@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """A random tiny teacher and small ode_pairs / trajectories datasets, as the generate job writes them: each
    shard computed here by the job's own Ray Data actor class (hiar.jobs.generate.ShardGenerator, called directly),
    then the job's main finds every shard committed and writes the manifest, as on a rerun after a kill. The job on
    Ray Data itself, whose shards equal direct sampling bit for bit: tests/integration/jobs/test_data.py."""
    from hiar.config import load_config
    from hiar.io.prompts import prompt_set
    from hiar.io.storage import ShardPlan, load_manifest
    from hiar.jobs import generate
    from hiar.methods.datagen import shard_items

    root = tmp_path_factory.mktemp("train")
    teacher = random_bundle(root / "teacher")
    base = [f"teacher.path={teacher}", f"data.storage={root / 'data'}", f"run_dir={root / 'runs'}"]
    cfg = load_config("tiny", DATA_FAST + base)
    plan = ShardPlan(4, cfg.data.shard_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the job's MLflow exports the URI it sets: not past here
        for kind in ("ode_pairs", "trajectories"):
            actor = generate.ShardGenerator("tiny", DATA_FAST + base, kind, str(root / "data" / kind), str(teacher))
            for item in shard_items(prompt_set(cfg).train, range(plan.num_shards), plan):
                actor({key: [value] for key, value in item.items()})  # a batch of one item, as Ray Data calls it
            assert generate.main(["--preset", "tiny", "--kind", kind, "--count", "4", "--actors", "1",
                                  *set_args(DATA_FAST + base)]) == 0
            assert load_manifest(str(root / "data" / kind))["count"] == 4
    return root, base


def job_env(ray_head, env=None) -> dict:
    """The job's environment: this cluster, and no MLFLOW_TRACKING_URI (mlflow.set_tracking_uri in this test
    process exports it; each job tracks into its own run dir's SQLite store)."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**base, "RAY_ADDRESS": ray_head.address, **(env or {})}


def run_train(ray_head, args, env=None, **kw):
    cmd = [sys.executable, "-m", "hiar.jobs.train", "--preset", "tiny", *args]
    return subprocess.run(cmd, env=job_env(ray_head, env), capture_output=True, text=True, timeout=900, **kw)


def train_here(ray_head, args, capsys, env=None) -> subprocess.CompletedProcess:
    """run_train without an interpreter of its own: the job's main in this process with run_train's environment
    (tests.services.job_here: what subprocess.run would return, plus ``joined``: whether it joined the cluster)."""
    from hiar.jobs.train import main

    return job_here(main, ["--preset", "tiny", *args], capsys,
                    {"RAY_ADDRESS": ray_head.address, "MLFLOW_TRACKING_URI": None, **(env or {})})


def ode_init_student(ray_head, world_dir) -> Path:
    """The ODE-init student of this module's world (normally left by the end-to-end test; made here if not)."""
    root, base = world_dir
    if not list((root / "runs" / "students").glob("ode_init-*")):
        r = run_train(ray_head, ["--stage", "ode_init", *set_args(DATA_FAST + base + TRAIN_FAST)])
        assert r.returncode == 0, r.stderr[-3000:]
    return next((root / "runs" / "students").glob("ode_init-*"))


def _client(root):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_two_workers_end_to_end_logs_checkpoints_and_resumes_as_a_skip(ray_head, world_dir, capsys):
    from hiar.jobs.results import TrainResult, read_result
    from hiar.platform.progress import parse

    root, base = world_dir
    result_json = root / "train-result.json"
    r = train_here(ray_head, ["--stage", "all", "--output-json", str(result_json),
                              *set_args(DATA_FAST + base + TRAIN_FAST)], capsys)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    students = sorted((root / "runs" / "students").iterdir())
    assert [p.name.split("-")[0] for p in students] == ["distill", "ode_init"]
    distilled = load_bundle(students[0])
    assert distilled.card["steps"] == 4 and distilled.card["stage"] == "distill"
    assert distilled.card["rollout"] == "hierarchical"  # the configured rollout, recorded by the workers
    assert distilled.card["teacher"] == distilled.card["real_score"] == str(root / "teacher")
    assert distilled.config.distill.num_workers == 2

    client = _client(root)
    exp = client.get_experiment_by_name("hiar-train")
    runs = client.search_runs([exp.experiment_id])
    parents = [r_ for r_ in runs if "mlflow.parentRunId" not in r_.data.tags]
    children = [r_ for r_ in runs if "mlflow.parentRunId" in r_.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    dist = next(c for c in children if c.data.tags["mlflow.runName"].startswith("distill"))
    assert dist.data.params["distill.rollout"] == "hierarchical"
    for key in ("dmd_loss", "fkl_loss", "critic_loss", "generator_grad_norm", "steps_per_s"):
        assert key in dist.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(dist.info.run_id)}
    assert {"samples", "card.json"} <= artifacts
    modes = {a.path for a in client.list_artifacts(dist.info.run_id, "samples")}
    assert modes == {"samples/hierarchical", "samples/block_first"}
    ckpts = list((root / "runs" / "train").glob("distill-*/checkpoint_*"))
    assert ckpts, "no Ray Train checkpoints written"
    # 4 steps over 2 micro-batches per worker and epoch: epochs 2.. replay the shard from memory
    assert "ode_pairs: 2 micro-batches" in r.stdout and "trajectories: 2 micro-batches" in r.stdout, r.stdout[-3000:]
    # the last stage's typed result: its bundle, identity, steps, last losses (from rank 0) and MLflow run
    result = read_result(result_json, TrainResult)
    assert (result.stage, result.output, result.steps) == ("distill", str(students[0]), 4)
    assert result.identity == distilled.card["identity"] and result.run_id == dist.info.run_id
    assert {"dmd_loss", "fkl_loss", "critic_loss"} <= set(result.losses)
    assert result.losses["critic_loss"] == pytest.approx(
        client.get_metric_history(dist.info.run_id, "critic_loss")[-1].value)
    # rank 0's progress of each stage, one task per stage, ending at its step count
    events = [e for e in map(parse, r.stdout.splitlines()) if e is not None]
    for stage in ("ode_init", "distill"):
        mine = [e for e in events if e.task == f"train {stage}"]
        assert mine and (mine[-1].done, mine[-1].total, mine[-1].unit) == (4, 4, "steps"), (stage, events)

    # the same command again: both stages are recognised as done, nothing retrains: the job does not even join
    # the cluster
    t0 = time.monotonic()
    result_json.unlink()
    r2 = train_here(ray_head, ["--stage", "all", "--output-json", str(result_json),
                               *set_args(DATA_FAST + base + TRAIN_FAST)], capsys)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert r2.stdout.count("skipping") == 2 and not r2.joined
    assert read_result(result_json, TrainResult) == result  # a skipped stage hands on the same result
    assert time.monotonic() - t0 < 120


def test_a_rerun_of_a_stage_on_two_workers_repeats_its_weights_bit_for_bit(ray_head, world_dir):
    """The same stage identity trained again in another run directory (the same data, two workers) gives the same
    bytes: each worker reads a fixed part of the dataset in file order (hiar.platform.training.dataset_parts), where
    Ray Train's own split handed blocks to whichever worker asked first."""
    root, base = world_dir
    first = ode_init_student(ray_head, world_dir)
    again = root / "runs-again"
    r = run_train(ray_head, ["--stage", "ode_init", *set_args(DATA_FAST + base + TRAIN_FAST + [f"run_dir={again}"])])
    assert r.returncode == 0, r.stderr[-3000:]
    second = again / "students" / first.name  # the same identity
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (second / weights).read_bytes() == (first / weights).read_bytes()
    # and training moved them: the student starts from the teacher's weights
    assert (second / weights).read_bytes() != (root / "teacher" / weights).read_bytes()


@pytest.mark.slow  # one more Ray Train run (~80 s quiet); the default suite covers it: the end-to-end test above
# (distill on Ray Train, overrides reaching the workers, the card's rollout) and Distiller.iteration_step with
# distill.rollout=block_first in tests/unit/methods/test_sharding.py::test_activation_checkpointing_on_and_off_...
def test_block_first_is_a_config_switch_on_the_same_path(ray_head, world_dir):
    root, base = world_dir
    init = ode_init_student(ray_head, world_dir)
    r = run_train(ray_head, ["--stage", "distill", "--init", str(init), *set_args(DATA_FAST + base + TRAIN_FAST),
                             "--set", "distill.rollout=block_first", "--set", "distill.num_workers=1",
                             "--set", "distill.steps=2"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    cards = [json.loads(p.read_text()) for p in (root / "runs" / "students").glob("distill-*/card.json")]
    assert any(c["rollout"] == "block_first" for c in cards)


def _wait_for_committed_checkpoint(runs: Path, timeout: float = 120.0) -> bool:
    """A worker's report() returns once its checkpoint is uploaded; the Ray Train controller registers it a moment
    later (and only then would a restart resume from it). The controller's snapshot file is that registration."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in (runs / "train").glob("distill-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snap.read_text()).get("checkpoint_results"):
                    return True
            except (OSError, ValueError):  # written while we read it
                pass
        time.sleep(0.2)
    return False


def _checkpoints(runs: Path) -> list[Path]:
    return sorted(p for p in (runs / "train").glob("distill-*/checkpoint_*") if p.is_dir())


@pytest.mark.slow  # two Ray Train runs (~5 min here); tests/unit/methods/test_sharding.py checks the same maths without Ray
def test_fsdp_checkpoints_are_sharded_resume_on_one_worker_and_export_the_ema(ray_head, world_dir):
    """distill.sharding=fsdp on 2 Ray Train workers: each checkpoint is one torch.distributed.checkpoint directory
    holding both ranks' shards (merged by Ray Train); the exported bundle loads with from_pretrained and equals the
    EMA of the last checkpoint; distill.resume_from that checkpoint on 1 worker continues from its step."""
    import torch

    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.sharding import read_counters, read_full_model

    root, base = world_dir
    init = ode_init_student(ray_head, world_dir)
    common = ["--stage", "distill", "--init", str(init), *set_args(DATA_FAST + base + TRAIN_FAST),
              "--set", "distill.sharding=fsdp", "--set", "distill.sample_every=0"]
    runs = root / "runs-fsdp"
    r = run_train(ray_head, [*common, "--set", f"run_dir={runs}", "--set", "distill.steps=2"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    ckpt = _checkpoints(runs)[-1]
    files = {f.name for f in ckpt.iterdir()}
    assert {".metadata", "trainer.json"} <= files, files
    assert sorted(f for f in files if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert not any(f.endswith(".pt") for f in files)  # nothing gathered on one rank
    assert read_counters(ckpt)["world_size"] == 2 and read_counters(ckpt)["generator_steps"] == 2

    bundle = next((runs / "students").glob("distill-*"))
    assert read_counters(ckpt)["run"] == load_bundle(bundle).card["identity"]  # what a resumed run is named after
    exported = CausalWanTransformer3DModel.from_pretrained(bundle / "transformer").state_dict()
    ema = read_full_model(ckpt, "ema")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)

    # 2 -> 1: another run starts from that checkpoint on one worker (fsdp with one worker: unsharded, warned),
    # given as the first run's directory (its latest checkpoint)
    runs1 = root / "runs-fsdp-1"
    r = run_train(ray_head, [*common, "--set", f"run_dir={runs1}", "--set", "distill.steps=4",
                             "--set", "distill.num_workers=1", "--set", f"distill.resume_from={ckpt.parent}"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"resumed from checkpoint at step 2 (distill.resume_from {ckpt})" in r.stdout
    assert load_bundle(next((runs1 / "students").glob("distill-*"))).card["steps"] == 4
    assert read_counters(_checkpoints(runs1)[-1])["world_size"] == 1


def _uniform_copy(src: Path, dst: Path) -> None:
    """A copy of a dataset whose every row is its first sample: however Ray Data splits it over workers, every
    micro-batch holds the same data, so runs with different worker counts see the same global batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    first = pq.read_table(sorted(dst.glob("shard-*.parquet"))[0]).slice(0, 1)
    for shard in dst.glob("shard-*.parquet"):
        pq.write_table(pa.concat_tables([first] * pq.read_metadata(shard).num_rows), shard)


@pytest.mark.slow  # two Ray Train runs (~4 min here)
def test_fsdp_on_two_ray_train_workers_matches_one_unsharded_worker(ray_head, world_dir):
    """The same data and seed through Ray Train: distill.sharding=fsdp on 2 workers (1 micro-batch each) vs one
    unsharded worker with the whole batch (2 micro-batches): the losses MLflow records at the last generator step
    within 1e-5, the generator weights of the final checkpoints within 1e-6 (different rollout noise would move
    them ~1e-5 apart at this learning rate)."""
    import mlflow

    from hiar.methods.sharding import read_full_model

    root, base = world_dir
    init = ode_init_student(ray_head, world_dir)
    data = root / "data-uniform"
    _uniform_copy(root / "data" / "trajectories", data / "trajectories")
    results = {}
    for name, extra in (("fsdp2", ["distill.sharding=fsdp", "distill.num_workers=2"]),
                        ("single", ["distill.sharding=ddp", "distill.num_workers=1"])):
        runs = root / f"runs-equal-{name}"
        r = run_train(ray_head, ["--stage", "distill", "--init", str(init),
                                 *set_args(DATA_FAST + base + TRAIN_FAST + extra + [
                                     f"data.storage={data}", f"run_dir={runs}", "distill.steps=3",
                                     "distill.checkpoint_every=3", "distill.sample_every=0"])])
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
        client = mlflow.MlflowClient()
        run = next(x for x in client.search_runs([client.get_experiment_by_name("hiar-train").experiment_id])
                   if x.data.tags.get("mlflow.runName", "").startswith("distill"))
        losses = {k: client.get_metric_history(run.info.run_id, k) for k in ("dmd_loss", "fkl_loss", "critic_loss")}
        assert all(h[-1].step == 3 for h in losses.values())
        results[name] = ({k: h[-1].value for k, h in losses.items()},
                         read_full_model(_checkpoints(runs)[-1], "generator"))
    (loss_f, gen_f), (loss_s, gen_s) = results["fsdp2"], results["single"]
    print("\nlast-step losses fsdp x2 vs one worker:", {k: (loss_f[k], loss_s[k]) for k in loss_f})
    for k in loss_f:
        assert abs(loss_f[k] - loss_s[k]) <= 1e-5 * max(1.0, abs(loss_s[k])), k
    gap = max((gen_f[k] - gen_s[k]).abs().max().item() for k in gen_s)
    start = load_bundle(init).transformer.state_dict()
    moved = max((gen_s[k] - start[k]).abs().max().item() for k in gen_s)
    print(f"generator: max |fsdp - single| = {gap:.2e}; moved from the init by up to {moved:.2e}")
    assert gap <= 1e-6 < 10 * 1e-6 <= moved  # the tolerance is far below what training moved


def test_a_resume_checkpoint_of_another_shape_or_stage_is_refused_before_training(ray_head, world_dir, tmp_path,
                                                                                   capsys):
    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.sharding import save_checkpoint

    root, base = world_dir
    init = ode_init_student(ray_head, world_dir)
    kw = load_config("tiny").model.kwargs()
    other = CausalWanTransformer3DModel(**{**kw, "ffn_dim": kw["ffn_dim"] * 2})
    for stage in ("distill", "ode_init"):
        save_checkpoint(tmp_path / stage, {"generator": other, "critic": other, "ema": other}, {},
                        {"stage": stage, "iteration": 1})
    for stage, message in (("distill", "written for another model: generator.blocks.0.ffn"),
                           ("ode_init", "is a 'ode_init' checkpoint, not a 'distill' one")):
        r = train_here(ray_head, ["--stage", "distill", "--init", str(init), *set_args(DATA_FAST + base + TRAIN_FAST),
                                  "--set", f"distill.resume_from={tmp_path / stage}"], capsys)
        assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr
        assert "[train] distill:" not in r.stdout and not r.joined  # no MLflow run, no trainer, not even Ray


def plan_distill(world_dir, init: Path, *overrides) -> dict:
    """train.plan_stage of a distillation of this module's world from ``init`` (no compute, no Ray)."""
    from hiar.config import load_config
    from hiar.jobs.train import plan_stage

    root, base = world_dir
    teacher, storage = base[0].split("=", 1)[1], base[1].split("=", 1)[1]
    return plan_stage(load_config("tiny", DATA_FAST + base + TRAIN_FAST + [str(o) for o in overrides]), "distill",
                      storage, teacher, str(init))


def distill_checkpoint(path: Path, iteration: int, run: str) -> None:
    """A distillation checkpoint of the tiny model's shapes, as the train loop writes it (trainer.json names its run)."""
    from hiar.config import load_config
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.sharding import save_checkpoint

    model = CausalWanTransformer3DModel(**load_config("tiny").model.kwargs())
    save_checkpoint(path, {"generator": model, "critic": model, "ema": model}, {},
                    {"stage": "distill", "iteration": iteration, "run": run})


def test_a_student_is_named_by_its_real_scores_weights_and_a_resumed_one_by_the_run_it_continues(world_dir,
                                                                                                 tmp_path):
    """plan_stage (no compute): a real score retrained in place renames the student; distill.resume_from names the
    run that wrote the checkpoint and its iteration (trainer.json), not where the checkpoint lies, and a run's
    directory resumes from its checkpoint with the highest iteration."""
    init = random_bundle(tmp_path / "init", card={"identity": "i" * 16, "stage": "ode_init"})

    def plan(*overrides):
        return plan_distill(world_dir, init, *overrides)

    real = tmp_path / "real"
    random_bundle(real, seed=1)
    first = plan(f"teacher.real_score_path={real}")["identity"]
    assert plan(f"teacher.real_score_path={real}")["identity"] == first
    random_bundle(real, seed=2)  # retrained in place: same path, other weights
    assert plan(f"teacher.real_score_path={real}")["identity"] != first
    assert plan()["identity"] != first

    run_dir = tmp_path / "train" / "distill-r1"
    # Ray Train names checkpoints by time, so the names need not follow the iterations
    for name, iteration in (("checkpoint_b", 3), ("checkpoint_a", 7)):
        distill_checkpoint(run_dir / name, iteration, run="r" * 16)
    latest = plan(f"distill.resume_from={run_dir}")
    assert latest["resume_from"] == str(run_dir / "checkpoint_a")
    assert latest["identity"] == plan(f"distill.resume_from={run_dir / 'checkpoint_a'}")["identity"]
    moved = tmp_path / "elsewhere" / "checkpoint_c"
    shutil.copytree(run_dir / "checkpoint_a", moved)  # the same run's checkpoint in another place: one student
    assert plan(f"distill.resume_from={moved}")["identity"] == latest["identity"]
    assert plan(f"distill.resume_from={run_dir / 'checkpoint_b'}")["identity"] != latest["identity"]
    assert plan()["resume_from"] == ""


def test_a_run_directory_on_s3_resumes_from_its_latest_checkpoint(world_dir, s3_server, tmp_path, monkeypatch):
    """distill.resume_from=s3://.../train/distill-<identity>: the same choice and the same name as on disk."""
    init = random_bundle(tmp_path / "init", card={"identity": "i" * 16, "stage": "ode_init"})
    s3 = s3_server.client()
    s3.create_bucket(Bucket="hiar-resume")
    for name, iteration in (("checkpoint_b", 3), ("checkpoint_a", 7)):
        distill_checkpoint(tmp_path / name, iteration, run="r" * 16)
        for f in (tmp_path / name).iterdir():
            s3.upload_file(str(f), "hiar-resume", f"train/distill-r1/{name}/{f.name}")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)

    remote = plan_distill(world_dir, init, "distill.resume_from=s3://hiar-resume/train/distill-r1")
    assert remote["resume_from"] == "s3://hiar-resume/train/distill-r1/checkpoint_a"
    local = plan_distill(world_dir, init, f"distill.resume_from={tmp_path / 'checkpoint_a'}")
    assert remote["identity"] == local["identity"]  # named by its run, not its place


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_sigkill_of_a_worker_resumes_from_the_last_checkpoint_in_the_same_run(ray_head, world_dir, sharding):
    """SIGKILL rank 1 right after the first committed checkpoint: Ray Train restarts the group from it, the step counter
    continues, MLflow keeps one run, and the final model loads -- with whole models per worker and with FSDP."""
    import re

    import mlflow

    root, base = world_dir
    runs = root / f"runs-ft-{sharding}"
    init = ode_init_student(ray_head, world_dir)
    cmd = [sys.executable, "-m", "hiar.jobs.train", "--preset", "tiny", "--stage", "distill",
           "--init", str(init), *set_args(DATA_FAST + base + TRAIN_FAST), "--set", f"run_dir={runs}",
           "--set", "distill.steps=8", "--set", "distill.sample_every=0", "--set", f"distill.sharding={sharding}"]
    proc = subprocess.Popen(cmd, env=job_env(ray_head), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, pids, killed = [], {}, []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"rank (\d+)/\d+ pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        if not killed and "checkpoint at step" in line and 1 in pids and _wait_for_committed_checkpoint(runs):
            os.kill(pids[1], signal.SIGKILL)
            killed.append(pids[1])
    proc.wait(timeout=900)
    out = "".join(lines)
    assert killed, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    resumed_at = [int(x) for x in re.findall(r"resumed from checkpoint at step (\d+)", out)]
    assert resumed_at and min(resumed_at) >= 2, [ln for ln in lines if "pid" in ln or "step" in ln or "rror" in ln][-40:]  # continued from a checkpoint, not from step 0

    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("hiar-train")
    distill_runs = [x for x in client.search_runs([exp.experiment_id])
                    if x.data.tags.get("mlflow.runName", "").startswith("distill")]
    assert len(distill_runs) == 1  # no duplicate run after the restart
    history = client.get_metric_history(distill_runs[0].info.run_id, "critic_loss")
    assert max(m.step for m in history) == 8
    bundle = load_bundle(next((runs / "students").glob("distill-*")))
    assert bundle.card["steps"] == 8


@pytest.mark.parametrize("override, message", [
    (["video.latent_height=8", "video.latent_width=8"], "expects"),
    (["teacher.path=/nonexistent/teacher"], "/nonexistent/teacher"),
])
def test_bad_input_fails_before_the_first_step(ray_head, world_dir, override, message, capsys):
    root, base = world_dir
    r = train_here(ray_head, ["--stage", "ode_init", *set_args(DATA_FAST + base + TRAIN_FAST + override)], capsys)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and not r.joined


def test_s3_path_with_no_data_is_a_clear_error(ray_head, world_dir, s3_server, capsys):
    root, base = world_dir
    s3_server.client().create_bucket(Bucket="hiar-train-empty")
    r = train_here(ray_head, ["--stage", "ode_init", *set_args(DATA_FAST + base + TRAIN_FAST),
                              "--set", "data.storage=s3://hiar-train-empty/nothing-here"], capsys, env=s3_server.env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no ode_pairs dataset" in r.stderr and not r.joined


def test_a_users_sqlite_tracking_uri_stays_the_users_for_the_workers(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///<their file>: the experiment is created there, and the URI the driver hands
    the Ray Train workers (tracking_uri after mlflow_experiment) is that same store, not the run dir's default
    (the workers then could not find the run the driver created)."""
    import hiar.platform.tracking as common

    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    monkeypatch.setattr(common, "_DEFAULT_WE_SET", "")
    common.mlflow_experiment("hiar-train", str(tmp_path / "run"))
    assert common.tracking_uri(str(tmp_path / "run")) == theirs
    assert (tmp_path / "theirs.db").exists() and not (tmp_path / "run" / "mlflow.db").exists()
