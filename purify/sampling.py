"""Sampling and inversion with a BCM (paper Algorithms 2-5, spec §4-5), and the probability-flow ODE solvers of
the baselines that use the same network as a denoiser (spec §10).

Every function takes the model ``f(x, t, u)`` first and works on the [-1, 1] data scale. "Time 0" as a
target is represented by ``eps`` (the model's smallest time). Noise comes from ``generator`` when given.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .bct import karras_times

Model = Callable[[torch.Tensor, float, float], torch.Tensor]

EPS = 0.002
T_MAX = 80.0

# Appendix A.2 (generation) and Section 4.2 / A.3 (inversion) settings, keyed by NFE.
ANCESTRAL_2 = dict(times=(1.2, 80.0))
ZIGZAG_3 = dict(times=(0.8, 80.0), noise_scales=(0.2,))
COMBINED_4 = dict(times=(1.2, 80.0), taus=(0.3, 1.2), noise_scales=(0.1,))
INVERSION_SCHEDULES = {
    1: (0.07, 80.0),
    2: (0.07, 6.0, 80.0),
    3: (0.07, 1.5, 6.0, 80.0),
    4: (0.07, 1.5, 4.0, 10.0, 80.0),
}


def standard_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped and typed like ``like``, drawn on ``generator``'s device, put on ``like``'s."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype,
                    device=generator.device if generator is not None else like.device)
    return z.to(like.device)


def increasing(times: Sequence[float], what: str) -> list[float]:
    """``times`` as floats, or a ``ValueError`` naming ``what`` unless they strictly increase."""
    times = [float(t) for t in times]
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"{what} must be strictly increasing, got {times}")
    return times


def initial_noise(shape, T: float = T_MAX, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """``x_T ~ N(0, T^2 I)``."""
    return T * torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)


def sample_onestep(model: Model, x_T: torch.Tensor, T: float = T_MAX, eps: float = EPS) -> torch.Tensor:
    """One-step generation: ``x = f(x_T, T, 0)`` (1 NFE)."""
    return model(x_T, T, eps)


def sample_ancestral(model: Model, x_T: torch.Tensor, times: Sequence[float], eps: float = EPS) -> torch.Tensor:
    """Algorithm 3: times ``t_1 < ... < t_N = T``; ``x_{t_{n-1}} = f(x_{t_n}, t_n, t_{n-1})`` with t_0 = 0.

    NFE = N.
    """
    times = [eps] + increasing(times, "times")
    x = x_T
    for n in range(len(times) - 1, 0, -1):
        x = model(x, times[n], times[n - 1])
    return x


def sample_zigzag(model: Model, x_T: torch.Tensor, times: Sequence[float], noise_scales: Sequence[float],
                  eps: float = EPS, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 4: times ``t_1 < ... < t_N = T``, small noise scales ``e_1 .. e_{N-1}``.

    For n = N..2: ``x0 = f(x_{t_n}, t_n, 0)``, ``x_e = x0 + e_{n-1} z``, ``x_{t_{n-1}} = f(x_e, e_{n-1}, t_{n-1})``;
    finally ``x = f(x_{t_1}, t_1, 0)``. NFE = 2N - 1.
    """
    times = increasing(times, "times")
    if len(noise_scales) != len(times) - 1:
        raise ValueError(f"zigzag needs {len(times) - 1} noise scales for {len(times)} times, got {noise_scales}")
    x = x_T
    for n in range(len(times) - 1, 0, -1):
        x0 = model(x, times[n], eps)
        e = float(noise_scales[n - 1])
        x = model(x0 + e * standard_noise(x0, generator), e, times[n - 1])
    return model(x, times[0], eps)


