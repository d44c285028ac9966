"""Generator steps/s and peak memory of distillation under hierarchical vs block-first self-rollout, side by side;
with ``--ray-workers N``, also the real train job on N Ray Train workers at the same global batch.

    python benchmarks/train.py --preset tiny [--iterations 10] [--set k=v ...]
    python benchmarks/train.py --preset tiny --ray-workers 2 [--ray-steps 12]

Each mode runs in its own fresh subprocess (so peak RSS is that mode's own), one after the other, on random
tiny models with the preset's shapes: an iteration = one critic update, a generator update every
``critic_ratio``-th iteration (hiar.methods.distill.Distiller).  Prints both rows and the ratios in one run, since this
machine is shared and noisy.  Peak memory is the process's max RSS (``resource.getrusage``), which on CPU is
where the tensors live.

``--ray-workers N`` (issue 22: the Ray Train path within 1.3x of one process): ``python -m hiar.jobs.train --stage
distill`` itself, on a local Ray cluster the job starts, ``distill.num_workers=N`` and the preset's global batch
(``distill.batch_size``; one process accumulates the same batch in micro-batches), from the shipped teacher's weights
on a trajectories dataset made once by ``python -m hiar.jobs.generate`` under ``--work-dir``. Its rate comes from
rank 0's progress events (``hiar.platform.progress``), from the end of the first generator step to the last: the
workers' start-up and the first pass over the dataset are left out, and printed apart as the job's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path



def run_one(preset: str, overrides: list[str], mode: str, iterations: int, threads: int) -> dict:
    import torch

    from hiar.config import load_config
    from hiar.methods.distill import Distiller
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.io.text import TextEncoder
    from hiar.tiny.captions import train_prompts, vocabulary

    torch.set_num_threads(threads)
    cfg = load_config(preset, [*overrides, f"distill.rollout={mode}"])
    torch.manual_seed(0)
    teacher = CausalWanTransformer3DModel(**cfg.model.kwargs())
    generator = CausalWanTransformer3DModel(**cfg.model.kwargs())
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
    d = Distiller(cfg, generator, teacher, text)
    v, b = cfg.video, cfg.distill.micro_batch_size
    prompts = train_prompts()[:b]
    states = torch.randn(b, cfg.schedule.num_steps + 1, v.latent_channels, v.train_latent_frames,
                         v.latent_height, v.latent_width)
    micro = [(prompts, states)] * d.accum
    d.iteration_step(micro)  # warm-up (allocator, first-call overheads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    gen_steps0 = d.generator_steps
    for _ in range(iterations):
        d.iteration_step(micro)
    seconds = time.perf_counter() - t0
    gen_steps = d.generator_steps - gen_steps0
    return {"mode": mode, "iterations": iterations, "seconds": seconds, "generator_steps": gen_steps,
            "iterations_per_s": iterations / seconds, "generator_steps_per_s": gen_steps / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_warmup_mb": rss0 / 1024,
            "batch": b * d.accum, "blocks": v.train_latent_frames // cfg.rollout.frames_per_block}


def run_ray_train(preset: str, overrides: list[str], workers: int, steps: int, work_dir: str) -> dict:
    """The train job's distill stage on ``workers`` Ray Train workers (module docstring): its generator steps/s
    between rank 0's first and last step, and the job's wall time."""
    from hiar.config import load_config
    from hiar.io.storage import resolve_path
    from hiar.platform.progress import parse

    work = Path(work_dir).resolve()
    sets = [a for o in overrides for a in ("--set", o)]
    teacher = resolve_path(load_config(preset, overrides).teacher.path)
    data = ["--preset", preset, "--set", f"data.storage={work / 'data'}", "--set", "data.num_trajectories=16", *sets]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    # the dataset once (a rerun finds its shards committed); each benchmark run trains in a run dir of its own, or
    # the job would find the stage done and skip it
    subprocess.run([sys.executable, "-m", "hiar.jobs.generate", *data, "--set", f"run_dir={work / 'runs-data'}",
                    "--kind", "trajectories"], env=env, check=True, capture_output=True)
    run_dir = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hiar.jobs.train", *data, "--set", f"run_dir={run_dir}",
                           "--stage", "distill", "--init", teacher, "--set", f"distill.num_workers={workers}",
                           "--set", f"distill.steps={steps}"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the train job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [e for e in map(parse, proc.stdout.splitlines()) if e is not None and e.task == "train distill"]
    first = next(e for e in events if e.done >= 1)
    last = events[-1]
    if last.done <= first.done:
        raise SystemExit(f"too few steps to time ({[e.done for e in events]}): raise --ray-steps")
    return {"workers": workers, "generator_steps_per_s": (last.done - first.done) / (last.at - first.at),
            "timed_steps": last.done - first.done, "wall_s": wall, "steps": last.done, "run_dir": str(run_dir)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--iterations", type=int, default=10, help="critic iterations per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="also time the train job's distill stage on this many Ray Train workers (docstring)")
    parser.add_argument("--ray-steps", type=int, default=12, help="generator steps of that job")
    parser.add_argument("--work-dir", default="runs/bench-train", help="that job's dataset and run dirs")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.preset, args.overrides, args.worker, args.iterations, args.threads)))
        return 0
    rows = []
    from hiar.core.rollout import ROLLOUT_MODES

    for mode in ROLLOUT_MODES:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--iterations", str(args.iterations),
               "--threads", str(args.threads), "--worker", mode]
        for o in args.overrides:
            cmd += ["--set", o]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"preset={args.preset} batch={rows[0]['batch']} blocks={rows[0]['blocks']} iterations={args.iterations} "
          f"(critic updates; generator every critic_ratio-th)")
    print(f"{'rollout':<14}{'iter/s':>9}{'gen steps/s':>13}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['mode']:<14}{r['iterations_per_s']:>9.2f}{r['generator_steps_per_s']:>13.3f}{r['peak_rss_mb']:>13.0f}")
    h, b = rows
    print(f"hierarchical / block_first: speed {h['iterations_per_s'] / b['iterations_per_s']:.2f}x, "
          f"peak memory {h['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    if args.ray_workers:
        r = run_ray_train(args.preset, args.overrides, args.ray_workers, args.ray_steps, args.work_dir)
        ratio = r["generator_steps_per_s"] / h["generator_steps_per_s"]
        print(f"train job, hierarchical, {r['workers']} Ray Train workers: {r['generator_steps_per_s']:.3f} gen steps/s "
              f"over {r['timed_steps']} steps (job wall {r['wall_s']:.0f} s for {r['steps']} steps, start-up "
              f"included; {r['run_dir']})")
        print(f"Ray Train / one process ({args.threads} threads): {ratio:.2f}x the generator steps/s "
              f"(issue 22's goal: >= {1 / 1.3:.2f}x, i.e. within 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
