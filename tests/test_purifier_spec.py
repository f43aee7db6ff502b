"""The purifier and samplers with a BCM whose answer is known (issue 12): for Gaussian data N(mu, s^2 I) the
probability-flow ODE of ``x_t = x + t z`` is ``x_t = mu + r(t)/r(0) (x - mu)`` with ``r(t) = sqrt(s^2 + t^2)``,
so the exact BCM is ``f(x, t, u) = mu + r(u)/r(t) (x - mu)``. We build it as a real ``BCM`` whose U-Net is
replaced by the ``F`` that makes the preconditioned output exact, so the preconditioning, the [0, 1] <-> [-1, 1]
mapping, the inversion and the one-step generation are all exercised with a non-trivial network."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_network
from purify import BCMPurifier
from purify.bcm import BCM, BCMConfig
from purify.sampling import invert, sample_ancestral, sample_zigzag

EPS, SD = 0.002, 0.5
MU_SEED, S = 0, 0.3


class ExactGaussianF(nn.Module):
    """``F(c_in(t) x, 250 ln t, 250 ln u)`` such that ``c_skip x + c_out F = mu + r(u)/r(t) (x - mu)``."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu, self.s = mu.double(), s

    def forward(self, y, noise_t, noise_u):
        t, u = (noise_t.double() / 250).exp().view(-1, 1, 1, 1), (noise_u.double() / 250).exp().view(-1, 1, 1, 1)
        x = y.double() * (SD**2 + t**2).sqrt()
        exact = self.mu + ((self.s**2 + u**2) / (self.s**2 + t**2)).sqrt() * (x - self.mu)
        skip, out = (SD**2 + t * u) / (SD**2 + t**2), SD * (t - u) / (SD**2 + t**2).sqrt()
        return ((exact - skip * x) / out).to(y.dtype)


def r(t: float) -> float:
    return math.sqrt(S**2 + t**2)


@pytest.fixture
def mu():
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(MU_SEED)) * 1.2 - 0.6


@pytest.fixture
def exact_bcm(mu):
    bcm = BCM(BCMConfig(network=tiny_network()))
    bcm.net = ExactGaussianF(mu, S)
    return bcm.eval()


@pytest.fixture
def images():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x[0, 0, :2] = 1.0   # saturated pixels: the purified image must be clamped back into [0, 1]
    x[0, 1, :2] = 0.0
    return x


def seeded_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_exact_bcm_is_the_pf_ode_map(exact_bcm, mu):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for t, u in [(0.11, 80.0), (80.0, EPS), (1.5, 0.3), (0.3, 6.0)]:
        torch.testing.assert_close(exact_bcm(x, t, u), mu + r(u) / r(t) * (x - mu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings, eps_inv", [
    (dict(), 0.11),                                                     # the paper's default, t* = 80
    (dict(t_star=10.0, inversion_times=[1.5, 6.0], denoise_times=[1.2]), 0.11),   # multi-step, same flow
    (dict(t_star=0.1), 0.05),                                           # eps_inv capped at t*/2
    (dict(t_star=1.0, eps_inv=0.07), 0.07),
])
def test_purifier_returns_the_exact_pf_ode_answer(exact_bcm, mu, images, settings, eps_inv):
    """Invert ``x + eps_inv z`` to t*, generate back to eps: ``mu + r(eps)/r(eps_inv) (x + eps_inv z - mu)``
    on [-1, 1], mapped back to [0, 1] and clamped; its gradient to the input is the same factor, also where the
    output saturates (the clamp passes gradients straight through)."""
    purifier = BCMPurifier(exact_bcm, seed=7, **settings)
    assert purifier.inversion_times[0] == pytest.approx(eps_inv)
    x = images.clone().requires_grad_(True)
    out = purifier(x)
    z = seeded_noise(images.shape, 7)
    y = mu + r(EPS) / r(eps_inv) * (images * 2 - 1 + eps_inv * z - mu)
    expected = ((y + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)
    assert out.min() == 0 and out.max() == 1 and ((y < -1) | (y > 1)).any()  # the clamp was exercised
    # nearly its input: the exact purifier moves an image by its initial noise, shrunk toward mu
    assert (out - images).abs().max() < 5 * eps_inv + (1 - r(EPS) / r(eps_inv)) * 2
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x.grad, r(EPS) / r(eps_inv)), rtol=1e-3, atol=0)


def test_denoise_mode_is_one_step_from_x_plus_t_star_z(exact_bcm, mu, images):
    out = BCMPurifier(exact_bcm, t_star=0.5, mode="denoise", seed=3)(images)
    y = mu + r(EPS) / r(0.5) * (images * 2 - 1 + 0.5 * seeded_noise(images.shape, 3) - mu)
    torch.testing.assert_close(out, ((y + 1) / 2).clamp(0, 1), rtol=1e-4, atol=2e-5)


