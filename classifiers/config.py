"""Classifier presets: ``configs/classifiers/{preset}.yaml`` loaded into typed dataclasses."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from purify.infra.config import load_yaml
from purify.infra.data import VAL_SPLIT_SEED
from purify.infra.paths import CONFIG_DIR
from purify.infra.runtime import native_bf16

CLASSIFIER_CONFIG_DIR = CONFIG_DIR / "classifiers"
PRESETS = ("paper", "small")
SPLIT_SEED = VAL_SPLIT_SEED  # the validation split (n_val held-out training images): the same for every seed and
#                             architecture, and the one BCM runs hold out (purify.infra.data)


@dataclasses.dataclass
class ArchConfig:
    """Size of one architecture. ``width``: channel multiplier (WideResNet: its integer widen factor);
    ``depth``: 0 = the architecture's own (WideResNet: 6n + 4); ``stage2_stride``: MobileNet-V2's second
    stage stride (1 is the usual CIFAR choice, 2 is 4x cheaper); ``epochs`` overrides the preset's."""
    width: float = 1.0
    depth: int = 0
    stage2_stride: int = 1
    epochs: int | None = None


@dataclasses.dataclass
class Archs:
    preact: ArchConfig = dataclasses.field(default_factory=ArchConfig)
    wrn: ArchConfig = dataclasses.field(default_factory=lambda: ArchConfig(width=10, depth=34))
    vgg: ArchConfig = dataclasses.field(default_factory=ArchConfig)
    mobilenet: ArchConfig = dataclasses.field(default_factory=ArchConfig)


@dataclasses.dataclass
class TrainConfig:
    """One preset: training recipe shared by all architectures plus each architecture's size."""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"          # "multistep" (paper) or "onecycle" (linear warm-up, linear decay)
    milestones: list[int] = dataclasses.field(default_factory=lambda: [100, 150])  # epochs, multistep only
    gamma: float = 0.1
    warmup_fraction: float = 0.0          # onecycle only: share of steps spent warming up
    label_smoothing: float = 0.0
    n_val: int = 1000                     # training images held out to select the checkpoint
    bf16: bool | None = False             # bfloat16 autocast; null: only where the device runs it natively
    channels_last: bool = True
    archs: Archs = dataclasses.field(default_factory=Archs)

    def __post_init__(self):
        if self.schedule not in ("multistep", "onecycle"):
            raise ValueError(f"schedule must be 'multistep' or 'onecycle', got {self.schedule!r}")

    def use_bf16(self, device: torch.device) -> bool:
        """Whether to autocast to bfloat16 on ``device``: ``bf16``, or when it is null, whether ``device`` runs
        bf16 natively (on an AVX2-only CPU emulated bf16 is 3-10x slower than float32)."""
        return native_bf16(device) if self.bf16 is None else self.bf16

    def arch(self, name: str) -> ArchConfig:
        return getattr(self.archs, name)

    def epochs_for(self, name: str) -> int:
        own = self.arch(name).epochs
        return self.epochs if own is None else own


def load_preset(preset: str, config_dir: str | Path = CLASSIFIER_CONFIG_DIR) -> TrainConfig:
    """The preset ``paper`` or ``small`` (or any ``{preset}.yaml`` in ``config_dir``)."""
    path = Path(config_dir) / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(config_dir).glob("*.yaml")) or list(PRESETS)
        raise ValueError(f"unknown preset {preset!r}; valid presets are {', '.join(known)} (in {config_dir})")
    return load_yaml(TrainConfig, path)
