"""Pipelined Ray Serve graph vs the single-process block-first rollout: throughput, time to first chunk, calls.

    python benchmarks/serve.py --preset tiny --blocks 16 --streams 4 --repeats 3
    python benchmarks/serve.py --model models:/hiar-student@champion --blocks 16       # a registered student

Both sides do the same work per block: denoise, decode, encode a self-contained MP4 chunk. The baseline runs
Self-Forcing's block-first order in this process (S denoising calls + one context write per block, one block
finished before the next starts: its first chunk is ready after S + 1 calls); the Serve side is the real
app (Ingress -> Decoder -> StepS..Step1) over real HTTP, one stage per denoising step, blocks flowing along the
anti-diagonals. Rows: one stream at a time, and ``--streams`` concurrent streams (aggregate frames/s; the
baseline serves them one after another -- it is one process). The single-process hierarchical rollout is
listed for reference (it cannot stream: its first block is final only after the last sweep).

Model calls: each Serve stage reports its calls per stream (``end`` record): N for N blocks (one plain call,
N - 1 fused [context of n - 1, block n] calls; the fused schedule's trailing context write, which makes it
N + 1 offline, is skipped because nothing reads it). Block-first makes N (S + 1) calls, all in one process.

Without --model, a randomly initialised tiny student is used (speed does not depend on training). The app
runs on an in-process Ray (or RAY_ADDRESS) with 0-CPU replicas, one torch thread each. The machine is what it
is: pipelining pays off when every stage has a core (or GPU) of its own; the report prints the core count.
"""

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hiar.config import load_config  # noqa: E402

PROMPT = "a blue circle moves down quickly over a black background"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_tiny_bundle(directory: Path, preset: str) -> Path:
    from hiar.io.bundle import save_bundle
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.methods.pretrain import build_world_components

    cfg = load_config(preset)
    _, text, codec = build_world_components(cfg)
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()
    return save_bundle(directory, model, text, codec, card={"preset": preset, "note": "random init (benchmark)"},
                       config=cfg)


# ---------------------------------------------------------------------- single process, block-first
@torch.no_grad()
def block_first_stream(bundle, prompt: str, seed: int, num_blocks: int):
    """Self-Forcing's order, one block at a time: yields (block, clean latents, mp4 bytes, model calls so far)."""
    from hiar.core.generation import block_shape, student_velocity
    from hiar.core.rollout import advance, initial_block_noise
    from hiar.io.video import encode_mp4, to_uint8

    cfg = bundle.config
    r = cfg.rollout
    embeds = bundle.text.encode([prompt])
    negative = bundle.text.null_embedding(1) if r.guidance_scale != 1.0 else None
    velocity = student_velocity(bundle.transformer, embeds, cfg, negative)
    sigmas, k, shape = cfg.schedule.sigmas(), r.frames_per_block, block_shape(cfg)
    cache, calls = velocity.new_cache(), 0
    for n in range(num_blocks):
        x = initial_block_noise([seed], n, shape)
        for j in range(sigmas.numel() - 1):
            s, s_next = float(sigmas[j]), float(sigmas[j + 1])
            v = velocity(x, s, cache=cache, frame_offset=n * k)
            x, _ = advance(x, v, s, s_next, r.step_rule, [seed], n, j)
            calls += 1
        velocity(x, 0.0, cache=cache, frame_offset=n * k)  # context write at t_c = 0
        calls += 1
        frames = bundle.codec.decode(x).clamp(0, 1)[0].numpy()
        yield n, x, encode_mp4(to_uint8(frames), cfg.video.fps), calls


def run_block_first(bundle, num_blocks: int, seed: int) -> dict:
    t0 = time.perf_counter()
    first, calls = None, 0
    for n, _, _, calls in block_first_stream(bundle, PROMPT, seed, num_blocks):
        if first is None:
            first = time.perf_counter() - t0
    return {"elapsed": time.perf_counter() - t0, "ttfc": first, "calls": calls}


@torch.no_grad()
def run_hierarchical(bundle, num_blocks: int, seed: int) -> dict:
    from hiar.core.generation import generate_latents
    from hiar.io.video import encode_mp4, to_uint8

    cfg, k = bundle.config, bundle.config.rollout.frames_per_block
    t0 = time.perf_counter()
    lat = generate_latents(bundle.transformer, bundle.text, cfg, [PROMPT], [seed], num_blocks, "hierarchical")
    first = None
    for n in range(num_blocks):
        frames = bundle.codec.decode(lat[:, :, n * k:(n + 1) * k]).clamp(0, 1)[0].numpy()
        encode_mp4(to_uint8(frames), cfg.video.fps)
        first = first if first is not None else time.perf_counter() - t0
    return {"elapsed": time.perf_counter() - t0, "ttfc": first}


