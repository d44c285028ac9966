"""Serving throughput and latency: single-process block-first vs the Serve topologies, unbatched and batched.

    python benchmarks/serve.py --preset tiny --blocks 16 --streams 1 4 8 --repeats 3
    python benchmarks/serve.py --model models:/hiar-student@champion --blocks 16      # a registered student

Rows, for each number of concurrent streams C (``--streams``), all in one run on the same model:

* block-first, 1 process, sequential -- Self-Forcing's order (S denoising calls + one context write per block,
  each block finished before the next starts) serving the C streams one after another: the baseline;
* block-first, 1 process, batched -- the same order with the C streams' calls of each (block, step) as ONE
  forward (``hiar.core.batching.batched_forward``), the streams in lock step;
* Serve per_step, unbatched (``serve.max_batch=1``) -- the real app over real HTTP, one deployment per step;
* Serve per_step, batched (``serve.max_batch=--max-batch``);
* Serve diagonal, batched -- one deployment running each stream's anti-diagonal as one forward, batched;
* diagonal, 1 process, batched -- the same forwards with no Serve at all: every stream's anti-diagonal in one
  forward (``hiar.core.diagonal.advance_diagonals``), then decode and encode, in this process with one replica's
  threads: the diagonal deployment's work without Serve's hops, HTTP or batching waits (its decode is in line
  here, where the deployment overlaps it on another thread).

Every side does the same work per block: denoise, decode, encode a self-contained MP4 chunk. Printed per row:
aggregate frames/s (C x frames / wall time until the last stream's last chunk), time to first chunk p50 / p95
over the streams of every repeat (all C requests arrive at once; a sequential baseline's later streams wait for
the earlier ones), and ratios to the sequential block-first row of the same C. Then, per Serve mode at the
largest C, where a block's time goes per stage (from the chunk records' timings): ``queue`` (waiting for a
batch on the stage's compute thread), ``forward`` (the batch's compute), ``hop`` (from the previous stage's end
to arriving in this stage's queue: Serve handles, object store, back-pressure), and the mean batch size.

Without --model, a randomly initialised tiny student is used (speed does not depend on training). The apps run
on an in-process Ray (or RAY_ADDRESS) with 0-CPU replicas, one torch thread each, deployed one after another.
The machine is what it is (the report prints its cores): pipelining needs a core or GPU per stage; batching
pays where one forward of a few blocks costs little more than one of a single block.
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

PROMPTS = ["a blue circle moves down quickly over a black background",
           "a red square moves left slowly over a gray background"]
IN_PROCESS = ("bf_seq", "bf_batch", "diag_proc")
MODES = {"bf_seq": "block-first, 1 process, sequential", "bf_batch": "block-first, 1 process, batched",
         "step": "Serve per_step, unbatched", "step_b": "Serve per_step, batched",
         "diag_b": "Serve diagonal, batched", "diag_proc": "diagonal, 1 process, batched"}


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
def block_first_streams(bundle, seeds: list[int], num_blocks: int, batched: bool):
    """Self-Forcing's order for ``len(seeds)`` streams: one after another, or all in lock step with each (block,
    step) of every stream in one forward. Yields (stream, block, latents) as each block's MP4 chunk is ready."""
    from hiar.core.batching import StreamCall, batched_forward
    from hiar.core.generation import block_shape, student_velocity
    from hiar.core.kv_cache import CacheSegment
    from hiar.core.rollout import advance, initial_block_noise
    from hiar.io.video import encode_mp4, to_uint8

    cfg = bundle.config
    r, sigmas, k, shape = cfg.rollout, cfg.schedule.sigmas(), cfg.rollout.frames_per_block, block_shape(cfg)
    streams = []
    for i, seed in enumerate(seeds):
        embeds = bundle.text.encode([PROMPTS[i % 2]])
        negative = bundle.text.null_embedding(1) if r.guidance_scale != 1.0 else None
        velocity = student_velocity(bundle.transformer, embeds, cfg, negative)
        streams.append((i, seed, velocity, velocity.new_cache()))

    def forward(group, xs, n: int, level: float):
        sigma = torch.full((k,), level)
        return batched_forward([StreamCall(vel, x, sigma, [CacheSegment(cache, n * k, k)])
                                for (_, _, vel, cache), x in zip(group, xs)])

    for group in [streams] if batched else [[s] for s in streams]:
        for n in range(num_blocks):
            xs = [initial_block_noise([seed], n, shape) for _, seed, _, _ in group]
            for j in range(sigmas.numel() - 1):
                s, s_next = float(sigmas[j]), float(sigmas[j + 1])
                vs = forward(group, xs, n, s)
                xs = [advance(x, v, s, s_next, r.step_rule, [seed], n, j)[0]
                      for (_, seed, _, _), x, v in zip(group, xs, vs)]
            forward(group, xs, n, 0.0)  # context write at t_c = 0
            for (i, _, _, _), x in zip(group, xs):
                encode_mp4(to_uint8(bundle.codec.decode(x).clamp(0, 1)[0].numpy()), cfg.video.fps)
                yield i, n, x


