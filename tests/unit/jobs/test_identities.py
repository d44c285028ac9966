"""Stage and teacher-training identities: the same command names the same student in any checkout, and a config
key added with a neutral default renames nothing (the README names stored students by identity)."""

import os

from hiar.config import load_config
from hiar.io.storage import PACKAGE_PARENT, locatable_path, portable_path, resolve_path
from hiar.jobs.pretrain_teacher import training_identity
from hiar.jobs.train import stage_identity

INPUTS = {"data": "d" * 16, "teacher": "t" * 16, "init": "i" * 16}
SHIPPED = "hiar/assets/tiny-teacher"


def test_portable_path_names_a_checkout_path_the_same_given_relative_or_absolute(tmp_path):
    assert portable_path(SHIPPED) == SHIPPED
    assert portable_path(str(PACKAGE_PARENT / SHIPPED)) == SHIPPED
    assert portable_path(str(PACKAGE_PARENT / "hiar" / "assets" / ".." / "assets" / "tiny-teacher")) == SHIPPED
    outside = tmp_path / "teacher"
    assert portable_path(str(outside)) == str(outside)  # outside the checkout: absolute, as resolved
    assert portable_path("s3://bucket/wan/") == "s3://bucket/wan/" and portable_path("") == ""


def test_locatable_path_names_a_shipped_asset_by_the_package_and_anything_else_absolutely(tmp_path, monkeypatch):
    assert locatable_path(PACKAGE_PARENT / SHIPPED) == SHIPPED == locatable_path(SHIPPED)
    monkeypatch.chdir(tmp_path)  # a later process elsewhere: resolve_path finds the asset beside the package
    assert resolve_path(locatable_path(PACKAGE_PARENT / SHIPPED)) == str(PACKAGE_PARENT / SHIPPED)
    in_checkout = PACKAGE_PARENT / "runs" / "x" / "components" / "text-0"  # not the package's: a Ray job's cwd differs
    assert locatable_path(in_checkout) == str(in_checkout)
    assert locatable_path(tmp_path / "teacher") == str(tmp_path / "teacher")


def test_a_stage_identity_does_not_depend_on_how_the_teacher_path_is_written():
    for stage in ("ode_init", "distill"):
        relative = load_config("tiny", [f"teacher.path={SHIPPED}", f"teacher.real_score_path={SHIPPED}"])
        absolute = load_config("tiny", [f"teacher.path={PACKAGE_PARENT / SHIPPED}",
                                        f"teacher.real_score_path={PACKAGE_PARENT / SHIPPED}"])
        assert stage_identity(relative, stage, INPUTS) == stage_identity(absolute, stage, INPUTS)
        other = load_config("tiny", [f"teacher.path={os.sep}elsewhere{os.sep}teacher"])
        assert stage_identity(other, stage, INPUTS) != stage_identity(relative, stage, INPUTS)


def test_what_trains_the_weights_changes_the_identity_and_logging_does_not():
    base = load_config("tiny")
    ident = stage_identity(base, "distill", INPUTS)
    for change in ("distill.critic_ratio=3", "distill.score_windows=all", "distill.rollout_frames=24", "seed=1"):
        assert stage_identity(load_config("tiny", [change]), "distill", INPUTS) != ident, change
    for change in ("distill.sample_every=7", "distill.num_workers=2", "distill.checkpoint_every=3"):
        assert stage_identity(load_config("tiny", [change]), "distill", INPUTS) == ident, change
    # the ODE init reads none of the distillation's DMD keys
    assert stage_identity(load_config("tiny", ["distill.critic_ratio=3"]), "ode_init", INPUTS) == \
        stage_identity(base, "ode_init", INPUTS)
    assert stage_identity(base, "distill", {**INPUTS, "init": "j" * 16}) != ident


def test_another_evaluation_horizon_trains_nothing_again():
    """``video.eval_horizon_factor`` is read by evaluations only (whose identity has the horizon as latent frames): a
    run that asks for another horizon finds its ODE init, student and teacher under the names they have, where it
    used to train all of them again. The training clip, which shapes every rollout, still names them."""
    base = load_config("tiny")
    longer = load_config("tiny", ["video.eval_horizon_factor=8"])
    assert longer.video.eval_horizon_factor == 8 and longer.identity_view("video")["video"]["eval_horizon_factor"] == 4
    for stage in ("ode_init", "distill"):
        assert stage_identity(longer, stage, INPUTS) == stage_identity(base, stage, INPUTS), stage
        clip = load_config("tiny", ["video.train_latent_frames=24"])
        assert stage_identity(clip, stage, INPUTS) != stage_identity(base, stage, INPUTS), stage
    assert training_identity(longer) == training_identity(base)
    assert training_identity(load_config("tiny", ["video.fps=16"])) != training_identity(base)  # kept in the bundle


