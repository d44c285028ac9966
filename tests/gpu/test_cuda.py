"""Training, sharding and generation on a CUDA GPU: what the CPU suite cannot check. Run on a GPU machine:

    python -m pytest -q -s tests/gpu

CI has no GPU, so every test here is skipped there (the CPU suite covers the same code on the CPU). On a GPU:

* fp32 on the GPU (TF32 off) computes what the CPU computes: ODE-init steps and distillation iterations (DMD, FKL,
  critic) of the same models on the same data and seeds, to float round-off;
* ``distill.mixed_precision: auto`` is bf16 autocast there: the losses move off fp32's (so bf16 really ran) but stay
  near them, and the weights and the optimiser state stay fp32;
* FSDP2 with the bf16 ``MixedPrecisionPolicy`` on an NCCL process group: one rank, because this machine has one GPU
  and NCCL refuses two ranks on one device; ``fsdp_enabled`` is told to shard anyway (with one worker the product
  runs unsharded). Parameters become fp32 ``DTensor`` shards on the GPU, a ``torch.distributed.checkpoint`` taken
  mid-run resumes to the same losses, and the exported EMA is a plain fp32 module holding the EMA's values;
* the miniature Wan2.1 checkpoint (the public layout, the real diffusers / transformers classes: tests/wan_checkpoint.py)
  loads on the GPU in the preset's ``precision.*`` (bf16 transformer and UMT5, fp32 VAE) and generates a decoded
  video close to fp32's, while fp32 on the GPU matches the CPU.
"""

from __future__ import annotations

import socket

import pytest
import torch

from tests.unit.methods.test_sharding import LOSSES, TINY, _close, _micro_batch, _models, _ode_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")

CUDA = torch.device("cuda", 0)
ITERATIONS = 4  # distillation iterations: 2 generator updates at critic_ratio 2


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32: no TF32 in matrix products or convolutions (cuDNN's default is TF32 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _config(*overrides: str):
    from hiar.config import load_config

    return load_config("tiny", TINY + ["distill.use_gpu=true", *overrides])


def _distiller(cfg, device: torch.device, world_size: int = 1):
    from hiar.methods.distill import Distiller

    teacher, generator, real_score, text = _models(cfg)
    return Distiller(cfg, generator.to(device), teacher.to(device), text, world_size=world_size,
                     real_score=real_score.to(device))


def _iterate(d, cfg, until: int) -> list[dict]:
    logs = []
    while d.iteration < until:
        logs.append(d.iteration_step([_micro_batch(cfg, d.iteration, i) for i in range(d.accum)]).metrics)
    return logs


def _finite(logs: list[dict]) -> bool:
    return all(torch.isfinite(torch.tensor(x[k])) for x in logs for k in LOSSES if k in x)


def test_fp32_on_the_gpu_trains_as_on_the_cpu():
    cfg = _config("distill.mixed_precision='no'")
    cpu = _iterate(_distiller(cfg, torch.device("cpu")), cfg, ITERATIONS)
    gpu_d = _distiller(cfg, CUDA)
    gpu = _iterate(gpu_d, cfg, ITERATIONS)
    assert all(p.device.type == "cuda" for p in gpu_d.generator.parameters())
    worst = _close(gpu, cpu, 1e-4)
    print(f"\n[gpu] fp32 distillation, {ITERATIONS} iterations: largest relative loss gap GPU vs CPU {worst:.2e}")
    ode_cpu, ode_gpu = _ode_losses(cfg, 0, 1), _ode_losses(cfg, 0, 1, CUDA)
    ode_worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ode_gpu, ode_cpu))
    print(f"[gpu] fp32 ODE init, {len(ode_cpu)} steps: GPU {ode_gpu} vs CPU {ode_cpu} (gap {ode_worst:.2e})")
    assert ode_worst < 1e-4


def test_bf16_autocast_trains_near_fp32_and_keeps_fp32_weights():
    assert torch.cuda.is_bf16_supported()
    ref_cfg, cfg = _config("distill.mixed_precision='no'"), _config("distill.mixed_precision=auto")
    ref = _iterate(_distiller(ref_cfg, CUDA), ref_cfg, ITERATIONS)
    d = _distiller(cfg, CUDA)
    got = _iterate(d, cfg, ITERATIONS)
    worst = _close(got, ref, 0.1)
    print(f"\n[gpu] bf16 autocast vs fp32: largest relative loss gap {worst:.2e}")
    assert _finite(got)
    assert worst > 1e-6, "bf16 autocast gave fp32's losses exactly: it did not run"
    for model, opt in ((d.generator, d.opt_g), (d.critic, d.opt_c)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}
    ode_ref, ode_bf16 = _ode_losses(ref_cfg, 0, 1, CUDA), _ode_losses(cfg, 0, 1, CUDA)
    print(f"[gpu] ODE init bf16 {ode_bf16} vs fp32 {ode_ref}")
    assert ode_bf16 != ode_ref and max(abs(a - b) / b for a, b in zip(ode_bf16, ode_ref)) < 0.1


