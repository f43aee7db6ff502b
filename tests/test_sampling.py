"""Samplers and inversion: NFE counts and call sequences of Algorithms 2-5."""
import pytest
import torch

from purify.sampling import (ANCESTRAL_2, COMBINED_4, INVERSION_SCHEDULES, ZIGZAG_3, initial_noise, invert,
                             reconstruction_mse, sample_ancestral, sample_combined, sample_onestep, sample_zigzag)


class Recorder:
    """Counts network evaluations and records their (t, u) pairs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, u):
        self.calls.append((round(float(t), 6), round(float(u), 6)))
        return self.model(x, t, u)


@pytest.fixture
def rec(tiny_bcm):
    return Recorder(tiny_bcm)


def test_onestep_is_one_nfe(rec):
    x = sample_onestep(rec, initial_noise((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)))
    assert rec.calls == [(80.0, 0.002)] and x.shape == (2, 3, 32, 32)


def test_ancestral_two_steps(rec):
    sample_ancestral(rec, 80 * torch.randn(2, 3, 32, 32), **ANCESTRAL_2)
    assert rec.calls == [(80.0, 1.2), (1.2, 0.002)]


def test_zigzag_three_nfe(rec):
    sample_zigzag(rec, 80 * torch.randn(2, 3, 32, 32), **ZIGZAG_3)
    assert rec.calls == [(80.0, 0.002), (0.2, 0.8), (0.8, 0.002)]


def test_combined_four_nfe(rec):
    sample_combined(rec, 80 * torch.randn(2, 3, 32, 32), **COMBINED_4)
    assert rec.calls == [(80.0, 1.2), (1.2, 0.002), (0.1, 0.3), (0.3, 0.002)]


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_inversion_nfe_and_direction(rec, nfe):
    times = INVERSION_SCHEDULES[nfe]
    invert(rec, torch.rand(2, 3, 32, 32) * 2 - 1, times, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == nfe
    assert all(u > t for t, u in rec.calls)  # inversion only adds noise
    assert rec.calls[-1][1] == 80.0


def test_inversion_of_an_identity_model_adds_only_the_initial_noise():
    """With f(x, t, u) = x, inversion returns x0 + t_1 z: the scheme adds exactly the first noise."""
    x0, z = torch.rand(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    out = invert(lambda x, t, u: x, x0, (0.07, 6.0, 80.0), noise=z)
    assert torch.allclose(out, x0 + 0.07 * z)


def test_reconstruction_mse_is_per_dimension_on_the_unit_scale():
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    # A model that returns zeros: the error is ((0 - x0) / 2)^2 per dimension.
    mse = reconstruction_mse(lambda x, t, u: torch.zeros_like(x), x0, (0.07, 80.0))
    assert torch.allclose(mse, (x0 / 2).pow(2).flatten(1).mean(1))


def test_seeded_generator_makes_sampling_reproducible(tiny_bcm):
    a = sample_zigzag(tiny_bcm, 80 * torch.ones(1, 3, 32, 32), **ZIGZAG_3, generator=torch.Generator().manual_seed(5))
    b = sample_zigzag(tiny_bcm, 80 * torch.ones(1, 3, 32, 32), **ZIGZAG_3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_schedules_are_rejected(tiny_bcm):
    with pytest.raises(ValueError, match="increasing"):
        invert(tiny_bcm, torch.zeros(1, 3, 32, 32), (6.0, 0.07))
    with pytest.raises(ValueError, match="noise scales"):
        sample_zigzag(tiny_bcm, torch.zeros(1, 3, 32, 32), times=(0.8, 80.0), noise_scales=())


def test_initial_noise_is_T_times_a_standard_normal():
    """x_T ~ N(0, T^2 I) (spec §4): exactly T times the generator's standard normal draw, T = 80 by default."""
    shape = (2, 3, 4, 4)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(initial_noise(shape, generator=torch.Generator().manual_seed(0)), 80.0 * want)
    torch.testing.assert_close(initial_noise(shape, T=2.5, generator=torch.Generator().manual_seed(0)), 2.5 * want)
