"""Run the three execution orders on a small random Wan DiT on CPU and compare them.

    python -m hiar.core.demo --preset tiny --blocks 8

Prints the model calls each order makes, the per-stage calls of the pipelined order (N + 1 for N blocks), and
the largest difference between hierarchical and pipelined outputs (0: they are the same computation).
"""

from __future__ import annotations

import argparse
import time

import torch

from hiar.config import add_config_args, config_from_args
from hiar.core.model import CausalWanTransformer3DModel
from hiar.core.rollout import block_first_rollout, hierarchical_rollout, initial_noise, pipelined_rollout
from hiar.core.velocity import GuidedVelocity


class CountingModel(torch.nn.Module):
    """Wraps a transformer and counts its forward calls (every rollout call is exactly one forward)."""

    def __init__(self, inner: CausalWanTransformer3DModel):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def random_student(cfg, seed: int = 0) -> CausalWanTransformer3DModel:
    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()


def run_orders(cfg, num_blocks: int, seed: int = 0, batch: int = 1):
    """Returns {order: (latents, calls, seconds)} and the pipelined stages, on a random model."""
    model = CountingModel(random_student(cfg, seed))
    text = torch.randn(batch, 8, cfg.model.text_dim, generator=torch.Generator().manual_seed(seed))
    r = cfg.rollout
    vel = GuidedVelocity(model, text, frames_per_block=r.frames_per_block, window_frames=r.window_frames,
                         sink_frames=r.sink_frames)
    seeds = list(range(seed, seed + batch))
    v = cfg.video
    noise = initial_noise(seeds, num_blocks, (v.latent_channels, r.frames_per_block, v.latent_height, v.latent_width))
    sigmas = cfg.schedule.sigmas()
    common = dict(step_rule=r.step_rule)
    orders = {
        "block_first": lambda: block_first_rollout(vel, noise, sigmas, seeds, **common),
        "hierarchical": lambda: hierarchical_rollout(vel, noise, sigmas, seeds, context_noise=r.context_noise, fused=False, **common),
        "hierarchical_fused": lambda: hierarchical_rollout(vel, noise, sigmas, seeds, context_noise=r.context_noise, **common),
        "pipelined": lambda: pipelined_rollout(vel, noise, sigmas, seeds, context_noise=r.context_noise, **common),
    }
    results, stages = {}, None
    with torch.no_grad():
        for name, fn in orders.items():
            model.calls = 0
            t0 = time.perf_counter()
            out = fn()
            if name == "pipelined":
                out, stages = out
            results[name] = (out, model.calls, time.perf_counter() - t0)
    return results, stages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--blocks", type=int, default=8, help="number of blocks N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be >= 1")
    cfg = config_from_args(args, parser)
    results, stages = run_orders(cfg, args.blocks, args.seed)
    n, s = args.blocks, cfg.schedule.num_steps
    print(f"preset={cfg.preset} N={n} blocks x S={s} steps, {cfg.rollout.frames_per_block} latent frames per block, "
          f"sigmas={[round(x, 4) for x in cfg.schedule.sigmas().tolist()]}")
    print(f"{'order':<20}{'model calls':>12}{'seconds':>10}")
    for name, (_, calls, secs) in results.items():
        print(f"{name:<20}{calls:>12}{secs:>10.3f}")
    print(f"pipelined calls per stage: {[st.calls for st in stages]} (N + 1 = {n + 1}; unfused would be 2N = {2 * n})")
    hier, pipe = results["hierarchical_fused"][0], results["pipelined"][0]
    unfused = results["hierarchical"][0]
    print(f"max |hierarchical - pipelined| = {(hier - pipe).abs().max().item():.3g} (bit-identical: {torch.equal(hier, pipe)})")
    print(f"max |fused - unfused hierarchical| = {(hier - unfused).abs().max().item():.3g}")
    print(f"max |hierarchical - block_first| = {(hier - results['block_first'][0]).abs().max().item():.3g} "
          "(different algorithms: expected to differ)")


if __name__ == "__main__":
    main()
