"""One installable distribution: the wheel built from this checkout, installed (not editable) into a fresh venv
outside the repository, runs the pipeline entrypoint and ``serve run`` with nothing but its own files.

The fresh venv gets the third-party packages from the test venv by a path entry (no network here); ``hiar`` itself
comes only from the wheel, which the tests check (``hiar.__file__``) before trusting anything else.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import requests
import yaml

from tests.services import free_port, random_bundle, wait_for

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "a blue circle moves down quickly over a black background"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv outside the repository with the wheel of this checkout installed; returns its python and env."""
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, cwd=base, timeout=300)
    (wheel,) = dist.glob("hiar-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies from the test venv: a plain path entry (its .pth files, among them the editable hiar
    # finder of the checkout, are not processed from there)
    Path(site, "test-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    # auth off as for every local cluster here (DESIGN §8): otherwise Ray writes a token into ~/.ray for good
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", HIAR_CACHE_DIR=str(base / "cache"),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    work = base / "elsewhere"
    work.mkdir()
    return {"python": str(python), "venv": venv, "env": env, "cwd": work, "site": site}


def test_the_wheel_is_what_runs_and_ships_its_data(installed):
    code = ("import hiar, hiar.io.storage as s, json; print(json.dumps({'file': hiar.__file__, "
            "'teacher': s.resolve_path('hiar/assets/tiny-teacher')}))")
    r = subprocess.run([installed["python"], "-c", code], env=installed["env"], cwd=installed["cwd"],
                       capture_output=True, text=True, check=True)
    where = json.loads(r.stdout)
    assert where["file"].startswith(installed["site"]), where  # not the checkout
    teacher = Path(where["teacher"])
    assert str(teacher).startswith(installed["site"]) and (teacher / "transformer" / "config.json").is_file()
    assert Path(installed["site"], "hiar", "presets", "tiny.yaml").is_file()
    assert Path(installed["site"], "hiar", "serving", "serve_config.tiny.yaml").is_file()
    scripts = installed["venv"] / "bin"
    for script in ("hiar-pipeline", "hiar-demo"):
        assert (scripts / script).is_file(), script
    r = subprocess.run([str(scripts / "hiar-pipeline"), "--preset", "no-such-preset"], env=installed["env"],
                       cwd=installed["cwd"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no-such-preset" in r.stderr, r.stderr[-2000:]


def test_the_installed_pipeline_generates_a_dataset_with_the_shipped_teacher(installed, tmp_path):
    run_dir = tmp_path / "run"
    fast = ["teacher.num_steps=4", "data.num_ode_pairs=2", "data.shard_size=2", "data.batch_size=2",
            "data.threads_per_actor=1", f"data.storage={tmp_path / 'data'}"]
    cmd = [installed["python"], "-m", "hiar.pipeline.full", "--preset", "tiny", "--stages", "ode_pairs",
           "--run-dir", str(run_dir)] + [a for o in fast for a in ("--set", o)]
    r = subprocess.run(cmd, env=installed["env"], cwd=installed["cwd"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    manifest = json.loads((tmp_path / "data" / "ode_pairs" / "manifest.json").read_text())
    assert manifest["count"] == 2
    assert not list(Path(installed["cwd"]).iterdir())  # nothing written into the working directory


def test_serve_run_of_the_installed_app_streams_a_video(installed, tmp_path):
    bundle = random_bundle(tmp_path / "bundle")
    port = free_port()
    config = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "hiar", "route_prefix": "/", "import_path": "hiar.serving.app:build_app",
                                "args": {"preset": "tiny", "model_uri": str(bundle),
                                         "overrides": ["serve.stage_num_cpus=0", "serve.stage_torch_threads=1"]}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # a short temp dir of its own: Ray's socket paths under pytest's tmp_path exceed the 107-byte AF_UNIX limit
    ray_tmp = tempfile.mkdtemp(prefix="hiar-ray-")
    env = {**installed["env"], "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([installed["python"], "-m", "ray.serve.scripts", "run", str(path)], env=env,
                            cwd=installed["cwd"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return requests.get(f"{url}/healthz", timeout=2).ok
            except requests.RequestException:
                return proc.poll() is not None
        assert wait_for(healthy, timeout=300), "the app did not come up"
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        with requests.post(f"{url}/v1/videos", json={"prompt": PROMPT, "num_blocks": 2}, stream=True,
                           timeout=300) as resp:
            assert resp.status_code == 200, resp.text[:500]
            kinds = [json.loads(line)["type"] for line in resp.iter_lines() if line]
        assert kinds[0] == "start" and kinds.count("chunk") == 2 and kinds[-1] == "end", kinds
    finally:
        _stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to ``serve run``'s process group (it shuts Serve and its cluster down), SIGKILL if it hangs."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
