"""Adaptive (white-box) attacks on a defended model and the scoring of randomized defences (spec §9).

The attacker knows the whole defence and differentiates through it: for the BCM purifier the gradients are
exact (both network evaluations are backpropagated). Threat models:

- ``pgd-eot``: L-inf PGD in which every step averages the loss gradient over ``eot`` independent draws of the
  defence's noise (torchattacks' ``EOTPGD``);
- ``aa-rand``: AutoAttack's version for randomized defences, APGD-CE then APGD-DLR with EOT (pyautoattack's
  ``AutoAttack(version="rand")``), with the protocol's iterations and draws;
- ``aa-standard``: AutoAttack's standard version for deterministic defences (APGD-CE, APGD-T, FAB-T, Square at
  their published budgets; ``AutoAttack(version="standard")``), the evaluation RobustBench reports;
- ``pgd-fixed``: the fixed-randomness ablation: the defence's noise frozen per image while attacking and while
  evaluating, i.e. PGD against a deterministic purifier;
- ``BPDA``: a non-differentiable transform evaluated as itself but differentiated as a smooth approximation
  (the identity by default; Athalye et al. 2018), so the same attacks run against JPEG-like defences.

A randomized defence is scored over ``N`` independent evaluations with fresh noise (``score``): ``single`` is
the mean accuracy of one evaluation, ``worst`` counts an image only if all ``N`` evaluations are correct
(DiffHammer), ``vote`` takes the majority of the ``N`` predicted labels (DiffBreak).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torchattacks
from torch import nn

from ._compat import import_autoattack
from .craft import autocast

SCORINGS = ("single", "worst", "vote")


@dataclass(frozen=True)
class Protocol:
    """How hard an adaptive evaluation tries: attack iterations, EOT draws, and evaluations for scoring."""
    name: str
    pgd_steps: int
    pgd_step_ratio: float     # PGD step size as a fraction of eps
    eot: int                  # noise draws averaged per gradient (PGD-EOT and APGD alike)
    apgd_iters: int           # iterations of each of AutoAttack-rand's APGD-CE and APGD-DLR
    evals: int                # N: independent evaluations behind the worst-case and vote scorings

    def step_size(self, eps: float) -> float:
        return self.pgd_step_ratio * eps

    def describe(self, eps: float, randomized: bool = True) -> str:
        """The attacks as run against a randomized defence, or (``randomized=False``) against a deterministic one:
        PGD without EOT, AutoAttack's standard version, one evaluation."""
        step = f"{self.step_size(eps) * 255:.3g}/255"
        if not randomized:
            return (f"PGD {self.pgd_steps} steps of {step} (deterministic defence: no EOT); AutoAttack standard "
                    f"(APGD-CE, APGD-T, FAB-T, Square) at its own budgets; one evaluation decides")
        return (f"PGD-EOT {self.pgd_steps} steps of {step} x {self.eot} EOT draws; "
                f"AutoAttack-rand (APGD-CE + APGD-DLR) {self.apgd_iters} iterations x {self.eot} EOT draws; "
                f"scored over N = {self.evals} evaluations")


