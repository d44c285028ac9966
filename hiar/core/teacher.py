"""The teacher's sampler: bidirectional multi-step Euler ODE integration with classifier-free guidance.

Used for data generation (ODE pairs, trajectories), evaluation and the tiny teacher's own sample videos. The
paper's data-generation settings are 48-50 Euler steps, shift 8, CFG 6 (``TeacherConfig``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from hiar.core.schedule import euler_step
from hiar.core.velocity import GuidedVelocity


@torch.no_grad()
def sample_teacher(
    transformer,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    negative_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    keep: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Integrate from ``noise`` (at ``sigmas[0]``) down the grid ``sigmas`` (ending at 0).

    Returns the clean sample and ``{i: state at sigmas[i]}`` for every index in ``keep`` (index 0 is the noise,
    ``len(sigmas) - 1`` the clean sample), so a caller can keep a trajectory without holding all of it.
    """
    if float(sigmas[-1]) != 0.0:
        raise ValueError("the teacher grid must end at sigma = 0")
    bad = [i for i in keep if not 0 <= i < sigmas.numel()]
    if bad:
        raise ValueError(f"keep indices {bad} are outside the grid of {sigmas.numel()} points")
    vel = GuidedVelocity(transformer, prompt_embeds, negative_embeds, guidance_scale=guidance_scale)
    x = noise
    states = {0: x} if 0 in keep else {}
    grid = sigmas.tolist()
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = vel(x, s, attention_mode="bidirectional")
        x = euler_step(x, v, s, s_next)
        if i + 1 in keep:
            states[i + 1] = x
    return x, states
