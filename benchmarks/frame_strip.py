"""Frame strips of long tiny-preset rollouts, to look at: does the shape keep its form at 4x the training horizon?

    python benchmarks/frame_strip.py --out docs/tiny-4x-frames.png \\
        --model "ODE init=runs/ablations/students/ode_init-<id>" --model "t_c = t_{j+1}=runs/ablations/students/distill-<id>"

For each of ``--prompts`` held-out prompts (evenly spread, the evaluation's own choice: ``eval_prompts``) and seed
``--seed``: one row with the tiny world's reference clip (what the caption means, from the same start position),
then one row per ``--model`` (a student bundle, rolled out hierarchically with its own config, ``video.
eval_horizon_factor`` times the training horizon unless ``--factor``), every ``--every``-th frame, enlarged
``--scale`` times. Each row's label carries the oracle's caption consistency of that video. Written as a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from hiar.config import load_config
from hiar.core.generation import generate_frames
from hiar.io.bundle import load_bundle
from hiar.io.video import to_uint8
from hiar.methods.pretrain import build_world, eval_prompts
from hiar.tiny.oracle import score_clip

LABEL_WIDTH = 230
GAP = 2
TEXT_ROW = 18


def parse_models(specs: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    models = []
    for spec in specs:
        label, sep, path = spec.rpartition("=")
        if not sep or not label or not (Path(path) / "card.json").is_file():
            parser.error(f"--model {spec!r}: expected LABEL=PATH of a model bundle (a directory with card.json)")
        models.append((label, path))
    return models


def strip(frames: np.ndarray, every: int, scale: int) -> np.ndarray:
    """Every ``every``-th frame of ``[T, H, W, 3]`` (float in [0, 1]) side by side, enlarged, as uint8 BGR."""
    picked = [cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
              for f in to_uint8(frames[::every])]
    gap = np.full((picked[0].shape[0], GAP, 3), 255, np.uint8)
    row = np.concatenate([x for f in picked for x in (f, gap)][:-1], axis=1)
    return row[..., ::-1]


def labelled(row: np.ndarray, label: str) -> np.ndarray:
    pad = np.full((row.shape[0], LABEL_WIDTH, 3), 40, np.uint8)
    for i, line in enumerate(label.split("\n")):
        cv2.putText(pad, line, (4, 16 + 15 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([pad, row], axis=1)


def caption_bar(text: str, width: int) -> np.ndarray:
    bar = np.full((TEXT_ROW, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH", required=True)
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factor", type=int, default=0, help="horizon in training horizons (0: the preset's)")
    parser.add_argument("--every", type=int, default=4, help="show every N-th frame")
    parser.add_argument("--scale", type=int, default=3, help="pixel enlargement")
    args = parser.parse_args(argv)
    models = parse_models(args.model, parser)
    for name in ("prompts", "every", "scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.factor < 0 or args.seed < 0:
        parser.error("--factor and --seed must be >= 0")
    cfg = load_config("tiny")
    factor = args.factor or cfg.video.eval_horizon_factor
    num_blocks = cfg.video.train_latent_frames // cfg.rollout.frames_per_block * factor
    prompts = eval_prompts(args.prompts)
    world = build_world(cfg)
    videos = {}
    for label, path in models:
        bundle = load_bundle(path)
        videos[label] = generate_frames(bundle, prompts, [args.seed] * len(prompts), num_blocks, "hierarchical")
        print(f"[frame_strip] {label}: {path} ({num_blocks} blocks, t_c = {bundle.config.rollout.context_noise})")
    blocks = []
    num_frames = videos[models[0][0]].shape[1]
    for i, prompt in enumerate(prompts):
        reference = world.clip_for_prompt(prompt, args.seed, num_frames)
        rows = [labelled(strip(reference, args.every, args.scale), "reference (the world)")]
        for label, _ in models:
            video = videos[label][i]
            score = score_clip(video, prompt)["caption_consistency"]
            rows.append(labelled(strip(video, args.every, args.scale), f"{label}\ncaption consistency {score:.2f}"))
        width = rows[0].shape[1]
        blocks += [caption_bar(f"{prompt}  (seed {args.seed}; frames 0, {args.every}, ... of {num_frames})", width),
                   *[x for r in rows for x in (r, np.full((GAP, width, 3), 255, np.uint8))]]
    image = np.concatenate(blocks, axis=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), image):
        raise SystemExit(f"cannot write {args.out}")
    print(f"[frame_strip] wrote {args.out}: {image.shape[1]}x{image.shape[0]} px, {len(prompts)} prompt(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
