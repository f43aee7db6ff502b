"""Applications of a BCM's bidirectional consistency (paper Section 4.3, Appendix A.3, spec §6): interpolation
between two real images, inpainting (Algorithm 6) and blind restoration of compressed images.

Same conventions as ``purify.sampling``: every function takes the model ``f(x, t, u)`` first and works on the
[-1, 1] data scale; "time 0" as a target is ``eps``; noise comes from ``generator`` when given. A mask is 1
where pixels are missing and broadcasts over the image batch (``(1 or B, 1, H, W)``); the mask makers below
build the paper's kinds of holes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .defences import JPEG
from .sampling import EPS, INVERSION_SCHEDULES, Model, increasing, invert, standard_noise, reconstruct

# Appendix A.3: interpolation inverts with 3 steps to T = 80; inpainting inverts to 2.0 only; JPEG restoration
# inverts in 2 steps to 2.0 (the INR codec's restoration uses the interpolation schedule).
INTERPOLATION_TIMES = INVERSION_SCHEDULES[3]  # (0.07, 1.5, 6.0, 80.0)
INPAINTING_TIMES = (0.07, 0.4, 1.0, 2.0)
RESTORATION_TIMES = (0.07, 0.7, 2.0)
HALVES = ("left", "right", "top", "bottom")


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical linear interpolation (Eq. 23), per pair of latents (first dimension):

        z = sin((1 - a) psi) / sin(psi) z1 + sin(a psi) / sin(psi) z2,   psi = arccos(z1.z2 / (|z1| |z2|)),

    with z1, z2 flattened. Written as ``a sinc(a psi / pi) / sinc(psi / pi)`` (torch.sinc(x) = sin(pi x)/(pi x)),
    which is the same weight and tends to linear interpolation, ``a``, for parallel latents (psi -> 0); it is
    undefined for opposite latents (psi = pi).
    """
    cosine = torch.nn.functional.cosine_similarity(z1.flatten(1), z2.flatten(1), dim=1)
    psi = torch.arccos(cosine.clamp(-1, 1)).view(-1, *[1] * (z1.ndim - 1))

    def weight(a: float) -> torch.Tensor:  # sin(a psi) / sin(psi)
        return a * torch.sinc(a * psi / math.pi) / torch.sinc(psi / math.pi)

    return weight(1 - alpha) * z1 + weight(alpha) * z2


