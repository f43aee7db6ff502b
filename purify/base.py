"""The interface every defence shares: an ``nn.Module`` from images in [0, 1] to images in [0, 1].

A defence declares what an evaluation needs to know about it: its name and full settings (``spec()``, the key
of every result row), its cost in network evaluations per image (``nfe``), whether gradients through it are
exact (``differentiable``; if not, attacks use BPDA) and whether it draws noise (``randomized``; then
``noise_shape`` is the noise it needs per image and ``with defence.fixed_noise(z)`` supplies it, so results do
not depend on batching; ``with defence.noise_stream(ids, seed)`` draws fresh noise per call, per image, for
attacks).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


class Defence(nn.Module):
    """Base class: subclasses set ``name`` and implement ``purify``; ``forward`` checks the input first."""

    name = "none"
    differentiable = True
    randomized = False

    @property
    def nfe(self) -> int:
        """Network evaluations per image (0 for input transformations)."""
        return 0

    def settings(self) -> dict:
        """The options that define this defence (every one that changes its output)."""
        return {}

    def spec(self) -> str:
        """``name(option=value, ...)``: the defence with its full settings, e.g. ``jpeg(quality=75)``."""
        return _format(self.name, self.settings())

    def family(self) -> str:
        """The spec without the strength ``t_star``: the settings one trade-off curve shares."""
        return _format(self.name, {k: v for k, v in self.settings().items() if k != "t_star"})

    def noise_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the standard normal noise one call draws per image (empty for a deterministic defence)."""
        return ()

    @contextlib.contextmanager
    def fixed_noise(self, noise: torch.Tensor) -> Iterator["Defence"]:
        """Within the block, use ``noise`` (batch x ``noise_shape``) instead of drawing it (no-op here)."""
        yield self

    @contextlib.contextmanager
    def noise_stream(self, indices: torch.Tensor, seed: int) -> Iterator["Defence"]:
        """Within the block, draw every call's noise per image from ``(seed, indices)`` (no-op here)."""
        yield self

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.purify(images)

    def wrap(self, classifier: nn.Module) -> nn.Module:
        """A module that defends, then classifies, in the classifier's train/eval mode: a fresh ``nn.Sequential``
        is in training mode, and an attack that restores its model's mode (torchattacks) would otherwise put the
        classifier's batch norm into training mode, where every later forward pass updates its statistics."""
        return nn.Sequential(self, classifier).train(classifier.training)

    def extra_repr(self) -> str:
        return self.spec()


def _format(name: str, settings: dict) -> str:
    options = ", ".join(f"{k}={_value(v)}" for k, v in sorted(settings.items()))
    return f"{name}({options})" if options else name


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_value(v) for v in value) + "]"
    return str(value)


def check_images(images: torch.Tensor, channels: int = 3) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``images`` is a float (B, C, H, W) batch in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype} "
                         f"(convert uint8 images with images.float() / 255)")
    if images.ndim != 4:
        raise ValueError(f"expected a 4-D batch (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"empty batch: got shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels, got shape {tuple(images.shape)} "
                         f"(channels-first layout (B, C, H, W) is required)")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
