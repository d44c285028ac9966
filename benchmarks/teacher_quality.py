"""What tiny teachers generate, side by side: oracle scores on held-out prompts, each with its standard error.

    python benchmarks/teacher_quality.py                                   # the shipped teacher, 96 held-out prompts
    python benchmarks/teacher_quality.py --teacher hiar/assets/tiny-teacher --teacher runs/static/teacher --prompts 64
    python benchmarks/teacher_quality.py --set teacher.num_steps=24          # the sampler's settings are config

Each teacher samples the same prompts with the same noise (``hiar.methods.pretrain.sample_eval_clips``: 48 Euler
steps (what the teachers' cards were scored with; the preset's ODE pairs take 24), shift 8, CFG 2 from the tiny
preset's ``teacher.*``, which ``--set`` changes; one seed per prompt); every
clip is scored by the tiny world's oracle. Printed per teacher: caption consistency, motion accuracy, mean motion (px/frame) and the share of
clips that stand still (``oracle/static``), as mean ± SE over the clips. This is how the teacher of a world with
``world.static_share`` (README "Quality on the tiny preset") was checked to have learned the static mode.

``--windows 0 12 24 36`` adds how well each teacher denoises true world videos that start at those frames (what
DMD's real score is asked about a window of a long rollout, ``distill.rollout_frames``): for each held-out prompt,
its reference scene's window (``hiar.methods.pretrain.window_latents``: a later window carries the frames before it
as history) noised to each sigma, and the mean squared error of the teacher's guided x0 prediction, mean ± SE over
the prompts. The noise is the same for every teacher and window, so the rows and columns are paired.

    python benchmarks/teacher_quality.py --teacher hiar/assets/tiny-teacher --teacher runs/teacher-late36 --windows 0 12 24 36
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hiar.config import load_config
from hiar.core.schedule import add_noise, x0_from_velocity
from hiar.core.velocity import GuidedVelocity
from hiar.eval.gate import mean_se
from hiar.methods.pretrain import build_world, eval_prompts, load_teacher, sample_eval_clips, window_latents
from hiar.seeding import seeded_generator
from hiar.tiny.oracle import score_clip

SHIPPED = Path(__file__).resolve().parents[1] / "hiar" / "assets" / "tiny-teacher"
COLUMNS = ("caption_consistency", "motion_accuracy", "motion", "static")
WINDOW_SIGMAS = (0.3, 0.6, 0.9)


@torch.no_grad()
def window_errors(model, text, codec, cfg, num_prompts: int, starts: list[int],
                  sigmas=WINDOW_SIGMAS) -> dict[tuple[float, int], tuple[float, float]]:
    """``{(sigma, start frame): (mean, SE)}`` over held-out prompts of the teacher's guided x0-prediction MSE on
    its reference scene's window from that frame, noised to sigma (the same noise for every start and teacher)."""
    world = build_world(cfg)
    prompts = eval_prompts(num_prompts)
    scenes = [world.scene_for_prompt(p, seed) for seed, p in enumerate(prompts)]
    velocity = GuidedVelocity(model, text.encode(prompts), text.null_embedding(len(prompts)),
                              guidance_scale=cfg.teacher.guidance_scale)
    out = {}
    for start in starts:
        x0 = torch.cat([window_latents(world, codec, s, cfg.video.train_latent_frames, start) for s in scenes])
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=seeded_generator(cfg.seed, 7, round(sigma * 1e6)))
            x_t = add_noise(x0, noise, sigma)
            pred = x0_from_velocity(x_t, velocity(x_t, sigma, attention_mode="bidirectional"), sigma)
            out[(sigma, start)] = mean_se((pred - x0).square().flatten(1).mean(1).tolist())[:2]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append", default=[], help="a teacher bundle directory (repeatable)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts, evenly spread (96 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="tiny preset overrides, e.g. teacher.num_steps=24")
    parser.add_argument("--windows", type=int, nargs="+", default=[], metavar="FRAME",
                        help="also the x0 error on true windows starting at these frames (e.g. 0 12 24 36)")
    args = parser.parse_args(argv)
    teachers = args.teacher or [str(SHIPPED)]
    missing = [t for t in teachers if not (Path(t) / "card.json").is_file()]
    if missing:
        parser.error(f"not a teacher bundle (no card.json): {missing}")
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config("tiny", ["teacher.num_steps=48", *args.overrides])
    except ValueError as err:
        parser.error(str(err))
    k = cfg.world.frames_per_latent
    bad = [f for f in args.windows if f < 0 or f % k]
    if bad:
        parser.error(f"--windows: start frames must be non-negative multiples of world.frames_per_latent ({k}), "
                     f"got {bad}")
    t = cfg.teacher
    print(f"{t.num_steps} Euler steps, shift {t.shift}, CFG {t.guidance_scale}; {args.prompts} held-out prompts")
    print("| teacher | n | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for path in teachers:
        model, text, codec, _ = load_teacher(path)
        frames, prompts = sample_eval_clips(model.eval(), text, codec, cfg, num_prompts=args.prompts)
        clips = [score_clip(f, p) for f, p in zip(frames, prompts)]
        cells = [mean_se([c[k] for c in clips])[:2] for k in COLUMNS]
        print(f"| {path} | {len(clips)} | " + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in cells) + " |")
    if args.windows:
        print(f"\nx0-prediction MSE on true windows, by start frame ({args.prompts} held-out prompts, "
              f"{cfg.video.train_latent_frames} latent frames, CFG {t.guidance_scale})")
        print("| teacher | sigma | " + " | ".join(f"from frame {f}" for f in args.windows) + " |")
        print("|---" * (len(args.windows) + 2) + "|")
        for path in teachers:
            model, text, codec, _ = load_teacher(path)
            errors = window_errors(model.eval(), text, codec, cfg, args.prompts, args.windows)
            for sigma in WINDOW_SIGMAS:
                print(f"| {path} | {sigma} | " + " | ".join(
                    "{:.4f} ± {:.4f}".format(*errors[(sigma, f)]) for f in args.windows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
