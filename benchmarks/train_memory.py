"""Per-worker memory of distillation, ``distill.sharding`` ddp vs fsdp, side by side in one run.

    python benchmarks/train_memory.py                  # tiny preset model, 2 workers on gloo (CPU)
    python benchmarks/train_memory.py --layers 8 --ffn 1536 --heads 8 --head-dim 64

Each mode starts 2 processes (``torch.multiprocessing`` spawn, a gloo process group on 127.0.0.1) that build the
same Distiller (generator, critic, EMA, a separate real score) and run one generator step (iteration 0 updates
generator and critic), then measure on each rank, from the tensors it actually holds (local shards under FSDP):
bytes of parameters (generator, critic, real score), gradients, AdamW state and EMA, and the process's peak RSS.
The table prints rank 0's numbers for both modes and the ratio fsdp / ddp (the ideal is 1 / workers for what is
sharded; RSS also holds the Python runtime, torch and activations, which are not).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bytes(tensors) -> int:
    from hiar.methods.sharding import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def measure_state(d) -> dict:
    opt_state = lambda opt: [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]  # noqa: E731
    return {
        "generator params": _bytes(d.generator.parameters()),
        "generator grads": _bytes(p.grad for p in d.generator.parameters()),
        "generator AdamW": _bytes(opt_state(d.opt_g)),
        "EMA": _bytes(d.ema.parameters()),
        "critic params": _bytes(d.critic.parameters()),
        "critic grads": _bytes(p.grad for p in d.critic.parameters()),
        "critic AdamW": _bytes(opt_state(d.opt_c)),
        "real score params": _bytes(d.real_score.parameters()),
        "peak RSS": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _worker(rank: int, world: int, port: int, mode: str, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hiar.config import load_config
        from hiar.methods.distill import Distiller
        from hiar.core.model import CausalWanTransformer3DModel
        from hiar.io.text import TextEncoder
        from hiar.tiny.captions import train_prompts, vocabulary

        cfg = load_config("tiny", [*overrides, f"distill.sharding={mode}", f"distill.batch_size={world}",
                                   "distill.micro_batch_size=1", "distill.critic_ratio=2"])
        torch.manual_seed(0)
        teacher = CausalWanTransformer3DModel(**cfg.model.kwargs())
        real = copy.deepcopy(teacher)
        text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
        d = Distiller(cfg, copy.deepcopy(teacher), teacher, text, rank=rank, world_size=world, real_score=real)
        v = cfg.video
        states = torch.randn(1, cfg.schedule.sigmas().numel(), v.latent_channels, v.train_latent_frames,
                             v.latent_height, v.latent_width, generator=torch.Generator().manual_seed(rank))
        d.iteration_step([([train_prompts()[rank]], states)])
        torch.save(measure_state(d), Path(out) / f"{mode}-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="model.num_layers (default: the tiny preset's)")
    p.add_argument("--ffn", type=int, default=None, help="model.ffn_dim")
    p.add_argument("--heads", type=int, default=None, help="model.num_attention_heads")
    p.add_argument("--head-dim", type=int, default=None, help="model.attention_head_dim")
    args = p.parse_args(argv)
    overrides = ["video.train_latent_frames=6"]
    for key, value in (("num_layers", args.layers), ("ffn_dim", args.ffn), ("num_attention_heads", args.heads),
                       ("attention_head_dim", args.head_dim)):
        if value is not None:
            overrides.append(f"model.{key}={value}")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("ddp", "fsdp"):
            torch.multiprocessing.spawn(_worker, args=(args.workers, _free_port(), mode, overrides, out),
                                        nprocs=args.workers, join=True)
            results[mode] = [torch.load(Path(out) / f"{mode}-{r}.pt") for r in range(args.workers)]
    ddp, fsdp = results["ddp"][0], results["fsdp"][0]
    print(f"per-worker memory, rank 0 of {args.workers} (overrides: {' '.join(overrides)})")
    print(f"{'':<20}{'ddp':>14}{'fsdp':>14}{'fsdp/ddp':>10}")
    for key in ddp:
        print(f"{key:<20}{ddp[key] / 2**20:>11.3f} MB{fsdp[key] / 2**20:>11.3f} MB{fsdp[key] / max(1, ddp[key]):>10.3f}")
    sharded = [k for k in ddp if k != "peak RSS"]
    total_d, total_f = sum(ddp[k] for k in sharded), sum(fsdp[k] for k in sharded)
    print(f"{'model state total':<20}{total_d / 2**20:>11.3f} MB{total_f / 2**20:>11.3f} MB{total_f / total_d:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