def sample_combined(model: Model, x_T: torch.Tensor, times: Sequence[float], taus: Sequence[float],
                    noise_scales: Sequence[float], eps: float = EPS,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 2: ancestral steps along ``t_1 < ... < t_N = T`` down to ``t_1``, then zigzag on
    ``tau_1 < ... < tau_M = t_1`` with noise scales ``e_1 .. e_{M-1}``. NFE = (N - 1) + (2M - 1).
    """
    times, taus = increasing(times, "times"), increasing(taus, "taus")
    if taus[-1] != times[0]:
        raise ValueError(f"the zigzag part must end where the ancestral part stops: tau_M={taus[-1]} != t_1={times[0]}")
    x = x_T
    for n in range(len(times) - 1, 0, -1):
        x = model(x, times[n], times[n - 1])
    return sample_zigzag(model, x, taus, noise_scales, eps=eps, generator=generator)


def invert(model: Model, x0: torch.Tensor, times: Sequence[float],
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 5: ``x_{t_1} = x_0 + t_1 z``, then ``x_{t_{n+1}} = f(x_{t_n}, t_n, t_{n+1})``. NFE = N - 1."""
    times = increasing(times, "inversion times")
    z = standard_noise(x0, generator) if noise is None else noise
    x = x0 + times[0] * z
    for n in range(len(times) - 1):
        x = model(x, times[n], times[n + 1])
    return x


def sample_reverse_diffusion(model: Model, x_t: torch.Tensor, times: Sequence[float], solver: str = "sde",
                             noise: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """Integrate the diffusion back from ``x_t`` at ``times[0]`` along ``t_0 > t_1 > ... > t_{N-1} > t_N = 0``
    with the BCM's ``u = 0`` branch as the denoiser ``D(x, t) = f(x, t, 0)`` (DiffPure's purification, with the
    same network). NFE = N.

    - ``"sde"``: ancestral sampling of the VE reverse SDE, the Gaussian posterior of ``x_s`` given ``x_t`` and
      ``x_0 = D``: ``x_s = D + (s/t)^2 (x_t - D) + (s/t) sqrt(t^2 - s^2) z``, with ``z = noise[:, i]`` (i >= 1);
    - ``"ode"``: Euler steps of the probability-flow ODE ``dx/dt = (x - D)/t``: ``x_s = D + (s/t) (x_t - D)``.
    """
    times = [float(t) for t in times]
    if any(b >= a for a, b in zip(times, times[1:])) or times[-1] != 0:
        raise ValueError(f"reverse-diffusion times must decrease strictly to 0, got {times}")
    x = x_t
    for i, (t, s) in enumerate(zip(times, times[1:])):
        d = model(x, t, eps)
        if solver == "ode":
            x = d + (s / t) * (x - d)
        elif solver == "sde":
            z = torch.zeros_like(x) if s == 0 else noise[:, i + 1] if noise is not None else torch.randn_like(x)
            x = d + (s / t) ** 2 * (x - d) + (s / t) * math.sqrt(t * t - s * s) * z
        else:
            raise ValueError(f"solver must be 'sde' or 'ode', got {solver!r}")
    return x


def reconstruct(model: Model, x0: torch.Tensor, times: Sequence[float], eps: float = EPS,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Invert ``x0`` along ``times`` (Algorithm 5), then generate back in one step ``f(x_T, T, 0)``."""
    x_T = invert(model, x0, times, generator=generator)
    return model(x_T, float(times[-1]), eps).clamp(-1, 1)


def reconstruction_mse(model: Model, x0: torch.Tensor, times: Sequence[float], eps: float = EPS,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image MSE per dimension on the [0, 1] scale of invert-then-one-step-generate (Section 4.2)."""
    return ((reconstruct(model, x0, times, eps, generator) - x0) / 2).pow(2).flatten(1).mean(1)


# ------------------------------------------------------------------ probability-flow ODE with the same network

ODE_SOLVERS = ("euler", "heun")


def ode_times(steps: int, t_min: float, t_max: float = T_MAX, rho: float = 7.0) -> list[float]:
    """EDM's time grid (Karras et al. 2022, Eq. 5; the paper's Eq. 22), increasing: ``steps + 1`` times from
    ``t_min`` to ``t_max`` spaced uniformly in ``t^(1/rho)``, with both ends exact."""
    if steps < 1:
        raise ValueError(f"an ODE grid needs at least 1 step, got {steps}")
    if not 0 < t_min < t_max:
        raise ValueError(f"an ODE grid needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
    times = karras_times(steps + 1, t_min, t_max, rho).tolist()
    return [float(t_min), *times[1:-1], float(t_max)]


def pf_ode_nfe(times: Sequence[float], solver: str) -> int:
    """Network evaluations of ``solve_pf_ode`` along ``times``: 1 per Euler step, 2 per Heun step, 1 for a Heun
    step that ends at t = 0 (EDM skips its correction there)."""
    steps = len(times) - 1
    return steps if solver == "euler" else 2 * steps - sum(float(t) == 0 for t in times[1:])


def solve_pf_ode(model: Model, x: torch.Tensor, times: Sequence[float], solver: str = "heun",
                 eps: float = EPS) -> torch.Tensor:
    """Integrate the probability-flow ODE ``dx/dt = (x - D(x, t)) / t`` from ``times[0]`` to ``times[-1]``, up
    (inversion) or down (generation), with the BCM's ``u = 0`` branch as the denoiser ``D(x, t) = f(x, t, eps)``
    (spec §10; EDM's Algorithm 1, Karras et al. 2022). Each step ``t_i -> t_{i+1}``, ``h = t_{i+1} - t_i``,
    ``d_i = (x_i - D(x_i, t_i)) / t_i``:

    - ``"euler"``: ``x_{i+1} = x_i + h d_i``;
    - ``"heun"``: ``x' = x_i + h d_i``, then ``x_{i+1} = x_i + h (d_i + d') / 2`` with
      ``d' = (x' - D(x', t_{i+1})) / t_{i+1}``, except on a step that ends at ``t = 0``, which keeps the Euler
      step (EDM's line 7).

    ``times`` is strictly monotonic and non-negative; only the last time may be 0. NFE: ``pf_ode_nfe``.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"ODE solver must be one of {ODE_SOLVERS}, got {solver!r}")
    times = [float(t) for t in times]
    steps = list(zip(times, times[1:]))
    if not steps or any(t == s for t, s in steps) or len({t < s for t, s in steps}) > 1:
        raise ValueError(f"ODE times must be strictly monotonic with at least two of them, got {times}")
    if min(times[:-1]) <= 0 or times[-1] < 0:
        raise ValueError(f"ODE times must be positive (only the last may be 0), got {times}")

    def slope(x: torch.Tensor, t: float) -> torch.Tensor:
        return (x - model(x, t, eps)) / t

    for t, s in steps:
        d = slope(x, t)
        x_next = x + (s - t) * d
        if solver == "heun" and s != 0:
            x_next = x + (s - t) * (d + slope(x_next, s)) / 2
        x = x_next
    return x


def invert_ode(model: Model, x0: torch.Tensor, times: Sequence[float], solver: str = "heun",
               eps: float = EPS) -> torch.Tensor:
    """ODE inversion (DDIM / EDM inversion, the ODE baseline of the paper's Figure 4): the image is the
    trajectory's point at ``t_1 = times[0]`` (deterministic: ``x(t_1) = x0``, no noise is added), then the PF ODE
    is integrated up along the increasing ``times`` to ``x(t_N)`` (``solve_pf_ode``)."""
    return solve_pf_ode(model, x0, increasing(times, "ODE inversion times"), solver, eps)


def sample_ode(model: Model, x_T: torch.Tensor, times: Sequence[float], solver: str = "heun",
               eps: float = EPS) -> torch.Tensor:
    """ODE generation: integrate the PF ODE down from ``x_T`` at ``t_N`` along the increasing ``times``
    ``t_1 < ... < t_N`` read backwards, to ``x(t_1)`` (``t_1 = 0`` is EDM's last Euler step; ``solve_pf_ode``).
    With the inversion's times it is the inversion's mirror: ``sample_ode(invert_ode(x0, times), times) ~ x0``."""
    return solve_pf_ode(model, x_T, increasing(times, "ODE generation times")[::-1], solver, eps)
