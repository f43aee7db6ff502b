"""The BCM preconditioning around the U-Net (paper Eq. 9-10 and 47/51, spec §2), and the single-time consistency
model a BCM can be fine-tuned from (spec §3, last bullet)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .network import NetworkConfig, UNet, add_u_input


@dataclass
class BCMConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sigma_data: float = 0.5
    eps: float = 0.002   # smallest time; "time 0" as a target is represented by u = eps
    T: float = 80.0


def c_in(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1 / (sigma_data**2 + t**2).sqrt()


def c_out(t: torch.Tensor, u: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data * (t - u) / (sigma_data**2 + t**2).sqrt()


def c_skip(t: torch.Tensor, u: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma_data**2 + t * u) / (sigma_data**2 + t**2)


def c_noise(s: torch.Tensor) -> torch.Tensor:
    """Noise conditioning of both times, as in the authors' code: 250 ln(s)."""
    return 250 * s.log()


class BCM(nn.Module):
    """``f(x_t, t, u) = c_skip(t,u) x_t + c_out(t,u) F(c_in(t) x_t, t, u)`` on the [-1, 1] data scale.

    ``t`` and ``u`` are floats or tensors of shape ``(B,)``; ``f(x, t, t) = x`` exactly.
    """

    time_inputs = 2  # the U-Net's noise levels: t and u

    def __init__(self, config: BCMConfig | None = None):
        super().__init__()
        self.config = config or BCMConfig()
        if self.config.network.time_inputs != self.time_inputs:
            raise ValueError(f"a {type(self).__name__} needs network.time_inputs = {self.time_inputs}, "
                             f"got {self.config.network.time_inputs}")
        self.net = UNet(self.config.network)

    @property
    def sigma_data(self) -> float:
        return self.config.sigma_data

    def _times(self, s, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
        return s.expand(x.shape[0]) if s.ndim == 0 else s

    def forward(self, x: torch.Tensor, t, u) -> torch.Tensor:
        t, u = self._times(t, x), self._times(u, x)
        sd = self.sigma_data
        shape = (-1, 1, 1, 1)
        skip, out, scale_in = c_skip(t, u, sd).view(shape), c_out(t, u, sd).view(shape), c_in(t, sd).view(shape)
        F_x = self.net((scale_in * x).to(x.dtype), *self.noise_levels(t, u))
        return (skip * x + out * F_x.to(x.dtype)).to(x.dtype)

    def noise_levels(self, t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The U-Net's noise conditioning: ``c_noise(t)`` and ``c_noise(u)``."""
        return c_noise(t), c_noise(u)


CONSISTENCY_KIND = "consistency"  # the checkpoint kind of a ConsistencyModel (a BCM's is "bcm")


class ConsistencyModel(BCM):
    """A single-time consistency model ``f(x_t, t) = c_skip(t, eps) x_t + c_out(t, eps) F(c_in(t) x_t, t)``: the
    BCM form at ``u = eps`` (Eq. 9-10) with a U-Net that takes ``t`` only (``network.time_inputs: 1``), the model
    of CT/iCT (loss kind ``ct``) that a BCM can be fine-tuned from (spec §3; ``bcm_weights_from_consistency_model``).

    Its ``c_skip`` is the BCM's at ``u = eps``, not Eq. 25's ``sigma_data^2 / (sigma_data^2 + (t - eps)^2)``
    (``c_skip_ct``; they differ by less than 2e-3), so that the BCM fine-tuned from it starts with its predictions.
    It maps to time eps only: ``forward(x, t, u)`` takes ``u = eps`` (the number), so the CT loss and the
    samplers' maps to time 0 ``f(x, t, eps)`` run on it as on a BCM.
    """

    time_inputs = 1

    def forward(self, x: torch.Tensor, t, u) -> torch.Tensor:
        if not isinstance(u, (int, float)) or u != self.config.eps:
            raise ValueError(f"a consistency model maps to time eps = {self.config.eps} only, got u = {u!r}; "
                             f"fine-tune a BCM from it to reach other times")
        return super().forward(x, t, u)

    def noise_levels(self, t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The U-Net's noise conditioning: ``c_noise(t)`` alone."""
        return (c_noise(t),)


def bcm_weights_from_consistency_model(consistency: BCMConfig, weights: dict, bcm: BCMConfig,
                                       source: str = "the consistency model") -> dict:
    """The weights of a BCM of config ``bcm`` that starts as the consistency model of config ``consistency`` with
    ``weights``: ``f_BCM(x, t, eps) = f_CM(x, t)`` for every ``x`` and ``t`` (spec §3, last bullet). The U-Net
    gains its ``u`` input by ``purify.network.add_u_input``; the configs must agree in everything but
    ``network.time_inputs`` (the preconditioning, e.g. ``eps``, and every layer)."""
    if consistency.network.time_inputs != 1:
        raise ValueError(f"{source} is not a single-time consistency model: its network takes u already")
    expected = dataclasses.replace(consistency, network=dataclasses.replace(consistency.network, time_inputs=2))
    differences = _differences(expected, bcm)
    if differences:
        raise ValueError(f"{source} cannot start this BCM: the configs differ in {'; '.join(differences)}")
    return add_u_input(weights)


def _differences(a, b, prefix: str = "") -> list[str]:
    """The fields in which dataclass configs ``a`` and ``b`` differ, as ``name a_value != b_value``."""
    found = []
    for f in dataclasses.fields(a):
        left, right = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(left):
            found += _differences(left, right, f"{prefix}{f.name}.")
        elif left != right:
            found.append(f"{prefix}{f.name} {left!r} != {right!r}")
    return found


def c_skip_ct(t: torch.Tensor, sigma_data: float, eps: float) -> torch.Tensor:
    """Consistency-model c_skip (paper Eq. 25), for comparison with the BCM form at u = eps."""
    return sigma_data**2 / (sigma_data**2 + (t - eps) ** 2)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


