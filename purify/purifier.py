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
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .base import Defence, check_images
from .bcm import BCM
from .bct import karras_times
from .infra.checkpoint import bcm_weights, load_checkpoint, load_state_dict_strict
from .infra.paths import CHECKPOINT_DIR
from .network import recompute_activations
from .presets import Preset, preset_from_dict
from .sampling import invert, sample_ancestral, sample_reverse_diffusion

MODES = ("bcm", "denoise")
SOLVERS = ("sde", "ode")


class _StraightThroughClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def clamp_straight_through(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x.clamp(low, high)`` whose backward is the identity (BPDA with the identity), for the purifiers' output
    clamps: a plain clamp zeroes the gradient wherever the purified image saturates, so an adaptive attack would
    get no gradient on exactly the brightest and darkest pixels and understate what a gradient can do there.
    The forward value is the clamp's, bit for bit: an autograd function rather than
    ``x + (x.clamp(low, high) - x).detach()``, whose sum rounds for huge values and is NaN for infinite ones."""
    return _StraightThroughClamp.apply(x, low, high)


def shipped_bcm_path(preset: str) -> Path:
    """Where the repository ships the trained BCM of a preset, e.g. ``checkpoints/bcm/cifar10-small.pt``."""
    return CHECKPOINT_DIR / "bcm" / f"{preset}.pt"


def load_bcm(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[BCM, Preset]:
    """The BCM of a release file (the weights it ships) or of a training checkpoint (its EMA weights), and
    its preset."""
    state = load_checkpoint(path, ("kind", "config"))
    if state["kind"] != "bcm":
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not a BCM")
    preset = preset_from_dict(state["config"], f"{path} config")
    bcm = BCM(preset.model)
    load_state_dict_strict(bcm, bcm_weights(state, path)[0], str(path))
    return bcm.to(device), preset


class _NoisyDefence(Defence):
    """A defence around a frozen BCM that draws noise: seeded or global RNG, or noise fixed per image."""

    randomized = True

    def __init__(self, bcm: BCM, seed: int | None, recompute: bool = False):
        super().__init__()
        self.bcm = bcm.eval().requires_grad_(False)
        self.seed, self.recompute = seed, bool(recompute)
        self.generator: torch.Generator | None = None
        self._fixed_noise: torch.Tensor | None = None
        self._stream: dict | None = None
        self.reseed()

    def reseed(self) -> None:
        """Restart the seeded noise stream (no effect without a seed)."""
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def train(self, mode: bool = True) -> "_NoisyDefence":
        super().train(mode)
        self.bcm.eval()  # the defence never trains its BCM: no dropout, whatever the wrapper's mode
        return self

    @contextlib.contextmanager
    def fixed_noise(self, noise: torch.Tensor) -> Iterator["_NoisyDefence"]:
        """Within the block, every forward pass uses ``noise`` (batch x ``noise_shape``, standard normal)
        instead of drawing it: per-image noise independent of batching, or noise frozen per image for the
        fixed-randomness ablation of an adaptive attack."""
        previous, self._fixed_noise = self._fixed_noise, noise
        try:
            yield self
        finally:
            self._fixed_noise = previous

    @contextlib.contextmanager
    def noise_stream(self, indices: torch.Tensor, seed: int) -> Iterator["_NoisyDefence"]:
        """Within the block, the defence draws fresh noise on every call, but per image: call ``c`` on a batch
        of ``k`` copies of the images at ``indices`` (one after another, as ``attacks.DrawAverage`` lays out its
        draws) gives copy ``j`` of image ``i`` the noise ``image_noise(i, seed, draw=f"{c}.{j}", stream="attack")``.
        An attack that makes the same calls on every batch then gets the same noise for an image whatever the
        batch size or the process it runs in."""
        previous, self._stream = self._stream, {"indices": indices.cpu(), "seed": int(seed), "calls": 0}
        try:
            yield self
        finally:
            self._stream = previous

    def _stream_noise(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        indices, stream = self._stream["indices"], self._stream
        if x.shape[0] % len(indices):
            raise ValueError(f"a noise stream for {len(indices)} images cannot serve a batch of {x.shape[0]}")
        call, stream["calls"] = stream["calls"], stream["calls"] + 1
        return torch.cat([image_noise(indices, shape[1:], stream["seed"], f"{call}.{copy}", "attack")
                          for copy in range(x.shape[0] // len(indices))]).to(device=x.device, dtype=x.dtype)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Noise of shape (batch, *noise_shape) for the image batch ``x``."""
        shape = (x.shape[0], *self.noise_shape(x.shape[1:]))
        if self._stream is not None and self._fixed_noise is None:
            return self._stream_noise(x, shape)
        if self._fixed_noise is not None:
            if tuple(self._fixed_noise.shape) != shape:
                raise ValueError(f"fixed noise of shape {tuple(self._fixed_noise.shape)} does not match the "
                                 f"{shape} this defence needs for the image batch {tuple(x.shape)}")
            return self._fixed_noise.to(device=x.device, dtype=x.dtype)
        return torch.randn(shape, generator=self.generator, dtype=x.dtype,
                           device="cpu" if self.generator is not None else x.device).to(x.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.bcm.config.network.image_channels)
        # the noise is drawn once per call, outside the network passes a backward pass may recompute
        with recompute_activations(self.bcm, self.recompute):
            return self.purify(images)


class BCMPurifier(_NoisyDefence):
    """Purify images in [0, 1] by inverting them to noise level ``t_star`` and denoising back. The output is
    clamped into [0, 1] with ``clamp_straight_through``, so gradients reach the input also where it saturates.

    Args:
        bcm: a trained BCM (its weights are frozen; gradients still flow to the input).
        t_star: purification strength; the noise level the image is inverted to ([-1, 1] data scale).
        eps_inv: scale of the initial noise added before inverting (Algorithm 5's ``t_1``); capped at
            ``t_star / 2`` so that small strengths still invert upwards (the paper's 0.11 is for t* = 80).
        inversion_times: optional intermediate times between ``eps_inv`` and ``t_star`` (multi-step inversion).
        denoise_times: optional intermediate times between 0 and ``t_star`` (ancestral multi-step denoising).
        mode: ``"bcm"`` (invert, then denoise) or ``"denoise"`` (the baseline: ``x + t* z``, then denoise).
        rounds: purify this many times in a row, each round from the last one's output with fresh noise
            (invert, denoise, re-noise: the zigzag idea of Algorithm 4 applied to purification); ``rounds``
            times the network evaluations.
        t_star_max: when given, every image (and round) gets its own strength, drawn log-uniformly in
            ``[t_star, t_star_max]`` from one more standard normal of its noise (``Phi`` of it is the position
            on the log scale), with its own ``eps_inv`` cap; one-step inversion and denoising only.
        seed: when given, noise comes from a generator seeded with it (``reseed()`` restarts the stream), so
            an evaluation is reproducible; otherwise from torch's global RNG. ``with purifier.fixed_noise(z)``
            uses the given noise instead (e.g. ``image_noise``: drawn per image, independent of batching).
        recompute: recompute the network's activations in the backward pass instead of keeping them
            (``purify.network.recompute_activations``): the same gradients in a fraction of the memory, for
            attacks through a large BCM.
    """

    def __init__(self, bcm: BCM, t_star: float = 80.0, eps_inv: float = 0.11,
                 inversion_times: Sequence[float] = (), denoise_times: Sequence[float] = (),
                 mode: str = "bcm", rounds: int = 1, seed: int | None = None, recompute: bool = False,
                 t_star_max: float | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a whole number >= 1, got {rounds!r}")
        self.rounds = rounds
        eps, T = bcm.config.eps, bcm.config.T
        if not eps < t_star <= T:
            raise ValueError(f"t_star must be in ({eps}, {T}], got {t_star}")
        super().__init__(bcm, seed, recompute)
        self.t_star, self.mode = float(t_star), mode
        self.eps_inv_option = float(eps_inv)  # as given; a trade-off curve over t* shares it
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
        self.t_star_max = None if t_star_max is None else float(t_star_max)
        if t_star_max is not None:
            if not self.t_star < self.t_star_max <= T:
                raise ValueError(f"t_star_max must be in (t_star={t_star:g}, {T}], got {t_star_max}")
            if inversion_times or denoise_times:
                raise ValueError("a t* drawn per image (t_star_max) needs one-step inversion and denoising: "
                                 "drop inversion_times and denoise_times")

    @property
    def name(self) -> str:
        return self.mode

    @property
    def nfe(self) -> int:
        inversion = len(self.inversion_times) - 1 if self.mode == "bcm" else 0
        return self.rounds * (inversion + len(self.denoise_times))

    def settings(self) -> dict:
        out = {"t_star": self.t_star}
        if self.mode == "bcm":
            # with t_star_max, the cap at t*/2 is applied per image: the spec names the eps_inv asked for
            out["eps_inv"] = self.eps_inv if self.t_star_max is None else self.eps_inv_option
            if len(self.inversion_times) > 2:
                out["inversion_times"] = self.inversion_times[1:-1]
        if len(self.denoise_times) > 1:
            out["denoise_times"] = self.denoise_times[:-1]
        if self.rounds > 1:
            out["rounds"] = self.rounds
        if self.t_star_max is not None:
            out["t_star_max"] = self.t_star_max
        return out

    def family(self) -> str:
        # the eps_inv asked for, not the one capped at t*/2, so every t* of a trade-off curve shares the family
        return super().family().replace(f"eps_inv={self.eps_inv:g}", f"eps_inv={self.eps_inv_option:g}")

    def noise_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """One image's noise per round: the image's shape (with ``t_star_max``, flattened, plus one value for
        its t*), with a leading round axis for ``rounds > 1``."""
        per_round = tuple(image_shape) if self.t_star_max is None else (math.prod(image_shape) + 1,)
        return per_round if self.rounds == 1 else (self.rounds, *per_round)

    def sampled_t_star(self, z: torch.Tensor) -> torch.Tensor:
        """The per-image strengths of ``t_star_max``: ``t_star (t_star_max / t_star) ** Phi(z)`` for standard
        normal ``z``, log-uniform in ``[t_star, t_star_max]``."""
        return self.t_star * (self.t_star_max / self.t_star) ** torch.special.ndtr(z.float())

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs) -> "BCMPurifier":
        """Build from a release file (the weights it ships) or a training checkpoint (its EMA weights);
        ``t_star``/``eps_inv`` default to the preset's ``purifier`` section, any keyword overrides them."""
        bcm, preset = load_bcm(path, device)
        kwargs.setdefault("t_star", preset.purifier.t_star)
        kwargs.setdefault("eps_inv", preset.purifier.eps_inv)
        return cls(bcm, **kwargs)

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        noise = self._noise(images)
        x = images * 2 - 1
        for r in range(self.rounds):
            z = noise if self.rounds == 1 else noise[:, r]
            if self.t_star_max is not None:
                x = self._purify_sampled(x, z)
            else:
                x_t = invert(self.bcm, x, self.inversion_times, noise=z) if self.mode == "bcm" else x + self.t_star * z
                x = sample_ancestral(self.bcm, x_t, self.denoise_times, eps=self.bcm.config.eps)
            x = clamp_straight_through(x, -1, 1)
        return (x + 1) / 2

    def _purify_sampled(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One round of ``t_star_max``: each image's t* from the last value of its ``noise``, the rest as the
        image's noise; one-step inversion from ``min(eps_inv, t*/2)`` (or ``x + t* z`` in ``denoise`` mode), then
        ``f(., t*, eps)``, as ``purify`` does at a single t*."""
        z, t_star = noise[:, :-1].reshape(x.shape), self.sampled_t_star(noise[:, -1])  # on x's device, as the noise
        per_image = lambda t: t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))  # noqa: E731
        if self.mode == "bcm":
            eps_inv = torch.clamp(t_star / 2, max=self.eps_inv_option)
            x_t = self.bcm(x + per_image(eps_inv) * z, eps_inv, t_star)
        else:
            x_t = x + per_image(t_star) * z
        return self.bcm(x_t, t_star, self.bcm.config.eps)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, t_star={self.t_star}, eps_inv={self.eps_inv}, "
                f"inversion_times={self.inversion_times}, denoise_times={self.denoise_times}, rounds={self.rounds}, "
                f"t_star_max={self.t_star_max}, seed={self.seed}")


class DiffusionPurifier(_NoisyDefence):
    """DiffPure-style purification with the same network: diffuse to ``t_star`` (``x + t* z``), then integrate
    back to 0 in ``steps`` steps (``solver``: ``"sde"`` reverse SDE, or ``"ode"`` probability-flow ODE) on
    the Karras grid (rho = 7) from ``t_star`` down to the model's ``eps``, using the BCM's ``u = 0`` branch as
    the denoiser (``purify.sampling.sample_reverse_diffusion``). ``steps`` network evaluations per image:
    what a user would pick instead of the BCM purifier, at equal network quality. Like ``BCMPurifier``, it
    clamps its output into [0, 1] with ``clamp_straight_through``."""

    name = "diffusion"

    def __init__(self, bcm: BCM, t_star: float = 1.0, steps: int = 100, solver: str = "sde",
                 seed: int | None = None, recompute: bool = False):
        eps, T = bcm.config.eps, bcm.config.T
        if not eps < t_star <= T:
            raise ValueError(f"t_star must be in ({eps}, {T}], got {t_star}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        super().__init__(bcm, seed, recompute)
        self.t_star, self.steps, self.solver = float(t_star), int(steps), solver
        grid = karras_times(self.steps, eps, self.t_star) if self.steps > 1 else torch.tensor([self.t_star])
        self.times = [*grid.flip(0).tolist(), 0.0]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        **kwargs) -> "DiffusionPurifier":
        """Build from a BCM checkpoint; ``t_star`` defaults to its preset's purifier strength."""
        bcm, preset = load_bcm(path, device)
        kwargs.setdefault("t_star", preset.purifier.t_star)
        return cls(bcm, **kwargs)

    @property
    def nfe(self) -> int:
        return self.steps

    def settings(self) -> dict:
        return {"t_star": self.t_star, "steps": self.steps, "solver": self.solver}

    def noise_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        # the SDE draws fresh noise at every step but the last; slot 0 is the diffusion's noise
        return (self.steps, *image_shape) if self.solver == "sde" else tuple(image_shape)

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        noise = self._noise(x)
        x_t = x + self.t_star * (noise[:, 0] if self.solver == "sde" else noise)
        x0 = sample_reverse_diffusion(self.bcm, x_t, self.times, self.solver, noise if self.solver == "sde" else None,
                                      eps=self.bcm.config.eps)
        return clamp_straight_through((x0 + 1) / 2, 0, 1)


def image_noise(indices: torch.Tensor, shape: Sequence[int], seed: int, draw: int | str = 0, stream: str = "",
                uniform: bool = False) -> torch.Tensor:
    """Standard normal noise of ``shape`` (C, H, W) for each image index (``uniform``: uniform on [0, 1)):
    image ``i``'s noise depends only on ``(stream, seed, draw, i)``, so results do not depend on batch size,
    batch order, device or how the images are split across processes. ``draw`` numbers independent evaluations
    of the same image; ``stream`` names a use (an attack's random start, its purifier noise), so that two uses
    never share noise (the evaluation draws use the empty stream)."""
    out = torch.empty(len(indices), *shape)
    prefix, draw = f"{stream}:" if stream else "", draw if isinstance(draw, str) else int(draw)
    for row, index in enumerate(indices.tolist()):
        # a stable digest (Python's hash of a tuple may change between versions)
        key = hashlib.blake2b(f"{prefix}{int(seed)}:{draw}:{int(index)}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        out[row] = (torch.rand if uniform else torch.randn)(tuple(shape), generator=generator)
    return out
