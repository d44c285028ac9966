"""FSDP2 sharding of the distillation models (hiar.methods.sharding, ``distill.sharding: fsdp``) on CPU with gloo.

Over 400 lines because every scenario shares one pair of spawned processes (the ``runs`` fixture).

Two processes started with ``torch.multiprocessing`` (spawn) and a gloo process group on 127.0.0.1 run a tiny
Distiller; no Ray here (``tests/integration/jobs/test_train.py`` covers the Ray Train wiring).

The reference is one unsharded process holding the whole global batch (2 micro-batches of accumulation) on the
same data and seed: the rollout seeds come from each micro-batch's index in the global batch
(``Distiller.iteration_step``) and the logged losses are means over workers, so 2 sharded workers x 1 micro-batch
compute the same numbers, up to the order of floating-point sums.

Checkpoints are ``torch.distributed.checkpoint`` directories. The sharded run writes each rank's files into a
directory of its own, merged afterwards as Ray Train merges the ranks' directories of one report.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch

from hiar.core.rollout import ROLLOUT_MODES

TINY = ["distill.batch_size=2", "distill.ode_batch_size=2", "distill.micro_batch_size=1",
        "distill.ode_micro_batch_size=null", "distill.critic_ratio=2",
        "video.train_latent_frames=6", "video.latent_height=8", "video.latent_width=8", "model.num_layers=2",
        "model.ffn_dim=64", "model.num_attention_heads=2", "model.attention_head_dim=16"]
GENERATOR_STEPS = 3
ITERATIONS = GENERATOR_STEPS * 2  # critic_ratio 2
WORKER_TIMEOUT_S = 300
SAVE_AT = 3  # iterations before the mid-run checkpoint (after generator steps 1, 2)
LOSSES = ("dmd_loss", "fkl_loss", "critic_loss")


def _models(cfg):
    from hiar.core.model import CausalWanTransformer3DModel
    from hiar.io.text import TextEncoder
    from hiar.tiny.captions import vocabulary
    from tests.conftest import perturbed

    torch.manual_seed(0)
    teacher = perturbed(CausalWanTransformer3DModel(**cfg.model.kwargs()), seed=0)
    generator = perturbed(copy.deepcopy(teacher), scale=0.02, seed=1)
    real_score = perturbed(copy.deepcopy(teacher), scale=0.05, seed=2)  # its own model: the real-score path matters
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
    return teacher, generator, real_score, text


def _micro_batch(cfg, iteration: int, index: int):
    """The data of micro-batch ``index`` of the global batch at ``iteration``: prompt and FKL trajectory states."""
    from hiar.tiny.captions import train_prompts

    v = cfg.video
    states = torch.randn(1, cfg.schedule.sigmas().numel(), v.latent_channels, v.train_latent_frames,
                         v.latent_height, v.latent_width, generator=torch.Generator().manual_seed(100 * iteration + index))
    return [train_prompts()[(iteration * 2 + index) % 20]], states


def _distiller(cfg, rank, world):
    from hiar.methods.distill import Distiller

    teacher, generator, real_score, text = _models(cfg)
    return Distiller(cfg, generator, teacher, text, rank=rank, world_size=world, real_score=real_score)


def _run(d, cfg, until: int) -> list[dict]:
    """Iterations up to ``until``; this rank feeds its micro-batches of the global batch."""
    logs = []
    while d.iteration < until:
        batch = [_micro_batch(cfg, d.iteration, d.rank * d.accum + i) for i in range(d.accum)]
        logs.append(d.iteration_step(batch).metrics)
    return logs


def _ode_losses(cfg, rank: int, world: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Two ODE-init steps (the same code path, sharded when the config says so) on the same global batches, held
    on the CPU as the training job's dataset delivers them, with the model on ``device`` (tests/gpu: a GPU)."""
    from hiar.methods.distill import ODEInit

    teacher, _, _, text = _models(cfg)
    ode = ODEInit(cfg, teacher.to(device), text, rank, world)
    v = cfg.video
    out = []
    for step in range(2):
        batch = []
        for i in range(ode.accum):
            index = rank * ode.accum + i
            latents = torch.randn(1, cfg.schedule.sigmas().numel(), v.latent_channels, v.train_latent_frames,
                                  v.latent_height, v.latent_width, generator=torch.Generator().manual_seed(7 + 10 * step + index))
            batch.append((_micro_batch(cfg, 0, index)[0], latents))
        out.append(ode.train_step(batch)["ode_loss"])
    return out


