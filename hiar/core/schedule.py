"""Flow-matching schedule (paper eq. 1-3) and the student's few-step grid.

Conventions used everywhere in `hiar`:

* Noise levels are handled as ``sigma`` in [0, 1]: ``x_sigma = (1 - sigma) * x0 + sigma * eps``.
* The DiT receives ``timestep = 1000 * sigma`` (Wan's ``num_train_timesteps = 1000`` convention), so the model
  never sees the shift: the shift only decides *where* on the sigma axis a grid puts its points.
* A sampling grid of S steps is S + 1 sigmas, strictly decreasing, ending at 0. Step ``j`` maps
  ``sigmas[j] -> sigmas[j + 1]``; the last step lands on the clean sample.

The student's grid. The paper writes the schedule as times t in [0, 1] and eq. 1 warps them with a shift s.
The public Self-Forcing / HiAR configs list ``denoising_step_list = [1000, 750, 500, 250]`` and, with
``warp_denoising_step: true``, look each entry up in a 1000-entry shift-5 sigma table, which is exactly
eq. 1 applied to ``t = entry / 1000``: ``[1000, 937.5, 833.33, 625]``. We implement the warp as eq. 1
(no table lookup, so no rounding to the table's 1/1000 grid) and make it a switch: ``warp=False`` uses the
listed values as ``1000 * sigma`` directly.
"""

from __future__ import annotations

from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000.0


def shift_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Eq. 1: ``sigma(t) = s*t / (1 + (s-1)*t)``. Maps 0 -> 0 and 1 -> 1, monotone for s > 0."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def student_sigmas(
    timesteps: Sequence[float] = (1000, 750, 500, 250), shift: float = 5.0, warp: bool = True
) -> torch.Tensor:
    """The student's S + 1 grid points (float64, decreasing, last = 0).

    ``timesteps`` are on the 0-1000 scale as in the public configs. With ``warp`` each becomes
    ``shift_sigma(t / 1000, shift)`` (the Self-Forcing/HiAR default); without it, ``t / 1000``.
    """
    t = torch.tensor([float(x) for x in timesteps], dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    if t.numel() == 0:
        raise ValueError("the student schedule needs at least one timestep")
    if (t <= 0).any() or (t > 1).any():
        raise ValueError(f"student timesteps must lie in (0, 1000], got {list(timesteps)}")
    if not (t[1:] < t[:-1]).all():
        raise ValueError(f"student timesteps must be strictly decreasing, got {list(timesteps)}")
    sig = shift_sigma(t, shift) if warp else t
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def teacher_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The teacher's dense Euler grid: ``num_steps`` uniform times in (0, 1] warped by eq. 1, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigma(t, shift)


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The value the DiT's timestep embedding receives."""
    return sigma * NUM_TRAIN_TIMESTEPS


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Forward interpolation (eq. 1): ``(1 - sigma) * x0 + sigma * noise``. ``sigma`` broadcasts."""
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the flow-matching regression target ``eps - x0``."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Invert eq. 1 + 2: ``x_t = x0 + sigma * v`` so ``x0 = x_t - sigma * v``."""
    return x_t - sigma * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``v = (x_t - x0) / sigma``; undefined at sigma = 0."""
    return (x_t - x0) / sigma


def euler_step(
    x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 3: ``x_{t_{j+1}} = x_{t_j} + v * (sigma_{j+1} - sigma_j)``."""
    return x_t + v * (sigma_next - sigma)
