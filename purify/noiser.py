"""The CT Inversion noiser ``g(x_t, t) -> x_T`` (Hsu, "Consistency Training Inverse", Section 3; spec §8).

A network trained alone (loss kind ``ctinv``, ``purify.bct.CTInversionLoss``) to map an image at any noise level
``t`` to the end ``x_T`` of its probability-flow ODE trajectory in one evaluation: an encoder for the BCM or
any other denoiser of the same data. It is the BCM's U-Net with the report's preconditioning

    g(x_t, t) = c_skip(t) x_t + c_out(t) G(c_in(t) x_t, t),   c_skip(t) = 1,   c_out(t) = T - t,
    c_in(t) = 1 / sqrt(sigma_data^2 + t^2),

so ``g(x_T, T) = x_T`` exactly: the boundary condition sits at T and consistency training propagates it down
to small t. The U-Net's second time input is the target time, always T (``g`` moves ``x_t`` to time T).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .bcm import BCMConfig, c_in, c_noise
from .infra.checkpoint import bcm_weights, load_checkpoint, load_state_dict_strict
from .network import UNet
from .presets import Preset, preset_from_dict

KIND = "noiser"  # the checkpoint kind of a noiser (a BCM's is "bcm")


class Noiser(nn.Module):
    """``g(x_t, t) = x_t + (T - t) G(c_in(t) x_t, c_noise(t), c_noise(T))`` on the [-1, 1] data scale.

    ``t`` is a float or a tensor of shape ``(B,)``; ``g(x, T) = x`` exactly.
    """

    def __init__(self, config: BCMConfig | None = None):
        super().__init__()
        self.config = config or BCMConfig()
        self.net = UNet(self.config.network)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        T = torch.full_like(t, self.config.T)
        out, scale_in = (T - t).view(-1, 1, 1, 1), c_in(t, self.config.sigma_data).view(-1, 1, 1, 1)
        G = self.net((scale_in * x).to(x.dtype), c_noise(t), c_noise(T))
        return (x + out * G.to(x.dtype)).to(x.dtype)


def load_noiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Noiser, Preset]:
    """The noiser of a CT Inversion training checkpoint (its EMA weights) and its preset."""
    state = load_checkpoint(path, ("kind", "config"))
    if state["kind"] != KIND:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not a CT Inversion noiser "
                         f"(train one with python -m purify.train --config cifar10-small-ctinv)")
    preset = preset_from_dict(state["config"], f"{path} config")
    noiser = Noiser(preset.model)
    load_state_dict_strict(noiser, bcm_weights(state, path)[0], str(path))
    return noiser.to(device), preset
