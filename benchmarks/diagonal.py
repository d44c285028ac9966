"""Wall time per video: fused hierarchical sweep (S * (N + 1) forwards) vs diagonal-packed (N + S forwards), and
for C concurrent videos (``--streams``) the diagonals of all C streams batched into one forward each.

    python benchmarks/diagonal.py --preset tiny --blocks 8 16 --repeats 3 --threads 1
    python benchmarks/diagonal.py --preset tiny --blocks 8 --streams 1 4 8 --repeats 3 --threads 1
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
from hiar.core.diagonal import DiagonalRollout, advance_diagonals, diagonal_rollout
from hiar.core.rollout import _split_blocks, hierarchical_rollout, initial_noise
from hiar.core.velocity import GuidedVelocity


def time_orders(
    cfg, model: CountingModel, num_blocks: int, repeats: int, device: str, streams: int = 1
) -> dict[str, tuple[int, float, float]]:
    """{order: (forwards, median seconds for all streams' videos, max |order - hierarchical|)} for one length.

    ``streams`` videos with their own prompt and seed: the per-stream orders make them one after another, the
    batched diagonal advances every stream's diagonal in one forward (``hiar.core.diagonal.advance_diagonals``).
    """
    r, v = cfg.rollout, cfg.video
    shape = (v.latent_channels, r.frames_per_block, v.latent_height, v.latent_width)
    sigmas = cfg.schedule.sigmas()
    options = dict(step_rule=r.step_rule, context_noise=r.context_noise)
    videos = []  # (velocity, noise, seeds) per stream
    for i in range(streams):
        text = torch.randn(1, 8, cfg.model.text_dim, generator=torch.Generator().manual_seed(i)).to(device)
        vel = GuidedVelocity(model, text, frames_per_block=r.frames_per_block, window_frames=r.window_frames,
                             sink_frames=r.sink_frames)
        videos.append((vel, initial_noise([i], num_blocks, shape, device=device), [i]))

    def diagonal_batched() -> list[torch.Tensor]:
        rollouts = [DiagonalRollout(vel, sigmas, seeds, **options) for vel, _, seeds in videos]
        blocks = [list(_split_blocks(noise, r.frames_per_block)) for _, noise, _ in videos]
        out: list[list[torch.Tensor]] = [[] for _ in videos]
        for d in range(num_blocks):
            for i, x in enumerate(advance_diagonals([(ro, blocks[i][d]) for i, ro in enumerate(rollouts)])):
                if x is not None:
                    out[i].append(x)
        while not all(ro.done for ro in rollouts):
            pending = [(i, ro) for i, ro in enumerate(rollouts) if not ro.done]
            for (i, _), x in zip(pending, advance_diagonals([(ro, None) for _, ro in pending])):
                if x is not None:
                    out[i].append(x)
        return [torch.cat(blocks_i, dim=2) for blocks_i in out]

    orders = {
        "hierarchical_fused": lambda: [hierarchical_rollout(vel, noise, sigmas, seeds, **options)
                                       for vel, noise, seeds in videos],
        "diagonal": lambda: [diagonal_rollout(vel, noise, sigmas, seeds, **options)[0] for vel, noise, seeds in videos],
    }
    if streams > 1:
        orders["diagonal_batched"] = diagonal_batched
    seconds: dict[str, list[float]] = {name: [] for name in orders}
    outputs, forwards = {}, {}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for name, run in orders.items():
                model.calls = 0
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outputs[name] = torch.cat(run())
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
    parser.add_argument("--streams", type=int, nargs="+", default=[1],
                        help="concurrent videos (own prompt and seed); above 1 adds the batched diagonal")
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
    print(f"preset={cfg.preset} S={cfg.schedule.num_steps} repeats={args.repeats} device={args.device} "
          f"({where}) dtype={args.dtype} (median seconds for all C streams' videos)")
    print(f"{'C':>3}{'N':>4}  {'order':<20}{'forwards':>9}{'seconds':>10}{'time / hierarchical':>21}{'max |diff|':>12}")
    for c in args.streams:
        for n in args.blocks:
            results = time_orders(cfg, model, n, args.repeats, args.device, streams=c)
            base = results["hierarchical_fused"][1]
            for name, (forwards, secs, diff) in results.items():
                print(f"{c:>3}{n:>4}  {name:<20}{forwards:>9}{secs:>10.3f}{secs / base:>21.2f}{diff:>12.2g}")

if __name__ == "__main__":
    main()
