"""The BCM preconditioning around the U-Net (paper Eq. 9-10 and 47/51, spec §2)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .network import NetworkConfig, UNet


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

    def __init__(self, config: BCMConfig | None = None):
        super().__init__()
        self.config = config or BCMConfig()
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
        skip, out, cin = c_skip(t, u, sd).view(shape), c_out(t, u, sd).view(shape), c_in(t, sd).view(shape)
        F_x = self.net((cin * x).to(x.dtype), c_noise(t), c_noise(u))
        return (skip * x + out * F_x.to(x.dtype)).to(x.dtype)


def c_skip_ct(t: torch.Tensor, sigma_data: float, eps: float) -> torch.Tensor:
    """Consistency-model c_skip (paper Eq. 25), for comparison with the BCM form at u = eps."""
    return sigma_data**2 / (sigma_data**2 + (t - eps) ** 2)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


