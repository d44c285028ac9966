"""Where along a long tiny-preset rollout does caption consistency go? The oracle's per-pair indicator
(``hiar.tiny.oracle.consistency_curve``: frames t and t+1 show the caption's background and colour, and the step
between them its direction) averaged per segment of the video, for the world's reference clips and each model.

    python -m benchmarks.consistency_over_time \\
        --model "t_c = t_{j+1}=runs/ablations/students/distill-<id>" --model "t_c = t_j=runs/ablations/students/distill-<id>"

The evaluation's own prompts and seeds (``eval.num_prompts`` held-out prompts x ``eval.seeds`` unless
``--prompts`` / ``--seeds``), each model rolled out hierarchically with its own config for ``video.
eval_horizon_factor`` training horizons (``--factor``); segments are one training horizon long (``--segment``
frames). A row's "all" is the video's caption consistency, the number the evaluation reports; each cell is the
mean over the videos ± its standard error. The reference row shows what the oracle gives a clip that follows the
caption exactly (the shape wraps around the frame), so a drop in a model's row that the reference does not share
is the model's. (Run as a module from the project root: it shares ``parse_models`` with ``frame_strip.py``.)
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.frame_strip import parse_models
from hiar.config import load_config
from hiar.core.generation import generate_frames
from hiar.io.bundle import load_bundle
from hiar.methods.pretrain import build_world, eval_prompts
from hiar.tiny.oracle import consistency_curve


def segment_means(curves: np.ndarray, segment: int) -> list[tuple[float, float]]:
    """Per segment of ``segment`` frames, the mean over videos of each video's mean indicator, and its standard
    error. ``curves``: ``[videos, frames - 1]``, pair t judging frames t and t + 1; a segment of frames [a, b)
    takes the pairs that start in it (the last segment has one pair fewer). Then the whole video."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] < 1:
        raise ValueError(f"need [videos, pairs] curves, got shape {curves.shape}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1 frame, got {segment}")
    pairs = curves.shape[1]
    spans = [(a, min(a + segment, pairs)) for a in range(0, pairs, segment)] + [(0, pairs)]
    out = []
    for a, b in spans:
        per_video = curves[:, a:b].mean(axis=1)
        se = per_video.std(ddof=1) / np.sqrt(len(per_video)) if len(per_video) > 1 else float("nan")
        out.append((float(per_video.mean()), float(se)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH", required=True)
    parser.add_argument("--prompts", type=int, default=0, help="held-out prompts (0: eval.num_prompts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds (default: eval.seeds)")
    parser.add_argument("--factor", type=int, default=0, help="horizon in training horizons (0: the preset's)")
    parser.add_argument("--segment", type=int, default=0, help="frames per segment (0: one training horizon)")
    args = parser.parse_args(argv)
    models = parse_models(args.model, parser)
    if min(args.prompts, args.factor, args.segment) < 0 or any(s < 0 for s in args.seeds or []):
        parser.error("--prompts, --seeds, --factor and --segment must be >= 0")
    cfg = load_config("tiny")
    factor = args.factor or cfg.video.eval_horizon_factor
    num_blocks = cfg.video.train_latent_frames // cfg.rollout.frames_per_block * factor
    prompts = eval_prompts(args.prompts or cfg.eval.num_prompts)
    seeds = list(args.seeds if args.seeds is not None else cfg.eval.seeds)
    pairs = [(p, s) for s in seeds for p in prompts]
    world = build_world(cfg)

    rows: dict[str, np.ndarray] = {}
    num_frames = 0
    for label, path in models:
        bundle = load_bundle(path)
        videos = generate_frames(bundle, [p for p, _ in pairs], [s for _, s in pairs], num_blocks, "hierarchical")
        num_frames = videos.shape[1]
        rows[label] = np.stack([consistency_curve(v, p) for v, (p, _) in zip(videos, pairs)])
        print(f"[consistency_over_time] {label}: {path} ({len(pairs)} videos of {num_frames} frames, "
              f"t_c = {bundle.config.rollout.context_noise}, window {bundle.config.rollout.window_frames})", flush=True)
    reference = np.stack([consistency_curve(world.clip_for_prompt(p, s, num_frames), p) for p, s in pairs])
    rows = {"reference (the world)": reference, **rows}

    segment = args.segment or num_frames // factor
    spans = [f"{a}-{min(a + segment, num_frames)}" for a in range(0, num_frames - 1, segment)]
    header = f"{'caption consistency by frames':<36}" + "".join(f"{s:>16}" for s in spans) + f"{'all':>16}"
    print(f"\n{len(prompts)} held-out prompts x seeds {seeds} = {len(pairs)} videos; mean ± SE over videos")
    print(header)
    for label, curves in rows.items():
        cells = "".join(f"{f'{m:.3f} ± {se:.3f}':>16}" for m, se in segment_means(curves, segment))
        print(f"{label[:35]:<36}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
