"""Run an attack over a whole image set in batches, reproducibly."""
from __future__ import annotations

import contextlib
import hashlib

import torch
from tqdm.auto import tqdm

from purify.infra.images import as_float
from purify.infra.runtime import autocast


def craft(attack, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250, seed: int | None = 0,
          bf16: bool = False, progress: bool = True, desc: str = "attack", ids: torch.Tensor | None = None,
          noise=None) -> torch.Tensor:
    """Adversarial versions of ``images`` (uint8 or float in [0, 1]) as float32 in [0, 1], on the CPU.

    ``attack`` is any torchattacks-style ``attack(images, labels)``; batches go to its model's device. An
    attack with ``per_image = True`` is also given the batch's ``ids`` and draws its randomness per image.
    With ``seed``, the rest of the attack's randomness (e.g. torchattacks PGD's random start, drawn from
    torch's global RNG) is seeded per batch from ``(seed, id of the batch's first image)`` and the caller's RNG
    state is restored afterwards, so a batch's result depends neither on what ran before nor on which process
    runs it.
    ``bf16`` runs the model's forward and backward passes under bfloat16 autocast; the perturbation itself
    is accumulated in float32. ``noise(ids_of_batch, 0)``, when given, is a context entered around each batch's
    attack (e.g. to freeze a purifier's noise per image for the fixed-randomness ablation); ``ids`` are the
    images' dataset indices (default: their positions).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    device = getattr(attack, "device", None) or torch.device("cpu")
    out = torch.empty(images.shape, dtype=torch.float32)
    ids = torch.arange(len(images)) if ids is None else ids
    noise = noise or (lambda batch_ids, draw: contextlib.nullcontext())
    per_image = getattr(attack, "per_image", False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x, batch_ids = as_float(images[start:start + batch_size]).to(device), ids[start:start + batch_size]
            if seed is not None:
                torch.manual_seed(batch_seed(seed, int(batch_ids[0])))
            with noise(batch_ids, 0), autocast(device, bf16):
                y = labels[start:start + batch_size].to(device)
                adv = attack(x, y, ids=batch_ids) if per_image else attack(x, y)
            out[start:start + len(x)] = adv.float().cpu()
    return out


def batch_seed(seed: int, first_id: int) -> int:
    """The global RNG's seed for the batch whose first image has dataset index ``first_id``."""
    key = hashlib.blake2b(f"batch:{int(seed)}:{first_id}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1
