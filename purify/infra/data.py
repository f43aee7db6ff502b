"""CIFAR-10 as in-memory uint8 tensors, shared by every package.

A whole split is read once per process (a subset, ``load_cifar10(..., indices)``, decodes only its own files)
from either
- an ImageFolder root (``<root>/{train,test}/<class>/*.jpg``), such as the offline JPEG copy; or
- torchvision's ``CIFAR10`` binary release under ``<root>`` (downloaded there on a connected machine).

The root comes from the ``--data-root`` option of each command, else the ``BCM_DATA`` environment
variable, else ``~/.cache/bcm-purify/cifar10`` (download target).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "bcm-purify" / "cifar10"


def default_data_root() -> Path:
    """The data root used when a command is given none: ``$BCM_DATA`` or the download cache."""
    env = os.environ.get("BCM_DATA")
    return Path(env) if env else DEFAULT_DOWNLOAD_ROOT


def load_cifar10(split: str, root: str | os.PathLike | None = None,
                 indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``; the whole split is cached per
    process. With ``indices``, only those images: from an ImageFolder copy only their files are decoded (a
    subset of the 50,000 training images costs its own size, not the split's)."""
    root = _root(split, root)
    if indices is not None and (root / split).is_dir():
        paths, labels = _listing(root / split)
        return _decode([paths[i] for i in indices.tolist()], root / split), labels[indices]
    images, labels = _load(split, root)
    return (images, labels) if indices is None else (images[indices], labels[indices])


def cifar10_labels(split: str, root: str | os.PathLike | None = None) -> torch.Tensor:
    """Every label of the split (int64), without decoding an ImageFolder copy's images."""
    root = _root(split, root)
    return _listing(root / split)[1] if (root / split).is_dir() else _load(split, root)[1]


def _root(split: str, root: str | os.PathLike | None) -> Path:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_data_root()
    return root.expanduser().resolve()


@functools.lru_cache(maxsize=4)
def _load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if (root / split).is_dir():
        paths, labels = _listing(root / split)
        return _decode(paths, root / split), labels
    images, labels = _read_torchvision(split, root)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


@functools.lru_cache(maxsize=4)
def _listing(folder: Path) -> tuple[list[str], torch.Tensor]:
    """The image files of an ImageFolder copy in torchvision's order, and their labels."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder))
    if tuple(dataset.classes) != CLASSES:
        raise ValueError(f"{folder} has class folders {dataset.classes}, expected CIFAR-10's {list(CLASSES)}")
    return [path for path, _ in dataset.samples], torch.tensor(dataset.targets, dtype=torch.int64)


def _decode(paths: list[str], folder: Path) -> torch.Tensor:
    from PIL import Image

    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{folder} holds images of shape {images.shape[1:]}, expected 32x32 RGB")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _read_torchvision(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=split == "train", download=True)
    except Exception as err:  # no network, or a broken download
        raise FileNotFoundError(
            f"CIFAR-10 {split} split not found under {root}. Either point --data-root (or the BCM_DATA "
            f"environment variable) at an ImageFolder copy with {split}/<class>/*.jpg, e.g. "
            f"../shared/data/cifar10, or run on a machine that can download torchvision's CIFAR10 "
            f"into {root}. ({type(err).__name__}: {err})"
        ) from err
    return np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)


VAL_SPLIT_SEED = 0  # the validation split the classifiers select on and BCM runs with train.n_val hold out


def train_val_split(n: int, n_val: int, seed: int = VAL_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of ``range(n)`` into (train indices, validation indices)."""
    if not 0 <= n_val < n:
        raise ValueError(f"n_val must be in [0, {n}), got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def seeded_subset(n_total: int, n: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random subset of size ``n`` (all indices, in order, when ``n`` is None or >= total)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[:n].sort().values


def augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch: random crop after zero padding by ``pad``, random h-flip."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    cropped = padded.gather(2, rows.to(images.device))
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
    cropped = cropped.gather(3, cols.to(images.device))
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