@torch.no_grad()
def diagonal_streams(bundle, seeds: list[int], num_blocks: int):
    """HiAR's order for ``len(seeds)`` streams in lock step, each anti-diagonal of every stream in ONE forward
    (what the diagonal deployment's batcher does when every stream makes each batch), with the deployment's
    options (no trailing context writes). Yields (stream, block, latents) as each block's MP4 chunk is ready."""
    from hiar.core.diagonal import DiagonalRollout, advance_diagonals
    from hiar.core.generation import block_shape, student_velocity
    from hiar.core.rollout import initial_block_noise
    from hiar.io.video import encode_mp4, to_uint8

    cfg = bundle.config
    r, sigmas, shape = cfg.rollout, cfg.schedule.sigmas(), block_shape(cfg)
    rollouts = []
    for i, seed in enumerate(seeds):
        embeds = bundle.text.encode([PROMPTS[i % 2]])
        negative = bundle.text.null_embedding(1) if r.guidance_scale != 1.0 else None
        rollouts.append(DiagonalRollout(student_velocity(bundle.transformer, embeds, cfg, negative), sigmas, [seed],
                                        step_rule=r.step_rule, context_noise=r.context_noise, trailing_writes=False))
    emitted = [0] * len(seeds)
    for d in range(num_blocks + cfg.schedule.num_steps - 1):
        entering = [initial_block_noise([seed], d, shape) if d < num_blocks else None for seed in seeds]
        for i, x in enumerate(advance_diagonals(list(zip(rollouts, entering)))):
            if x is not None:
                encode_mp4(to_uint8(bundle.codec.decode(x).clamp(0, 1)[0].numpy()), cfg.video.fps)
                yield i, emitted[i], x
                emitted[i] += 1


def run_in_process(bundle, seeds: list[int], num_blocks: int, mode: str) -> dict:
    streams = (diagonal_streams(bundle, seeds, num_blocks) if mode == "diag_proc"
               else block_first_streams(bundle, seeds, num_blocks, mode == "bf_batch"))
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    for i, _, _ in streams:
        first.setdefault(i, time.perf_counter() - t0)
    return {"elapsed": time.perf_counter() - t0, "ttfc": [first[i] for i in range(len(seeds))], "chunks": []}


# ---------------------------------------------------------------------- the Serve app
def run_serve(url: str, num_blocks: int, seeds: list[int]) -> dict:
    """``len(seeds)`` concurrent streams; wall time until the last ends, each stream's time to first chunk."""
    from hiar.serving.client import stream_video

    results, errors = [None] * len(seeds), []

    def one(i):
        try:
            results[i] = stream_video(url, {"prompt": PROMPTS[i % 2], "num_blocks": num_blocks, "seed": seeds[i]})
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
    return {"elapsed": max(r.received[-1] for r in results) - t0, "ttfc": [r.time_to_first_chunk for r in results],
            "chunks": [(c, got) for r in results for c, got in zip(r.chunks, r.received)]}


