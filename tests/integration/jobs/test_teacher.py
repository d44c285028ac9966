"""The tiny teacher: sampler, pretraining step, the Ray Train job, and the shipped weights' recorded quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hiar.config import load_config
from hiar.methods.losses import flow_matching_loss, sample_training_sigmas
from hiar.methods.pretrain import (TeacherPretraining, build_world_components, evaluate_teacher, eval_prompts, load_teacher,
                                   window_latents)
from hiar.core.schedule import teacher_sigmas
from hiar.core.teacher import sample_teacher
from hiar.tiny.captions import heldout_prompts, train_prompts
from tests.services import job_here

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "hiar" / "assets" / "tiny-teacher"


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 6, 4, 4, generator=g), torch.randn(2, 3, 6, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    # the exact velocity of a point mass at x0 is (x_t - x0) / sigma = noise - x0
    true_v = lambda x_t, s: (x_t - x0) / s.view(-1, 1, 1, 1, 1)  # noqa: E731
    assert flow_matching_loss(true_v, x0, sigma, noise) < 1e-10
    zero_v = lambda x_t, s: torch.zeros_like(x_t)  # noqa: E731
    assert torch.isclose(flow_matching_loss(zero_v, x0, sigma, noise), (noise - x0).pow(2).mean())
    per_frame = torch.tensor([[0.3] * 6, [0.8] * 6])
    true_vf = lambda x_t, s: (x_t - x0) / s.view(2, 1, 6, 1, 1)  # noqa: E731
    assert flow_matching_loss(true_vf, x0, per_frame, noise) < 1e-10


def test_training_sigmas_cover_both_ends():
    s = sample_training_sigmas(20000, 1.0, torch.Generator().manual_seed(0))
    assert (s > 0).all() and (s < 1).all()
    assert (s < 0.15).float().mean() > 0.1 and (s > 0.9).float().mean() > 0.05
    with pytest.raises(ValueError, match="distribution"):
        sample_training_sigmas(4, 1.0, distribution="beta")


def test_sampler_keeps_requested_states_and_checks_grid(tiny_model):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    sig = teacher_sigmas(5, 8.0)
    out, states = sample_teacher(tiny_model, noise, text, sig, keep=[0, 2, 5])
    assert set(states) == {0, 2, 5} and torch.equal(states[0], noise) and torch.equal(states[5], out)
    with pytest.raises(ValueError, match="outside the grid"):
        sample_teacher(tiny_model, noise, text, sig, keep=[9])
    with pytest.raises(ValueError, match="end at sigma = 0"):
        sample_teacher(tiny_model, noise, text, sig[:-1])


def test_pretraining_batches_never_contain_heldout_prompts_and_resume_exactly():
    cfg = load_config("tiny", ["pretrain.batch_size=4", "model.num_layers=1"])
    world, text, codec = build_world_components(cfg)
    a = TeacherPretraining(cfg, world, text, codec)
    held = set(heldout_prompts())
    seen = set()
    for step in range(150):
        _, _, captions = a.batch(step)
        seen.update(captions)
    assert not seen & held and seen <= set(train_prompts())
    losses = [a.train_step()["loss"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    state = a.state_dict()
    b = TeacherPretraining(cfg, world, text, codec)
    b.load_state_dict(state)
    assert a.train_step()["loss"] == b.train_step()["loss"]  # same data, noise and weights after a resume


def test_pretraining_reads_world_static_share_and_trains_on_frozen_clips_of_moving_captions():
    cfg = load_config("tiny", ["pretrain.batch_size=8", "model.num_layers=1", "world.static_share=0.5"])
    world, text, codec = build_world_components(cfg)
    assert world.static_share == 0.5
    trainer = TeacherPretraining(cfg, world, text, codec)
    x0, _, captions = trainer.batch(0)
    video = codec.decode(x0)  # [B, T, H, W, 3]
    still = [bool((video[i] - video[i, :1]).abs().max() < 1e-5) for i in range(len(captions))]
    assert still == [world.sample_scene(i).frozen for i in range(len(captions))]  # batch 0 of rank 0: scenes 0..7
    assert 0 < sum(still) < len(still) and all(" moves " in c for c in captions)


@pytest.mark.parametrize("codec_sets, frames_per_latent", [(["world.history_frames=1"], 1),
                                                          (["world.frames_per_latent=2", "world.history_frames=0"], 2)])
def test_pretraining_with_six_channel_latents_trains_on_clips_of_the_right_length(codec_sets, frames_per_latent):
    sets = ["pretrain.batch_size=2", "model.num_layers=1"]
    with pytest.raises(ValueError, match="set video.latent_channels, model.in_channels and model.out_channels to 9"):
        build_world_components(load_config("tiny", sets + ["world.history_frames=2"]))
    cfg = load_config("tiny", sets + codec_sets)
    world, text, codec = build_world_components(cfg)
    assert (codec.frames_per_latent, codec.history_frames, codec.latent_channels) == (
        frames_per_latent, cfg.world.history_frames, 6)
    trainer = TeacherPretraining(cfg, world, text, codec)
    x0, _, captions = trainer.batch(0)
    frames = cfg.video.train_latent_frames
    assert x0.shape == (2, 6, frames, cfg.video.latent_height, cfg.video.latent_width)
    clip, caption = world.clip(0, frames_per_latent * frames)  # batch 0 of rank 0 starts at scene 0
    assert caption == captions[0]
    np.testing.assert_allclose(codec.decode(x0[:1])[0].numpy(), clip, atol=1e-5)
    assert np.isfinite(trainer.train_step()["loss"])


@pytest.mark.parametrize("codec_sets", [[], ["world.frames_per_latent=2", "world.history_frames=0"]])
def test_late_start_clips_are_later_windows_of_their_scene_with_their_true_history(codec_sets):
    sets = ["pretrain.batch_size=16", "model.num_layers=1", "pretrain.late_start_share=0.5",
            "pretrain.late_start_frames=36"] + codec_sets
    cfg = load_config("tiny", sets)
    world, text, codec = build_world_components(cfg)
    trainer = TeacherPretraining(cfg, world, text, codec)
    k, frames = codec.frames_per_latent, cfg.video.train_latent_frames
    step = 3
    x0, _, captions = trainer.batch(step)
    starts = trainer.start_frames(step)
    assert starts == trainer.start_frames(step)  # drawn from (seed, step, rank): a resume sees the same clips
    assert 0 < sum(s > 0 for s in starts) < len(starts) and all(0 <= s <= 36 and s % k == 0 for s in starts)
    moved = 0  # late windows that differ from their scene's start (a motion can come full circle on the torus)
    for i, first in enumerate(starts):
        scene, caption = world.clip(step * 16 + i, first + k * frames)  # the scene from its start
        assert caption == captions[i]
        moved += first > 0 and bool(window_latents(world, codec, world.sample_scene(step * 16 + i), frames).ne(
            x0[i:i + 1]).any())
        # the window of the whole scene's latents: its first latent frame holds the frame before it as history
        whole = codec.encode(torch.from_numpy(scene)[None])
        torch.testing.assert_close(x0[i:i + 1], whole[:, :, first // k:], rtol=0, atol=0)
    assert moved >= 3
    plain = TeacherPretraining(load_config("tiny", sets[:2] + codec_sets), world, text, codec)
    assert plain.start_frames(step) == [0] * 16


def test_window_latents_rejects_a_start_between_latent_frames():
    cfg = load_config("tiny", ["world.frames_per_latent=2", "world.history_frames=0"])
    world, _, codec = build_world_components(cfg)
    scene = world.sample_scene(0)
    assert window_latents(world, codec, scene, 4, 6).shape[2] == 4
    with pytest.raises(ValueError, match="start_frame must be a non-negative multiple of 2"):
        window_latents(world, codec, scene, 4, 3)


def test_init_from_a_narrower_teacher_starts_from_what_it_computed(tmp_path):
    small = ["pretrain.batch_size=2", "model.num_layers=1"]
    narrow_cfg = load_config("tiny", small + ["world.history_frames=0", "video.latent_channels=3",
                                              "model.in_channels=3", "model.out_channels=3"])
    world, text, narrow_codec = build_world_components(narrow_cfg)
    narrow = TeacherPretraining(narrow_cfg, world, text, narrow_codec)
    for _ in range(3):
        narrow.train_step()
    torch.save(narrow.state_dict(), tmp_path / "state.pt")
    narrow.save_teacher(tmp_path / "bundle", {"steps": narrow.step})

    cfg = load_config("tiny", small + ["world.history_frames=1", "seed=7"])
    _, _, codec = build_world_components(cfg)
    _, embeds, _ = narrow.batch(0)
    wide_x = codec.encode(torch.from_numpy(np.stack([world.clip(i, cfg.video.train_latent_frames)[0]
                                                       for i in range(2)])))
    t = torch.full((2,), 700.0)
    for source, reference in ((tmp_path / "state.pt", narrow.raw), (tmp_path / "bundle", narrow.ema)):
        wide = TeacherPretraining(cfg, world, text, codec)
        before = wide.raw(wide_x, t, embeds, return_dict=False)[0]
        wide.init_from(source)
        assert wide.step == 0
        with torch.no_grad():
            got = wide.raw(wide_x, t, embeds, return_dict=False)[0]
            want = reference(wide_x[:, :3], t, embeds, return_dict=False)[0]
        # the new input channels are ignored at first, the old output channels are the narrow model's, and the
        # history output starts as the same-colour prediction
        torch.testing.assert_close(got[:, :3], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[:, 3:], want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before[:, :3], want, atol=1e-3)  # it really changed from the random start
        assert np.isfinite(wide.train_step()["loss"])
    with pytest.raises(FileNotFoundError, match="init_from"):
        wide.init_from(tmp_path / "missing")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a trainer state"):
        wide.init_from(tmp_path / "other.pt")
    deeper = TeacherPretraining(load_config("tiny", small + ["model.num_layers=2"]), world, text, codec)
    with pytest.raises(ValueError, match="does not fit model"):
        deeper.init_from(tmp_path / "state.pt")


def test_missing_teacher_dir_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer/"):
        load_teacher(tmp_path / "none")


def test_a_bundle_whose_codec_and_transformer_disagree_is_a_clear_error(tmp_path):
    from hiar.io.codec import PixelCodec
    from tests.services import random_bundle

    bundle = random_bundle(tmp_path / "mixed")
    PixelCodec(frames_per_latent=4).save_pretrained(bundle / "codec")  # 12 channels: a codec from another model
    with pytest.raises(ValueError, match=r"\d-channel latents but codec/.*makes 12-channel ones"):
        load_teacher(bundle)


def test_unknown_word_in_prompt_is_a_clear_error():
    _, text, _ = build_world_components(load_config("tiny"))
    with pytest.raises(ValueError, match="purple"):
        text.encode(["a purple square moves left quickly over a black background"])


def test_pretrain_job_on_the_local_ray_cluster_checkpoints_and_saves(ray_head, tmp_path, capsys):
    """Two runs of the job (its main, as the job's driver on the cluster: tests.services.job_here), each a Ray Train
    start-up: a new run started from a teacher this job wrote (the shipped one, ``pretrain.init_from``; how the
    shipped one was grown from a 3-channel run: its card) checkpoints and saves; the same command with a larger
    step budget resumes from its checkpoint."""
    from hiar.jobs.pretrain_teacher import main

    out = tmp_path / "teacher"
    args = ["--preset", "tiny", "--output", str(out), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"pretrain.init_from={SHIPPED}", "--set", "pretrain.batch_size=2",
            "--set", "pretrain.checkpoint_every=2", "--set", "pretrain.eval_prompts=2",
            "--set", "pretrain.eval_num_steps=3", "--set", "pretrain.threads_per_worker=1"]
    env = {"RAY_ADDRESS": ray_head.address}
    proc = job_here(main, [*args, "--set", "pretrain.max_steps=4"], capsys, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the new run started from that teacher's weights (one line: see the tee below)
    assert (proc.stdout + proc.stderr).count(f"initialised from {SHIPPED}") == 1
    transformer, text, codec, card = load_teacher(out)
    assert card["steps"] == 4 and "caption_consistency" in card["oracle"] and card["mlflow_run_id"]
    # evaluated with its own sampler key, not the ODE pairs' teacher.num_steps (24 in the preset)
    assert card["sampler"]["num_steps"] == 3 and card["config"]["teacher"]["num_steps"] == 24
    assert (transformer.config.in_channels, codec.history_frames) == (6, 1)
    assert card["config"]["pretrain"]["init_from"] == str(SHIPPED)
    assert (out / "MODEL_CARD.md").exists()
    # rerunning with a larger step budget resumes from the checkpoint instead of starting over (or from init_from)
    proc = job_here(main, [*args, "--set", "pretrain.max_steps=6"], capsys, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # once: Ray Train's print patch would tee each worker line to the driver twice (hiar.platform.ray_cluster.train_worker_env)
    assert (proc.stdout + proc.stderr).count("resumed at step 4") == 1
    assert "initialised from" not in proc.stdout + proc.stderr
    # the test head has no dashboard, so the State API is down: the cleaner's polling stays quiet (init_ray's hook)
    assert "Failed to query Ray Train Controller" not in proc.stdout + proc.stderr
    assert json.loads((out / "card.json").read_text())["steps"] == 6


@pytest.fixture(scope="module")
def shipped_scores():
    """The shipped teacher's oracle scores on its card's evaluation prompts, sampled as its card says they were (48
    CFG steps on 16 prompts, whatever the preset's teacher.num_steps for ODE pairs: computed once for the tests that
    read them)."""
    assert SHIPPED.is_dir(), f"the tiny preset's default teacher is missing at {SHIPPED}"
    transformer, text, codec, card = load_teacher(SHIPPED)
    sampler = card["sampler"]
    cfg = load_config("tiny", [f"teacher.num_steps={sampler['num_steps']}", f"teacher.shift={sampler['shift']}",
                               f"teacher.guidance_scale={sampler['guidance_scale']}"])
    scores, frames, prompts = evaluate_teacher(transformer, text, codec, cfg, card["sampler"]["eval_prompts"])
    assert prompts == eval_prompts(card["sampler"]["eval_prompts"])
    return scores, card


def test_shipped_teacher_still_meets_its_recorded_oracle_score(shipped_scores):
    """The teacher in hiar/assets/ (what the pipeline uses by default) scores what its card says with today's code."""
    scores, card = shipped_scores
    for key in ("caption_consistency", "background_ok", "color_ok", "direction_ok"):
        assert scores[key] >= card["oracle"][key] - 1e-6, (key, scores, card["oracle"])


def test_shipped_teacher_reaches_the_quality_bar(shipped_scores):
    scores, _ = shipped_scores
    assert scores["caption_consistency"] >= 0.7 and scores["motion"] > 0.5


def test_untrained_teacher_scores_about_zero():
    cfg = load_config("tiny", ["teacher.num_steps=8"])
    _, text, codec = build_world_components(cfg)
    torch.manual_seed(0)
    from hiar.core.model import CausalWanTransformer3DModel

    scores, _, _ = evaluate_teacher(CausalWanTransformer3DModel(**cfg.model.kwargs()).eval(), text, codec, cfg, 4)
    assert scores["caption_consistency"] <= 0.05