@pytest.fixture
def nccl_one_rank(monkeypatch):
    """An NCCL process group of one rank on this GPU, and ``fsdp_enabled`` told to shard over it."""
    import torch.distributed as dist

    from hiar.methods import sharding

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)  # eager: fails here, not mid-step
    monkeypatch.setattr(sharding, "fsdp_enabled", lambda cfg, world_size: cfg.distill.sharding == "fsdp")
    # and every loss of a step goes through mean_over_workers' all_reduce over NCCL (a CPU tensor there raises)
    yield
    dist.destroy_process_group()


def test_fsdp2_bf16_policy_on_nccl_shards_resumes_and_exports(nccl_one_rank, tmp_path):
    from torch.distributed.tensor import DTensor

    from hiar.methods import sharding

    cfg = _config("distill.sharding=fsdp", "distill.mixed_precision=auto")
    d = _distiller(cfg, CUDA)
    assert d.fsdp
    params = list(d.generator.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    seen = []  # the dtype the blocks compute in: the policy's bf16
    hook = d.generator.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    logs = _iterate(d, cfg, 2)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, seen
    d.save_checkpoint(tmp_path / "mid")
    logs += _iterate(d, cfg, ITERATIONS)
    assert _finite(logs)

    resumed = _distiller(cfg, CUDA)
    resumed.load_checkpoint(tmp_path / "mid")
    assert resumed.iteration == 2
    again = _iterate(resumed, cfg, ITERATIONS)
    worst = _close(again, logs[2:], 1e-3)
    print(f"\n[gpu] FSDP2 bf16 on NCCL: losses {[round(x['critic_loss'], 5) for x in logs]}; resumed from the "
          f"iteration-2 checkpoint, largest relative gap {worst:.2e}")

    ref_cfg = _config("distill.mixed_precision='no'")
    ref = _iterate(_distiller(ref_cfg, CUDA), ref_cfg, ITERATIONS)
    near = _close(logs, ref, 0.1)
    print(f"[gpu] FSDP2 bf16 vs unsharded fp32: largest relative loss gap {near:.2e}")

    exported = d.export_model()
    assert not sharding.is_sharded(exported) and {p.dtype for p in exported.parameters()} == {torch.float32}
    full = sharding.full_state_dict(d.ema)
    state = exported.state_dict()
    assert all(torch.equal(state[k].to(full[k].device), full[k]) for k in full)


def _main_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype holding most of ``module``'s parameter values."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


@pytest.fixture(scope="module")
def wan_checkpoint(tmp_path_factory):
    from tests.wan_checkpoint import build_wan_checkpoint

    return build_wan_checkpoint(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-mini-Diffusers")


def test_the_wan_checkpoint_generates_on_the_gpu_in_the_preset_precision(wan_checkpoint):
    from hiar.config import load_config
    from hiar.core.generation import generate_frames
    from hiar.io.bundle import load_bundle, open_model_dir, runtime_dtypes
    from tests.wan_checkpoint import PROMPTS, cpu_overrides

    cfg = load_config("wan2.1-1.3b", cpu_overrides(wan_checkpoint))
    md = open_model_dir(wan_checkpoint, "teacher.path")
    dtypes = runtime_dtypes(cfg, CUDA)
    assert dtypes == {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "vae": torch.float32}
    videos = {}
    for name, device, dt in (("cpu fp32", "cpu", None), ("gpu fp32", "cuda", runtime_dtypes(None, CUDA)),
                             ("gpu preset", "cuda", dtypes)):
        bundle = load_bundle(md, device=device, dtypes=dt)
        if name == "gpu preset":  # most weights; diffusers and transformers keep a few modules fp32 on purpose
            assert _main_dtype(bundle.transformer) == _main_dtype(bundle.text.model) == torch.bfloat16
            assert _main_dtype(bundle.codec.vae) == torch.float32
        videos[name] = generate_frames(bundle, PROMPTS[:2], [0, 1], 2, "hierarchical", cfg=cfg)
    ref = torch.from_numpy(videos["cpu fp32"])
    fp32_gap = (torch.from_numpy(videos["gpu fp32"]) - ref).abs().max().item()
    bf16_gap = (torch.from_numpy(videos["gpu preset"]) - ref).abs().mean().item()
    print(f"\n[gpu] miniature Wan2.1, 2 blocks x 2 prompts, decoded {tuple(ref.shape)}: GPU fp32 vs CPU max |diff| "
          f"{fp32_gap:.2e}; GPU bf16 (precision.*) vs CPU mean |diff| {bf16_gap:.2e}")
    assert ref.std() > 0.01  # a video, not a flat frame
    assert fp32_gap < 1e-3
    assert 0 < bf16_gap < 0.1
