"""The ``wan2.1-1.3b`` preset through ``hiar/pipeline/full.py`` on a miniature checkpoint in the public Wan2.1 layout
(tests/wan_checkpoint.py): bad input refused before anything runs (default suite), and every stage from the
user's prompt dataset to a deployed endpoint that streams VAE-decoded MP4 (slow suite)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hiar.pipeline.full import main as full_main
from tests.services import free_port, run_main, set_args
from tests.wan_checkpoint import cpu_overrides, write_prompts

ROOT = Path(__file__).resolve().parents[3]
FULL = ("-m", "hiar.pipeline.full")


@pytest.fixture(scope="module")
def models(wan_ckpt, wan_real_scores, tmp_path_factory):
    """The miniature 1.3B repository, the stand-in 14B real score, an incompatible one, a .jsonl prompt dataset."""
    real, bad_real = wan_real_scores
    return {"ckpt": wan_ckpt, "real": real, "bad_real": bad_real,
            "prompts": write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", fmt="jsonl")}


def run_full(args, ray_address=None, timeout=1800, cache=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    if cache:
        env["HIAR_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-u", *FULL, "--preset", "wan2.1-1.3b", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def _without(src: Path, dst: Path, part: str) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / part)
    return dst


@pytest.mark.parametrize("case", ["no_vae", "no_transformer", "incompatible_real_score", "no_prompts",
                                  "duplicate_prompts", "model_mismatch"])
def test_bad_wan_input_is_refused_before_anything_runs(models, tmp_path, case, monkeypatch, capsys):
    """The command's ``main`` in this process, with run_full's environment (the checks are the same; an interpreter
    per case only added its start-up): exit code 2, the path and the problem named."""
    ckpt, real, prompts = models["ckpt"], models["real"], models["prompts"]
    overrides = cpu_overrides(ckpt, real, prompts)
    expected = {"no_vae": "missing ['vae/']", "no_transformer": "missing ['transformer/']",
                "incompatible_real_score": "text_dim is 48", "no_prompts": "needs a prompt dataset",
                "duplicate_prompts": "distinct prompt", "model_mismatch": "model.num_layers = 5"}[case]
    if case in ("no_vae", "no_transformer"):
        broken = _without(ckpt, tmp_path / "broken", case[3:])
        overrides += [f"teacher.path={broken}"]
        expected_path = str(broken)
    else:
        expected_path = ""
    if case == "incompatible_real_score":
        overrides += [f"teacher.real_score_path={models['bad_real']}"]
    if case == "no_prompts":
        overrides += ['data.prompts=""']
    if case == "duplicate_prompts":
        dup = tmp_path / "dup.txt"
        dup.write_text("a red car drives along a quiet road at night\n" * 5)
        overrides += [f"data.prompts={dup}"]
    if case == "model_mismatch":
        overrides += ["model.num_layers=5"]
    run_dir = tmp_path / "runs"
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HIAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    code = run_main(full_main, ["--preset", "wan2.1-1.3b", "--run-dir", str(run_dir), *set_args(overrides)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert expected in err and expected_path in err, err[-2000:]
    assert not run_dir.exists(), "nothing is written before the input is valid"


@pytest.mark.slow
def test_wan_preset_runs_every_stage_and_serves_a_vae_decoded_mp4(models, ray_head, tmp_path):
    import av
    import requests

    port = free_port()
    run_dir = tmp_path / "runs"
    summary_path = tmp_path / "summary.json"
    overrides = [*cpu_overrides(models["ckpt"], models["real"], models["prompts"]), f"serve.port={port}"]
    r = run_full(["--run-dir", str(run_dir), *set_args(overrides), "--deploy", "--summary-json", str(summary_path)],
                 ray_address=ray_head.address, cache=tmp_path / "cache")
    try:
        assert r.returncode == 0, (r.stdout[-8000:], r.stderr[-3000:])
        summary = json.loads(summary_path.read_text())
        got = {s["stage"]: s["status"] for s in summary["stages"]}
        assert got == {"teacher": "skipped", **{s: "ran" for s in ("ode_pairs", "trajectories", "ode_init", "distill",
                                                                   "evaluate", "register", "promote", "deploy")}}

        # the datasets were made from the user's prompts (train split only), never the tiny world's captions
        data = Path(next(s for s in summary["stages"] if s["stage"] == "ode_pairs")["detail"]["output"])
        manifest = json.loads((data / "manifest.json").read_text())
        assert manifest["prompts"]["source"] == str(models["prompts"])
        heldout = set(manifest["prompts"]["heldout"])
        import pyarrow.parquet as pq

        used = {p for f in data.glob("shard-*.parquet") for p in pq.read_table(f, columns=["prompt"])["prompt"]
                .to_pylist()}
        assert used and not used & heldout

        # the student references the teacher's text encoder and VAE instead of carrying them; the real score was
        # the one named
        student = Path(next(s for s in summary["stages"] if s["stage"] == "distill")["detail"]["output"])
        assert (student / "components.json").is_file()
        assert not (student / "text_encoder").exists() and not (student / "vae").exists()
        card = json.loads((student / "card.json").read_text())
        assert card["real_score"] == str(models["real"])
        job_logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log")))  # not the console's
        assert f"real score {models['real']}" in job_logs

        # the endpoint: a real POST through the Wan VAE decoder, with the promised number of frames
        body = {"prompt": "a white bird flies over the river at sunset", "num_blocks": 2, "stream": False}
        resp = requests.post(f"http://127.0.0.1:{port}/v1/videos", json=body, timeout=600)
        assert resp.status_code == 200 and resp.headers["content-type"] == "video/mp4", resp.text[:500]
        with av.open(io.BytesIO(resp.content)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        # 2 blocks x 3 latent frames = 6 latent frames -> 1 + 4 x 5 = 21 video frames at 64 x 64 (x8 spatial)
        assert len(frames) == 21 == int(resp.headers["X-HiAR-Num-Frames"])
        assert frames[0].shape[:2] == (64, 64)
    finally:
        code = ("import ray; from ray import serve; ray.init(address=%r, log_to_driver=False); serve.shutdown()"
                % ray_head.address)
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=180)
