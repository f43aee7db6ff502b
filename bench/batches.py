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
def draws_predictions(model: nn.Module, draws: list[torch.Tensor], defence: Defence | None = None,
                      batch_size: int = 250) -> torch.Tensor:
    """The label ``model`` predicts for each image from ``purify_draws``' output for ``defence`` (float32, in
    batches): a vote's decision over its draws (``vote_scores``: the majority of the predicted labels, ties to the
    smallest label, or the argmax of the mean logits), else the argmax on the one image (``draws[0]``; also with no
    defence, e.g. for unpurified images). Images outside [0, 1] or not finite raise ``ValueError``."""
    for x in draws:
        check_images(x)
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(defence, Vote):
        return map_batches(model, [draws[0]], batch_size, device, progress=False).output.argmax(1)
    logits = torch.stack([map_batches(model, [x], batch_size, device, progress=False).output for x in draws])
    return vote_scores(logits, defence.how).argmax(1)


def decisions_accuracy(decisions: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``draws_predictions``' decisions equal to ``labels``: the count of correct over the images,
    so that the decisions of blocks of images merged give the whole set's accuracy exactly."""
    correct = decisions.cpu() == labels.cpu()
    return correct.sum().item() / len(correct)