def test_samplers_follow_the_exact_flow(exact_bcm, mu):
    """Ancestral sampling composes to one jump T -> eps; inversion adds t_1 z then flows up; zigzag
    (Alg. 4) re-noises with e z_fresh between jumps."""
    x_T = 80 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample_ancestral(exact_bcm, x_T, (0.3, 1.2, 80.0), eps=EPS),
                               mu + r(EPS) / r(80) * (x_T - mu), rtol=1e-4, atol=1e-4)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = seeded_noise(x0.shape, 4)
    torch.testing.assert_close(invert(exact_bcm, x0, (0.07, 1.5, 80.0), noise=z),
                               mu + r(80) / r(0.07) * (x0 + 0.07 * z - mu), rtol=1e-4, atol=1e-3)
    g = torch.Generator().manual_seed(6)
    got = sample_zigzag(exact_bcm, x_T, times=(0.8, 80.0), noise_scales=(0.2,), eps=EPS, generator=g)
    fresh = seeded_noise(x_T.shape, 6)
    x0 = mu + r(EPS) / r(80) * (x_T - mu)
    x = mu + r(0.8) / r(0.2) * (x0 + 0.2 * fresh - mu)
    torch.testing.assert_close(got, mu + r(EPS) / r(0.8) * (x - mu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("times", [(0.07, 80.0), (0.07, 1.5, 6.0, 80.0)])
def test_reconstruct_inverts_then_generates_from_the_last_time(exact_bcm, mu, times):
    """Section 4.2: invert along ``times`` (Alg. 5), then one step f(x_T, T, 0) from the *last* time, clamped to
    [-1, 1]; with the exact BCM that is mu + r(eps)/r(t_1) (x0 + t_1 z - mu), and the MSE is per dimension on
    the [0, 1] scale."""
    from purify.sampling import reconstruct, reconstruction_mse

    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x0[0, 0, :2], x0[0, 1, :2] = 1.0, -1.0     # saturated pixels: the clamp must be exercised
    z = seeded_noise(x0.shape, 4)
    y = mu + r(EPS) / r(times[0]) * (x0 + times[0] * z - mu)
    assert ((y < -1) | (y > 1)).any()
    got = reconstruct(exact_bcm, x0, times, eps=EPS, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, y.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    mse = reconstruction_mse(exact_bcm, x0, times, eps=EPS, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mse, ((y.clamp(-1, 1) - x0) / 2).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["bcm", "denoise"])
def test_a_t_star_drawn_per_image_is_log_uniform_and_purifies_each_image_at_its_own(exact_bcm, mu, images, mode):
    """``t_star_max``: image i's t* is ``t_star (t_star_max / t_star) ** Phi(zeta_i)`` with zeta_i the last value
    of its noise: 0.1 (zeta -9), the geometric mean 0.2 (zeta 0), 0.4 (zeta 9), 0.1 * 4 ** 0.25 (zeta at the first
    quartile). The exact purifier then gives ``mu + r(eps)/r(e_i) (x + e_i z - mu)`` with e_i = min(eps_inv, t_i/2)
    (the inversion's start, capped per image) in ``bcm`` mode and e_i = t_i in ``denoise`` mode."""
    purifier = BCMPurifier(exact_bcm, t_star=0.1, t_star_max=0.4, eps_inv=0.11, mode=mode)
    assert purifier.noise_shape((3, 8, 8)) == (3 * 8 * 8 + 1,) and purifier.nfe == (2 if mode == "bcm" else 1)
    # the spec names the eps_inv asked for, capped per image (at the lowest t* it would read 0.05)
    assert purifier.spec() == ("bcm(eps_inv=0.11, t_star=0.1, t_star_max=0.4)" if mode == "bcm"
                               else "denoise(t_star=0.1, t_star_max=0.4)")
    z = seeded_noise(images.shape, 11)
    zeta = torch.tensor([-9.0, 0.0, 9.0, -0.6744897501960817])
    t = torch.tensor([0.1, 0.2, 0.4, 0.1 * 4 ** 0.25])
    torch.testing.assert_close(purifier.sampled_t_star(zeta), t, rtol=1e-6, atol=1e-7)
    with purifier.fixed_noise(torch.cat([z.flatten(1), zeta[:, None]], 1)):
        out = purifier(images)
    e = (t / 2).clamp(max=0.11) if mode == "bcm" else t
    e = e.view(-1, 1, 1, 1).double()
    y = mu + torch.tensor([r(EPS)]).double() / (S**2 + e**2).sqrt() * (images * 2 - 1 + e * z - mu)
    torch.testing.assert_close(out, ((y + 1) / 2).clamp(0, 1).float(), rtol=1e-4, atol=2e-5)
    assert BCMPurifier(exact_bcm, t_star=0.1, t_star_max=0.4, rounds=2).noise_shape((3, 8, 8)) == (2, 193)
    with pytest.raises(ValueError, match="t_star_max must be in"):
        BCMPurifier(exact_bcm, t_star=0.4, t_star_max=0.4)
    with pytest.raises(ValueError, match="one-step"):
        BCMPurifier(exact_bcm, t_star=0.4, t_star_max=1.0, denoise_times=[0.2])
