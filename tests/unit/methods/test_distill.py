"""Distillation pieces (hiar.methods.distill) on tiny random models: rollouts, gradient routing, losses, updates."""

import copy
import math

import pytest
import torch

from hiar.config import load_config
from hiar.methods.distill import (Distiller, ODEInit, fkl_regulariser, ode_regression_loss, score_sigmas,
                                   self_rollout)
from hiar.methods.losses import fkl_loss
from hiar.core.model import CausalWanTransformer3DModel
from hiar.core.rollout import ROLLOUT_MODES, block_first_rollout, hierarchical_rollout, initial_noise
from hiar.core.velocity import GuidedVelocity
from hiar.io.text import TextEncoder
from hiar.tiny.captions import train_prompts, vocabulary


C = load_config("tiny").video.latent_channels  # the latent channels of the tiny preset's model


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("tiny", ["distill.batch_size=2", "distill.micro_batch_size=2", "distill.ode_batch_size=2",
                               "video.train_latent_frames=6"])
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()
    text = TextEncoder.tiny(vocabulary(), d_model=cfg.model.text_dim, max_length=cfg.world.text_max_length)
    return cfg, model, text


def _velocity(model, text, cfg, prompts):
    return GuidedVelocity(model, text.encode(prompts), frames_per_block=cfg.rollout.frames_per_block)


@pytest.mark.parametrize("mode", ROLLOUT_MODES)
def test_self_rollout_at_last_exit_step_is_the_inference_rollout(setup, mode):
    cfg, model, text = setup
    prompts, seeds = train_prompts()[:2], [3, 4]
    vel = _velocity(model, text, cfg, prompts)
    noise = initial_noise(seeds, 2, (C, 3, 16, 16))
    sigmas = cfg.schedule.sigmas()
    with torch.no_grad():
        got = self_rollout(vel, noise, sigmas, seeds, mode=mode, exit_step=sigmas.numel() - 2)
        ref = (hierarchical_rollout(vel, noise, sigmas, seeds) if mode == "hierarchical"
               else block_first_rollout(vel, noise, sigmas, seeds))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("mode", ROLLOUT_MODES)
def test_gradient_only_through_the_exit_step(setup, mode):
    """Exactly one model call per block carries grad (the exit step); context and earlier steps carry none."""
    cfg, model, text = setup
    student = copy.deepcopy(model).train()
    prompts, seeds = train_prompts()[:1], [0]
    vel = _velocity(student, text, cfg, prompts)
    graded = []
    handle = student.register_forward_hook(lambda m, i, o: graded.append(o[0].requires_grad if isinstance(o, tuple)
                                                                         else o.sample.requires_grad))
    noise = initial_noise(seeds, 3, (C, 3, 16, 16))
    out = self_rollout(vel, noise, cfg.schedule.sigmas(), seeds, mode=mode, exit_step=2)
    handle.remove()
    assert sum(graded) == 3  # one grad call per block
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.ndim > 1)
    # block 0's output does not depend on later blocks; block 2's gradient must not flow into block 0's exit call
    student.zero_grad()
    out2 = self_rollout(vel, noise, cfg.schedule.sigmas(), seeds, mode=mode, exit_step=2)
    x_in = out2[:, :, :3]
    assert x_in.requires_grad


def test_ode_regression_loss_gathers_per_block_levels(setup):
    """With a zero-velocity student, x0_pred = x_t, so the loss is the mean squared gap to the clean state at
    each block's drawn schedule index: checked against an independent computation with the same draws."""
    cfg, _, text = setup

    class Zero(torch.nn.Module):
        def forward(self, x, *a, **k):
            return (torch.zeros_like(x),)

    b, s1, f = 2, 5, 6
    latents = torch.arange(s1, dtype=torch.float32).view(1, s1, 1, 1, 1, 1).expand(b, s1, C, f, 2, 2).clone()
    sigmas = cfg.schedule.sigmas()
    gen = torch.Generator().manual_seed(7)
    loss = ode_regression_loss(Zero(), text.encode(train_prompts()[:b]), latents, sigmas, 3, gen)
    idx = torch.randint(0, s1 - 1, (b, 2), generator=torch.Generator().manual_seed(7))
    expected = ((idx.float() - (s1 - 1)) ** 2).mean()
    assert torch.isclose(loss, expected)


