"""Samplers and inversion: NFE counts and call sequences of Algorithms 2-5, and the probability-flow ODE solvers."""
import math

import pytest
import torch

from purify.bct import karras_times
from purify.sampling import (ANCESTRAL_2, COMBINED_4, INVERSION_SCHEDULES, ZIGZAG_3, initial_noise, invert,
                             invert_ode, ode_times, pf_ode_nfe, reconstruction_mse, sample_ancestral, sample_combined,
                             sample_ode, sample_onestep, sample_zigzag, solve_pf_ode)


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


# ------------------------------------------------------------------------------ probability-flow ODE solvers

def linear_denoiser(c: float):
    """``D(x, t) = c x`` as the model's u = 0 branch: the ODE ``dx/dt = (1 - c) x / t``, solved by
    ``x(s) = x(t) (s/t)^(1-c)``."""
    return lambda x, t, u: c * x


def test_ode_grid_is_edms_karras_grid_with_exact_ends():
    times = ode_times(5, 0.07, 80.0)
    assert len(times) == 6 and times[0] == 0.07 and times[-1] == 80.0
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64), karras_times(6, 0.07, 80.0, 7.0))
    for bad in [(0, 0.07, 80.0), (5, 0.0, 80.0), (5, 80.0, 0.07)]:
        with pytest.raises(ValueError, match="ODE grid"):
            ode_times(*bad)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_zero_denoiser_scales_the_state_by_the_time_ratio_exactly(solver):
    """D = 0: dx/dt = x / t, so x(T) = x(t_1) T / t_1. Euler's product prod(1 + h_i / t_i) = prod(t_{i+1} / t_i)
    telescopes to the same ratio, and Heun's two slopes agree, so both are exact, up and down."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    times = ode_times(7, 0.07, 80.0)
    up = invert_ode(linear_denoiser(0.0), x, times, solver)
    torch.testing.assert_close(up, x * 80.0 / 0.07, rtol=1e-12, atol=0)
    torch.testing.assert_close(sample_ode(linear_denoiser(0.0), up, times, solver), x, rtol=1e-12, atol=0)


def test_euler_and_heun_steps_equal_their_hand_computed_products():
    """D = x / 2: dx/dt = x / (2t). Euler: x_{i+1} = x_i (1 + h_i / (2 t_i)); Heun: x_{i+1} = x_i (1 + h_i / 4
    (1 / t_i + (1 + h_i / (2 t_i)) / t_{i+1})); the exact solution is x_1 sqrt(T / t_1), and Heun is closer even
    on 4 steps this coarse."""
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    times = ode_times(4, 0.07, 80.0)
    euler = heun = 1.0
    for t, s in zip(times, times[1:]):
        h = s - t
        euler *= 1 + h / (2 * t)
        heun *= 1 + h / 4 * (1 / t + (1 + h / (2 * t)) / s)
    model = linear_denoiser(0.5)
    got_euler, got_heun = (invert_ode(model, x, times, solver).item() for solver in ("euler", "heun"))
    assert got_euler == pytest.approx(euler, rel=1e-12) and got_heun == pytest.approx(heun, rel=1e-12)
    exact = math.sqrt(80.0 / 0.07)
    assert abs(got_heun - exact) < abs(got_euler - exact)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solvers_converge_at_their_order(solver, order):
    """On a smooth problem (D = x / 2, up from 0.07 to 80) doubling the steps divides the error by about 2^order."""
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = math.sqrt(80.0 / 0.07)
    errors = [abs(invert_ode(linear_denoiser(0.5), x, ode_times(n, 0.07, 80.0), solver).item() - exact)
              for n in (40, 80)]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.15)


def test_ode_call_sequences_and_nfe():
    """Euler: one call per step at its start; Heun: at the start and at the end of each step; a Heun step that
    ends at t = 0 keeps its Euler step (EDM): 1 call. Every call is D(x, t) = f(x, t, eps)."""
    times = [0.07, 1.0, 80.0]
    for solver, up, down in [("euler", [0.07, 1.0], [80.0, 1.0]),
                             ("heun", [0.07, 1.0, 1.0, 80.0], [80.0, 1.0, 1.0, 0.07])]:
        for run, want in [(invert_ode, up), (sample_ode, down)]:
            rec = Recorder(lambda x, t, u: x / 2)
            run(rec, torch.ones(1, 3, 2, 2), times, solver)
            assert rec.calls == [(t, 0.002) for t in want], (solver, run.__name__)
            assert len(rec.calls) == pf_ode_nfe(times, solver)
    rec = Recorder(lambda x, t, u: x / 2)
    sample_ode(rec, torch.ones(1, 3, 2, 2), [0.0, 0.07, 1.0, 80.0], "heun")
    assert rec.calls == [(t, 0.002) for t in (80.0, 1.0, 1.0, 0.07, 0.07)]
    assert pf_ode_nfe([80.0, 1.0, 0.07, 0.0], "heun") == 5 and pf_ode_nfe(ode_times(9, 0.07), "euler") == 9
    assert pf_ode_nfe(ode_times(10, 0.07), "heun") == 20


def test_ode_up_then_down_returns_the_image_on_the_tiny_bcm(tiny_bcm):
    """The ODE is reversible: up and back down on the same grid comes back near the image (on [-1, 1]), Heun (2nd
    order) far nearer than Euler (measured max errors 0.06 and 0.55 on this random network)."""
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    times = ode_times(20, 0.07, 80.0)
    with torch.no_grad():
        errors = {solver: (sample_ode(tiny_bcm, invert_ode(tiny_bcm, x0, times, solver), times, solver) - x0)
                  .abs().max().item() for solver in ("euler", "heun")}
    assert errors["heun"] < 0.2 * errors["euler"] and errors["heun"] < 0.1, errors


def test_bad_ode_inputs_are_rejected():
    model, x = linear_denoiser(0.5), torch.ones(1, 1, 1, 1)
    with pytest.raises(ValueError, match="solver"):
        invert_ode(model, x, [0.07, 80.0], "rk4")
    with pytest.raises(ValueError, match="monotonic"):
        solve_pf_ode(model, x, [0.07, 1.0, 0.5])
    with pytest.raises(ValueError, match="positive"):
        solve_pf_ode(model, x, [0.0, 1.0])
    with pytest.raises(ValueError, match="increasing"):
        invert_ode(model, x, [80.0, 0.07])
