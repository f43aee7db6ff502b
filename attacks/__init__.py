"""Attacks: a thin layer over torchattacks.

- ``paper_pgd(model, k)``: the BCM paper's L-inf PGD at ``eps = k/255`` (``round(5k/4)`` steps of 2/255);
  ``EPS_GRID`` is its Table 3 grid ``{0, 4, 8, 12, 16, 24, 32}``.
- ``make_attack(name, model, **kwargs)``: any torchattacks attack by class name (``ATTACKS`` lists them).
- ``craft(attack, images, labels)``: run an attack over a data set in seeded batches.

- ``adaptive``: white-box attacks through a defence (PGD-EOT, AutoAttack-rand and -standard, BPDA), the fixed-randomness
  ablation and the scorings of randomized defences (one evaluation, worst case and majority vote over N).

``_compat`` is the one place that imports RobustBench/AutoAttack.
"""
from .adaptive import (BPDA, PROTOCOLS, SCORINGS, Protocol, autoattack_rand, autoattack_standard,
                       correct_by_scoring, eot_pgd, get_protocol, predict_draws, run_autoattack, score)
from .craft import autocast, craft
from .pgd import EPS_GRID, PGD_STEP_SIZE, check_eps, paper_pgd, pgd_steps
from .registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "BPDA", "EPS_GRID", "PGD_STEP_SIZE", "PROTOCOLS", "SCORINGS", "Protocol", "autoattack_rand",
           "autoattack_standard", "autocast", "check_eps", "correct_by_scoring", "craft", "eot_pgd", "get_protocol", "make_attack",
           "paper_pgd", "pgd_steps", "predict_draws", "run_autoattack", "score"]
