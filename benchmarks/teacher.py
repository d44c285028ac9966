"""Tiny teacher throughput: samples/s at --steps Euler steps with CFG, and training steps/s, in one run.

    python benchmarks/teacher.py [--teacher hiar/assets/tiny-teacher] [--batch 8] [--train-steps 10] [--steps 48]

Uses the shipped teacher when present (a random one otherwise: the speed is the same). Run on an otherwise idle
machine; the numbers are per process with all cores' threads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


from hiar.config import load_config  # noqa: E402
from hiar.core.model import CausalWanTransformer3DModel  # noqa: E402
from hiar.methods.pretrain import TeacherPretraining, build_world_components, load_teacher  # noqa: E402
from hiar.core.rollout import initial_noise  # noqa: E402
from hiar.core.teacher import sample_teacher  # noqa: E402
from hiar.tiny.captions import heldout_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(Path(__file__).resolve().parents[1] / "hiar" / "assets" / "tiny-teacher"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=48,
                        help="Euler steps per clip (the preset's ODE pairs take teacher.num_steps, 24)")
    args = parser.parse_args()
    cfg = load_config("tiny", [f"teacher.num_steps={args.steps}"])
    world, text, codec = build_world_components(cfg)
    if Path(args.teacher).exists():
        model, text, codec, _ = load_teacher(args.teacher)
    else:
        model = CausalWanTransformer3DModel(**cfg.model.kwargs()).eval()
    v, k = cfg.video, cfg.rollout.frames_per_block
    prompts = heldout_prompts()[: args.batch]
    noise = initial_noise(list(range(args.batch)), v.train_latent_frames // k,
                          (v.latent_channels, k, v.latent_height, v.latent_width))
    embeds, null = text.encode(prompts), text.null_embedding(args.batch)
    sample_teacher(model, noise[:1], embeds[:1], cfg.teacher.sigmas()[-3:], negative_embeds=null[:1],
                   guidance_scale=cfg.teacher.guidance_scale)  # warm-up
    t0 = time.perf_counter()
    sample_teacher(model, noise, embeds, cfg.teacher.sigmas(), negative_embeds=null,
                   guidance_scale=cfg.teacher.guidance_scale)
    sample_s = time.perf_counter() - t0
    trainer = TeacherPretraining(cfg, world, text, codec)
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        trainer.train_step()
    train_s = time.perf_counter() - t0
    print(f"threads={torch.get_num_threads()} teacher={args.teacher if Path(args.teacher).exists() else 'random'}")
    print(f"{'what':<44}{'value':>12}")
    print(f"{f'sampling: clips/s ({args.steps} steps, CFG, 12 frames)':<44}{args.batch / sample_s:>12.3f}")
    print(f"{'sampling: s per clip':<44}{sample_s / args.batch:>12.3f}")
    print(f"{'training: steps/s (batch ' + str(cfg.pretrain.batch_size) + ')':<44}{args.train_steps / train_s:>12.3f}")
    print(f"{'training: clips/s':<44}{args.train_steps * cfg.pretrain.batch_size / train_s:>12.2f}")


if __name__ == "__main__":
    main()
