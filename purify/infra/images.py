"""Image conversions and image files: uint8 <-> float and PNG grids, written once for every package."""
from __future__ import annotations

import os

import torch

from .checkpoint import atomic_write


def as_float(images: torch.Tensor) -> torch.Tensor:
    """float32 images on [0, 1]: uint8 ``[0, 255]`` is divided by 255, floating input is cast (a new tensor)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images on [0, 1] -> uint8 ``[0, 255]`` on the CPU, rounded to the nearest level."""
    return (images.detach().float() * 255).round().clamp_(0, 255).to(torch.uint8).cpu()


def write_png(images: torch.Tensor, path: str | os.PathLike, nrow: int,
              value_range: tuple[float, float] = (0, 1)) -> None:
    """An image grid (``images`` on ``value_range``, 2 px padding) written to ``path`` through a temporary file."""
    from torchvision.utils import save_image  # noqa: PLC0415 (torchvision's image I/O only where images are written)

    low, high = value_range
    atomic_write(path, lambda tmp: save_image((images - low) / (high - low), tmp, nrow=nrow, padding=2, format="png"))