def test_the_ode_inits_micro_batch_names_it_whichever_key_sets_it():
    """``distill.ode_micro_batch_size`` (tiny: 4, with the distillation at 2) or, unset, ``micro_batch_size``: an ODE
    init trained at micro 4 has one name either way, and a distillation's name does not hash it (the ODE init's
    identity, an input, does), so every student named before the key existed keeps its name."""
    base = load_config("tiny")
    assert (base.distill.micro_batch("ode_init"), base.distill.micro_batch("distill")) == (4, 2)
    ode, distill = stage_identity(base, "ode_init", INPUTS), stage_identity(base, "distill", INPUTS)
    unset = load_config("tiny", ["distill.ode_micro_batch_size=null", "distill.micro_batch_size=4"])
    assert stage_identity(unset, "ode_init", INPUTS) == ode
    assert stage_identity(load_config("tiny", ["distill.ode_micro_batch_size=2"]), "ode_init", INPUTS) != ode
    assert stage_identity(load_config("tiny", ["distill.ode_micro_batch_size=2"]), "distill", INPUTS) == distill
    assert stage_identity(load_config("tiny", ["distill.micro_batch_size=1"]), "distill", INPUTS) != distill
    assert stage_identity(load_config("tiny", ["distill.micro_batch_size=1"]), "ode_init", INPUTS) == ode


def test_a_batch_that_does_not_divide_over_the_workers_is_refused_before_any_data_is_read(tmp_path):
    import pytest

    from hiar.jobs.train import plan_stage

    missing = str(tmp_path / "no-data-here")  # the batch is checked first: no dataset, teacher or init is opened
    cases = [("distill", ["distill.batch_size=6"], r"distill.batch_size \(6\) must be a multiple of "
                                                    r"distill.micro_batch_size x distill.num_workers \(2 x 2\)"),
             ("ode_init", ["distill.ode_batch_size=4"], r"distill.ode_batch_size \(4\) must be a multiple of "
                                                         r"distill.ode_micro_batch_size x distill.num_workers \(4 x 2\)"),
             ("ode_init", ["distill.ode_micro_batch_size=null", "distill.micro_batch_size=3"],
              r"multiple of distill.micro_batch_size x distill.num_workers \(3 x 2\) for ode_init")]
    for stage, sets, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_stage(load_config("tiny", sets), stage, missing, teacher=missing, init=None)


def test_no_run_setting_enters_a_stage_identity():
    """Every ``hiar.config.run_setting`` of the distill section (workers, devices, checkpoints, sampling, storage),
    changed on its own, names the same ODE init and student; the distill section's other keys stay hashed."""
    import copy
    import dataclasses

    base = load_config("tiny")
    idents = {stage: stage_identity(base, stage, INPUTS) for stage in ("ode_init", "distill")}
    settings = [f for f in dataclasses.fields(base.distill) if f.metadata.get("run_setting")]
    assert {"num_workers", "checkpoint_every", "sample_every", "storage_path", "resume_from"} <= \
        {f.name for f in settings}
    assert "critic_ratio" not in {f.name for f in settings}
    for f in settings:
        value = getattr(base.distill, f.name)
        changed = copy.deepcopy(base)
        other = (not value) if isinstance(value, bool) else value * 2 + 1 if isinstance(value, (int, float)) \
            else f"{value}-elsewhere"
        setattr(changed.distill, f.name, other)
        for stage, ident in idents.items():
            assert stage_identity(changed, stage, INPUTS) == ident, (f.name, stage)
    assert set(base.identity_view("distill")["distill"]).isdisjoint(f.name for f in settings)


def test_a_teacher_training_keeps_its_name_over_budget_checkpoints_and_threads():
    """Rerunning teacher pretraining with a larger budget, other checkpoint or evaluation intervals, or another
    thread count continues the same run; what sets the weights -- the per-worker batch times the workers, the
    learning rate, the seed -- names another."""
    base = training_identity(load_config("tiny"))
    for change in ("pretrain.max_minutes=90", "pretrain.max_steps=7", "pretrain.checkpoint_every=7",
                   "pretrain.eval_every_minutes=1", "pretrain.eval_prompts=4", "pretrain.threads_per_worker=2"):
        assert training_identity(load_config("tiny", [change])) == base, change
    for change in ("pretrain.num_workers=2", "pretrain.batch_size=8", "pretrain.lr=5e-4", "seed=1"):
        assert training_identity(load_config("tiny", [change])) != base, change


def test_the_tiny_presets_identities_stay_put():
    """Pinned: a change here renames every stored student and the README's reproduction commands. A new config
    key that trains differently by default is declared ``added_later`` with its no-op value (``hiar.config``);
    renaming on purpose means updating these values and the README's student names together."""
    cfg = load_config("tiny", ["seed=0"])
    # ba0cfc9dcf299aca / 08dd46a531df9619 until the preset's schedule.shift went from 5 to 1 (with distill.score_shift
    # held at 5): a renaming on purpose, the README's students of that preset say which shift they were trained with
    # 3c2381781130f1de / a5547f38998ca007 since the ODE pairs take 24 teacher steps and the distillation a batch of 4
    # (micro 2; the ODE init keeps micro 4): a renaming on purpose. The recipe before keeps its names:
    assert stage_identity(cfg, "ode_init", INPUTS) == "3c2381781130f1de"
    assert stage_identity(cfg, "distill", INPUTS) == "a5547f38998ca007"
    before = load_config("tiny", ["seed=0", "teacher.num_steps=48", "distill.batch_size=8",
                                  "distill.micro_batch_size=4"])
    assert stage_identity(before, "ode_init", INPUTS) == "09eb7410903b2432"
    assert stage_identity(before, "distill", INPUTS) == "2af6cd210090da99"
    # 95ba9c2be82ac2e1 until checkpoint_every and threads_per_worker became run settings (no stored student names it)
    assert training_identity(cfg) == "1a7d4f034e8b06ec"


