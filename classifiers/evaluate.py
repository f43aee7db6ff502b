"""Clean accuracy of a classifier, batched; reused by the trainer and by ``bench``."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from purify.base import check_images
from purify.infra.images import as_float


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device: str | torch.device | None = None, progress: bool = True) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``images`` (uint8 in [0, 255] or float in [0, 1]; anything else,
    e.g. NaN or the wrong layout, raises ``ValueError`` saying what is wrong).

    ``device`` defaults to the model's own; the model is put in eval mode and restored afterwards.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images: the accuracy of an empty set is undefined")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="accuracy", disable=not progress, leave=False):
            x = images[start:start + batch_size].to(device)
            x = as_float(x)
            check_images(x)
            pred = model(x).argmax(1)
            correct += (pred == labels[start:start + batch_size].to(device)).sum().item()
    finally:
        model.train(was_training)
    return correct / max(1, len(images))
