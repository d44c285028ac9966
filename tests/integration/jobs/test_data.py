"""Ray Data generation of teacher data into Parquet shards, on local disk and on a real S3 server (moto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hiar.config import load_config
from hiar.io.storage import committed_shards, load_manifest, read_rows
from hiar.methods.datagen import TeacherSampler, load_teacher_components, merged_grid, prompt_source
from hiar.core.schedule import teacher_sigmas
from hiar.core.teacher import sample_teacher
from tests.services import job_here, random_bundle, set_args

ROOT = Path(__file__).resolve().parents[3]
FAST = ["teacher.num_steps=6", "data.trajectory_steps=7", "data.shard_size=3", "data.batch_size=2",
        "data.threads_per_actor=1"]


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """A randomly initialised tiny teacher in the shipped layout (the data path must not depend on training)."""
    return random_bundle(tmp_path_factory.mktemp("teacher"))


def latent_chw() -> tuple[int, int, int]:
    """The tiny preset's latent channels, height and width (what a stored latent frame holds)."""
    v = load_config("tiny").video
    return v.latent_channels, v.latent_height, v.latent_width


def generate_here(capsys, args, env=None) -> subprocess.CompletedProcess:
    """``python -m hiar.jobs.generate --preset tiny <FAST> <args>`` with ``env``, as the job's main in this process
    (tests.services.job_here: what subprocess.run would return, plus ``joined``). The command in an interpreter of
    its own: the killed-driver test."""
    from hiar.jobs.generate import main

    return job_here(main, ["--preset", "tiny", *set_args(FAST), *args], capsys, env)


def direct_states(teacher: Path, kind: str, index: int) -> torch.Tensor:
    cfg = load_config("tiny", FAST)
    transformer, text = load_teacher_components(cfg, str(teacher))
    sampler = TeacherSampler(cfg, kind, transformer, text, prompt_source(cfg))
    return sampler.states([sampler.prompt(index)], [sampler.seed(index)])[0]


def check_roundtrip(uri: str, teacher: Path, kind: str, count: int, column: str) -> None:
    rows = list(read_rows(uri))
    assert sorted(r["sample_id"] for r in rows) == list(range(count))
    for r in rows:
        assert r[column].dtype == torch.float16 and r[column].shape == (5, 12, *latent_chw())
    for index in (0, count - 1):
        row = next(r for r in rows if r["sample_id"] == index)
        expected = direct_states(teacher, kind, index)
        assert torch.equal(row[column], expected.half()), "stored tensor differs from a direct sampler call"
    manifest = load_manifest(uri)
    assert manifest["count"] == count and manifest["kind"] == kind and manifest["schema_version"] == 1
    assert manifest["teacher_checksum"] and manifest["config_hash"]


def progress_events(output: str, task: str) -> list:
    """The progress events (hiar.platform.progress) of ``task`` a job printed."""
    from hiar.platform.progress import parse

    return [e for e in map(parse, output.splitlines()) if e is not None and e.task == task]


