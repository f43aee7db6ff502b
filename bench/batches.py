"""Models and defences applied to many images in batches, and the accuracy of a classifier on the result: the one
batch loop of the bench commands (transfer, trade-off, quality, applications)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

import classifiers
from purify import Defence, image_noise
from purify.base import check_images
from purify.defences import Vote, vote_scores
from purify.infra.runtime import autocast


@dataclass(frozen=True)
class Batched:
    """What ``map_batches`` returns: the outputs of every batch, concatenated on the CPU in float32, and the
    wall seconds the batches took."""
    output: torch.Tensor
    seconds: float


def map_batches(function: Callable[..., torch.Tensor], inputs: list[torch.Tensor], batch_size: int,
                device: torch.device, *, bf16: bool = False, desc: str = "", progress: bool = True) -> Batched:
    """``function(*batch)`` over consecutive batches of ``inputs``, in order: each input with as many rows as the
    longest is sliced (images, their labels or ids), any other (a mask of one image that broadcasts) is passed
    whole; every input goes to ``device``, the call runs under bf16 autocast with ``bf16``."""
    n = max(len(x) for x in inputs)
    outputs, started = [], time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        batch = [(x[start:start + batch_size] if len(x) == n else x).to(device) for x in inputs]
        with autocast(device, bf16):
            outputs.append(function(*batch).float().cpu())
    return Batched(torch.cat(outputs), time.perf_counter() - started)


@torch.inference_mode()
def purify_images(defence: Defence, images: torch.Tensor, ids: torch.Tensor, seed: int, device: torch.device,
                  batch_size: int = 250, bf16: bool = False, progress: bool = True, desc: str = "purify",
                  draw: int = 0) -> torch.Tensor:
    """``defence`` applied to float images in [0, 1] in batches; a randomized defence's noise for image ``i`` is
    drawn from ``(seed, draw, ids[i])`` (``image_noise``), so the result does not depend on the batch size."""
    def purify(x: torch.Tensor, batch_ids: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        noise = (defence.fixed_noise(image_noise(batch_ids, defence.noise_shape(x.shape[1:]), seed, draw))
                 if defence.randomized else contextlib.nullcontext())
        with noise:
            return defence(x)

    return map_batches(purify, [images, ids], batch_size, device, bf16=bf16, desc=desc, progress=progress).output


def purify_draws(defence: Defence, images: torch.Tensor, ids: torch.Tensor, seed: int, device: torch.device,
                 batch_size: int = 250, bf16: bool = False, progress: bool = True) -> list[torch.Tensor]:
    """The images after ``defence``, one tensor per draw: a vote's n purifications by its base (draws 0..n-1,
    independent noise), else the one purification."""
    base, draws = (defence.base, defence.n) if isinstance(defence, Vote) else (defence, 1)
    return [purify_images(base, images, ids, seed, device, batch_size, bf16, progress,
                          desc=f"purify ({base.spec()}) {d + 1}/{draws}", draw=d) for d in range(draws)]


@torch.no_grad()
def vote_accuracy(model: nn.Module, draws: list[torch.Tensor], labels: torch.Tensor, how: str,
                  batch_size: int = 250) -> float:
    """Accuracy of the decision over several purifications of the same images: the majority of the predicted
    labels (ties to the smallest label) or the argmax of the mean logits."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.stack([map_batches(model, [x], batch_size, device, progress=False).output for x in draws])
    return (vote_scores(logits, how).argmax(1) == labels.cpu()).float().mean().item()


def draws_accuracy(model: nn.Module, draws: list[torch.Tensor], labels: torch.Tensor, defence: Defence,
                   batch_size: int = 250) -> float:
    """Accuracy in [0, 1] of ``model`` on ``purify_draws``' output for ``defence``: a vote's decision over its
    draws, else the accuracy on the one purification."""
    if isinstance(defence, Vote):
        return vote_accuracy(model, draws, labels, defence.how, batch_size)
    return classifiers.accuracy(model, draws[0], labels, batch_size, progress=False)


@torch.no_grad()
def draws_predictions(model: nn.Module, draws: list[torch.Tensor], defence: Defence | None,
                      batch_size: int = 250) -> torch.Tensor:
    """Per image the label ``model`` decides on ``purify_draws``' output for ``defence`` (None: the unpurified
    images, float in [0, 1]): a vote's decision over its draws, else the argmax on the one tensor. With
    ``decisions_accuracy`` this is ``draws_accuracy`` image by image, so the decisions of blocks of images can be
    merged and scored exactly as the whole set."""
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(defence, Vote):
        check_images(draws[0])  # as classifiers.accuracy does
    logits = torch.stack([map_batches(model, [x], batch_size, device, progress=False).output for x in draws])
    return (vote_scores(logits, defence.how) if isinstance(defence, Vote) else logits[0]).argmax(-1)


def decisions_accuracy(decisions: torch.Tensor, labels: torch.Tensor, defence: Defence | None) -> float:
    """The accuracy ``draws_accuracy`` (``classifiers.accuracy`` for None) reports, from ``draws_predictions``'
    decisions: the same float, a vote's as a float32 mean, any other as the count of correct over the images."""
    correct = decisions.cpu() == labels.cpu()
    if isinstance(defence, Vote):
        return correct.float().mean().item()
    return correct.sum().item() / max(1, len(labels))
