"""Serving topologies and cross-stream batching (issue 23, items 1 and 2) on a real local Ray cluster over real HTTP.

The default suite deploys ONE app, the diagonal topology with batching on (``serve.topology=diagonal``,
``serve.max_batch=8``): one deployment holds every step cache of a stream and runs each anti-diagonal as one
forward, batched with the other streams' diagonals. The per-step topology with batching on is a second app
(slow: another six replicas to start); per-step with ``max_batch=1`` staying bit-identical is
``test_serving.py``'s app (the default config).

Tolerance: batched or packed results equal the offline ``hierarchical_rollout`` within TOL on the latents (float
round-off of the packed matmuls: ``hiar.core.batching``); the decoded MP4 chunks then equal the offline frames'
encoding within a few levels of 255 (H.264 of frames that differ by at most one level in a few pixels).
"""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import requests

from tests.integration.serving.test_serving import PROMPTS, offline, read_stream
from tests.services import free_port, wait_for

TOL = 1e-4
STEPS = 4  # the tiny preset's student schedule
DIAGONAL = ["serve.topology=diagonal", "serve.max_batch=8", "serve.batch_wait_ms=5", "serve.max_concurrent_streams=8",
            "serve.health_check_period_s=1"]
PER_STEP = ["serve.topology=per_step", "serve.max_batch=4", "serve.batch_wait_ms=5", "serve.max_concurrent_streams=8"]
# 8 mixed streams: (prompt, blocks, seed, guidance, joins after (stream, its chunks) or at once). Lengths 1..8 (the
# tiny window is 4 blocks), three guided (two samples each in the model), four joining mid-way through others.
MIXED = [(0, 6, 200, None, None), (1, 3, 201, 2.5, None), (0, 8, 202, None, None), (1, 2, 203, None, None),
         (1, 5, 204, None, (0, 1)), (0, 7, 205, 3.0, (2, 2)), (1, 1, 206, None, (0, 3)), (0, 4, 207, 2.0, (2, 4))]


