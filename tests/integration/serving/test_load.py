"""Load (issue 23): 8 streams x 64 blocks read by slow clients keep every process of the Serve app within a stated
memory bound, a ninth stream gets 429 at once, and afterwards the service serves a valid request.

A real local Ray cluster, real Serve and real HTTP: the app in each topology (``diagonal``, the tiny preset's, and
``per_step``, the cluster's), each in turn, on a random tiny bundle with the default
limits (``serve.max_concurrent_streams: 8``, ``serve.max_blocks: 64``, ``serve.max_buffered_blocks: 2``). The
harness (slow clients, RSS sampling from /proc, the bound) is ``benchmarks/serve_load.py``, which prints the same
table. Round 1: 8 streams x 64 blocks read at full speed (warm-up). Round 2: 8 streams x 64 blocks whose clients
read a chunk record, then sleep 2 s (half the pace the pipeline keeps on 2 cores), and the ninth stream. Every
stream asks for ``return_latents``: 28.6 kB chunk records instead of 4 kB, so that per-chunk leaks weigh more.

The bounds, per process (step stages and decoder, or the Diagonal replica; ingress, its FlowControl actor, the
Serve HTTP proxy):

* growth = round 2's peak RSS - its RSS once every stream has read 4 chunks (each stream's KV caches then hold
  their attention window: 5 blocks x 4 layers x K, V x CFG 2 = 0.94 MiB per stream and step stage, no more
  after that) <= 8 streams x (max_buffered_blocks + 1) x 28.6 kB in flight (0.65 MiB), plus ALLOWANCE_MB; for
  the proxy 8 x 64 records (14 MiB: what a slow client has not read may wait there, Serve passes no
  back-pressure from the HTTP client to the ingress; measured, most of it waits in the kernel's socket buffers);
  a Diagonal replica packs the S = 4 steps of its streams into each forward, so its allowance is 4 x
  ALLOWANCE_MB (measured once at 8 streams: 26.7 MiB, a full batch's forward, benchmarks/serve_load.py);
* r2 - r1 = round 2's peak - round 1's peak <= RETAIN_MB (RETAIN_STAGE_MB for a step stage): a second round of
  as many streams needs no more.

Measured on 2 shared cores (benchmarks/serve_load.py, four runs): growth 1.0-7.7 MiB, r2 - r1 at most 7.7 MiB,
both in a step stage whose RSS moves in steps of several MiB as glibc's arenas grow and shrink (it went up
7.5 MiB and back down within the round); a CI run then saw r2 - r1 = 14.4 MiB in a step stage. What the bounds
catch: a KV cache that never slid its window (+94 MiB per step replica per round: 60 blocks x 8 streams x
0.19 MiB); the ingress or the decoder keeping every chunk record (8 x 64 x 28.6 kB = 14 MiB per round). What they
cannot tell from the step stages' noise is checked directly instead: every stage's ``max_lead`` (most blocks
produced and not yet taken when it started one) stays below max_buffered_blocks, and once round 2 is over no
replica holds a finished stream's stage (``live_stages``: its KV caches, 0.94 MiB per stream). Still unseen: a
step stage keeping every 18 kB block (9 MiB per round).
"""

from __future__ import annotations

import pytest

from tests.services import free_port

APP = "hiar-load"
STREAMS, BLOCKS, READ_DELAY_S = 8, 64, 2.0
ALLOWANCE_MB = 16.0  # the fixed part of the growth bound: twice the largest growth measured (7.7 MiB)
# round 2's peak over round 1's: a step stage (torch's temporaries in glibc's per-thread arenas) measured up to
# 14.4 MiB (a CI run), the other processes much less; about twice the largest of each
RETAIN_STAGE_MB, RETAIN_MB = 32.0, 12.0
OVERRIDES = [f"serve.max_concurrent_streams={STREAMS}", f"serve.max_blocks={BLOCKS}", "serve.health_check_period_s=1"]