def test_local_roundtrip_is_bit_identical_to_direct_sampling(ray_head, random_teacher, tmp_path, capsys):
    from hiar.jobs.results import DatasetResult, read_result

    out, result_json = tmp_path / "ode", tmp_path / "ode.json"
    proc = generate_here(capsys, ["--kind", "ode_pairs", "--count", "5", "--output", str(out), "--teacher",
                                  str(random_teacher), "--actors", "1", "--output-json", str(result_json)],
                         env={"RAY_ADDRESS": ray_head.address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 samples committed (5 generated now in 2 shards on 1 of 1 actor(s)," in proc.stdout
    check_roundtrip(str(out), random_teacher, "ode_pairs", 5, "latents")
    result = read_result(result_json, DatasetResult)
    assert (result.kind, result.uri, result.count, result.shards_written) == ("ode_pairs", str(out), 5, 2)
    assert result.identity == load_manifest(str(out))["identity"] and result.samples_per_s > 0 and result.run_id
    events = progress_events(proc.stdout, "generate ode_pairs")
    assert events and events[0].done == 0 and (events[-1].done, events[-1].total, events[-1].unit) == (5, 5, "samples")
    # a rerun skips every committed shard; with nothing to compute it does not even join the cluster
    again = generate_here(capsys, ["--kind", "ode_pairs", "--count", "5", "--output", str(out), "--teacher",
                                   str(random_teacher), "--output-json", str(result_json)],
                          env={"RAY_ADDRESS": ray_head.address})
    assert again.returncode == 0 and "2 already committed, 0 to compute" in again.stdout
    assert not again.joined
    rerun = read_result(result_json, DatasetResult)
    assert (rerun.count, rerun.shards_written, rerun.samples_per_s, rerun.identity) == (5, 0, None, result.identity)
    assert rerun.run_id != result.run_id


def test_s3_roundtrip_trajectories(ray_head, s3_server, random_teacher, capsys):
    s3_server.client().create_bucket(Bucket="hiar-data")
    uri = "s3://hiar-data/runs/trajectories"
    proc = generate_here(capsys, ["--kind", "trajectories", "--count", "4", "--output", uri, "--teacher",
                                  str(random_teacher), "--actors", "1"],
                         env={"RAY_ADDRESS": ray_head.address, **s3_server.env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = s3_server.client().list_objects_v2(Bucket="hiar-data")["Contents"]
    keys = [o["Key"] for o in objects if not o["Key"].endswith("/")]  # pyarrow may add a prefix marker
    assert sorted(keys) == ["runs/trajectories/manifest.json", "runs/trajectories/shard-00000.parquet",
                            "runs/trajectories/shard-00001.parquet"]
    env_backup = dict(os.environ)
    os.environ.update(s3_server.env)
    try:
        check_roundtrip(uri, random_teacher, "trajectories", 4, "states")
        assert all(r["num_steps"] == 7 for r in read_rows(uri, columns=["num_steps"]))
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    for secret in ("testing",):
        assert f"secret_key={secret}" not in proc.stdout + proc.stderr


def test_killed_driver_resumes_without_recomputing(ray_head, random_teacher, tmp_path, capsys):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hiar.jobs.generate", "--preset", "tiny", "--kind", "ode_pairs",
           "--count", "12", "--output", str(out), "--teacher", str(random_teacher), "--actors", "1", *set_args(FAST)]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ray_head.address}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(committed_shards(str(out))) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = committed_shards(str(out))
    assert 1 <= len(first) < 4, f"kill came too late or too early: {first}"
    assert load_manifest(str(out)) is None  # not finished, so no manifest
    time.sleep(2)  # let the orphaned actor (if still running) finish its current shard or die with the job
    first = committed_shards(str(out))
    mtimes = {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in first}
    again = generate_here(capsys, ["--kind", "ode_pairs", "--count", "12", "--output", str(out), "--teacher",
                                   str(random_teacher), "--actors", "1"], env={"RAY_ADDRESS": ray_head.address})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(first)} already committed, {4 - len(first)} to compute" in again.stdout
    rows = list(read_rows(str(out)))
    ids = [r["sample_id"] for r in rows]
    assert sorted(ids) == list(range(12)) and len(set(ids)) == 12
    assert {s: (out / f"shard-{s:05d}.parquet").stat().st_mtime_ns for s in first} == mtimes  # not rewritten
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no partial files left behind


def test_trajectory_states_sit_on_the_student_schedule(random_teacher):
    cfg = load_config("tiny", FAST)
    transformer, text = load_teacher_components(cfg, str(random_teacher))
    sampler = TeacherSampler(cfg, "trajectories", transformer, text, prompt_source(cfg))
    student = cfg.schedule.sigmas()
    assert torch.allclose(sampler.grid[sampler.keep], student, atol=1e-12)
    assert sampler.timesteps == pytest.approx((student * 1000).tolist())
    # the grid is the teacher's 7-step grid with the student's points inserted
    grid, _ = merged_grid(teacher_sigmas(7, cfg.teacher.shift), student)
    assert torch.equal(grid, sampler.grid)
    # compare against the full trajectory of the sampler
    states = sampler.states([sampler.prompt(2)], [sampler.seed(2)])[0]
    from hiar.core.rollout import initial_noise

    c, h, w = latent_chw()
    noise = initial_noise([sampler.seed(2)], 4, (c, 3, h, w))
    embeds, null = text.encode([sampler.prompt(2)]), text.null_embedding(1)
    _, full = sample_teacher(transformer, noise, embeds, sampler.grid, negative_embeds=null,
                             guidance_scale=cfg.teacher.guidance_scale, keep=range(sampler.grid.numel()))
    for j, idx in enumerate(sampler.keep):
        assert torch.equal(states[j], full[idx][0].permute(1, 0, 2, 3))
    assert torch.equal(states[0], noise[0].permute(1, 0, 2, 3))  # noise first


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "must be > 0"),
    (["--output", "/proc/hiar-cannot-write"], "cannot write"),
    (["--teacher", "/nonexistent/teacher"], "does not exist"),
])
def test_bad_input_fails_fast(random_teacher, tmp_path, args, message, capsys):
    base = ["--kind", "ode_pairs", "--count", "3", "--output", str(tmp_path / "x"), "--teacher", str(random_teacher)]
    t0 = time.monotonic()
    proc = generate_here(capsys, base + args)
    assert proc.returncode != 0 and message in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "x" / "shard-00000.parquet").exists()


