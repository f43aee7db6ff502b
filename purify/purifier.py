"""``BCMPurifier``: adversarial purification with a BCM (Section 4.3.4, spec §7).

Default: invert the input in one step from ``eps_inv = 0.11`` to ``t* = 80`` (Algorithm 5), then generate
back in one step ``f(x, t*, 0)``. Images go in and come out in [0, 1], so the purifier composes with any
classifier that takes [0, 1] inputs (torchattacks, RobustBench)::

    purifier = BCMPurifier.from_checkpoint("checkpoints/bcm/cifar10-small.pt")
    defended = purifier.wrap(classifier)          # nn.Sequential(purifier, classifier)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Sequence

import torch
from torch import nn

from .bcm import BCM
from .checkpoint import bcm_weights, load_checkpoint, load_state_dict_strict
from .presets import preset_from_dict
from .sampling import invert, sample_ancestral

MODES = ("bcm", "denoise")


class BCMPurifier(nn.Module):
    """Purify images in [0, 1] by inverting them to noise level ``t_star`` and denoising back.

    Args:
        bcm: a trained BCM (its weights are frozen; gradients still flow to the input).
        t_star: purification strength; the noise level the image is inverted to ([-1, 1] data scale).
        eps_inv: scale of the initial noise added before inverting (Algorithm 5's ``t_1``); capped at
            ``t_star / 2`` so that small strengths still invert upwards (the paper's 0.11 is for t* = 80).
        inversion_times: optional intermediate times between ``eps_inv`` and ``t_star`` (multi-step inversion).
        denoise_times: optional intermediate times between 0 and ``t_star`` (ancestral multi-step denoising).
        mode: ``"bcm"`` (invert, then denoise) or ``"denoise"`` (the baseline: ``x + t* z``, then denoise).
        seed: when given, noise comes from a generator seeded with it (``reseed()`` restarts the stream), so
            an evaluation is reproducible; otherwise from torch's global RNG. ``with purifier.fixed_noise(z)``
            uses the given noise instead (e.g. ``image_noise``: drawn per image, independent of batching).
    """

    def __init__(self, bcm: BCM, t_star: float = 80.0, eps_inv: float = 0.11,
                 inversion_times: Sequence[float] = (), denoise_times: Sequence[float] = (),
                 mode: str = "bcm", seed: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        eps, T = bcm.config.eps, bcm.config.T
        if not eps < t_star <= T:
            raise ValueError(f"t_star must be in ({eps}, {T}], got {t_star}")
        self.bcm = bcm.eval().requires_grad_(False)
        self.t_star, self.mode, self.seed = float(t_star), mode, seed
        self.eps_inv = min(float(eps_inv), self.t_star / 2)
        self.inversion_times = [self.eps_inv, *map(float, inversion_times), self.t_star]
        self.denoise_times = [*map(float, denoise_times), self.t_star]
        # Validate the schedule the network will actually see (eps_inv after its cap), so that no setting
        # evaluates the BCM outside the times it was trained on, [eps, T] (t_star <= T is checked above).
        if mode == "bcm" and not eps <= self.eps_inv:
            raise ValueError(f"the first inversion time min(eps_inv, t_star/2) = {self.eps_inv:g} is below the "
                             f"model's eps={eps} (eps_inv={eps_inv}, t_star={t_star}): eps_inv and t_star/2 must "
                             f"both be at least {eps}")
        times = self.inversion_times
        if mode == "bcm" and any(not a < b for a, b in zip(times, times[1:])):
            raise ValueError(f"inversion times [eps_inv, *inversion_times, t_star] must increase strictly within "
                             f"[{eps}, {T}], got {times}")
        times = self.denoise_times
        if any(not a < b for a, b in zip([eps, *times], times)):
            raise ValueError(f"denoise_times must increase strictly within ({eps}, t_star={t_star:g}), "
                             f"got {list(times[:-1])}")
        self.generator: torch.Generator | None = None
        self._fixed_noise: torch.Tensor | None = None
        self.reseed()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs) -> "BCMPurifier":
        """Build from a release file (the weights it ships) or a training checkpoint (its EMA weights);
        ``t_star``/``eps_inv`` default to the preset's ``purifier`` section, any keyword overrides them."""
        state = load_checkpoint(path, ("kind", "config"))
        if state["kind"] != "bcm":
            raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not a BCM")
        preset = preset_from_dict(state["config"], f"{path} config")
        bcm = BCM(preset.model)
        load_state_dict_strict(bcm, bcm_weights(state, path)[0], str(path))
        kwargs.setdefault("t_star", preset.purifier.t_star)
        kwargs.setdefault("eps_inv", preset.purifier.eps_inv)
        return cls(bcm.to(device), **kwargs)

    def reseed(self) -> None:
        """Restart the seeded noise stream (no effect without a seed)."""
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def train(self, mode: bool = True) -> "BCMPurifier":
        super().train(mode)
        self.bcm.eval()  # the purifier never trains its BCM: no dropout, whatever the wrapper's mode
        return self

    @contextlib.contextmanager
    def fixed_noise(self, noise: torch.Tensor) -> Iterator["BCMPurifier"]:
        """Within the block, every forward pass uses ``noise`` (the shape of the image batch, standard normal)
        as its initial noise instead of drawing it: per-image noise independent of batching, or noise frozen
        per image for the fixed-randomness ablation of an adaptive attack."""
        previous, self._fixed_noise = self._fixed_noise, noise
        try:
            yield self
        finally:
            self._fixed_noise = previous

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self._fixed_noise is not None:
            if self._fixed_noise.shape != x.shape:
                raise ValueError(f"fixed noise of shape {tuple(self._fixed_noise.shape)} does not match the "
                                 f"image batch {tuple(x.shape)}")
            return self._fixed_noise.to(device=x.device, dtype=x.dtype)
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype,
                           device="cpu" if self.generator is not None else x.device).to(x.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.bcm.config.network.image_channels)
        x = images * 2 - 1
        if self.mode == "bcm":
            x_t = invert(self.bcm, x, self.inversion_times, noise=self._noise(x))
        else:
            x_t = x + self.t_star * self._noise(x)
        x0 = sample_ancestral(self.bcm, x_t, self.denoise_times, eps=self.bcm.config.eps)
        return ((x0 + 1) / 2).clamp(0, 1)

    def wrap(self, classifier: nn.Module) -> nn.Sequential:
        """A module that purifies, then classifies: ``nn.Sequential(self, classifier)``."""
        return nn.Sequential(self, classifier)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, t_star={self.t_star}, eps_inv={self.eps_inv}, "
                f"inversion_times={self.inversion_times}, denoise_times={self.denoise_times}, seed={self.seed}")


def image_noise(indices: torch.Tensor, shape: Sequence[int], seed: int, draw: int = 0) -> torch.Tensor:
    """Standard normal noise of ``shape`` (C, H, W) for each image index: image ``i``'s noise depends only on
    ``(seed, draw, i)``, so results do not depend on batch size, batch order or device. ``draw`` numbers
    independent evaluations of the same image."""
    out = torch.empty(len(indices), *shape)
    for row, index in enumerate(indices.tolist()):
        # a stable digest (Python's hash of a tuple may change between versions)
        key = hashlib.blake2b(f"{int(seed)}:{int(draw)}:{int(index)}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        out[row] = torch.randn(tuple(shape), generator=generator)
    return out


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