def _scenario(rank: int, world: int, scenario: dict, out_dir: str) -> dict:
    """One scenario on this rank: ``train`` (distill from scratch, checkpoints ``mid`` and ``end``, the exported EMA,
    ODE-init losses unless ``"ode": False``) or ``resume`` (from each checkpoint in ``scenario["from"]`` to the end)."""
    from hiar.methods import sharding
    from hiar.config import load_config

    cfg = load_config("tiny", TINY + scenario["overrides"])
    out: dict = {}
    if scenario["kind"] == "train":
        d = _distiller(cfg, rank, world)
        out["fsdp"] = d.fsdp
        _, generator, real_score, _ = _models(cfg)
        out["full_bytes"] = {"generator": sharding.local_param_bytes(generator),
                             "real_score": sharding.local_param_bytes(real_score)}
        out["bytes"] = {k: sharding.local_param_bytes(getattr(d, k))
                        for k in ("generator", "critic", "ema", "real_score")}
        out["logs"] = _run(d, cfg, SAVE_AT)
        d.save_checkpoint(os.path.join(out_dir, f"mid-rank{rank}"))  # a directory per rank, as under Ray
        out["logs"] += _run(d, cfg, ITERATIONS)
        d.save_checkpoint(os.path.join(out_dir, f"end-rank{rank}"))
        ema = d.export_model()  # collective with fsdp: the whole EMA generator on rank 0
        if rank == 0:
            out["ema"] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        if scenario.get("ode", True):
            out["ode_losses"] = _ode_losses(cfg, rank, world)
    else:  # resume from each checkpoint in scenario["from"], continue to the end
        for name, path in scenario["from"].items():
            d = _distiller(cfg, rank, world)
            d.load_checkpoint(path)
            out[f"{name}_iteration"] = d.iteration
            out[f"{name}_logs"] = _run(d, cfg, ITERATIONS)
    return out


