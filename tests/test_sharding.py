"""FSDP2 sharding of the distillation models (hiar.sharding, ``distill.sharding: fsdp``) on CPU with gloo.

Two processes started with ``torch.multiprocessing`` (spawn) and a gloo process group on 127.0.0.1 run a tiny
Distiller; no Ray here (``tests/test_train.py`` covers the Ray Train wiring).

Why 2-worker ``ddp`` is the reference and not one unsharded process with accumulation 2: every micro-batch's
rollout seeds are derived from (iteration, rank, micro index) (``Distiller.iteration_step``), so 2 workers x 1
micro-batch and 1 worker x 2 micro-batches roll out different noise by design. 2-worker ``ddp`` holds the whole
models in each process and all-reduces gradients; 2-worker ``fsdp`` differs from it only by the sharding.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch

TINY = ["distill.batch_size=2", "distill.ode_batch_size=2", "distill.micro_batch_size=1", "distill.critic_ratio=2",
        "video.train_latent_frames=6", "video.latent_height=8", "video.latent_width=8", "model.num_layers=2",
        "model.ffn_dim=64", "model.num_attention_heads=2", "model.attention_head_dim=16"]
GENERATOR_STEPS = 3
WORKER_TIMEOUT_S = 300
SAVE_AT = 3  # iterations before the mid-run checkpoint (critic_ratio 2: after generator steps 1, 2)


def _models(cfg):
    from hiar.model import CausalWanTransformer3DModel
    from hiar.text import TextEncoder
    from hiar.world import vocabulary
    from tests.conftest import perturbed

    torch.manual_seed(0)
    teacher = perturbed(CausalWanTransformer3DModel(**cfg.model.kwargs()), seed=0)
    generator = perturbed(copy.deepcopy(teacher), scale=0.02, seed=1)
    real_score = perturbed(copy.deepcopy(teacher), scale=0.05, seed=2)  # its own model: the real-score path matters
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
    return teacher, generator, real_score, text


def _micro_batch(cfg, iteration: int, rank: int, world: int):
    """The same data for a given (iteration, rank) in every run: prompt and FKL trajectory states."""
    from hiar.world import train_prompts

    v = cfg.video
    states = torch.randn(1, cfg.schedule.sigmas().numel(), v.latent_channels, v.train_latent_frames,
                         v.latent_height, v.latent_width, generator=torch.Generator().manual_seed(100 * iteration + rank))
    return [train_prompts()[(iteration * world + rank) % 20]], states


def _distiller(cfg, rank, world):
    from hiar.distill import Distiller

    teacher, generator, real_score, text = _models(cfg)
    return Distiller(cfg, generator, teacher, text, rank=rank, world_size=world, real_score=real_score)


def _run(d, cfg, rank, world, until: int) -> list[dict]:
    logs = []
    while d.iteration < until:
        logs.append(d.iteration_step([_micro_batch(cfg, d.iteration, rank, world)]).metrics)
    return logs


def _worker(rank: int, world: int, port: int, scenario: dict, out_dir: str) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hung collective fails the test, with stacks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hiar import sharding
        from hiar.config import load_config

        cfg = load_config("tiny", TINY + scenario["overrides"])
        out: dict = {}
        iterations = GENERATOR_STEPS * cfg.distill.critic_ratio
        if scenario["kind"] == "train":
            d = _distiller(cfg, rank, world)
            out["fsdp"] = d.fsdp
            _, generator, real_score, _ = _models(cfg)
            out["full_bytes"] = {"generator": sharding.local_param_bytes(generator),
                                 "real_score": sharding.local_param_bytes(real_score)}
            out["bytes"] = {k: sharding.local_param_bytes(getattr(d, k))
                            for k in ("generator", "critic", "ema", "real_score")}
            out["logs"] = _run(d, cfg, rank, world, SAVE_AT)
            state = d.state_dict()  # collective with fsdp
            if rank == 0:
                torch.save(state, os.path.join(out_dir, "mid.pt"))
            out["logs"] += _run(d, cfg, rank, world, iterations)
            ema = d.export_model()  # collective with fsdp
            if rank == 0:
                out["ema"] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
            # ODE init: the same code path sharded
            from hiar.distill import ODEInit

            teacher, _, _, text = _models(cfg)
            ode = ODEInit(cfg, teacher, text, rank, world)
            v = cfg.video
            gen = torch.Generator().manual_seed(7 + rank)
            out["ode_logs"] = []
            for _ in range(2):
                latents = torch.randn(1, cfg.schedule.sigmas().numel(), v.latent_channels, v.train_latent_frames,
                                      v.latent_height, v.latent_width, generator=gen)
                out["ode_logs"].append(ode.train_step([(_micro_batch(cfg, 0, rank, world)[0], latents)]))
        else:  # resume from each checkpoint in scenario["from"], continue to the end
            for name, path in scenario["from"].items():
                d = _distiller(cfg, rank, world)
                saved = torch.load(path, weights_only=False)
                d.load_state_dict(saved)
                again = d.state_dict()
                if rank == 0:  # what the sharded trainer holds after loading == what was saved
                    out[f"{name}_same"] = all(torch.equal(again[m][k], saved[m][k])
                                              for m in ("generator", "critic", "ema") for k in saved[m])
                out[f"{name}_logs"] = _run(d, cfg, rank, world, iterations)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # only on success: a rank that raised must not wait here for the others
    finally:
        dist.destroy_process_group()


def _spawn(scenario: dict, tmp_path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    out_dir = tmp_path / scenario["name"]
    out_dir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, scenario, str(out_dir)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(a: list[dict], b: list[dict], tol: float) -> float:
    """Largest relative gap between two runs' losses (generator DMD, FKL, critic), iteration by iteration."""
    assert len(a) == len(b) and a
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["exit_step"] == y["exit_step"]
        for k in ("dmd_loss", "fkl_loss", "critic_loss"):
            if k in x:
                gap = abs(x[k] - y[k]) / max(1.0, abs(x[k]))
                assert gap <= tol, f"{k}: {x[k]} vs {y[k]}"
                worst = max(worst, gap)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    ddp = _spawn({"name": "ddp", "kind": "train", "overrides": ["distill.sharding=ddp"]}, tmp)
    fsdp = _spawn({"name": "fsdp", "kind": "train", "overrides": ["distill.sharding=fsdp"]}, tmp)
    return tmp, ddp, fsdp