def interpolate(model: Model, x1: torch.Tensor, x2: torch.Tensor, alphas: Sequence[float],
                times: Sequence[float] = INTERPOLATION_TIMES, eps: float = EPS,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Interpolation between two real images (Section 4.3.1, Appendix A.3.1).

    Invert ``x1`` and ``x2`` to ``T = times[-1]`` with Algorithm 5, each from its *own* initial noise
    (``x_{t_1} = x + t_1 sigma_i``, sigma_1 != sigma_2: with the same noise the latents leave the Gaussian's sphere
    and the path degrades, Figure 18), slerp the latents ``z = slerp(z1, z2, a)`` (Eq. 23), map back in one step
    ``f(z, T, 0)``. NFE = 2 (N - 1) + len(alphas) per pair.

    Returns the paths, ``(B, len(alphas), C, H, W)`` clamped to [-1, 1]: ``[:, 0]`` for ``a = 0`` is the one-step
    reconstruction of ``x1`` from its latent, ``[:, -1]`` (``a = 1``) that of ``x2``.
    """
    if x1.shape != x2.shape:
        raise ValueError(f"interpolation needs two batches of the same shape, got {tuple(x1.shape)} and "
                         f"{tuple(x2.shape)}")
    T = float(times[-1])
    z1 = invert(model, x1, times, generator=generator)
    z2 = invert(model, x2, times, generator=generator)  # the generator moved on: a different initial noise
    return torch.stack([model(slerp(z1, z2, float(a)), T, eps).clamp(-1, 1) for a in alphas], dim=1)


def inpaint(model: Model, x: torch.Tensor, mask: torch.Tensor, times: Sequence[float] = INPAINTING_TIMES,
            s: float = 0.5, eps: float = EPS, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 6 (BCM's inpainting), with mask ``M`` (1 = missing) and times ``t_1 < ... < t_N``:

        x~ = x (1 - M) + s sigma M                                  # small noise in the hole
        x_{t_1} = x~ + t_1 sigma_1                                  # initial inversion noise, on the whole image
        for n = 2..N:  x_{t_n} = f(x_{t_{n-1}}, t_{n-1}, t_n)
                       x_{t_n} = x_{t_n} (1 - M) + t_n sigma_n M    # the hole becomes noise of the current scale
        x^ = x (1 - M) + f(x_{t_N}, t_N, 0) M                       # known pixels stay the input's

    with fresh ``sigma ~ N(0, I)`` each time. NFE = N. Known pixels of the result are exactly ``x``'s; the hole is
    clamped to [-1, 1].
    """
    times = increasing(times, "inpainting times")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("an inpainting mask holds only 0 (known pixel) and 1 (missing pixel)")
    hole = mask.bool().expand_as(x)
    x_t = torch.where(hole, s * standard_noise(x, generator), x)
    x_t = x_t + times[0] * standard_noise(x, generator)
    for n in range(1, len(times)):
        x_t = model(x_t, times[n - 1], times[n])
        x_t = torch.where(hole, times[n] * standard_noise(x, generator), x_t)
    return torch.where(hole, model(x_t, times[-1], eps).clamp(-1, 1), x)


def restore(model: Model, x: torch.Tensor, times: Sequence[float] = RESTORATION_TIMES, eps: float = EPS,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Blind restoration of a compressed image (Section 4.3.3, Appendix A.3.3): invert along ``times``
    (Algorithm 5, ``x_{t_1} = x + t_1 sigma``, ``x_{t_{n+1}} = f(x_{t_n}, t_n, t_{n+1})``), then denoise in one
    step, ``x^ = f(x_{t_N}, t_N, 0)``, clamped to [-1, 1]. NFE = N. Inversion maps the codec's out-of-distribution
    artefacts to in-distribution noise; a larger ``t_N`` restores more but may change the content. JPEG:
    ``0.07 -> 0.7 -> 2.0`` (the default); the paper's INR codec: ``INTERPOLATION_TIMES``.
    """
    return reconstruct(model, x, times, eps, generator)


def compress_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """``x`` (on [-1, 1]) through torchvision's JPEG codec at ``quality`` (1-100), pixels quantised to uint8: the
    ``jpeg`` defence (``purify.defences.JPEG``) on the [0, 1] scale."""
    return JPEG(quality)((x + 1) / 2) * 2 - 1


def box_mask(height: int, width: int, fraction: float = 0.5) -> torch.Tensor:
    """A centred box missing, ``round(fraction H) x round(fraction W)`` pixels: ``(1, 1, H, W)``, 1 = missing."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the box's side fraction must lie in (0, 1], got {fraction}")
    box_h, box_w = round(fraction * height), round(fraction * width)
    top, left = (height - box_h) // 2, (width - box_w) // 2
    mask = torch.zeros(1, 1, height, width)
    mask[..., top:top + box_h, left:left + box_w] = 1
    return mask


def half_mask(height: int, width: int, side: str) -> torch.Tensor:
    """The ``side`` half of the image missing (one of ``HALVES``): ``(1, 1, H, W)``, 1 = missing."""
    if side not in HALVES:
        raise ValueError(f"side must be one of {', '.join(HALVES)}, got {side!r}")
    mask = torch.zeros(1, 1, height, width)
    if side == "left":
        mask[..., :width // 2] = 1
    elif side == "right":
        mask[..., width // 2:] = 1
    elif side == "top":
        mask[..., :height // 2, :] = 1
    else:
        mask[..., height // 2:, :] = 1
    return mask


def random_pixel_mask(n: int, height: int, width: int, fraction: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly ``round(fraction H W)`` pixels missing per image, chosen uniformly at random for each of the ``n``
    images (seeded by ``generator``): ``(n, 1, H, W)``, 1 = missing."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the missing fraction must lie in [0, 1], got {fraction}")
    missing = round(fraction * height * width)
    chosen = torch.rand(n, height * width, generator=generator).argsort(dim=1)[:, :missing]
    return torch.zeros(n, height * width).scatter_(1, chosen, 1).view(n, 1, height, width)