def _worker(rank: int, world: int, port: int, scenarios: list[dict], out_dir: str) -> None:
    """The scenarios in order in one process per rank (one interpreter, torch import and process group for all);
    each scenario's checkpoints in ``out_dir/<name>/``, its result in ``out_dir/<name>/rank<r>.pt``, and the
    checkpoints named in its ``merge`` merged by rank 0 (as Ray Train merges a report's uploads) before the next
    scenario, which may resume from them."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hung collective fails the test, with stacks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            here = os.path.join(out_dir, scenario["name"])
            out = _scenario(rank, world, scenario, here)
            torch.save(out, os.path.join(here, f"rank{rank}.pt"))
            # only on success: a rank that raised must not wait here for the others (start_processes then stops
            # the other rank and raises the error)
            dist.barrier()
            if rank == 0:
                for name in scenario.get("merge", ()):
                    _merge(Path(here), name)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(scenarios: list[dict], tmp_path, world: int = 2) -> dict[str, list[dict]]:
    """Run ``scenarios`` in order on ``world`` spawned processes; ``{scenario name: [each rank's result]}``."""
    import torch.multiprocessing as mp

    for scenario in scenarios:
        (tmp_path / scenario["name"]).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, scenarios, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    return {sc["name"]: [torch.load(tmp_path / sc["name"] / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for sc in scenarios}


def _merge(out_dir, name: str, world: int = 2):
    """The ranks' directories of one checkpoint merged into one (what Ray Train does with a report's uploads);
    no file may come from two ranks."""
    merged = out_dir / name
    merged.mkdir()
    for r in range(world):
        for f in (out_dir / f"{name}-rank{r}").iterdir():
            assert not (merged / f.name).exists(), f"{f.name} written by two ranks"
            shutil.copy2(f, merged / f.name)
    return merged


def _close(a: list[dict], b: list[dict], tol: float) -> float:
    """Largest relative gap between two runs' losses (generator DMD, FKL, critic), iteration by iteration."""
    assert len(a) == len(b) and a
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["exit_step"] == y["exit_step"]
        for k in LOSSES:
            if k in x:
                gap = abs(x[k] - y[k]) / max(1.0, abs(x[k]))
                assert gap <= tol, f"{k}: {x[k]} vs {y[k]}"
                worst = max(worst, gap)
    return worst


def _single(tmp):
    """One unsharded process holding the whole global batch (2 micro-batches); checkpoint at SAVE_AT."""
    from hiar.config import load_config

    cfg = load_config("tiny", TINY)
    d = _distiller(cfg, 0, 1)
    assert not d.fsdp and d.accum == 2
    logs = _run(d, cfg, SAVE_AT)
    d.save_checkpoint(tmp / "mid")
    return d, cfg, logs + _run(d, cfg, ITERATIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The unsharded reference in this process, then every two-worker scenario on one pair of spawned processes
    (each start-up costs an interpreter, torch and a process group): the sharded run (its checkpoints merged), the
    resumes from its and the reference's mid-run checkpoints, and the run with activation checkpointing and a
    replicated real score."""
    tmp = tmp_path_factory.mktemp("sharding")
    (tmp / "single").mkdir()
    single, cfg, single_logs = _single(tmp / "single")
    got = _spawn([
        {"name": "fsdp", "kind": "train", "overrides": ["distill.sharding=fsdp"], "merge": ["mid", "end"]},
        {"name": "resume", "kind": "resume", "overrides": ["distill.sharding=fsdp"],
         "from": {"fsdp": str(tmp / "fsdp" / "mid"), "single": str(tmp / "single" / "mid")}},
        {"name": "fsdp_ac", "kind": "train", "ode": False,
         "overrides": ["distill.sharding=fsdp", "distill.activation_checkpointing=true",
                       "distill.real_score_sharding=replicate"]},
    ], tmp)
    return {"tmp": tmp, "single": single, "single_logs": single_logs, "single_ode": _ode_losses(cfg, 0, 1), **got}


def test_fsdp_on_two_workers_matches_one_unsharded_process(runs):
    """3 generator steps (6 critic steps) on the same data and seed: generator (DMD), FKL and critic losses within
    1e-5 of one unsharded process with the whole batch; ODE-init losses too; the exported EMA generator within 1e-6."""
    fsdp, logs_s = runs["fsdp"], runs["single_logs"]
    assert fsdp[0]["fsdp"]
    logs_f = fsdp[0]["logs"]
    assert fsdp[1]["logs"] == logs_f  # the logged losses are the global batch's, the same on every rank
    assert sum("dmd_loss" in m for m in logs_f) == GENERATOR_STEPS and any("fkl_loss" in m for m in logs_f)
    worst = _close(logs_s, logs_f, 1e-5)
    print(f"\nmax relative loss gap, one process vs fsdp on 2 workers: {worst:.2e}")
    for m_s, m_f in zip(logs_s, logs_f):
        print({k: (round(m_s[k], 7), round(m_f[k], 7)) for k in m_s if k in LOSSES})
    for a, b in zip(runs["single_ode"], fsdp[0]["ode_losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (runs["single_ode"], fsdp[0]["ode_losses"])
    print("ode losses", runs["single_ode"], fsdp[0]["ode_losses"])
    ema_s, ema_f = runs["single"].ema.state_dict(), fsdp[0]["ema"]
    assert ema_s.keys() == ema_f.keys()
    assert max((ema_s[k] - ema_f[k]).abs().max().item() for k in ema_s) < 1e-6


def test_each_of_two_workers_holds_half_the_parameters(runs):
    """Measured: the bytes of the local shards of the generator, critic, EMA and real score on each rank are
    ~1/2 of the unsharded model's (dim-0 shards of odd-sized tensors make the halves uneven) and add up to it."""
    from hiar.methods.sharding import local_param_bytes

    fsdp, single = runs["fsdp"], runs["single"]
    full = fsdp[0]["full_bytes"]
    assert full["generator"] == local_param_bytes(single.generator)
    for name in ("generator", "critic", "ema", "real_score"):
        whole = full["real_score" if name == "real_score" else "generator"]
        per_rank = [r["bytes"][name] for r in fsdp]
        print(f"\n{name}: unsharded {whole} B, per rank {per_rank} ({[round(b / whole, 3) for b in per_rank]})")
        assert sum(per_rank) == whole
        assert all(0.45 <= b / whole <= 0.55 for b in per_rank)


def test_sharded_checkpoints_resume_exactly_with_the_same_and_another_worker_count(runs):
    """torch.distributed.checkpoint directories, each rank writing only its shards:
    2 -> 2 continues the uninterrupted sharded run bit for bit; 1 -> 2 (the unsharded process's checkpoint into 2
    sharded workers) and 2 -> 1 (the sharded checkpoint into one unsharded process) continue the uninterrupted
    run of the other worker count within 1e-5 (the same next-step losses up to summation order)."""
    from hiar.methods.sharding import read_full_model

    tmp, fsdp = runs["tmp"], runs["fsdp"]
    files = {f.name for f in (tmp / "fsdp" / "mid").iterdir()}
    assert {".metadata", "trainer.json"} <= files and sum(f.endswith(".distcp") for f in files) == 2
    got = runs["resume"]  # 2 workers resumed from each mid-run checkpoint (the fixture's spawned scenarios)
    reference_f, reference_s = fsdp[0]["logs"][SAVE_AT:], runs["single_logs"][SAVE_AT:]
    assert got[0]["fsdp_iteration"] == got[0]["single_iteration"] == SAVE_AT
    assert got[0]["fsdp_logs"] == reference_f  # 2 -> 2: the same numbers as never stopping
    print(f"\n1 -> 2: max relative gap {_close(reference_s, got[0]['single_logs'], 1e-5):.2e}")

    # 2 -> 1: the sharded checkpoint into one unsharded process; every tensor whole and equal to the shards'
    from hiar.config import load_config

    cfg = load_config("tiny", TINY)
    d = _distiller(cfg, 0, 1)
    d.load_checkpoint(tmp / "fsdp" / "mid")
    assert d.iteration == SAVE_AT
    for name in ("generator", "critic", "ema"):
        saved = read_full_model(tmp / "fsdp" / "mid", name)
        here = getattr(d, name).state_dict()
        assert saved.keys() == here.keys() and all(torch.equal(saved[k], here[k]) for k in saved), name
    exp_avg = d.opt_g.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.abs().sum() > 0  # the optimiser's moments came back too (a fresh AdamW has zeros)
    print(f"2 -> 1: max relative gap {_close(reference_f, _run(d, cfg, ITERATIONS), 1e-5):.2e}")


def test_the_exported_generator_is_the_sharded_ema(runs):
    """Rank 0's export (gathered from the shards) equals the EMA in the final sharded checkpoint exactly."""
    from hiar.methods.sharding import read_full_model

    saved = read_full_model(runs["tmp"] / "fsdp" / "end", "ema")
    exported = runs["fsdp"][0]["ema"]
    assert saved.keys() == exported.keys()
    assert all(torch.equal(saved[k], exported[k]) for k in saved)


def test_a_checkpoint_of_another_model_shape_or_stage_is_a_clear_error(runs, tmp_path):
    from hiar.config import load_config
    from hiar.methods.distill import ODEInit

    mid = runs["tmp"] / "single" / "mid"
    cfg = load_config("tiny", TINY + ["model.ffn_dim=32"])
    d = _distiller(cfg, 0, 1)
    with pytest.raises(ValueError, match=r"written for another model: generator\.blocks\.0\..* is \[64.*\] there, \[32"):
        d.load_checkpoint(mid)
    teacher, _, _, text = _models(load_config("tiny", TINY))
    with pytest.raises(ValueError, match="is a 'distill' checkpoint, not a 'ode_init' one"):
        ODEInit(load_config("tiny", TINY), teacher, text).load_checkpoint(mid)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        _distiller(load_config("tiny", TINY), 0, 1).load_checkpoint(tmp_path)


def test_fsdp_with_activation_checkpointing_and_a_replicated_real_score_matches_one_process(runs):
    got = runs["fsdp_ac"]  # 2 workers, fsdp with activation checkpointing and a replicated real score
    assert got[0]["bytes"]["real_score"] == got[0]["full_bytes"]["real_score"]  # replicated: whole on each rank
    _close(runs["single_logs"], got[0]["logs"], 1e-5)


# ---------------------------------------------------------------------------------------------- one process
def _steps(cfg, iterations: int):
    d = _distiller(cfg, 0, 1)
    out = []
    for it in range(iterations):
        log = d.iteration_step([_micro_batch(cfg, it, 0)])
        grads = [p.grad.detach().clone() for p in d.generator.parameters()] if log.generator_updated else None
        out.append((log.metrics, grads, [p.grad.detach().clone() for p in d.critic.parameters()]))
    return out


@pytest.mark.parametrize("rollout", ROLLOUT_MODES)
def test_activation_checkpointing_on_and_off_give_the_same_losses_and_gradients(rollout, monkeypatch):
    """Per-block checkpointing (non-reentrant) recomputes each grad-carrying block call in backward; the KV cache
    it reads from holds only blocks before the call (and training has no window), so recomputation is exact."""
    import torch.utils.checkpoint as tuc

    from hiar.config import load_config

    base = TINY + ["distill.batch_size=1", f"distill.rollout={rollout}"]
    off = _steps(load_config("tiny", base), 4)
    calls = []
    real_checkpoint = tuc.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    on = _steps(load_config("tiny", base + ["distill.activation_checkpointing=true"]), 4)
    assert calls and set(calls) == {False}  # it ran, per block, non-reentrant
    for (m_off, g_off, c_off), (m_on, g_on, c_on) in zip(off, on):
        for k in m_off:
            assert abs(m_off[k] - m_on[k]) <= 1e-6, k
        if g_off is not None:
            assert max((a - b).abs().max().item() for a, b in zip(g_off, g_on)) <= 1e-6
        assert max((a - b).abs().max().item() for a, b in zip(c_off, c_on)) <= 1e-6


def test_fsdp_with_one_worker_warns_and_runs_unsharded_like_ddp():
    from hiar.config import load_config

    ddp = _steps(load_config("tiny", TINY + ["distill.batch_size=1"]), 2)
    with pytest.warns(UserWarning, match="one worker"):
        fsdp = _steps(load_config("tiny", TINY + ["distill.batch_size=1", "distill.sharding=fsdp"]), 2)
    for (m_a, g_a, c_a), (m_b, g_b, c_b) in zip(ddp, fsdp):
        assert m_a == m_b
        assert all(torch.equal(a, b) for a, b in zip(c_a, c_b))


def test_bad_sharding_settings_are_clear_errors():
    from hiar.config import load_config

    with pytest.raises(ValueError, match="distill.real_score_sharding"):
        load_config("tiny", ["distill.real_score_sharding=everywhere"])
    with pytest.raises(ValueError, match="distill.sharding"):
        load_config("tiny", ["distill.sharding=zero3"])
    with pytest.raises(ValueError, match="distill.mixed_precision"):
        load_config("tiny", ["distill.mixed_precision=fp8"])
    for part in ("transformer", "text_encoder", "vae"):  # the frozen parts' precision: named, with the choices
        with pytest.raises(ValueError, match=rf"precision\.{part} must be one of .*fp32.*bf16.*fp16.*got 'fp8'"):
            load_config("tiny", [f"precision.{part}=fp8"])


def test_mixed_precision_policy_is_bf16_with_fp32_reduce_only_on_cuda():
    from hiar.config import load_config
    from hiar.methods.sharding import mixed_precision_policy

    cfg = load_config("tiny")
    assert mixed_precision_policy(cfg, torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            p = mixed_precision_policy(cfg, torch.device("cuda"))
            assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
            assert mixed_precision_policy(load_config("tiny", ["distill.mixed_precision=no"]),
                                          torch.device("cuda")) is None