def test_fsdp_on_two_workers_matches_ddp_on_two_workers(runs):
    """3 generator steps (6 critic steps): generator (DMD), FKL and critic losses within 1e-5, the exported EMA
    generator equal within 1e-6."""
    _, ddp, fsdp = runs
    assert not ddp[0]["fsdp"] and fsdp[0]["fsdp"]
    logs_d, logs_f = ddp[0]["logs"], fsdp[0]["logs"]
    assert sum("dmd_loss" in m for m in logs_f) == GENERATOR_STEPS and any("fkl_loss" in m for m in logs_f)
    worst = _close(logs_d, logs_f, 1e-5)
    print(f"\nmax relative loss gap ddp vs fsdp: {worst:.2e}")
    for m_d, m_f in zip(logs_d, logs_f):
        print({k: (round(m_d[k], 7), round(m_f[k], 7)) for k in m_d if k.endswith("loss")})
    for o_d, o_f in zip(ddp[0]["ode_logs"], fsdp[0]["ode_logs"]):  # ODE init, the same code path
        assert abs(o_d["ode_loss"] - o_f["ode_loss"]) <= 1e-5 * max(1.0, abs(o_d["ode_loss"]))
    print("ode losses", [(o["ode_loss"], p["ode_loss"]) for o, p in zip(ddp[0]["ode_logs"], fsdp[0]["ode_logs"])])
    ema_d, ema_f = ddp[0]["ema"], fsdp[0]["ema"]
    assert ema_d.keys() == ema_f.keys()
    assert max((ema_d[k] - ema_f[k]).abs().max().item() for k in ema_d) < 1e-6


def test_each_of_two_workers_holds_half_the_parameters(runs):
    """Measured: the bytes of the local shards of the generator, critic, EMA and real score on each rank are
    ~1/2 of the unsharded model's (dim-0 shards of odd-sized tensors make the halves uneven) and add up to it."""
    _, ddp, fsdp = runs
    full = fsdp[0]["full_bytes"]
    for name in ("generator", "critic", "ema", "real_score"):
        whole = full["real_score" if name == "real_score" else "generator"]
        per_rank = [r["bytes"][name] for r in fsdp]
        print(f"\n{name}: unsharded {whole} B, per rank {per_rank} ({[round(b / whole, 3) for b in per_rank]})")
        assert sum(per_rank) == whole
        assert all(0.45 <= b / whole <= 0.55 for b in per_rank)
        assert all(r["bytes"][name] == whole for r in ddp)  # ddp: every rank holds the whole model


