"""The paper's transfer attack: untargeted L-inf PGD on a source model (BCM paper Section 4.3.4, Table 3,
Appendix A.3.4; spec §7).

For ``eps = k/255`` the paper takes ``5k/4`` PGD steps of size ``2/255`` over the grid
``k in {0, 4, 8, 12, 16, 24, 32}``. It does not say whether PGD starts from a random point; we keep
torchattacks' default, a uniform random start in the eps-ball (Madry et al.'s PGD), but draw it per image from
``(seed, image id)`` instead of for the whole batch from the global RNG, so an image's adversarial example does not
depend on the batch or the process it is crafted in (``PerImagePGD``).
"""
from __future__ import annotations

import math

import torch
import torchattacks
from torch import nn

from . import eot
from .registry import make_attack

EPS_GRID = (0, 4, 8, 12, 16, 24, 32)  # eps = k/255 (Table 3)
PGD_STEP_SIZE = 2 / 255


def pgd_steps(k: int) -> int:
    """Number of PGD steps for ``eps = k/255``: ``5k/4`` (Appendix A.3.4), rounded half up."""
    return int(math.floor(5 * k / 4 + 0.5))


def check_eps(k) -> int:
    """``k`` as an int if it is a whole number of 255ths in [0, 255], else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 0 <= k <= 255:
        raise ValueError(f"eps is given as k in eps = k/255 with k a whole number in [0, 255], got {k!r}; "
                         f"the paper's grid is {', '.join(map(str, EPS_GRID))}")
    return int(k)


class PerImagePGD(torchattacks.PGD):
    """torchattacks' untargeted L-inf PGD (cross-entropy, steps of ``alpha`` along the gradient's sign, projected
    on the eps-ball and on [0, 1], the last iterate) whose uniform random start is drawn per image from ``(seed,
    id)`` (``attacks.eot.random_start``): ``attacks.craft`` passes the batch's image ids (``per_image``).
    Without a random start it is torchattacks' ``PGD`` (a test holds them equal)."""

    per_image = True

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, random_start: bool = True,
                 seed: int = 0):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.seed = seed

    def forward(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.targeted:
            raise ValueError("PerImagePGD is untargeted; use torchattacks.PGD for a targeted attack")
        x, y = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        ids = torch.arange(len(x)) if ids is None else ids.cpu()
        start = (self.eps * eot.random_start(ids, x.shape[1:], self.seed, 0, "transfer-pgd").to(x.device)
                 if self.random_start else torch.zeros_like(x))
        adv = (x + start).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            grad, = torch.autograd.grad(nn.functional.cross_entropy(self.get_logits(adv), y), adv)
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (x + (adv - x).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


def paper_pgd(model: nn.Module, eps: int, random_start: bool = True, seed: int = 0) -> torchattacks.attack.Attack:
    """Table 3's attack on ``model`` at ``eps = k/255`` (``eps`` is the integer ``k``): L-inf PGD with
    ``round(5k/4)`` steps of ``2/255`` from a random start drawn per image from ``(seed, id)`` (``PerImagePGD``).
    At ``k = 0`` it is torchattacks' ``VANILA``: the input unchanged."""
    k = check_eps(eps)
    if k == 0:
        return make_attack("VANILA", model)
    return PerImagePGD(model, eps=k / 255, alpha=PGD_STEP_SIZE, steps=pgd_steps(k), random_start=random_start,
                       seed=seed)
