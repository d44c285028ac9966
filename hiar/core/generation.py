"""Generate videos with a (distilled) causal student: the one call evaluation, the notebook, the MLflow model
and the serving reference all use, so "what the student produces" has a single definition.

``mode`` picks the rollout: ``hierarchical`` (HiAR, Alg. 1 with the config's context noise level) or
``block_first`` (Self-Forcing).  Noise comes from ``hiar.core.rollout.initial_noise``: seeded per (seed, block), so a
stream of N blocks and a longer stream with the same seed share their first N blocks' noise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hiar.config import HiarConfig
from hiar.core.rollout import ROLLOUT_MODES, block_first_rollout, hierarchical_rollout, initial_noise
from hiar.core.velocity import GuidedVelocity

def student_velocity(transformer, prompt_embeds: torch.Tensor, cfg: HiarConfig,
                     negative_embeds: torch.Tensor | None = None) -> GuidedVelocity:
    r = cfg.rollout
    return GuidedVelocity(transformer, prompt_embeds, negative_embeds, guidance_scale=r.guidance_scale,
                          frames_per_block=r.frames_per_block, window_frames=r.window_frames,
                          sink_frames=r.sink_frames)


def block_shape(cfg: HiarConfig) -> tuple[int, int, int, int]:
    """``(C, k, H, W)`` of one latent block."""
    v = cfg.video
    return (v.latent_channels, cfg.rollout.frames_per_block, v.latent_height, v.latent_width)


@torch.no_grad()
def generate_latents(transformer, text, cfg: HiarConfig, prompts: Sequence[str], seeds: Sequence[int],
                     num_blocks: int, mode: str = "hierarchical") -> torch.Tensor:
    """Clean latents ``[B, C, num_blocks * k, H, W]`` for one prompt and seed per sample."""
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; valid: {list(ROLLOUT_MODES)}")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    device = next(transformer.parameters()).device
    embeds = text.encode(list(prompts)).to(device)
    negative = text.null_embedding(len(prompts)).to(device) if cfg.rollout.guidance_scale != 1.0 else None
    velocity = student_velocity(transformer, embeds, cfg, negative)
    noise = initial_noise(list(seeds), num_blocks, block_shape(cfg)).to(device)
    sigmas = cfg.schedule.sigmas().to(device)
    r = cfg.rollout
    if mode == "hierarchical":
        return hierarchical_rollout(velocity, noise, sigmas, seeds, step_rule=r.step_rule,
                                    context_noise=r.context_noise, fused=r.fused)
    return block_first_rollout(velocity, noise, sigmas, seeds, step_rule=r.step_rule)


def generate_frames(bundle, prompts: Sequence[str], seeds: Sequence[int], num_blocks: int,
                    mode: str = "hierarchical", cfg: HiarConfig | None = None):
    """Decoded video ``[B, T, H, W, 3]`` in [0, 1] (numpy) from a :class:`hiar.io.bundle.ModelBundle`."""
    cfg = cfg or bundle.config
    if cfg is None:
        raise ValueError("the bundle has no hiar_config.yaml; pass cfg=")
    latents = generate_latents(bundle.transformer, bundle.text, cfg, prompts, seeds, num_blocks, mode)
    return bundle.codec.decode(latents).clamp(0, 1).cpu().numpy()


__all__ = ["student_velocity", "block_shape", "generate_latents", "generate_frames"]