@pytest.fixture(scope="module", params=["diagonal", "per_step"])
def service(request, ray_head, tmp_path_factory):
    import ray
    from ray import serve

    from hiar.serving.app import build_app
    from tests.services import random_bundle

    bundle_dir = random_bundle(tmp_path_factory.mktemp("student"))
    ray.init(address=ray_head.address, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    overrides = [*OVERRIDES, f"serve.topology={request.param}"]
    serve.run(build_app({"model_uri": str(bundle_dir), "overrides": overrides}), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}", bundle_dir, overrides
    serve.shutdown()
    ray.shutdown()


def retain_bound(process: str, num_steps: int) -> float:
    """A Diagonal replica runs all ``num_steps`` step stages' forwards (a CI run: r2 - r1 = 41.9 MiB against a
    step stage's 32); a KV cache that never slid its window would add about 4 x 94 MiB per round there."""
    from benchmarks.serve_load import steps_run

    if process.startswith(("Step", "Diagonal")):
        return RETAIN_STAGE_MB * steps_run(process, num_steps)
    return RETAIN_MB


@pytest.mark.slow
def test_slow_clients_keep_memory_bounded_and_a_ninth_stream_gets_429(service, ray_head):
    import requests

    from benchmarks.serve_load import Sampler, app_deployments, block_payload_bytes, bounds_mb, report, run_load
    from hiar.config import load_config
    from hiar.io.video import decode_mp4
    from hiar.serving.client import join_segments, stream_video

    url, bundle_dir, overrides = service
    cfg = load_config("tiny", overrides)
    window = cfg.serve.max_buffered_blocks
    limits = requests.get(f"{url}/v1/limits", timeout=60).json()
    assert limits["topology"] == cfg.serve.topology, limits
    deployments = app_deployments(APP)
    sampler = Sampler(APP, url, deployments, ray_head.proc.pid)
    assert set(sampler.pids) >= {*deployments, "Ingress", "ProxyActor"}, f"processes found in /proc: {sampler.pids}"
    result = run_load(url, sampler, streams=STREAMS, blocks=BLOCKS, delay=READ_DELAY_S)
    block_bytes = block_payload_bytes(bundle_dir)
    bounds = bounds_mb(result, streams=STREAMS, blocks=BLOCKS, window=window, block_bytes=block_bytes,
                       allowance_mb=ALLOWANCE_MB, num_steps=limits["num_steps"])
    print(report(result, bounds, streams=STREAMS, blocks=BLOCKS, delay=READ_DELAY_S, window=window,
                 block_bytes=block_bytes))

    # the ninth stream, sent while the eight held every slot (none frees before BLOCKS x READ_DELAY_S seconds,
    # longer than its 30 s request timeout: a queued request would have timed out instead)
    assert result.extra_status == 429, (result.extra_status, result.extra_body)
    assert result.extra_body["error"] == "too_many_streams" and result.extra_retry_after

    # every slow stream got all its blocks, in order, and ended cleanly
    for s in result.streams:
        assert s.error is None and s.end and s.end["type"] == "end", (s.error, s.end)
        assert [c.index for c in s.chunks] == list(range(BLOCKS)) and s.end["num_blocks"] == BLOCKS

    # bounded memory: back-pressure between the stages held, and no process grew past its bounds
    assert set(result.marks["first"]) == set(result.marks["peak"]) == set(sampler.pids), result.marks
    assert all(lead <= window - 1 for lead in result.max_lead.values()), result.max_lead
    over = {n: (round(g, 1), round(bounds[n], 1)) for n, g in result.growth().items() if g > bounds[n]}
    assert not over, f"RSS grew past the bound within round 2 (growth MiB, bound MiB): {over}"
    steps = limits["num_steps"]
    more = {n: (round(r, 1), retain_bound(n, steps)) for n, r in result.retained().items()
            if r > retain_bound(n, steps)}
    assert not more, f"round 2 needed more than round 1's peak plus the bound (MiB, bound MiB): {more}"
    # no replica still holds a finished stream's per-step state (its KV caches): checked directly, since the
    # step stages' resident memory cannot tell that leak (8 x 0.94 MiB per round) from the allocator's steps
    assert set(result.live_stages) >= set(deployments) and not any(result.live_stages.values()), result.live_stages

    # and afterwards the service serves a valid request: a whole, decodable video
    after = stream_video(url, {"prompt": "a red square moves left slowly over a gray background", "num_blocks": 3},
                         timeout=120)
    assert after.end["num_blocks"] == 3 and [c["index"] for c in after.chunks] == [0, 1, 2]
    assert decode_mp4(join_segments(after.segments())).shape == (9, 16, 16, 3)
