"""Any torchattacks attack by name, so callers swap attacks without rewriting their loops."""
from __future__ import annotations

import inspect

import torchattacks
from torch import nn

# Every attack class torchattacks exports (PGD, FGSM, APGD, CW, Square, ...); ``MultiAttack`` combines
# attack objects rather than wrapping a model, so it is not constructible by name.
ATTACKS = tuple(name for name in torchattacks.__all__
                if inspect.isclass(getattr(torchattacks, name))
                and issubclass(getattr(torchattacks, name), torchattacks.attack.Attack)
                and name != "MultiAttack")


def make_attack(name: str, model: nn.Module, **kwargs) -> torchattacks.attack.Attack:
    """``torchattacks.<name>(model, **kwargs)``: an attack object called as ``attack(images, labels)`` on
    images in [0, 1]. ``name`` is the torchattacks class name, e.g. ``"PGD"``, ``"FGSM"``, ``"APGD"``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; torchattacks provides {', '.join(ATTACKS)}")
    return getattr(torchattacks, name)(model, **kwargs)