def test_a_fingerprint_reads_fixed_blocks_so_copies_agree_and_retrained_weights_differ(tmp_path):
    import shutil

    import numpy as np

    from hiar.io.checksums import FINGERPRINT_BLOCK_BYTES, FINGERPRINT_BLOCKS, fingerprint_dir

    span = FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES
    model = tmp_path / "a" / "transformer"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"num_layers": 2}')
    weights = np.random.default_rng(0).bytes(3 * span)  # larger than the span: only the blocks are read
    (model / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (model / "notes.txt").write_text("not a model file")
    fingerprint = fingerprint_dir(model)
    shutil.copytree(model, tmp_path / "b")
    assert fingerprint_dir(tmp_path / "b") == fingerprint  # a copy elsewhere: the same model
    (tmp_path / "b" / "notes.txt").write_text("edited")
    assert fingerprint_dir(tmp_path / "b") == fingerprint  # only weights and configs count
    retrained = np.random.default_rng(1).bytes(3 * span)  # every byte changes, as training changes every tensor
    (model / "diffusion_pytorch_model.safetensors").write_bytes(retrained)
    assert fingerprint_dir(model) != fingerprint
    (model / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (model / "config.json").write_text('{"num_layers": 3}')
    assert fingerprint_dir(model) != fingerprint
    (model / "config.json").write_text('{"num_layers": 2}')
    assert fingerprint_dir(model) == fingerprint
    # the first byte is in the first block, so even a one-byte change there is seen; a small file is read whole
    (model / "diffusion_pytorch_model.safetensors").write_bytes(bytes([weights[0] ^ 1]) + weights[1:])
    assert fingerprint_dir(model) != fingerprint
    small = tmp_path / "small"
    small.mkdir()
    (small / "w.safetensors").write_bytes(weights[:1000])
    before = fingerprint_dir(small)
    (small / "w.safetensors").write_bytes(weights[:999] + bytes([weights[999] ^ 1]))
    assert fingerprint_dir(small) != before


def test_an_evaluations_generation_hash_is_the_configs_identity_view():
    """Stored evaluations are found again by this hash (``evaluate --reuse``, the gate's paired runs): it hashes the
    generation sections as every identity does, so a key added later at its neutral value renames none. Pinned
    for the tiny preset: the value every evaluation stored before the change carries."""
    from hiar.platform.evaluation_plan import EvalPlan

    cfg = load_config("tiny")
    plan = EvalPlan(model_uri="m", bundle_path="b", checksum="c", model_name=None, model_version=None,
                    gen_config=cfg.to_dict(), prompts=["p"], seeds=[0], modes=["hierarchical"], latent_frames=12,
                    num_blocks=4, segments=5, fps=8, use_oracle=True, weights_dir=None, eval_settings={})
    assert plan.generation_hash() == "8b9da52f1076c51d"  # e07405223a11b9b6 with the preset's schedule.shift at 5
    other = load_config("tiny", ["rollout.window_frames=9"])
    assert EvalPlan(**{**plan.__dict__, "gen_config": other.to_dict()}).generation_hash() != plan.generation_hash()
    # what the evaluation does not generate with (the distillation's run settings, its recipe) is not hashed
    recipe = load_config("tiny", ["distill.critic_ratio=5", "distill.num_workers=1"])
    assert EvalPlan(**{**plan.__dict__, "gen_config": recipe.to_dict()}).generation_hash() == plan.generation_hash()


def test_how_many_samples_a_stage_trains_on_names_it():
    """A dataset's identity names how its samples are made, not how many it holds (it grows by index), so the count
    a stage reads enters the stage's identity; at the tiny preset's counts it is left out (the pins above)."""
    base = load_config("tiny")
    ode, distill = (stage_identity(base, s, INPUTS) for s in ("ode_init", "distill"))
    fewer_pairs = load_config("tiny", ["data.num_ode_pairs=192"])
    assert stage_identity(fewer_pairs, "ode_init", INPUTS) != ode
    assert stage_identity(fewer_pairs, "distill", INPUTS) == distill  # it reads the pairs through its init
    fewer_trajectories = load_config("tiny", ["data.num_trajectories=32"])
    assert stage_identity(fewer_trajectories, "distill", INPUTS) != distill
    assert stage_identity(fewer_trajectories, "ode_init", INPUTS) == ode
