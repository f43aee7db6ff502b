"""Adaptive (white-box) evaluation of a defended model and the scoring of randomized defences (spec §9).

The attacker knows the whole defence and differentiates through it: for the BCM purifier the gradients are
exact (both network evaluations are backpropagated). The attacks themselves are in ``attacks.eot``
(margin- and CE-PGD with a decaying step and restarts, APGD-CE/-DLR and Square, each on the prediction
averaged over a step's draws of the defence's noise, each returning the best iterate per image); this module
holds how hard they try (``Protocol``), AutoAttack's standard version for deterministic models, BPDA for
defences that are not differentiable, and how a randomized defence is scored:

A randomized defence is scored over ``N`` independent evaluations with fresh noise (``score``): ``single`` is
the mean accuracy of one evaluation (average of N), ``worst`` counts an image only if all ``N`` evaluations
are correct (DiffHammer), ``vote`` only if the true label holds a strict majority of the ``N`` predicted
labels, ties counting as wrong (DiffBreak). Scoring always runs in float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from purify.defences import vote_shares
from purify.infra.images import as_float
from purify.infra.optional import import_autoattack
from purify.infra.runtime import autocast

from .eot import STEP_SCHEDULE

SCORINGS = ("single", "worst", "vote")
SUITE = "v2"  # the attack suite's version, part of every results key: a resumed CSV never mixes suites


@dataclass(frozen=True)
class Protocol:
    """How hard an adaptive evaluation tries (``attacks.eot``'s attacks): PGD steps and APGD iterations, draws
    of a randomized defence's noise per step, random restarts, Square's queries, evaluations for scoring."""
    name: str
    steps: int                 # margin-PGD and CE-PGD steps; APGD-CE and APGD-DLR iterations
    eot: int                   # draws averaged per step (randomized defences; deterministic ones take 1)
    restarts: int              # random restarts of each PGD against a randomized defence
    square_queries: int        # Square's queries (each costs ``eot`` draws); 0 leaves Square out
    evals: int                 # N: fresh evaluations behind the three scorings
    restarts_deterministic: int = 5  # PGD restarts against a deterministic defence (cheap: one draw a step)

    def describe(self, eps: float, randomized: bool = True) -> str:
        """The suite as run against a randomized defence, or (``randomized=False``) a deterministic one."""
        steps = " -> ".join(f"{eps * f * 255:.3g}" for _, f in STEP_SCHEDULE) + "/255"
        if not randomized:
            return (f"margin-PGD and CE-PGD, {self.steps} steps of {steps} x {self.restarts_deterministic} "
                    f"restarts, best iterate; AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) at its own "
                    f"budgets; one evaluation decides")
        square = (f"; Square {self.square_queries} queries x {self.eot} draws" if self.square_queries else "")
        return (f"margin-PGD and CE-PGD {self.steps} steps of {steps} x {self.restarts} restart(s); APGD-CE and "
                f"APGD-DLR {self.steps} iterations (AutoAttack's schedule); every step on the prediction averaged "
                f"over {self.eot} draws, best iterate per image{square}; scored over N = {self.evals} fresh "
                f"evaluations")


PROTOCOLS = {
    # Two cores, the small preset: about 10 minutes per white-box threat on 200 images of the robust
    # configuration (docs/adaptive.md).
    "cpu": Protocol("cpu", steps=20, eot=4, restarts=1, square_queries=0, evals=10),
    # The sealed headline on a GPU: 100 steps x 10 draws (the independent check's budget) for each loss.
    "gpu": Protocol("gpu", steps=100, eot=10, restarts=1, square_queries=1000, evals=10),
    # The anchors' budget (Lee & Kim, ICCV 2023: 200 steps x 20 draws; N = 10 as in DiffHammer).
    "paper": Protocol("paper", steps=200, eot=20, restarts=1, square_queries=5000, evals=10),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


class _Float32Logits(nn.Module):
    """``model`` with float32 outputs. Under bf16 autocast the logits are bfloat16, and AutoAttack's Square
    attack then writes float32 losses into a bfloat16 buffer and fails."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


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
    """``adversary``'s adversarial images (float in [0, 1], on the CPU), for a deterministic model (one
    evaluation decides, as AutoAttack assumes). The caller's RNG state is restored afterwards (AutoAttack
    reseeds torch's global RNG)."""
    device = torch.device(adversary.device)
    x = as_float(images).to(device)
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
                  noise: NoiseContext = no_noise, batch_size: int = 250) -> torch.Tensor:
    """Predicted labels, shape (``evals``, n): row ``d`` is one evaluation of every image with the noise of
    draw ``d`` (per image ``ids``, so independent of batching). ``images`` are uint8 or float in [0, 1].
    Always float32: bf16 may speed attacks up, never the scoring."""
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
        x = as_float(x).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        for draw in range(evals):
            with noise(ids[start:start + batch_size], draw):
                out[draw, start:start + len(x)] = model(x).argmax(1).cpu()
    return out


def majority_correct(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The majority scoring rule, per image: the true label holds strictly more of the N votes than any other
    label (a tie counts as wrong: an attacker who reaches a tie has reached a coin flip, whatever rule the
    deployed vote uses to break it, ``purify.defences``)."""
    votes = vote_shares(predictions, int(max(predictions.max(), labels.max())) + 1)
    true = votes.gather(1, labels.cpu()[:, None]).squeeze(1)
    others = votes.scatter(1, labels.cpu()[:, None], -1).amax(1)
    return true > others


def correct_by_scoring(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, whether it counts as correct under each scoring, from (N, n) predicted labels: ``single``
    the fraction of the N evaluations that are right (its mean is the average of N), ``worst`` all N right,
    ``vote`` a strict majority right (``majority_correct``)."""
    correct = predictions == labels.cpu()[None]
    return {"single": correct.float().mean(0), "worst": correct.all(0).float(),
            "vote": majority_correct(predictions, labels).float()}


def score(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy in [0, 1] under each scoring (``SCORINGS``) from (N, n) predicted labels."""
    return {name: value.mean().item() for name, value in correct_by_scoring(predictions, labels).items()}
