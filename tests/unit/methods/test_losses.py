"""Loss maths against closed forms: DMD's gradient on Gaussians, eq. 10 on a hand-made trajectory."""

import torch

from hiar.methods.losses import dmd_generator_loss, fkl_loss


def gaussian_x0_prediction(x_t: torch.Tensor, sigma: float, mean: float, std: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, std^2), x_t = (1 - sigma) x0 + sigma eps (a closed form)."""
    a = 1.0 - sigma
    var_t = a * a * std * std + sigma * sigma
    return mean + a * std * std / var_t * (x_t - a * mean)


def test_dmd_gradient_follows_the_reverse_kl_direction():
    """Generator N(mu_f, s^2) vs data N(mu_r, s^2): d KL(q||p) / d mu_f = (mu_f - mu_r) / s^2. The DMD gradient on
    the samples must point the same way, and per sample be exactly the normalised score difference."""
    g = torch.Generator().manual_seed(0)
    std, mu_r = 0.5, 0.0
    for mu_f in (1.0, 0.5, -0.5):
        x0 = (mu_f + std * torch.randn(4096, 1, generator=g)).requires_grad_(True)
        sigma = 0.6
        x_t = (1 - sigma) * x0.detach() + sigma * torch.randn(x0.shape, generator=g)
        real = gaussian_x0_prediction(x_t, sigma, mu_r, std)
        fake = gaussian_x0_prediction(x_t, sigma, mu_f, std)
        dmd_generator_loss(x0, real, fake).backward()
        mean_grad = x0.grad.mean().item()
        assert mean_grad * (mu_f - mu_r) > 0  # descent moves the samples towards the data mean
        normaliser = (x0.detach() - real).abs().mean(dim=1, keepdim=True)
        expected = (fake - real) / normaliser / x0.numel()  # d/dx0 of 0.5 * mean((x0 - target)^2)
        assert torch.allclose(x0.grad, expected, atol=1e-9)


def test_dmd_gradient_vanishes_when_fake_equals_real():
    x0 = torch.randn(8, 3, requires_grad=True)
    real = torch.randn(8, 3)
    dmd_generator_loss(x0, real, real.clone()).backward()
    assert x0.grad.abs().max() == 0


def test_fkl_target_is_the_euler_step_between_checkpoints():
    g = torch.Generator().manual_seed(1)
    x_i, x_next = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    s, s_next = 0.9375, 0.8333
    exact_v = (x_next - x_i) / (s_next - s)
    assert fkl_loss(exact_v, x_i, x_next, s, s_next) < 1e-12
    # one Euler step with the exact v lands on the next checkpoint
    assert torch.allclose(x_i + exact_v * (s_next - s), x_next, atol=1e-6)
    assert torch.isclose(fkl_loss(exact_v + 1.0, x_i, x_next, s, s_next), torch.tensor(1.0))
