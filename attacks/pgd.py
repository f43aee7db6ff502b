"""The paper's transfer attack: untargeted L-inf PGD on a source model (BCM paper Section 4.3.4, Table 3,
Appendix A.3.4; spec §7).

For ``eps = k/255`` the paper takes ``5k/4`` PGD steps of size ``2/255`` over the grid
``k in {0, 4, 8, 12, 16, 24, 32}``. It does not say whether PGD starts from a random point; we keep
torchattacks' default, a uniform random start in the eps-ball (Madry et al.'s PGD).
"""
from __future__ import annotations

import math

import torchattacks
from torch import nn

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


def paper_pgd(model: nn.Module, eps: int, random_start: bool = True) -> torchattacks.attack.Attack:
    """Table 3's attack on ``model`` at ``eps = k/255`` (``eps`` is the integer ``k``): L-inf PGD with
    ``round(5k/4)`` steps of ``2/255``. At ``k = 0`` it is torchattacks' ``VANILA``: the input unchanged."""
    k = check_eps(eps)
    if k == 0:
        return make_attack("VANILA", model)
    return make_attack("PGD", model, eps=k / 255, alpha=PGD_STEP_SIZE, steps=pgd_steps(k),
                       random_start=random_start)
