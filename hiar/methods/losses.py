"""Training objectives. This module grows with distillation (DMD, FKL); it starts with flow matching, which the
tiny teacher's pretraining and the DMD critic (fake score) both minimise."""

from __future__ import annotations

import torch

from hiar.core.schedule import add_noise, shift_sigma, velocity_target


def sample_training_sigmas(batch: int, shift: float, generator: torch.Generator | None = None,
                           distribution: str = "uniform", logit_std: float = 1.0) -> torch.Tensor:
    """Training noise levels: times from ``distribution`` warped by eq. 1's shift.

    ``"uniform"`` covers every level evenly: a sampler with a large shift (the teacher's 8) ends with one jump from
    sigma ~0.15 to 0, so the low-noise end must be trained as well as the high-noise end where motion is decided.
    ``"logit_normal"`` (SD3-style) concentrates on mid levels and starves both ends on short training budgets.
    """
    if distribution == "uniform":
        t = torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
    elif distribution == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std)
    else:
        raise ValueError(f"distribution must be 'uniform' or 'logit_normal', got {distribution!r}")
    return shift_sigma(t, shift)


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


def dmd_generator_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Distribution matching (eq. 5) as a surrogate whose gradient in ``x0`` is the normalised score difference.

    ``x0``: generator samples (with grad). ``real_x0`` / ``fake_x0``: the real score's (teacher with CFG) and the
    critic's clean predictions for the same re-noised ``x0`` (computed without grad). The reverse-KL gradient with
    respect to a sample is ``score_fake - score_real``, which in x0-prediction form is proportional to
    ``fake_x0 - real_x0``; as in DMD2/Self-Forcing it is divided by the per-sample mean ``|x0 - real_x0|`` so its
    scale does not depend on the noise level. ``0.5 * ||x0 - stopgrad(x0 - g)||^2`` then has gradient exactly ``g``
    (up to the mean's 1/numel).
    """
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        normaliser = (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        grad = torch.nan_to_num((fake_x0 - real_x0) / normaliser)
        target = (x0 - grad).detach()
    return 0.5 * torch.nn.functional.mse_loss(x0.float(), target.float(), reduction="mean")


def fkl_loss(v_pred: torch.Tensor, x_ref: torch.Tensor, x_ref_next: torch.Tensor, sigma: torch.Tensor | float,
             sigma_next: torch.Tensor | float) -> torch.Tensor:
    """Eq. 10: the student's velocity at a teacher-trajectory checkpoint should take the single Euler step to the
    next checkpoint: ``|| v - (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i) ||^2``."""
    target = (x_ref_next - x_ref) / (sigma_next - sigma)
    return (v_pred.float() - target.float()).pow(2).mean()
