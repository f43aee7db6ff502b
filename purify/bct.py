"""Bidirectional Consistency Training (paper Eq. 11-15 and 20-22, Algorithm 1, spec §3), and the CT Inversion
loss of the baseline noiser (spec §8).

Schedules, the index distribution and the distance are small named functions; ``BCTLoss`` puts them
together so that its body reads like Eq. 15, ``CTInversionLoss`` like the CT Inversion report's Algorithm 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


CTINV_WEIGHTS = ("inverse-gap", "uniform")
CTINV_INDICES = ("lognormal", "uniform")


@dataclass
class LossConfig:
    kind: str = "bct"            # "bct": Eq. 15; "ct": the CT term alone (iCT baseline); "denoise": EDM warm start;
    #                              "ctinv": CT Inversion, which trains a noiser g(x_t, t) instead of a BCM (spec §8)
    soft_start: str = "n"        # "n": Eq. 15; "n+1": the authors' public-code variant (spec §3)
    s0: int = 10
    s1: int = 1280
    rho: float = 7.0
    p_mean: float = -1.1
    p_std: float = 2.0
    denoise_p_mean: float = -1.2  # EDM's lognormal noise levels, for kind "denoise"
    denoise_p_std: float = 1.2
    huber_c: float | None = None  # None: 0.00054 * sqrt(D)
    ctinv_weight: str = "inverse-gap"  # kind "ctinv": lambda(t_n) = 1 / (t_{n+1} - t_n) (iCT's), or "uniform" (1)
    ctinv_index: str = "lognormal"     # kind "ctinv": n ~ Eq. 20 (iCT's), or "uniform" over the N - 1 intervals (CM's)

    def __post_init__(self):
        if self.kind not in ("bct", "ct", "denoise", "ctinv"):
            raise ValueError(f"loss.kind must be 'bct', 'ct', 'denoise' or 'ctinv', got {self.kind!r}")
        if self.soft_start not in ("n", "n+1"):
            raise ValueError(f"loss.soft_start must be 'n' or 'n+1', got {self.soft_start!r}")
        if self.ctinv_weight not in CTINV_WEIGHTS:
            raise ValueError(f"loss.ctinv_weight must be one of {', '.join(CTINV_WEIGHTS)}, got {self.ctinv_weight!r}")
        if self.ctinv_index not in CTINV_INDICES:
            raise ValueError(f"loss.ctinv_index must be one of {', '.join(CTINV_INDICES)}, got {self.ctinv_index!r}")


def karras_times(n: int, eps: float, T: float, rho: float = 7.0) -> torch.Tensor:
    """Eq. 22: ``t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho`` for i = 1..N (float64)."""
    i = torch.arange(n, dtype=torch.float64)
    return (eps ** (1 / rho) + i / (n - 1) * (T ** (1 / rho) - eps ** (1 / rho))) ** rho


def curriculum_boundaries(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """Eq. 21: ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2(s1/s0) + 1))``."""
    K_prime = max(1, math.floor(K / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def index_probabilities(times: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Eq. 20: ``p(n) ∝ erf((ln t_{n+1} - P_mean)/(√2 P_std)) - erf((ln t_n - P_mean)/(√2 P_std))``.

    Returns the N-1 probabilities of the intervals ``[t_n, t_{n+1}]`` (index 0 is n = 1).
    """
    cdf = torch.erf((times.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def sample_index_pair(p: torch.Tensor, batch: int, exclude_offset: int = 0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n ~ p`` and ``n' ~ p`` with ``n' != n + exclude_offset`` (0-based indices into ``p``)."""
    n = torch.multinomial(p, batch, replacement=True, generator=generator)
    p_other = p.expand(batch, -1).clone()
    excluded = n + exclude_offset
    valid = excluded < p.numel()
    p_other[valid.nonzero().squeeze(1), excluded[valid]] = 0
    n_prime = torch.multinomial(p_other, 1, generator=generator).squeeze(1)
    return n, n_prime


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``d(a, b) = sqrt(||a - b||^2 + c^2) - c`` per sample."""
    return ((a - b).float().pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def huber_constant(sample_shape: torch.Size, huber_c: float | None) -> float:
    """``c = 0.00054 sqrt(D)`` with D = pixels x channels, unless set explicitly."""
    return huber_c if huber_c is not None else 0.00054 * math.sqrt(math.prod(sample_shape))


class CurriculumLoss:
    """What the consistency losses share: the discretization ``t_1 < ... < t_N(k)`` at training step k (Eq. 21-22)
    and the pseudo-Huber distance."""

    def __init__(self, config: LossConfig, total_steps: int, eps: float, T: float):
        self.config, self.total_steps, self.eps, self.T = config, total_steps, eps, T

    def discretization(self, step: int) -> torch.Tensor:
        c = self.config
        return karras_times(curriculum_boundaries(step, self.total_steps, c.s0, c.s1), self.eps, self.T, c.rho)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pseudo_huber(a, b, huber_constant(a.shape[1:], self.config.huber_c))


def float32_passes(x: torch.Tensor):
    """Autocast off on ``x``'s device: the network passes whose outputs a consistency loss compares run in float32
    even when the caller trains under bf16 autocast. Their difference shrinks with the step ``t_{n+1} - t_n``
    (at N = 1281 far below bf16's relative precision of 2^-8), so in bf16 the rounding of each pass would
    outweigh it. Outside autocast this changes nothing."""
    return torch.autocast(x.device.type, enabled=False)


class BCTLoss(CurriculumLoss):
    """Eq. 15 for a batch; ``__call__`` returns per-sample terms ``{"ct", "soft", "loss"}`` and the current N.

    Under bf16 autocast (the trainer's on GPUs) the three passes whose outputs are compared, the target, the CT
    term's online pass and the soft term's frozen pass, run in float32 (``float32_passes``). Only the soft term's
    online pass ``x_u = f(x + t_n z, t_n, t_{n'})`` runs in bf16: it is compared with nothing, and its rounding
    reaches the loss as a perturbation of the frozen pass's input, measured against a distance between two
    arbitrary times that does not shrink with N as the CT term's neighbours do. On the shipped small BCM (64
    test images, docs/training.md) this leaves the CT term exactly the float32 one and moves the soft term by
    0.2-0.35% (median per image) at N = 41 and at N = 1281; bf16 in every pass moved the CT term by 0.4-0.5%
    at N = 41 and by 3-4% at N = 1281.
    """

    def __call__(self, model: nn.Module, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        c, eps = self.config, self.eps
        times = self.discretization(step)
        p = index_probabilities(times, c.p_mean, c.p_std)
        offset = 1 if c.soft_start == "n+1" else 0
        n, n_prime = sample_index_pair(p, x.shape[0], exclude_offset=offset)
        # non-blocking copies: the indices are drawn on the host, and a blocking copy would wait for the device
        times = times.to(x.device, torch.float32, non_blocking=True)
        n, n_prime = n.to(x.device, non_blocking=True), n_prime.to(x.device, non_blocking=True)
        t_n, t_n1, t_prime = times[n], times[n + 1], times[n_prime]
        z = torch.randn_like(x)
        dropout_seed = int(torch.randint(0, 2**62, ()))
        f = _SharedDropout(model, dropout_seed)
        d = self.distance

        with torch.no_grad(), float32_passes(x):
            target = f.frozen(x + per_image(t_n) * z, t_n, eps)
        with float32_passes(x):
            ct = d(f(x + per_image(t_n1) * z, t_n1, eps), target) / (t_n1 - t_n)
        if c.kind == "ct":
            soft = torch.zeros_like(ct)
        else:
            t_start = t_n1 if c.soft_start == "n+1" else t_n
            x_u = f(x + per_image(t_start) * z, t_start, t_prime)
            with float32_passes(x):
                soft = d(f.frozen(x_u, t_prime, eps), target) / (t_start - t_prime).abs()
        return {"loss": ct + soft, "ct": ct, "soft": soft, "N": torch.tensor(times.numel())}


class CTInversionLoss(CurriculumLoss):
    """CT Inversion (Hsu, Algorithm 1; spec §8) for a noiser ``g(x_t, t) -> x_T`` (``purify.noiser``), per sample:

        n ~ P,  z ~ N(0, I)
        x_n     = x + t_n z
        x_{n+1} = x_n + (t_{n+1} - t_n) (x_n - x) / t_n      # an Euler step of the PF ODE with x for E[x_0 | x_n]
        L       = lambda(t_n) d(g_sg(x_{n+1}, t_{n+1}), g(x_n, t_n))

    so ``x_{n+1} = x + t_{n+1} z``. The target sits at the larger time, next to the boundary ``g(x_T, T) = x_T``,
    and carries no gradient at all; both passes share their dropout randomness. The report leaves the weight
    ``lambda(t_n)``, the distance ``d`` and the index distribution ``P`` open. ``d`` is BCT's pseudo-Huber on the
    same curriculum; ``lambda`` is ``loss.ctinv_weight``: iCT's ``1 / (t_{n+1} - t_n)`` (``inverse-gap``) or the
    original consistency models' ``1`` (``uniform``); ``P`` is ``loss.ctinv_index``: iCT's Eq. 20 (``lognormal``)
    or the original's uniform over the intervals. iCT's choices favour small t, next to *its* boundary at eps;
    here the boundary is at T. With ``c_out = T - t`` an error of G weighs ``(T - t) lambda(t)``: under
    ``inverse-gap`` (N = 11) ~5,000 times more on the first interval than on the last, under ``uniform`` 80 / 35;
    and Eq. 20 samples the last interval [45, 80] 0.4% of the time at N = 11, the uniform index 10%. Logged as
    ``ct``; ``soft = 0``. Both passes are compared, so both run in float32 under autocast (``float32_passes``).
    """

    def __call__(self, model: nn.Module, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        times = self.discretization(step)
        if c.ctinv_index == "lognormal":
            p = index_probabilities(times, c.p_mean, c.p_std)
        else:
            p = torch.full((times.numel() - 1,), 1 / (times.numel() - 1), dtype=times.dtype)
        n = torch.multinomial(p, x.shape[0], replacement=True).to(x.device, non_blocking=True)
        times = times.to(x.device, torch.float32, non_blocking=True)
        t_n, t_n1 = times[n], times[n + 1]
        z = torch.randn_like(x)
        g = _SharedDropout(model, int(torch.randint(0, 2**62, ())))
        d = self.distance

        x_n = x + per_image(t_n) * z
        x_n1 = x_n + per_image(t_n1 - t_n) * (x_n - x) / per_image(t_n)
        with float32_passes(x):
            with torch.no_grad():
                target = g(x_n1, t_n1)
            loss = d(target, g(x_n, t_n))
        if c.ctinv_weight == "inverse-gap":
            loss = loss / (t_n1 - t_n)
        return {"loss": loss, "ct": loss, "soft": torch.zeros_like(loss), "N": torch.tensor(times.numel())}


def per_image(t: torch.Tensor) -> torch.Tensor:
    """Per-image noise levels ``t`` (B,) shaped (B, 1, 1, 1) to scale a batch of images."""
    return t.view(-1, 1, 1, 1)


class _SharedDropout:
    """Calls the model with the same dropout randomness each time (the authors reseed before each pass).

    ``frozen`` evaluates with the current weights detached (stop-gradient on the parameters only), so a
    gradient still flows through its input, as Eq. 15's soft term needs.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.model, self.seed = model, seed
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    def __call__(self, *inputs):
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            return self.model(*inputs)

    def frozen(self, *inputs):
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            return functional_call(self.model, params, inputs)


class DenoiserLoss:
    """EDM's denoising loss on the ``u = 0`` branch (Karras et al. 2022, Eq. 2 with their lambda and P(sigma)).

    A warm start for BCT on small compute: ``f(x + s z, s, eps)`` learns to predict ``x`` at lognormal noise
    levels ``s``, one forward and one backward pass per image; BCT then fine-tunes from these weights
    (``--init-from``), as spec §3's fine-tuning path allows. ``lambda(s) = 1 / c_out(s, 0)^2``.
    """

    def __init__(self, config: LossConfig, sigma_data: float, eps: float, T: float):
        self.config, self.sigma_data, self.eps, self.T = config, sigma_data, eps, T

    def __call__(self, model: nn.Module, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        c, sd = self.config, self.sigma_data
        s = (torch.randn(x.shape[0], device=x.device) * c.denoise_p_std + c.denoise_p_mean).exp()
        s = s.clamp(self.eps * 1.01, self.T)
        weight = (s**2 + sd**2) / (s * sd) ** 2
        denoised = model(x + per_image(s) * torch.randn_like(x), s, self.eps)
        loss = weight * (denoised - x).float().pow(2).flatten(1).mean(1)
        zero = torch.zeros_like(loss)
        return {"loss": loss, "ct": zero, "soft": zero, "N": torch.tensor(0)}


def make_loss(config: LossConfig, total_steps: int, sigma_data: float, eps: float, T: float):
    """The training objective named by ``config.kind``."""
    if config.kind == "denoise":
        return DenoiserLoss(config, sigma_data, eps, T)
    if config.kind == "ctinv":
        return CTInversionLoss(config, total_steps, eps, T)
    return BCTLoss(config, total_steps, eps, T)