def test_s3_bad_bucket_and_unreachable_endpoint(s3_server, random_teacher, capsys):
    common = ["--kind", "ode_pairs", "--count", "3", "--teacher", str(random_teacher)]
    proc = generate_here(capsys, common + ["--output", "s3://no-such-bucket/x"], env=s3_server.env)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    dead = {**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "HIAR_S3_CONNECT_TIMEOUT": "1",
            "HIAR_S3_REQUEST_TIMEOUT": "2", "AWS_EC2_METADATA_DISABLED": "true"}
    proc = generate_here(capsys, common + ["--output", "s3://hiar-data/x"], env=dead)
    assert proc.returncode != 0 and ("cannot reach" in proc.stderr or "cannot write" in proc.stderr)


def test_a_dataset_grows_by_index_and_a_stage_reads_the_count_its_config_asks_for(ray_head, random_teacher,
                                                                                    tmp_path, capsys):
    """A run dir shared by budgets (benchmarks/ablations.py): 4 samples, then 6 (the short last shard is made again,
    the whole one kept), then 4 again (nothing to do; the dataset still holds 6). A training stage checks that the
    samples its config asks for are there before any compute, and reads exactly those."""
    from hiar.io.storage import ShardPlan
    from hiar.platform.training import dataset_parts
    from hiar.platform.train_inputs import check_dataset

    out = tmp_path / "grow"
    env = {"RAY_ADDRESS": ray_head.address}

    def generate(count: int):
        proc = generate_here(capsys, ["--kind", "ode_pairs", "--count", str(count), "--output", str(out),
                                      "--teacher", str(random_teacher), "--actors", "1"], env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    generate(4)  # shards of 3: [0, 1, 2] and [3]
    whole = (out / "shard-00000.parquet").stat().st_mtime_ns
    wants_six = load_config("tiny", FAST + ["data.num_ode_pairs=6"])
    with pytest.raises(ValueError, match=r"holds 4 samples, but data.num_ode_pairs = 6 needs shards 0-1 whole"):
        check_dataset(wants_six, "ode_pairs", str(out))
    assert "1 already committed, 1 to compute" in generate(6).stdout
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == whole
    assert sorted(r["sample_id"] for r in read_rows(str(out))) == list(range(6))
    assert "2 already committed, 0 to compute" in generate(4).stdout
    assert load_manifest(str(out))["count"] == 6  # what it holds, not what the last run asked for

    manifest, samples = check_dataset(load_config("tiny", FAST + ["data.num_ode_pairs=4"]), "ode_pairs", str(out))
    assert samples == ShardPlan(4, 3) and manifest["count"] == 6
    first_four = sorted(r["prompt"] for r in read_rows(str(out)) if r["sample_id"] < 4)
    [whole] = dataset_parts(str(out), samples, ["prompt", "latents"], 1)
    read = whole.take_all()
    assert sorted(r["prompt"] for r in read) == first_four and set(read[0]) == {"prompt", "latents"}
    # two workers: fewer than a full shard (3) each, so both read both files and take every other sample
    halves = [part.take_all() for part in dataset_parts(str(out), samples, ["prompt", "latents"], 2)]
    by_index = {r["sample_id"]: r["prompt"] for r in read_rows(str(out))}
    assert [[r["prompt"] for r in half] for half in halves] == [[by_index[0], by_index[2]], [by_index[1], by_index[3]]]
    six = check_dataset(wants_six, "ode_pairs", str(out))[1]
    assert [part.count() for part in dataset_parts(str(out), six, ["prompt", "latents"], 2)] == [3, 3]  # a shard each