def test_resume_from_a_checkpoint_with_the_same_and_another_worker_count(runs, tmp_path):
    """The mid-run checkpoint of the fsdp run (whole tensors gathered on rank 0) and the one of the 2-worker ddp
    run load into 2 fsdp workers: the loaded state equals the saved one and the losses continue exactly as the
    uninterrupted fsdp run (2 -> 2; ddp's state also continues fsdp's curve, 1e-5). The fsdp checkpoint loads
    into one unsharded process (2 -> 1) with every tensor intact; one process with 1 micro-batch per step
    continues the ddp curve of the checkpoint's own single-worker run (1 -> 2 -> 1 is the 2-worker run above)."""
    tmp, ddp, fsdp = runs
    got = _spawn({"name": "resume", "kind": "resume", "overrides": ["distill.sharding=fsdp"],
                  "from": {"fsdp": str(tmp / "fsdp" / "mid.pt"), "ddp": str(tmp / "ddp" / "mid.pt")}}, tmp_path)
    assert got[0]["fsdp_same"] and got[0]["ddp_same"]
    reference = fsdp[0]["logs"][SAVE_AT:]
    for name in ("fsdp", "ddp"):
        assert len(got[0][f"{name}_logs"]) == len(reference)
    # 2 -> 2 from its own sharded run: the same numbers as never stopping
    assert got[0]["fsdp_logs"] == reference
    _close(got[0]["ddp_logs"], reference, 1e-5)

    # 2 -> 1: the whole state into one unsharded process
    from hiar.config import load_config

    cfg = load_config("tiny", TINY + ["distill.sharding=fsdp", "distill.batch_size=1"])
    saved = torch.load(tmp / "fsdp" / "mid.pt", weights_only=False)
    with pytest.warns(UserWarning, match="one worker"):
        d = _distiller(cfg, 0, 1)
    assert not d.fsdp
    d.load_state_dict(saved)
    for m in ("generator", "critic", "ema"):
        sd = getattr(d, m).state_dict()
        assert all(torch.equal(sd[k], saved[m][k]) for k in saved[m])
    for opt, key in ((d.opt_g, "opt_g"), (d.opt_c, "opt_c")):
        names = [n for n, _ in (d.generator if key == "opt_g" else d.critic).named_parameters()]
        for i, n in enumerate(names):
            for s in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state_dict()["state"][i][s], saved[key]["state"][n][s])
    assert d.iteration == SAVE_AT
    logs = _run(d, cfg, 0, 1, SAVE_AT + 2)
    assert all(torch.isfinite(torch.tensor(m["critic_loss"])) for m in logs)


def test_fsdp_with_activation_checkpointing_and_a_replicated_real_score_matches_ddp(runs, tmp_path):
    _, ddp, _ = runs
    got = _spawn({"name": "fsdp_ac", "kind": "train",
                  "overrides": ["distill.sharding=fsdp", "distill.activation_checkpointing=true",
                                "distill.real_score_sharding=replicate"]}, tmp_path)
    assert got[0]["bytes"]["real_score"] == got[0]["full_bytes"]["real_score"]  # replicated: whole on each rank
    _close(ddp[0]["logs"], got[0]["logs"], 1e-5)


# ---------------------------------------------------------------------------------------------- one process
def _steps(cfg, iterations: int):
    d = _distiller(cfg, 0, 1)
    out = []
    for it in range(iterations):
        log = d.iteration_step([_micro_batch(cfg, it, 0, 1)])
        grads = [p.grad.detach().clone() for p in d.generator.parameters()] if log.generator_updated else None
        out.append((log.metrics, grads, [p.grad.detach().clone() for p in d.critic.parameters()]))
    return out


@pytest.mark.parametrize("rollout", ["hierarchical", "block_first"])
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


def test_mixed_precision_policy_is_bf16_with_fp32_reduce_only_on_cuda():
    from hiar.config import load_config
    from hiar.sharding import mixed_precision_policy

    cfg = load_config("tiny")
    assert mixed_precision_policy(cfg, torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            p = mixed_precision_policy(cfg, torch.device("cuda"))
            assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
            assert mixed_precision_policy(load_config("tiny", ["distill.mixed_precision=no"]),
                                          torch.device("cuda")) is None