def test_fkl_regulariser_is_eq10_on_the_first_k_steps(setup):
    cfg, model, text = setup
    prompts = train_prompts()[:2]
    embeds = text.encode(prompts)
    states = torch.randn(2, 5, C, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = cfg.schedule.sigmas()
    with torch.no_grad():
        got = fkl_regulariser(model, embeds, states, sigmas, 2, "bidirectional", 3)
        vel = GuidedVelocity(model, embeds, frames_per_block=3)
        manual = []
        for i in range(2):
            v = vel(states[:, i], float(sigmas[i]), attention_mode="bidirectional")
            target = (states[:, i + 1] - states[:, i]) / (sigmas[i + 1] - sigmas[i])
            manual.append(((v - target) ** 2).mean())
        assert torch.allclose(got, torch.stack(manual).mean(), rtol=1e-5)
        causal = fkl_regulariser(model, embeds, states, sigmas, 1, "block_causal", 3)
        bidir = fkl_regulariser(model, embeds, states, sigmas, 1, "bidirectional", 3)
        assert not torch.equal(causal, bidir)  # the attention-mode switch changes the term
        assert torch.isclose(bidir, fkl_loss(vel(states[:, 0], float(sigmas[0]), attention_mode="bidirectional"),
                                             states[:, 0], states[:, 1], float(sigmas[0]), float(sigmas[1])))


def test_distiller_updates_critic_every_iteration_and_generator_every_ratio(setup, tmp_path):
    cfg, model, text = setup
    gen = copy.deepcopy(model)
    d = Distiller(cfg, gen, copy.deepcopy(model), text)
    prompts = train_prompts()[:2]
    states = torch.randn(2, 5, C, 6, 16, 16)
    g0 = [p.detach().clone() for p in d.generator.parameters()]
    c0 = [p.detach().clone() for p in d.critic.parameters()]
    t0 = [p.detach().clone() for p in d.real_score.parameters()]
    logs = [d.iteration_step([(prompts, states)]) for _ in range(cfg.distill.critic_ratio + 1)]
    assert [lg.generator_updated for lg in logs] == [True] + [False] * (cfg.distill.critic_ratio - 1) + [True]
    assert d.generator_steps == 2
    assert any(not torch.equal(a, b) for a, b in zip(g0, d.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(c0, d.critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t0, d.real_score.parameters()))  # the real score is frozen
    assert {"dmd_loss", "fkl_loss", "critic_loss", "generator_grad_norm"} <= set(logs[0].metrics)
    # checkpoint round trip resumes exactly
    d.save_checkpoint(tmp_path / "ckpt")
    d2 = Distiller(cfg, copy.deepcopy(model), copy.deepcopy(model), text)
    d2.load_checkpoint(tmp_path / "ckpt")
    assert d2.iteration == d.iteration
    for name in ("generator", "critic", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(d2, name).parameters(), getattr(d, name).parameters()))
    assert d2.opt_g.state_dict()["state"][0]["exp_avg"].equal(d.opt_g.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("start", [0, 2])
def test_ema_follows_the_generator_until_ema_start_step_then_averages(setup, start):
    cfg, model, text = setup
    cfg = copy.deepcopy(cfg)
    cfg.distill.critic_ratio, cfg.distill.ema_start_step, cfg.distill.ema_decay = 1, start, 0.9
    d = Distiller(cfg, copy.deepcopy(model), copy.deepcopy(model), text)
    batch = [(train_prompts()[:2], torch.randn(2, 5, C, 6, 16, 16))]
    for step in range(1, 4):
        before = [p.detach().clone() for p in d.ema.parameters()]
        d.iteration_step(batch)
        for e, g, b in zip(d.ema.parameters(), d.generator.parameters(), before):
            # ema <- decay * ema + (1 - decay) * generator once started; a copy of the generator before
            want = g.detach() if step <= start else 0.9 * b + 0.1 * g.detach()
            torch.testing.assert_close(e, want, rtol=0, atol=1e-6)
    assert any(not torch.equal(e, g) for e, g in zip(d.ema.parameters(), d.generator.parameters()))


def test_ode_init_step_reduces_loss_on_a_fixed_batch(setup):
    cfg, model, text = setup
    cfg2 = load_config("tiny", ["distill.ode_batch_size=2", "distill.micro_batch_size=2", "distill.lr_ode=1e-3",
                                "distill.ode_micro_batch_size=null", "video.train_latent_frames=6"])
    o = ODEInit(cfg2, copy.deepcopy(model), text)
    latents = torch.randn(2, 5, C, 6, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5
    losses = [o.train_step([(train_prompts()[:2], latents)])["ode_loss"] for _ in range(30)]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses


def test_accumulation_must_divide_the_batch():
    """Micro-batches per worker per step: the global batch over micro batch x workers, per stage's own keys."""
    d = load_config("tiny", ["distill.batch_size=8", "distill.micro_batch_size=2", "distill.ode_batch_size=12",
                             "distill.ode_micro_batch_size=3"]).distill
    assert (d.accumulation_steps("distill", 2), d.accumulation_steps("ode_init", 2)) == (2, 2)
    assert (d.accumulation_steps("distill", 1), d.accumulation_steps("ode_init", 4)) == (4, 1)
    with pytest.raises(ValueError, match=r"distill.batch_size \(8\) must be a multiple of distill.micro_batch_size "
                                         r"x distill.num_workers \(2 x 3\) for distill"):
        d.accumulation_steps("distill", 3)
    with pytest.raises(ValueError, match=r"distill.ode_micro_batch_size x distill.num_workers \(3 x 8\)"):
        d.accumulation_steps("ode_init", 8)


@pytest.mark.parametrize("score_shift", [None, 1.0, 3.0])
def test_score_sigmas_are_uniform_times_through_the_score_shift(score_shift):
    """DMD / critic noise levels: t ~ U[min_t, max_t], then sigma = s t / (1 + (s - 1) t) with s = distill.score_shift
    (schedule.shift when unset). Checked against that formula written out here, and against the distribution: the
    sigmas' empirical CDF at the shifted quartiles of t is the quartile."""
    # the tiny preset sets score_shift (5); null follows the schedule's shift, here 2 (the preset's 1 is the identity)
    overrides = ["distill.min_t=0.1", "distill.max_t=0.9", "schedule.shift=2",
                 f"distill.score_shift={'null' if score_shift is None else score_shift}"]
    cfg = load_config("tiny", overrides)
    assert cfg.distill.score_shift == score_shift
    s = cfg.schedule.shift if score_shift is None else score_shift
    t = 0.1 + 0.8 * torch.rand(4096, generator=torch.Generator().manual_seed(5))
    sigma = score_sigmas(4096, cfg, torch.Generator().manual_seed(5))
    assert torch.allclose(sigma, s * t / (1 + (s - 1) * t), atol=1e-6)
    for q in (0.25, 0.5, 0.75):
        tq = 0.1 + 0.8 * q
        assert abs(float((sigma <= s * tq / (1 + (s - 1) * tq)).float().mean()) - q) < 0.03


def test_score_shift_must_be_positive():
    with pytest.raises(ValueError, match="distill.score_shift"):
        load_config("tiny", ["distill.score_shift=-1"])


def rollout_at_last_exit(cfg, model, text, prompts, seeds):
    """A distiller of ``cfg`` (copies of ``model``) and its training self-rollout at the last exit step, whose
    latents are what inference produces: ``(distiller, windows, their prompt embeddings, the prompts' embeddings)``."""
    d = Distiller(cfg, copy.deepcopy(model), copy.deepcopy(model), text)
    embeds = text.encode(prompts)
    with torch.no_grad():
        windows, judged = d._rollout(embeds, seeds, exit_step=cfg.schedule.sigmas().numel() - 2)
    return d, windows, judged, embeds


@pytest.mark.parametrize("mode", ROLLOUT_MODES)
def test_training_rollout_uses_the_inference_window(setup, mode):
    """The distiller's self-rollout at the last exit step is what generation produces with the same
    rollout.window_frames: with a window shorter than the training clip (3 of 9 frames) the result differs from the
    unwindowed rollout, and equals the windowed inference rollout."""
    from hiar.core.generation import generate_latents

    cfg, model, text = setup
    cfg = load_config("tiny", ["distill.batch_size=2", "distill.micro_batch_size=2", "video.train_latent_frames=9",
                               "rollout.window_frames=3", f"distill.rollout={mode}"])
    unwindowed = load_config("tiny", ["video.train_latent_frames=9", "rollout.window_frames=9"])
    prompts, seeds = train_prompts()[:2], [3, 4]
    d, got, _, _ = rollout_at_last_exit(cfg, model, text, prompts, seeds)
    windowed = generate_latents(d.generator, text, cfg, prompts, seeds, num_blocks=3, mode=mode)
    full = generate_latents(d.generator, text, unwindowed, prompts, seeds, num_blocks=3, mode=mode)
    assert torch.equal(got, windowed)
    assert not torch.allclose(got[:, :, 6:], full[:, :, 6:], atol=1e-4)  # block 2 lost block 0 from its window
    assert torch.equal(got[:, :, :3], full[:, :, :3])  # block 0 has no context either way


@pytest.mark.parametrize("mode", ["hierarchical", "block_first"])
def test_a_longer_training_rollout_is_scored_on_its_last_clip(setup, mode):
    """distill.rollout_frames: the generator rolls out past the training clip (9 latent frames for a 6-frame clip)
    and the distiller hands DMD and the critic the last 6 frames of that rollout: the same numbers as the
    inference rollout of 3 blocks, cut to its last 2, and not the 2-block rollout."""
    from hiar.core.generation import generate_latents

    cfg, model, text = setup
    cfg = load_config("tiny", ["distill.batch_size=2", "distill.micro_batch_size=2", "video.train_latent_frames=6",
                               "distill.rollout_frames=9", f"distill.rollout={mode}"])
    prompts, seeds = train_prompts()[:2], [3, 4]
    d, got, _, _ = rollout_at_last_exit(cfg, model, text, prompts, seeds)
    long = generate_latents(d.generator, text, cfg, prompts, seeds, num_blocks=3, mode=mode)
    short = generate_latents(d.generator, text, cfg, prompts, seeds, num_blocks=2, mode=mode)
    assert got.shape[2] == 6 and torch.equal(got, long[:, :, 3:])
    assert not torch.allclose(got, short, atol=1e-4)


def test_score_windows_all_judges_every_clip_of_the_rollout_with_its_own_prompt(setup):
    """distill.score_windows=all: a 12-frame rollout of a 6-frame clip is judged as its two windows, each sample's
    in order, each with that sample's prompt; the DMD loss and the critic see all of them."""
    from hiar.core.generation import generate_latents

    cfg, model, text = setup
    sets = ["distill.batch_size=2", "distill.micro_batch_size=2", "video.train_latent_frames=6",
            "distill.rollout_frames=12", "distill.score_windows=all"]
    cfg = load_config("tiny", sets)
    prompts, seeds = train_prompts()[:2], [3, 4]
    d, got, judged, embeds = rollout_at_last_exit(cfg, model, text, prompts, seeds)
    long = generate_latents(d.generator, text, cfg, prompts, seeds, num_blocks=4, mode="hierarchical")
    assert got.shape == (4, *long.shape[1:2], 6, *long.shape[3:])
    for i in range(2):
        assert torch.equal(got[2 * i], long[i, :, :6]) and torch.equal(got[2 * i + 1], long[i, :, 6:])
        assert torch.equal(judged[2 * i], embeds[i]) and torch.equal(judged[2 * i + 1], embeds[i])
    log = d.iteration_step([(prompts, torch.zeros(2, 5, *long.shape[1:2], 6, *long.shape[3:]))])
    assert log.generator_updated and all(math.isfinite(log.metrics[k]) for k in ("dmd_loss", "critic_loss"))
    _, tail, same, embeds = rollout_at_last_exit(load_config("tiny", sets[:-1]), model, text, prompts, seeds)
    assert torch.equal(tail, long[:, :, 6:]) and same is embeds  # the default: the last window only


def test_score_windows_all_needs_whole_clips():
    with pytest.raises(ValueError, match="distill.score_windows=all needs distill.rollout_frames to be a whole"):
        load_config("tiny", ["video.train_latent_frames=6", "distill.rollout_frames=9", "distill.score_windows=all"])
    with pytest.raises(ValueError, match="distill.score_windows must be one of"):
        load_config("tiny", ["distill.score_windows=first"])
    assert load_config("tiny", ["distill.score_windows=all"]).distill.rollout_frames is None  # one clip: one window


@pytest.mark.parametrize("frames", [4, 3, 13])
def test_rollout_frames_shorter_than_the_clip_or_off_the_block_grid_is_refused(frames):
    with pytest.raises(ValueError, match="distill.rollout_frames"):
        load_config("tiny", [f"distill.rollout_frames={frames}", "video.train_latent_frames=6"])


@pytest.mark.parametrize("scale", [None, 1.0, 3.5])
def test_dmd_real_score_uses_its_own_guidance_scale(setup, scale):
    """DMD's real score is the teacher with CFG at ``distill.real_guidance_scale`` (the teacher's sampling scale when
    unset): the loss equals the one written out here from the real model's conditional and unconditional velocities,
    v = v_u + s (v_c - v_u), x0 = x_t - sigma v, and the scales give different losses."""
    cfg, model, text = setup
    cfg = copy.deepcopy(cfg)
    cfg.distill.real_guidance_scale = scale
    torch.manual_seed(1)
    real, critic = copy.deepcopy(model), copy.deepcopy(model)
    for p in critic.parameters():  # a critic unlike the real score, so the loss is not zero
        p.data.add_(0.05 * torch.randn_like(p))
    d = Distiller(cfg, copy.deepcopy(model), real, text, critic=critic)
    prompts = train_prompts()[:2]
    embeds = text.encode(prompts)
    x0 = torch.randn(2, C, 6, 16, 16)
    loss = d._dmd(x0, embeds, torch.Generator().manual_seed(3))

    gen = torch.Generator().manual_seed(3)  # the same draws as _dmd: levels, then noise
    sigma = score_sigmas(2, cfg, gen)
    noise = torch.randn(x0.shape, generator=gen)
    s5 = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s5) * x0 + s5 * noise
    levels = sigma.view(-1, 1).expand(-1, 6) * 1000.0
    with torch.no_grad():
        def v(m, e):
            return m(x_t, levels, e, return_dict=False, attention_mode="bidirectional")[0]
        v_c, v_u = v(real, embeds), v(real, text.null_embedding(2))
        s = cfg.teacher.guidance_scale if scale is None else scale
        real_x0 = x_t - s5 * (v_u + s * (v_c - v_u))
        fake_x0 = x_t - s5 * v(critic, embeds)
    g = (fake_x0 - real_x0) / (x0 - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = 0.5 * ((x0 - (x0 - g)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-4), (float(loss), float(expected))
    if scale is not None:
        other = copy.deepcopy(cfg)
        other.distill.real_guidance_scale = scale + 2.0
        d2 = Distiller(other, copy.deepcopy(model), real, text, critic=critic)
        assert not torch.allclose(d2._dmd(x0, embeds, torch.Generator().manual_seed(3)), loss, rtol=1e-3)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "51"])
def test_real_guidance_scale_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="distill.real_guidance_scale"):
        load_config("tiny", [f"distill.real_guidance_scale={value}"])
