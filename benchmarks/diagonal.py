"""Wall time per video: fused hierarchical sweep (S * (N + 1) forwards) vs diagonal-packed (N + S forwards).

    python benchmarks/diagonal.py --preset tiny --blocks 8 16 --repeats 3 --threads 1
    python benchmarks/diagonal.py --preset wan2.1-1.3b --blocks 7 21 --device cuda --dtype bfloat16   # a GPU

Both run in one process on the same random model, batch 1, interleaved per repeat after a warm-up (this machine
is shared and noisy: compare the ratio within one run, not absolute numbers across runs). The packed forward
does the same arithmetic in fewer, larger calls, so what it saves is per-call overhead and small-kernel
inefficiency: most on an accelerator, least on a few CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hiar.config import add_config_args, config_from_args
from hiar.core.demo import CountingModel, random_student
from hiar.core.diagonal import diagonal_rollout
from hiar.core.rollout import hierarchical_rollout, initial_noise
from hiar.core.velocity import GuidedVelocity


def time_orders(
    cfg, model: CountingModel, num_blocks: int, repeats: int, device: str
) -> dict[str, tuple[int, float, float]]:
    """{order: (forwards, median seconds per video, max |order - hierarchical|)} for one video length."""
    r, v = cfg.rollout, cfg.video
    text = torch.randn(1, 8, cfg.model.text_dim, generator=torch.Generator().manual_seed(0)).to(device)
    vel = GuidedVelocity(model, text, frames_per_block=r.frames_per_block, window_frames=r.window_frames,
                         sink_frames=r.sink_frames)
    seeds = [0]
    shape = (v.latent_channels, r.frames_per_block, v.latent_height, v.latent_width)
    noise = initial_noise(seeds, num_blocks, shape, device=device)
    sigmas = cfg.schedule.sigmas()
    options = dict(step_rule=r.step_rule, context_noise=r.context_noise)
    orders = {
        "hierarchical_fused": lambda: hierarchical_rollout(vel, noise, sigmas, seeds, **options),
        "diagonal": lambda: diagonal_rollout(vel, noise, sigmas, seeds, **options)[0],
    }
    seconds: dict[str, list[float]] = {name: [] for name in orders}
    outputs, forwards = {}, {}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for name, run in orders.items():
                model.calls = 0
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outputs[name] = run()
                if device != "cpu":
                    torch.cuda.synchronize()
                if rep:  # the first round is a warm-up
                    seconds[name].append(time.perf_counter() - t0)
                forwards[name] = model.calls
    ref = outputs["hierarchical_fused"]
    return {
        name: (forwards[name], statistics.median(seconds[name]), (outputs[name] - ref).abs().max().item())
        for name in orders
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's weights (the rollout, its caches and the noise stay float32)")
    args = parser.parse_args()
    cfg = config_from_args(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = CountingModel(random_student(cfg, seed=0)).to(args.device, dtype=getattr(torch, args.dtype))
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"preset={cfg.preset} S={cfg.schedule.num_steps} batch=1 repeats={args.repeats} device={args.device} "
          f"({where}) dtype={args.dtype} (median seconds per video)")
    print(f"{'N':>4}  {'order':<20}{'forwards':>9}{'seconds':>10}{'time / hierarchical':>21}{'max |diff|':>12}")
    for n in args.blocks:
        results = time_orders(cfg, model, n, args.repeats, args.device)
        base = results["hierarchical_fused"][1]
        for name, (forwards, secs, diff) in results.items():
            print(f"{n:>4}  {name:<20}{forwards:>9}{secs:>10.3f}{secs / base:>21.2f}{diff:>12.2g}")


if __name__ == "__main__":
    main()
