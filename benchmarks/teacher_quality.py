"""What tiny teachers generate, side by side: oracle scores on held-out prompts, each with its standard error.

    python benchmarks/teacher_quality.py                                   # the shipped teacher, 96 held-out prompts
    python benchmarks/teacher_quality.py --teacher hiar/assets/tiny-teacher --teacher runs/static/teacher --prompts 64
    python benchmarks/teacher_quality.py --set teacher.num_steps=24          # the sampler's settings are config

Each teacher samples the same prompts with the same noise (``hiar.methods.pretrain.sample_eval_clips``: 48 Euler
steps, shift 8, CFG 2 from the tiny preset's ``teacher.*``, which ``--set`` changes; one seed per prompt); every
clip is scored by the tiny world's oracle. Printed per teacher: caption consistency, motion accuracy, mean motion (px/frame) and the share of
clips that stand still (``oracle/static``), as mean ± SE over the clips. This is how the teacher of a world with
``world.static_share`` (README "Quality on the tiny preset") was checked to have learned the static mode.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hiar.config import load_config
from hiar.eval.gate import mean_se
from hiar.methods.pretrain import load_teacher, sample_eval_clips
from hiar.tiny.oracle import score_clip

SHIPPED = Path(__file__).resolve().parents[1] / "hiar" / "assets" / "tiny-teacher"
COLUMNS = ("caption_consistency", "motion_accuracy", "motion", "static")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append", default=[], help="a teacher bundle directory (repeatable)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts, evenly spread (96 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="tiny preset overrides, e.g. teacher.num_steps=24")
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
        cfg = load_config("tiny", args.overrides)
    except ValueError as err:
        parser.error(str(err))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
