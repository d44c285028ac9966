"""Bucketed gradient averaging (hiar.methods.parallel.average_gradients) on two real gloo processes: every
gradient ends as the mean of the two ranks' gradients, whatever the bucket boundaries, dtypes, layouts and unused
parameters, checked against the mean computed here from the gradients each rank was given; and the logged losses'
mean over the ranks (mean_over_workers), reduced on the device the backend takes (collective_device: the CPU for
gloo; tests/gpu runs it over NCCL)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import free_port


def grads_of(rank: int) -> dict[str, torch.Tensor | None]:
    """The gradients rank ``rank`` holds before averaging (a deterministic function of the rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(300, generator=g),  # alone over the small bucket size
        "c": torch.randn(3, generator=g).to(torch.bfloat16),  # another dtype: a bucket of its own
        "d": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "e": None,  # unused in this step on this rank
        "f": torch.randn(2, 2, generator=g),
    }


class Model(torch.nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        for name, grad in grads_of(rank).items():
            shape = (4, 6) if name == "d" else (2, 2) if name == "e" else tuple(grad.shape)
            dtype = grad.dtype if grad is not None else torch.float32
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            self.register_parameter(name, p)
        for name, grad in grads_of(rank).items():
            if grad is not None:
                getattr(self, name).grad = grad.t() if name == "d" else grad.clone()
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)


def _worker(rank: int, port: int, bucket_bytes: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from hiar.methods.parallel import average_gradients, collective_device, mean_over_workers

        model = Model(rank)
        if rank == 1:
            model.e.grad = torch.full((2, 2), 4.0)  # used on rank 1 only: the mean is half of it
        average_gradients(model, bucket_bytes=bucket_bytes)
        out[rank] = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
        out[f"means{rank}"] = (mean_over_workers({"dmd_loss": 1.0 + rank, "critic_loss": 3.0 * rank}),
                               collective_device())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket_bytes", [256, 2**20])  # many buckets, and one per dtype
def test_every_gradient_is_the_mean_over_ranks(bucket_bytes):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), bucket_bytes, out), nprocs=2)
    expected = {}
    for name in grads_of(0):
        per_rank = [grads_of(r)[name] for r in (0, 1)]
        if name == "e":
            per_rank = [torch.zeros(2, 2), torch.full((2, 2), 4.0)]
        if name == "d":
            per_rank = [g.t() for g in per_rank]
        expected[name] = (per_rank[0].float() + per_rank[1].float()) / 2
    for rank in (0, 1):
        got = out[rank]
        assert got["frozen"] is None  # a frozen parameter is left alone
        for name, want in expected.items():
            tol = 1e-2 if got[name].dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got[name].float(), want, rtol=0, atol=tol, msg=f"{name} on rank {rank}")
    assert torch.equal(out[0]["a"], out[1]["a"]) and torch.equal(out[0]["c"], out[1]["c"])
    for rank in (0, 1):
        assert out[f"means{rank}"] == ({"dmd_loss": 1.5, "critic_loss": 1.5}, torch.device("cpu"))