# ---------------------------------------------------------------------- the Serve graph
def run_serve(url: str, num_blocks: int, seeds: list[int]) -> dict:
    """``len(seeds)`` concurrent streams; wall time until the last ends, mean time to first chunk."""
    from hiar.serving.client import stream_video

    results, errors = [None] * len(seeds), []

    def one(i):
        try:
            results[i] = stream_video(url, {"prompt": PROMPT, "num_blocks": num_blocks, "seed": seeds[i]})
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"stream(s) failed: {errors}")
    return {"elapsed": max(r.received[-1] for r in results) - t0,
            "ttfc": statistics.mean(r.time_to_first_chunk for r in results),
            "calls": results[0].end["model_calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default=None, help="model URI or bundle dir (default: a random tiny student)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="serving config override, e.g. --set serve.stage_replicas=2")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams in the second row")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from ray import serve

    from hiar.io.bundle import load_bundle
    from hiar.serving.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="hiar-bench-")
    model = args.model or str(random_tiny_bundle(Path(tmp.name) / "student", args.preset))
    overrides = [*args.overrides, f"serve.max_blocks={max(64, args.blocks)}",
                 f"serve.max_concurrent_streams={max(8, args.streams)}"]
    cfg = load_config(args.preset, overrides)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.time()
    serve.run(build_app({"preset": args.preset, "overrides": overrides, "model_uri": model}), name="hiar-bench",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"deployed in {time.time() - t0:.0f} s", flush=True)

    from hiar.platform.registry import resolve_bundle

    torch.set_num_threads(max(1, cfg.serve.stage_torch_threads))  # the baseline gets what one replica gets
    bundle = load_bundle(resolve_bundle(model))
    S, N, k = bundle.config.schedule.num_steps, args.blocks, bundle.config.rollout.frames_per_block
    # sanity: the incremental baseline is hiar's block-first rollout
    from hiar.core.generation import generate_latents

    ref = generate_latents(bundle.transformer, bundle.text, bundle.config, [PROMPT], [0], 2, "block_first")
    got = torch.cat([x for _, x, _, _ in block_first_stream(bundle, PROMPT, 0, 2)], dim=2)
    assert torch.equal(ref, got), "the benchmark's block-first loop differs from hiar.core.rollout.block_first_rollout"

    for _ in range(2):  # warm-up: lazy imports and first-call costs in every replica and here
        run_serve(url, 2, [0, 1])
        run_block_first(bundle, 2, 0)
    rows: dict[str, list[dict]] = {"bf1": [], "bfC": [], "h1": [], "s1": [], "sC": []}
    calls_serve, calls_bf = None, None
    for r in range(args.repeats):  # interleaved, so drifting load on a shared box hits both sides alike
        b = run_block_first(bundle, N, r)
        rows["bf1"].append(b)
        calls_bf = b["calls"]
        seq = [run_block_first(bundle, N, 100 + i) for i in range(args.streams)]
        rows["bfC"].append({"elapsed": sum(x["elapsed"] for x in seq), "ttfc": statistics.mean(
            x["ttfc"] + sum(y["elapsed"] for y in seq[:i]) for i, x in enumerate(seq))})
        rows["h1"].append(run_hierarchical(bundle, N, r))
        s = run_serve(url, N, [r])
        rows["s1"].append(s)
        calls_serve = s["calls"]
        rows["sC"].append(run_serve(url, N, [100 + i for i in range(args.streams)]))

    frames = bundle.codec.num_frames_for(N * k)

    def med(key, field):
        return statistics.median(x[field] for x in rows[key])

    def fps(key, streams):
        return streams * frames / med(key, "elapsed")

    C = args.streams
    print(f"\npreset={args.preset} model={model if args.model else 'random tiny student'} N={N} blocks "
          f"({frames} frames) S={S} cores={os.cpu_count()} stage_replicas={cfg.serve.stage_replicas} "
          f"torch_threads={cfg.serve.stage_torch_threads} repeats={args.repeats} (medians; client-side times)")
    print(f"{'mode':<44}{'streams':>8}{'frames/s':>10}{'ttfc s':>9}{'x block-first':>15}")
    streams = {"bf1": 1, "h1": 1, "s1": 1, "bfC": C, "sC": C}
    table = [("block-first rollout, 1 process", "bf1", "bf1"),
             ("hierarchical rollout, 1 process (no stream)", "h1", "bf1"),
             ("Serve pipeline (1 stage per step)", "s1", "bf1"),
             ("block-first rollout, 1 process, sequential", "bfC", "bfC"),
             ("Serve pipeline (1 stage per step)", "sC", "bfC")]
    for name, key, base in table:
        ratio = fps(key, streams[key]) / fps(base, streams[base])
        print(f"{name:<44}{streams[key]:>8}{fps(key, streams[key]):>10.1f}{med(key, 'ttfc'):>9.3f}{ratio:>15.2f}")
    print(f"\nmodel calls per Serve stage for N={N}: {calls_serve} "
          f"(goal N+1={N + 1}: fused schedule; the trailing context write is skipped, so N)")
    print(f"block-first: {calls_bf} calls in one process = N(S+1); per block S+1={S + 1} before its chunk")
    ratio1, ratioC = fps("s1", 1) / fps("bf1", 1), fps("sC", C) / fps("bfC", C)
    print(f"throughput ratio Serve / block-first: {ratio1:.2f}x (1 stream), {ratioC:.2f}x ({C} streams); "
          f"goal >= 1.8x on a box with >= S={S} cores, this one has {os.cpu_count()}")
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
