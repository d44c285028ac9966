"""Generator steps/s and peak memory of distillation under hierarchical vs block-first self-rollout, side by side.

    python benchmarks/train.py --preset tiny [--iterations 10] [--set k=v ...]

Each mode runs in its own fresh subprocess (so peak RSS is that mode's own), one after the other, on random
tiny models with the preset's shapes: an iteration = one critic update, a generator update every
``critic_ratio``-th iteration (hiar.methods.distill.Distiller).  Prints both rows and the ratios in one run, since this
machine is shared and noisy.  Peak memory is the process's max RSS (``resource.getrusage``), which on CPU is
where the tensors live.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time



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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--iterations", type=int, default=10, help="critic iterations per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
