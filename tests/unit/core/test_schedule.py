import pytest
import torch

from hiar.core import schedule as S


def test_shift_endpoints_and_monotone():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0, 8.0):
        s = S.shift_sigma(t, shift)
        assert s[0] == 0.0 and s[-1] == 1.0
        assert (s[1:] > s[:-1]).all()
    # shift > 1 pushes the grid towards high noise
    assert S.shift_sigma(0.5, 5.0) > 0.5


def test_warped_student_schedule_matches_public_configs():
    sig = S.student_sigmas([1000, 750, 500, 250], shift=5.0, warp=True)
    expected = torch.tensor([1.0, 0.9375, 2.5 / 3.0, 0.625, 0.0], dtype=torch.float64)
    assert torch.allclose(sig, expected, atol=1e-12)
    assert torch.allclose(S.sigma_to_timestep(sig[:-1]), torch.tensor([1000.0, 937.5, 833.3333333, 625.0], dtype=torch.float64))
    plain = S.student_sigmas([1000, 750, 500, 250], warp=False)
    assert torch.allclose(plain, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="decreasing"):
        S.student_sigmas([500, 750])
    with pytest.raises(ValueError, match=r"\(0, 1000\]"):
        S.student_sigmas([1200, 500])
    with pytest.raises(ValueError, match="shift"):
        S.shift_sigma(0.5, 0.0)


def test_teacher_grid():
    sig = S.teacher_sigmas(48, 8.0)
    assert sig.numel() == 49 and sig[0] == 1.0 and sig[-1] == 0.0
    assert (sig[1:] < sig[:-1]).all()


def test_noise_velocity_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    for sigma in (0.1, 0.5, 0.93):
        xt = S.add_noise(x0, eps, sigma)
        v = S.velocity_target(x0, eps)
        assert torch.allclose(S.x0_from_velocity(xt, v, sigma), x0, atol=1e-12)
        assert torch.allclose(S.velocity_from_x0(xt, x0, sigma), v, atol=1e-12)


def test_euler_on_linear_flow_recovers_x0_exactly():
    """For a point-mass data distribution the flow is linear: v(x, s) = (x - x0) / s. Euler is exact on it."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for sigmas in (S.student_sigmas(), S.teacher_sigmas(48, 8.0), S.student_sigmas([1000, 400], warp=False)):
        x = torch.randn(4, 6, generator=g, dtype=torch.float64)  # pure noise at sigma = 1
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = S.euler_step(x, (x - x0) / s, s, s_next)
        assert torch.allclose(x, x0, atol=1e-12, rtol=0)
