"""Attacks: a thin layer over torchattacks.

- ``paper_pgd(model, k)``: the BCM paper's L-inf PGD at ``eps = k/255`` (``round(5k/4)`` steps of 2/255);
  ``EPS_GRID`` is its Table 3 grid ``{0, 4, 8, 12, 16, 24, 32}``.
- ``make_attack(name, model, **kwargs)``: any torchattacks attack by class name (``ATTACKS`` lists them).
- ``craft(attack, images, labels)``: run an attack over a data set in seeded batches.

- ``eot``: white-box attacks on a randomized defence's decision (margin/CE PGD, APGD, Square on the prediction
  averaged over draws, best iterate per image); ``adaptive``: their budgets (``PROTOCOLS``), AutoAttack's standard
  version, BPDA, and the scorings of randomized defences (average, all and strict majority of N).

``purify.infra.optional`` is the one place that imports RobustBench/AutoAttack.
"""
from .adaptive import (BPDA, PROTOCOLS, SCORINGS, SUITE, Protocol, autoattack_standard, correct_by_scoring,
                       get_protocol, majority_correct, predict_draws, run_autoattack, score)
from .craft import craft
from .eot import BestIteratePGD, BestLossAPGD, BestMarginSquare, DrawAverage, attack_loss
from .pgd import EPS_GRID, PGD_STEP_SIZE, check_eps, paper_pgd, pgd_steps
from .registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "BPDA", "BestIteratePGD", "BestLossAPGD", "BestMarginSquare", "DrawAverage", "EPS_GRID",
           "PGD_STEP_SIZE", "PROTOCOLS", "SCORINGS", "SUITE", "Protocol", "attack_loss", "autoattack_standard",
           "check_eps", "correct_by_scoring", "craft", "get_protocol", "majority_correct", "make_attack",
           "paper_pgd", "pgd_steps", "predict_draws", "run_autoattack", "score"]
