"""Training objectives. This module grows with distillation (DMD, FKL); it starts with flow matching, which the
tiny teacher's pretraining and the DMD critic (fake score) both minimise."""

from __future__ import annotations

import torch

from hiar.schedule import add_noise, shift_sigma, velocity_target


def sample_training_sigmas(batch: int, shift: float, generator: torch.Generator | None = None,
                           logit_std: float = 1.0) -> torch.Tensor:
    """Logit-normal times warped by eq. 1's shift: most samples land mid-to-high noise, where layout and motion
    are decided, and none exactly at 0 or 1."""
    u = torch.randn(batch, generator=generator) * logit_std
    return shift_sigma(torch.sigmoid(u), shift)


def flow_matching_loss(velocity_fn, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       reduce: bool = True) -> torch.Tensor:
    """MSE between ``velocity_fn(x_sigma, sigma)`` and the target ``noise - x0`` (eq. 2).

    ``sigma``: [B] (one level per sample) or [B, F] (per frame); ``velocity_fn(x, sigma)`` returns v, shape of x.
    """
    s = sigma.to(x0.dtype)
    s_b = s.view(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.view(-1, 1, 1, 1, 1)
    x_t = add_noise(x0, noise, s_b)
    err = (velocity_fn(x_t, s) - velocity_target(x0, noise)).pow(2)
    return err.mean() if reduce else err.flatten(1).mean(1)
