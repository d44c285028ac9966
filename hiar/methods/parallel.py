"""Data-parallel helpers of the distillation workers: gradient averaging and clipping, the mean of logged values
over workers, mixed-precision autocast, gradient-accumulation steps (no-ops on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiar.config import HiarConfig

__all__ = ["average_gradients", "mean_over_workers", "clip_gradients", "autocast", "accumulation_steps"]

def average_gradients(model: torch.nn.Module) -> None:
    """Mean of every parameter's gradient over the data-parallel workers (no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def mean_over_workers(values: dict) -> dict:
    """The mean of each float over the data-parallel workers (one all_reduce; identity on one process): the
    losses logged are those of the whole global batch, whatever the worker count."""
    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """``clip_grad_norm_`` (plain or DTensor gradients: the norm of a sharded model is reduced over its shards);
    returns the total norm before clipping as a float."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def autocast(cfg: HiarConfig, device: torch.device):
    """bf16 autocast where the device supports it and the config asks (``distill.mixed_precision``)."""
    mode = cfg.distill.mixed_precision
    use = device.type == "cuda" and mode in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


def accumulation_steps(total_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if total_batch % per_step:
        raise ValueError(f"distill.batch_size ({total_batch}) must be a multiple of micro_batch_size x workers "
                         f"({micro_batch} x {world_size} = {per_step})")
    return total_batch // per_step