class App:
    def __init__(self, name: str, url: str):
        self.name, self.url = name, url

    def stats(self, deployment: str) -> list[dict]:
        from ray import serve

        return serve.get_deployment_handle(deployment, self.name).broadcast("stats").results(timeout_s=30)

    def limits(self) -> dict:
        return requests.get(f"{self.url}/v1/limits", timeout=10).json()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from tests.services import random_bundle

    return random_bundle(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from hiar.io.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def serve_port(ray_head):
    import ray
    from ray import serve

    ray.init(address=ray_head.address, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def deploy(port: int, bundle_dir, name: str, overrides: list[str]) -> App:
    from ray import serve

    from hiar.serving.app import build_app

    serve.run(build_app({"model_uri": str(bundle_dir), "overrides": overrides}), name=name, route_prefix=f"/{name}")
    app = App(name, f"http://127.0.0.1:{port}/{name}")
    # warm-up: the first request after a deploy pays for lazy imports in every replica
    start, _, end, _ = read_stream(app, {"prompt": PROMPTS[0], "num_blocks": 2}, timeout=120)
    assert end["type"] == "end", end
    return app


@pytest.fixture(scope="module")
def diagonal_app(serve_port, bundle_dir):
    return deploy(serve_port, bundle_dir, "diag", DIAGONAL)


@pytest.fixture(scope="module")
def per_step_app(serve_port, bundle_dir):
    return deploy(serve_port, bundle_dir, "perstep", PER_STEP)


def body_for(prompt: int, blocks: int, seed: int, guidance) -> dict:
    body = {"prompt": PROMPTS[prompt], "num_blocks": blocks, "seed": seed, "return_latents": True}
    return body if guidance is None else {**body, "guidance": guidance}


def latent_error(bundle, body: dict, chunks: list[dict]) -> float:
    """Largest |served - offline hierarchical_rollout| over the stream's latents; checks blocks come in order."""
    from hiar.serving.schema import unpack_array

    want, _ = offline(bundle, body["prompt"], body["seed"], body["num_blocks"], body.get("guidance"))
    k = bundle.config.rollout.frames_per_block
    assert [c["index"] for c in chunks] == list(range(body["num_blocks"]))
    got = np.concatenate([unpack_array(c["latents"]) for c in chunks], axis=2)
    assert got.shape == want.shape == (1, bundle.config.video.latent_channels, k * body["num_blocks"], 16, 16)
    return float(np.abs(got - want).max())


def run_mixed(app: App, streams=MIXED) -> list[tuple[dict, list, dict]]:
    """The streams over HTTP at once, each starting at once or when another has received some chunks."""
    from hiar.serving.client import iter_records

    bodies = [body_for(*s[:4]) for s in streams]
    got = [[threading.Event() for _ in range(b["num_blocks"] + 1)] for b in bodies]  # got[i][c]: c chunks in
    results, errors = {}, []

    def run(i: int):
        try:
            after = streams[i][4]
            if after is not None and not got[after[0]][after[1]].wait(300):
                raise AssertionError(f"stream {after[0]} never received {after[1]} chunks")
            chunks, last = [], None
            for rec in iter_records(app.url, bodies[i], timeout=300):
                if rec["type"] == "chunk":
                    chunks.append(rec)
                    got[i][len(chunks)].set()
                elif rec["type"] != "start":
                    last = rec
            results[i] = (bodies[i], chunks, last)
        except Exception as err:  # noqa: BLE001
            errors.append((i, repr(err)))
            for ev in got[i]:
                ev.set()  # never leave a stream waiting for this one

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    return [results[i] for i in range(len(streams))]


def batch_sizes(chunks: list[dict], stage: str) -> list[int]:
    return [t["batch"] for c in chunks for t in c["timing"]["stages"] if t["stage"] == stage]


def check_mixed_streams(app: App, bundle, stage_names: list[str]) -> None:
    before = {name: app.stats(name) for name in stage_names}
    results = run_mixed(app)
    used = []
    for body, chunks, end in results:
        assert end and end["type"] == "end", end
        err = latent_error(bundle, body, chunks)
        assert err <= TOL, (body, err)
        for name in stage_names:
            used += batch_sizes(chunks, name)
    print(f"{app.name}: batch sizes seen by the streams' blocks {sorted(set(used))}, mean {np.mean(used):.2f}")
    assert max(used) > 1, "no two streams' blocks ever shared a forward"
    for name in stage_names:  # the replicas' own stats agree: batches of more than one block happened
        assert wait_for(lambda: not any(s["active"] for s in app.stats(name)), 60), app.stats(name)
        after = app.stats(name)
        grown = {size for s in after for size, n in s["batching"]["batch_sizes"].items()
                 if n > sum(b["batching"]["batch_sizes"].get(size, 0) for b in before[name])}
        assert any(int(size) > 1 for size in grown), (name, after)
        assert all(s["batching"]["max_batch"] == int(app.limits()["max_batch"]) for s in after)
        assert all(s["failed"] == 0 for s in after), after


# ---------------------------------------------------------------------- the diagonal topology (default suite)
def test_diagonal_streams_a_video_equal_to_the_offline_rollout(diagonal_app, bundle):
    from hiar.io.video import decode_mp4, encode_mp4, to_uint8

    limits = diagonal_app.limits()
    assert (limits["topology"], limits["max_batch"], limits["batch_wait_ms"]) == ("diagonal", 8, 5.0)
    assert limits["stages"] == ["Diagonal", "Decoder"] and limits["num_steps"] == STEPS
    body = {"prompt": PROMPTS[1], "num_blocks": 6, "seed": 31, "guidance": 2.5, "return_latents": True}
    start, chunks, end, _ = read_stream(diagonal_app, body)
    assert end["type"] == "end", end
    assert start["stages"] == ["Diagonal", "Decoder"] and start["topology"] == "diagonal"
    err = latent_error(bundle, body, chunks)
    assert err <= TOL, err
    # N + S - 1 packed forwards for N blocks (one per anti-diagonal; no trailing context writes)
    assert end["model_calls"] == {"Diagonal": 6 + STEPS - 1, "Decoder": 6}
    # one replica holds the whole stream, its decoding included: every block names the same replica for both
    assert len({t["replica"] for c in chunks for t in c["timing"]["stages"]}) == 1
    assert [t["stage"] for t in chunks[0]["timing"]["stages"]] == ["Diagonal", "Decoder"]
    from ray import serve

    deployments = set(serve.status().applications[diagonal_app.name].deployments)
    assert deployments == {"Ingress", "Diagonal"}, deployments  # no Decoder process to hop into
    _, frames = offline(bundle, body["prompt"], body["seed"], 6, body["guidance"])
    k, fps = bundle.config.rollout.frames_per_block, bundle.config.video.fps
    worst = 0
    for c in chunks:
        n = c["index"]
        got = decode_mp4(base64.b64decode(c["mp4"])).astype(int)
        want = decode_mp4(encode_mp4(to_uint8(frames[n * k:(n + 1) * k]), fps)).astype(int)
        assert got.shape == want.shape == (k, 16, 16, 3)
        worst = max(worst, int(np.abs(got - want).max()))
    print(f"diagonal: max latent error {err:.2g}, max frame difference after H.264 {worst} / 255")
    assert worst <= 8


def test_diagonal_batches_eight_mixed_streams_each_equal_to_its_offline_rollout(diagonal_app, bundle):
    check_mixed_streams(diagonal_app, bundle, ["Diagonal"])


def test_diagonal_client_disconnect_frees_the_stream(diagonal_app):
    before = diagonal_app.stats("Diagonal")
    resp = requests.post(f"{diagonal_app.url}/v1/videos", json={"prompt": PROMPTS[0], "num_blocks": 64},
                         stream=True, timeout=60)
    lines = resp.iter_lines()
    assert json.loads(next(lines))["type"] == "start" and json.loads(next(lines))["type"] == "chunk"
    resp.close()  # the client goes away after one chunk of 64

    def ended() -> bool:
        now = diagonal_app.stats("Diagonal")
        return not any(s["active"] for s in now) and sum(s["cancelled"] + s["closed"] for s in now) > sum(
            s["cancelled"] + s["closed"] for s in before)

    assert wait_for(ended, 60), diagonal_app.stats("Diagonal")
    after = diagonal_app.stats("Diagonal")
    assert sum(s["completed"] for s in after) == sum(s["completed"] for s in before)
    assert sum(s["failed"] for s in after) == 0


# ---------------------------------------------------------------------- the per-step topology, batched (slow)
@pytest.mark.slow
def test_per_step_batches_eight_mixed_streams_each_equal_to_its_offline_rollout(per_step_app, bundle):
    limits = per_step_app.limits()
    assert (limits["topology"], limits["max_batch"]) == ("per_step", 4)
    check_mixed_streams(per_step_app, bundle, [f"Step{j + 1}" for j in range(STEPS)])
