"""Attacks: a thin layer over torchattacks.

- ``paper_pgd(model, k)``: the BCM paper's L-inf PGD at ``eps = k/255`` (``round(5k/4)`` steps of 2/255);
  ``EPS_GRID`` is its Table 3 grid ``{0, 4, 8, 12, 16, 24, 32}``.
- ``make_attack(name, model, **kwargs)``: any torchattacks attack by class name (``ATTACKS`` lists them).
- ``craft(attack, images, labels)``: run an attack over a data set in seeded batches.

``_compat.import_robustbench()`` is the one place that imports RobustBench/AutoAttack.
"""
from .craft import autocast, craft
from .pgd import EPS_GRID, PGD_STEP_SIZE, check_eps, paper_pgd, pgd_steps
from .registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "EPS_GRID", "PGD_STEP_SIZE", "autocast", "check_eps", "craft", "make_attack", "paper_pgd",
           "pgd_steps"]
