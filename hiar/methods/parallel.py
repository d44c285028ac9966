"""Data-parallel helpers of the distillation workers: gradient averaging and clipping, the mean of logged values
over workers, mixed-precision autocast (no-ops on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiar.config import HiarConfig

__all__ = ["average_gradients", "collective_device", "mean_over_workers", "clip_gradients", "autocast"]

#: the most gradient bytes one all_reduce carries (DDP's default bucket size)
BUCKET_BYTES = 25 * 2**20


def average_gradients(model: torch.nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Mean of every parameter's gradient over the data-parallel workers (no-op on one process).

    The gradients travel in buckets: each bucket's gradients (one dtype, at most ``bucket_bytes``, or one larger
    tensor alone) are copied into one flat tensor, all-reduced in one call and copied back. One call per parameter
    cost about 2 ms each over gloo: the tiny model's 123 tensors took 260-300 ms per step against 15 ms for one
    flat call, half of a two-worker ODE-init step (benchmarks/train.py --ray-workers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad or p.grad is not None]
    for p in params:
        if p.grad is None:  # unused this step: its share of the mean is zero, and every rank must send the same
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        if len(bucket) > 1:
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        elif flat.data_ptr() != bucket[0].data_ptr():  # a non-contiguous gradient was reduced as a copy
            bucket[0].copy_(flat.view_as(bucket[0]))


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, grouped by dtype and device into runs of at most ``bucket_bytes`` (a larger tensor
    alone); the same grouping on every rank, since every rank has the same parameters."""
    out: list[list[torch.Tensor]] = []
    size, key = 0, None
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or (t.dtype, t.device) != key or size + nbytes > bucket_bytes:
            out.append([])
            size, key = 0, (t.dtype, t.device)
        out[-1].append(t)
        size += nbytes
    return out


def collective_device() -> torch.device:
    """Where a tensor made for a collective must live: NCCL reduces only CUDA tensors (a CPU tensor raises "No
    backend type associated with device type cpu"), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_workers(values: dict) -> dict:
    """The mean of each float over the data-parallel workers (one all_reduce; identity without a process group):
    the losses logged are those of the whole global batch, whatever the worker count. A group of one still
    reduces (a few floats), so that a one-GPU run goes through the collective a multi-GPU run makes."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
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
