"""A BCM preset: model, loss, training and purifier settings, loaded from ``configs/bcm/*.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .bcm import BCMConfig
from .bct import LossConfig
from .infra.config import from_dict, load_yaml
from .infra.paths import CONFIG_DIR

BCM_CONFIG_DIR = CONFIG_DIR / "bcm"


@dataclass
class TrainConfig:
    batch_size: int = 1024           # global batch, split over DDP ranks
    accumulate: int = 1              # micro-batches per rank and step (gradient accumulation, for less memory)
    total_steps: int = 400_000       # the run's length, and K of the curriculum (Eq. 21) unless set below
    curriculum_steps: int | None = None  # K of Eq. 21 when it differs from total_steps (training on at the final N)
    lr: float = 1e-4                 # RAdam
    warmup_steps: int = 0            # linear learning-rate warm-up over the first steps of a fresh optimizer
    ema_decay: float = 0.99993
    grad_clip: float | None = None
    hflip: bool = True
    channels_last: bool = False
    checkpoint_every: int = 1000     # steps
    log_every: int = 50              # steps
    seed: int = 0
    n_val: int = 0                   # training images held out (the classifiers' validation split) when > 0


@dataclass
class PurifierConfig:
    t_star: float = 80.0             # spec §7: invert 0.11 -> 80 in one step, then denoise in one step
    eps_inv: float = 0.11


@dataclass
class Preset:
    model: BCMConfig = field(default_factory=BCMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    purifier: PurifierConfig = field(default_factory=PurifierConfig)


def load_preset(name_or_path: str) -> Preset:
    """A preset by file path, or by name under ``configs/bcm`` (``cifar10-small``, ``cifar10-paper``)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BCM_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in BCM_CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no BCM preset {name_or_path!r}; known presets: {known}, or give a YAML path")
    return load_yaml(Preset, path)


def preset_from_dict(data: dict, where: str = "checkpoint config") -> Preset:
    return from_dict(Preset, data, where)