PROTOCOLS = {
    # The anchors' protocol (Lee & Kim, ICCV 2023: 200 steps of 0.007 at 8/255, 20 EOT draws; AutoAttack-rand at
    # its default 100 iterations and 20 draws; N = 10 as in DiffHammer). For GPUs.
    "paper": Protocol("paper", pgd_steps=200, pgd_step_ratio=0.007 / (8 / 255), eot=20, apgd_iters=100, evals=10),
    # Scaled down to run on 2 CPU cores in about 30 minutes per setting of 200 images with the small preset.
    "cpu": Protocol("cpu", pgd_steps=20, pgd_step_ratio=0.25, eot=4, apgd_iters=20, evals=10),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def eot_pgd(model: nn.Module, eps: float, steps: int, step_size: float, eot: int,
            random_start: bool = True) -> torchattacks.attack.Attack:
    """L-inf PGD with expectation over transformation: each step's gradient is the mean over ``eot``
    forward/backward passes, each drawing the defence's noise afresh (torchattacks' ``EOTPGD``)."""
    if eps <= 0 or steps < 1 or eot < 1 or step_size <= 0:
        raise ValueError(f"PGD-EOT needs eps > 0, steps >= 1, eot >= 1 and step size > 0; got eps={eps}, "
                         f"steps={steps}, eot={eot}, step_size={step_size}")
    return torchattacks.EOTPGD(model, eps=eps, alpha=step_size, steps=steps, eot_iter=eot,
                               random_start=random_start)


class _Float32Logits(nn.Module):
    """``model`` with float32 outputs. Under bf16 autocast the logits are bfloat16, and AutoAttack's Square
    attack then writes float32 losses into a bfloat16 buffer and fails."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def autoattack_rand(model: nn.Module, eps: float, iters: int, eot: int, seed: int = 0,
                    device: torch.device | str = "cpu"):
    """AutoAttack's randomized version (APGD-CE, then APGD-DLR on the points still robust, with EOT) with
    ``iters`` iterations and ``eot`` draws per gradient (the original: 100 and 20)."""
    if eps <= 0 or iters < 1 or eot < 1:
        raise ValueError(f"AutoAttack-rand needs eps > 0, iters >= 1 and eot >= 1; got {eps}, {iters}, {eot}")
    adversary = import_autoattack().AutoAttack(_Float32Logits(model), norm="Linf", eps=eps, version="rand",
                                               seed=seed, device=device)
    adversary.apgd.n_iter, adversary.apgd.eot_iter = iters, eot
    adversary.verbose = False
    return adversary


def autoattack_standard(model: nn.Module, eps: float, seed: int = 0, device: torch.device | str = "cpu"):
    """AutoAttack's standard version (APGD-CE, APGD-T on 9 target classes, FAB-T, Square with 5,000 queries),
    unchanged: the reference evaluation of a deterministic model."""
    if eps <= 0:
        raise ValueError(f"AutoAttack needs eps > 0, got {eps}")
    adversary = import_autoattack().AutoAttack(_Float32Logits(model), norm="Linf", eps=eps, version="standard",
                                               seed=seed, device=device)
    adversary.verbose = False
    return adversary


def run_autoattack(adversary, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250,
                   bf16: bool = False) -> torch.Tensor:
    """``adversary``'s adversarial images (float in [0, 1], on the CPU). AutoAttack keeps the clean image
    wherever its own single evaluation found no adversarial example; ``score`` re-evaluates them N times.
    The caller's RNG state is restored afterwards (AutoAttack reseeds torch's global RNG)."""
    device = torch.device(adversary.device)
    x = (images.float() / 255 if images.dtype == torch.uint8 else images.float()).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, bf16):
        adversarial, _ = adversary.run_standard_evaluation(x, labels.to(device), batch_size=batch_size)
    return adversarial.float().cpu()


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation (Athalye et al. 2018): the forward pass is ``transform(x)``,
    the backward pass is that of ``approximation(x)`` (the identity by default), so gradient attacks run
    through a non-differentiable defence such as JPEG re-compression."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor],
                 approximation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.transform = transform
        self.approximation = approximation if approximation is not None else (lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = self.approximation(x)
        with torch.no_grad():
            exact = self.transform(x)
        return smooth + (exact - smooth).detach()


NoiseContext = Callable[[torch.Tensor, int], ContextManager]
"""``noise(indices, draw)``: a context within which the defence uses the noise of draw ``draw`` for the
images at ``indices`` (e.g. ``BCMPurifier.fixed_noise(image_noise(...))``)."""


def no_noise(indices: torch.Tensor, draw: int) -> ContextManager:
    """The noise context of a deterministic defence."""
    return contextlib.nullcontext()


@torch.no_grad()
def predict_draws(model: nn.Module, images: torch.Tensor, ids: torch.Tensor, evals: int,
                  noise: NoiseContext = no_noise, batch_size: int = 250, bf16: bool = False) -> torch.Tensor:
    """Predicted labels, shape (``evals``, n): row ``d`` is one evaluation of every image with the noise of
    draw ``d`` (per image ``ids``, so independent of batching). ``images`` are uint8 or float in [0, 1]."""
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    if evals < 1:
        raise ValueError(f"evals must be >= 1, got {evals}")
    device = next(model.parameters()).device
    out = torch.empty(evals, len(images), dtype=torch.long)
    if model.training:  # batch norm in training mode would use and update batch statistics
        raise ValueError("predict_draws needs a model in eval mode (call .eval() first)")
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        for draw in range(evals):
            with noise(ids[start:start + batch_size], draw), autocast(device, bf16):
                out[draw, start:start + len(x)] = model(x).argmax(1).cpu()
    return out


def correct_by_scoring(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, whether it counts as correct under each scoring, from (N, n) predicted labels."""
    correct = predictions == labels.cpu()[None]
    votes = torch.nn.functional.one_hot(predictions, num_classes=int(predictions.max()) + 1).sum(0)
    majority = votes.argmax(1)  # ties go to the smallest label
    return {"single": correct.float().mean(0), "worst": correct.all(0).float(),
            "vote": (majority == labels.cpu()).float()}


def score(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy in [0, 1] under each scoring (``SCORINGS``) from (N, n) predicted labels."""
    return {name: value.mean().item() for name, value in correct_by_scoring(predictions, labels).items()}
