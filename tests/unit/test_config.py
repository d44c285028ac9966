import pytest

from hiar.config import HiarConfig, available_presets, load_config
from tests.services import run_main


def test_presets_load_with_the_papers_numbers():
    assert {"tiny", "wan2.1-1.3b"} <= set(available_presets())
    wan = load_config("wan2.1-1.3b")
    assert wan.rollout.frames_per_block == 3 and wan.schedule.num_steps == 4 and wan.schedule.shift == 5.0
    assert wan.video.train_latent_frames == 21 and wan.rollout.window_frames == 21
    d = wan.distill
    assert (d.fkl_weight, d.fkl_steps, d.critic_ratio) == (0.1, 1, 5)
    assert (d.lr_generator, d.lr_critic, d.betas, d.batch_size, d.ema_decay) == (2e-6, 3e-7, [0.0, 0.999], 64, 0.99)
    assert d.ema_start_step == 200
    assert (wan.data.num_ode_pairs, wan.data.num_trajectories) == (16000, 20000)
    assert wan.model.num_layers == 30 and wan.model.num_attention_heads * wan.model.attention_head_dim == 1536
    tiny = load_config("tiny")
    assert tiny.model.in_channels == tiny.video.latent_channels


def test_overrides_are_typed_and_change_the_hash():
    base = load_config("tiny")
    c = load_config("tiny", ["rollout.window_frames=null", "schedule.student_timesteps=[1000, 500]", "distill.fkl_weight=1"])
    assert c.rollout.window_frames is None and c.schedule.num_steps == 2 and c.distill.fkl_weight == 1.0
    assert isinstance(c.distill.fkl_weight, float)
    assert c.config_hash() != base.config_hash()
    assert load_config("tiny").config_hash() == base.config_hash()  # deterministic
    assert c.config_hash("model") == base.config_hash("model")


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.step_rule=heun", "step_rule must be one of"),
        ("rollout.context_noise=half", "context_noise must be one of"),
        ("rolout.window_frames=3", "unknown field"),
        ("rollout.frames_per_block=two", "must be int"),
        ("rollout.window_frames=2", "window_frames"),
        ("video.train_latent_frames=13", "divisible"),
        ("distill.fkl_steps=9", "fkl_steps"),
        ("schedule.student_timesteps=[250, 500]", "decreasing"),
        ("no_equals_sign", "section.field=value"),
        ("serve.topology=ring", r"serve.topology must be one of \['per_step', 'diagonal'\]"),
        ("serve.max_batch=0", "serve.max_batch must be >= 1"),
        ("serve.batch_wait_ms=-1", "serve.batch_wait_ms must be a finite number >= 0"),
        ("serve.batch_wait_ms=.nan", "serve.batch_wait_ms"),
        ("world.static_share=1.0", r"world.static_share must be in \[0, 1\)"),
        ("world.static_share=.nan", "world.static_share"),
        ("pretrain.eval_num_steps=0", "pretrain.eval_num_steps must be >= 1"),
        ("pretrain.late_start_share=1.5", r"pretrain.late_start_share must be in \[0, 1\]"),
        ("pretrain.late_start_share=.nan", "pretrain.late_start_share"),
        ("pretrain.late_start_share=0.5", "needs pretrain.late_start_frames, a multiple of world.frames_per_latent"),
        ("distill.ema_decay=1.0", r"distill.ema_decay must be in \[0, 1\)"),
        ("distill.ema_start_step=-1", "distill.ema_start_step must be >= 0"),
        ("distill.ode_micro_batch_size=0", "distill.ode_micro_batch_size must be >= 1"),
        ("distill.micro_batch_size=-2", "distill.micro_batch_size must be >= 1"),
        ("schedule.shift=0", "schedule.shift must be > 0"),
        ("teacher.shift=-2", "teacher.shift must be > 0"),
        ("teacher.shift=.nan", "teacher.shift must be > 0"),
        ("pretrain.sigma_shift=0", "pretrain.sigma_shift must be > 0"),
    ],
)
def test_bad_values_are_rejected_with_the_valid_choices(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid presets: \['tiny', 'wan2.1-1.3b'\]"):
        load_config("wan9")


def test_yaml_path_and_defaults(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("rollout:\n  frames_per_block: 2\nvideo:\n  train_latent_frames: 8\n")
    c = load_config(str(p))
    assert c.preset == "mine" and c.rollout.frames_per_block == 2
    assert c.to_dict()["schedule"]["shift"] == HiarConfig().schedule.shift


def test_demo_cli_runs_and_reports_bit_identical_orders(capsys):
    """``hiar-demo`` (hiar.core.demo:main, also ``python -m hiar.core.demo``) in this process; its seed does not
    leak into the tests after it."""
    import torch

    from hiar.core.demo import main

    with torch.random.fork_rng():
        assert run_main(main, ["--preset", "tiny", "--blocks", "3"]) is None  # main() returns nothing on success
    out = capsys.readouterr().out
    assert "pipelined calls per stage: [4, 4, 4, 4]" in out
    assert "bit-identical: True" in out


def test_demo_cli_rejects_unknown_preset(capsys):
    from hiar.core.demo import main

    assert run_main(main, ["--preset", "nope"]) == 2
    assert "valid presets" in capsys.readouterr().err


def test_identity_view_leaves_out_keys_added_later_at_their_neutral_value():
    base = load_config("tiny")
    view = base.identity_view("distill", "pretrain")
    # added after identities were published, at the value that keeps the old behaviour: not hashed
    for key in ("rollout_frames", "score_windows", "ema_start_step", "real_guidance_scale"):
        assert key not in view["distill"], key
    # tiny sets score_shift (5, the shift its DMD noise levels had before its schedule's went to 1): hashed; unset, not
    assert view["distill"]["score_shift"] == 5.0
    assert "score_shift" not in load_config("tiny", ["distill.score_shift=null"]).identity_view("distill")["distill"]
    assert "late_start_share" not in view["pretrain"] and "critic_ratio" in view["distill"]
    changed = load_config("tiny", ["distill.score_windows=all", "distill.rollout_frames=24",
                                   "distill.ema_start_step=200"]).identity_view("distill")["distill"]
    assert (changed["score_windows"], changed["rollout_frames"], changed["ema_start_step"]) == ("all", 24, 200)
    # the neutral value need not be the default: Wan's 200 is hashed, tiny's 0 (averaging from step 1) is not
    assert load_config("wan2.1-1.3b").identity_view("distill")["distill"]["ema_start_step"] == 200
    assert base.identity_view("seed", "model") == {"seed": base.seed, "model": base.to_dict()["model"]}