def stage_breakdown(chunks) -> list[tuple[str, float, float, float, float]]:
    """(stage, queue ms, forward ms, hop ms, mean batch) per stage, means over the blocks' timing records."""
    rows: dict[str, dict[str, list[float]]] = {}
    for chunk, received in chunks:
        stages = chunk["timing"]["stages"]
        for i, t in enumerate(stages):
            arrived = t["start"] - t.get("queued_s", 0.0)
            r = rows.setdefault(t["stage"], {"queue": [], "forward": [], "hop": [], "batch": []})
            r["queue"].append(1000 * t.get("queued_s", 0.0))
            r["forward"].append(1000 * (t["end"] - t["start"]))
            r["batch"].append(t.get("batch", 1))
            if i:
                r["hop"].append(1000 * (arrived - stages[i - 1]["end"]))
        rows.setdefault("to client", {"queue": [], "forward": [], "hop": [], "batch": []})["hop"].append(
            1000 * (received - stages[-1]["end"]))
    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs) if xs else float("nan")

    return [(name, mean(r["queue"]), mean(r["forward"]), mean(r["hop"]), mean(r["batch"])) for name, r in rows.items()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default=None, help="model URI or bundle dir (default: a random tiny student)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="serving config override for every app, e.g. --set serve.stage_replicas=2")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8], help="concurrent streams per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8, help="serve.max_batch of the batched apps")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="serve.batch_wait_ms of the batched apps")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()

    import ray
    from ray import serve

    from hiar.io.bundle import load_bundle
    from hiar.platform.registry import resolve_bundle
    from hiar.serving.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="hiar-bench-")
    model = args.model or str(random_tiny_bundle(Path(tmp.name) / "student", args.preset))
    C = sorted(set(args.streams))
    common = [*args.overrides, f"serve.max_blocks={max(64, args.blocks)}",
              f"serve.max_concurrent_streams={max(8, max(C))}"]
    batched = [f"serve.max_batch={args.max_batch}", f"serve.batch_wait_ms={args.batch_wait_ms}"]
    apps = {"step": ["serve.topology=per_step", "serve.max_batch=1"],
            "step_b": ["serve.topology=per_step", *batched], "diag_b": ["serve.topology=diagonal", *batched]}
    cfg = load_config(args.preset, common)
    torch.set_num_threads(max(1, cfg.serve.stage_torch_threads))  # the baseline gets what one replica gets
    bundle = load_bundle(resolve_bundle(model))
    S, N, k = bundle.config.schedule.num_steps, args.blocks, bundle.config.rollout.frames_per_block
    frames = bundle.codec.num_frames_for(N * k)

    # sanity: the benchmark's block-first loop is hiar's block-first rollout
    from hiar.core.generation import generate_latents

    ref = generate_latents(bundle.transformer, bundle.text, bundle.config, [PROMPTS[0]], [0], 2, "block_first")
    got = torch.cat([x for _, _, x in block_first_streams(bundle, [0], 2, batched=False)], dim=2)
    assert torch.allclose(ref, got, atol=1e-5), "the benchmark's block-first loop differs from block_first_rollout"
    if "diag_proc" in args.modes:  # and its diagonal loop is HiAR's rollout
        ref = generate_latents(bundle.transformer, bundle.text, bundle.config, [PROMPTS[0]], [0], 3, "hierarchical")
        got = torch.cat([x for _, _, x in diagonal_streams(bundle, [0], 3)], dim=2)
        assert torch.allclose(ref, got, atol=1e-4), "the benchmark's diagonal loop differs from hierarchical_rollout"

    results: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in C} for m in args.modes}
    for mode in [m for m in args.modes if m in IN_PROCESS]:
        run_in_process(bundle, [0, 1], 2, mode)  # warm-up
        for r in range(args.repeats):
            for c in C:
                results[mode][c].append(run_in_process(bundle, [100 * r + i for i in range(c)], N, mode))

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    for mode in [m for m in args.modes if m in apps]:
        t0 = time.time()
        serve.run(build_app({"preset": args.preset, "overrides": [*common, *apps[mode]], "model_uri": model}),
                  name="hiar-bench", route_prefix="/")
        print(f"{MODES[mode]}: deployed in {time.time() - t0:.0f} s", flush=True)
        for _ in range(2):  # warm-up: lazy imports and first-call costs in every replica
            run_serve(url, 2, [0, 1])
        for r in range(args.repeats):
            for c in C:
                results[mode][c].append(run_serve(url, N, [100 * r + i for i in range(c)]))
        serve.delete("hiar-bench")

    print(f"\npreset={args.preset} model={model if args.model else 'random tiny student'} N={N} blocks "
          f"({frames} frames) S={S} cores={os.cpu_count()} stage_replicas={cfg.serve.stage_replicas} "
          f"torch_threads={cfg.serve.stage_torch_threads} max_batch={args.max_batch} "
          f"batch_wait_ms={args.batch_wait_ms:g} repeats={args.repeats} (medians; client-side times)")
    print(f"{'mode':<40}{'streams':>8}{'frames/s':>10}{'ttfc p50':>10}{'ttfc p95':>10}{'x fps':>7}{'x ttfc50':>9}")
    for c in C:
        base = None
        for mode in args.modes:
            runs = results[mode][c]
            fps = c * frames / statistics.median(x["elapsed"] for x in runs)
            ttfc = [t for x in runs for t in x["ttfc"]]
            p50, p95 = percentile(ttfc, 0.5), percentile(ttfc, 0.95)
            base = base or (fps, p50)
            print(f"{MODES[mode]:<40}{c:>8}{fps:>10.1f}{p50:>10.3f}{p95:>10.3f}{fps / base[0]:>7.2f}"
                  f"{p50 / base[1]:>9.2f}")
        print()
    for mode in [m for m in args.modes if m in apps]:
        chunks = [ch for x in results[mode][max(C)] for ch in x["chunks"]]
        print(f"{MODES[mode]}, {max(C)} streams: where a block's time goes (ms, means over {len(chunks)} blocks)")
        print(f"  {'stage':<12}{'queue':>9}{'forward':>9}{'hop in':>9}{'batch':>7}")
        for name, queue, forward, hop, batch in stage_breakdown(chunks):
            print(f"  {name:<12}{queue:>9.1f}{forward:>9.1f}{hop:>9.1f}{batch:>7.2f}")
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
