"""Build a classifier by short name and preset; load a trained one from its checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from purify.infra.checkpoint import load_checkpoint, load_state_dict_strict
from purify.infra.config import from_dict
from purify.infra.paths import CHECKPOINT_DIR

from .architectures import ARCHS, build_architecture
from .config import PRESETS, TrainConfig, load_preset

DEFAULT_CHECKPOINT_DIR = CHECKPOINT_DIR / "classifiers"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names are {', '.join(ARCHS)}")


def build_classifier(arch: str, preset: str = "paper", config: TrainConfig | None = None) -> nn.Module:
    """An untrained classifier ``arch`` at the size of ``preset`` (or of ``config`` when given).

    Inputs are images in [0, 1]; the model normalises with CIFAR-10 mean/std inside. Outputs (B, 10) logits.
    """
    _check_arch(arch)
    config = config if config is not None else load_preset(preset)
    return build_architecture(arch, config.arch(arch))


def checkpoint_path(arch: str, preset: str, checkpoint_dir: str | os.PathLike = DEFAULT_CHECKPOINT_DIR,
                    variant: str | None = None) -> Path:
    """``{checkpoint_dir}/{arch}-{preset}.pt``, or ``{arch}-{preset}-{variant}.pt`` for a fine-tuned variant."""
    return Path(checkpoint_dir) / f"{arch}-{preset}{'' if variant is None else '-' + variant}.pt"


def train_command(arch: str, preset: str) -> str:
    return f"python -m classifiers.train --arch {arch} --preset {preset}"


def load_classifier_state(arch: str, preset: str = "small", checkpoint_dir: str | os.PathLike | None = None,
                          variant: str | None = None) -> tuple[Path, dict]:
    """The path and checkpoint of the trained ``arch``/``preset`` (``variant``) classifier, checked.

    Raises FileNotFoundError naming the training command when the file is missing, and ValueError when the
    checkpoint was trained for another architecture or preset."""
    _check_arch(arch)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets are {', '.join(PRESETS)}")
    path = checkpoint_path(arch, preset, checkpoint_dir if checkpoint_dir is not None else DEFAULT_CHECKPOINT_DIR,
                           variant)
    if not path.is_file():
        command = (train_command(arch, preset) if variant is None else
                   f"python -m classifiers.finetune --arch {arch} --preset {preset} --recipe {variant}")
        name = f"{arch}/{preset}" + ("" if variant is None else f" ({variant})")
        raise FileNotFoundError(f"no trained {name} classifier at {path}; train it with `{command}` (add "
                                f"--out-dir {path.parent} if that is not the default checkpoints/classifiers)")
    state = load_checkpoint(path, required=("arch", "preset", "config", "model"))
    if (state["arch"], state["preset"]) != (arch, preset):
        raise ValueError(f"{path} holds a {state['arch']}/{state['preset']} classifier, "
                         f"not the requested {arch}/{preset}")
    return path, state


def load_classifier(arch: str, preset: str = "small", checkpoint_dir: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", variant: str | None = None) -> nn.Module:
    """The trained classifier ``arch``/``preset`` from ``checkpoint_dir/{arch}-{preset}.pt`` (a ``variant``:
    ``{arch}-{preset}-{variant}.pt``, e.g. one fine-tuned through a purifier), in eval mode.

    ``checkpoint_dir`` defaults to the repository's ``checkpoints/classifiers`` (independent of the CWD).
    Raises as ``load_classifier_state`` does.
    """
    path, state = load_classifier_state(arch, preset, checkpoint_dir, variant)
    model = build_classifier(arch, config=from_dict(TrainConfig, state["config"], f"{path}:config"))
    # Shipped checkpoints store float weights in fp16 to stay small; the model computes in fp32.
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    load_state_dict_strict(model, weights, str(path))
    return model.to(device).eval()
