"""White-box attacks aimed at a randomized defence's deployed decision, with the best iterate per image.

A randomized defence (the BCM purifier draws noise on every call) is scored by its decision over several
independent evaluations (a majority of N, ``attacks.adaptive.correct_by_scoring``). The attacks here attack
that decision, not one noisy evaluation of it:

- ``DrawAverage(model, draws)`` evaluates ``model`` on ``draws`` independent draws of its noise at once and
  returns the log of the *averaged* predicted probabilities, the smooth version of the vote over the draws.
  Its cross-entropy is ``-log mean_k p_k(y)`` and its margin ``log p̄(y) - max_{j != y} log p̄(j)``; with one
  draw (a deterministic model) the margin is the usual logit margin (Carlini-Wagner's loss).
- ``BestIteratePGD``: L-inf PGD on that surrogate with a decaying step size (eps/4, eps/8 from half the
  steps, eps/16 from three quarters: 2 -> 1 -> 0.5 /255 at eps 8/255), random restarts, and per image the
  iterate with the highest loss over all steps and restarts (not the last one).
- ``BestLossAPGD``: AutoAttack's APGD (pyautoattack) on the same surrogate, built with its budget so that its
  step-size checkpoints (22%, 6%, 3% of the iterations) follow it, returning per image the highest-loss
  iterate (``perturb(best_loss=True)``) instead of AutoAttack's "first success by one noisy evaluation, else
  the clean image".
- ``BestMarginSquare``: AutoAttack's gradient-free Square attack on the same surrogate (each query costs
  ``draws`` evaluations; per image the lowest-margin query over the whole budget, not the first query whose
  noisy margin is negative), so that masked gradients cannot hide robustness that a query-based attacker
  removes.

Whether an image resists is decided afterwards by the caller's scoring over fresh evaluations, never here.
Every attack is a callable ``attack(images, labels) -> adversarial images`` with a ``device`` attribute, the
interface ``attacks.craft`` runs over a data set. PGD and APGD also take the images' dataset indices
(``ids=``, default: their positions) and draw their random starts per image from ``(seed, restart, id)``
(``purify.image_noise``), so an image's attack does not depend on the batch it runs in (``per_image``).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from purify.infra.optional import import_autoattack_part
from purify.purifier import image_noise

LOSSES = ("ce", "margin")
# PGD's step size as a fraction of eps, from the given fraction of the steps on
STEP_SCHEDULE = ((0.0, 1 / 4), (0.5, 1 / 8), (0.75, 1 / 16))
# Square's stopping margin is the margin plus this, far above any margin of log-probabilities a classifier gives
SQUARE_NEVER_FOOLED = 1e4


class DrawAverage(nn.Module):
    """``log mean_k softmax(model(x))`` over ``draws`` independent evaluations of ``model`` (float32).

    The draws run as one batch of ``draws x batch`` images, so a defence that draws its noise per image gives
    each copy its own noise; with ``draws = 1`` the output is ``log_softmax(model(x))``."""

    def __init__(self, model: nn.Module, draws: int = 1):
        super().__init__()
        if int(draws) != draws or draws < 1:
            raise ValueError(f"draws must be a positive integer, got {draws}")
        self.model, self.draws = model, int(draws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        logits = self.model(x.repeat(self.draws, *([1] * (x.dim() - 1)))).float()
        log_p = logits.log_softmax(-1).view(self.draws, batch, -1)
        return log_p.logsumexp(0) - math.log(self.draws)


def attack_loss(scores: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss the attacker maximises on log-probabilities ``scores``: ``ce`` = ``-scores[y]``,
    ``margin`` = ``max_{j != y} scores[j] - scores[y]`` (positive exactly where the decision is wrong)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    true = scores.gather(1, labels[:, None]).squeeze(1)
    if kind == "ce":
        return -true
    others = scores.masked_fill(nn.functional.one_hot(labels, scores.shape[1]).bool(), -math.inf)
    return others.amax(1) - true


def step_size(eps: float, step: int, steps: int, schedule=STEP_SCHEDULE) -> float:
    """The step size of step ``step`` (0-based) of ``steps``: ``eps`` times the schedule's fraction."""
    fraction = schedule[0][1]
    for start, value in schedule:
        if step >= start * steps:
            fraction = value
    return eps * fraction


def random_start(ids: torch.Tensor, shape, seed: int, restart: int, stream: str) -> torch.Tensor:
    """Per-image uniform noise on [-1, 1) of ``shape`` (C, H, W) for the images ``ids``: the random start of
    restart ``restart`` of the attack ``stream``."""
    return image_noise(ids, shape, seed, restart, stream, uniform=True) * 2 - 1


def _ids(ids: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
    ids = torch.arange(len(images)) if ids is None else ids.cpu()
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    return ids


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class BestIteratePGD:
    """L-inf PGD on ``DrawAverage(model, draws)`` with the decaying ``STEP_SCHEDULE``, ``restarts`` random
    starts, and per image the iterate with the highest loss seen (each step's loss is measured on that step's
    draws, the same ones its gradient comes from)."""

    per_image = True

    def __init__(self, model: nn.Module, eps: float, steps: int, draws: int = 1, loss: str = "margin",
                 restarts: int = 1, random_start: bool = True, seed: int = 0):
        if eps <= 0 or steps < 1 or restarts < 1:
            raise ValueError(f"PGD needs eps > 0, steps >= 1 and restarts >= 1; got eps={eps}, steps={steps}, "
                             f"restarts={restarts}")
        attack_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), loss)  # checks the name
        self.scores, self.eps, self.steps, self.loss = DrawAverage(model, draws), eps, steps, loss
        self.restarts, self.random_start, self.seed = restarts, random_start, seed
        self.device = _device(model)
        self.history: list[torch.Tensor] = []  # the mean loss of each step of the last call, on the device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        x, eps, ids = images.detach().float(), self.eps, _ids(ids, images)
        best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
        self.history = []
        for restart in range(self.restarts):
            start = (eps * random_start(ids, x.shape[1:], self.seed, restart, "pgd").to(x.device)
                     if self.random_start else torch.zeros_like(x))
            adv = (x + start).clamp(0, 1)
            for step in range(self.steps + 1):  # the last pass only measures the final iterate
                adv.requires_grad_(True)
                with torch.enable_grad():
                    loss = attack_loss(self.scores(adv), labels, self.loss)
                    grad, = torch.autograd.grad(loss.sum(), adv)
                with torch.no_grad():  # torch.where, not boolean indexing: no host synchronisation per step
                    better = loss.detach() > best_loss
                    best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), adv.detach(), best)
                    best_loss = torch.where(better, loss.detach(), best_loss)
                    self.history.append(loss.detach().mean())
                    if step == self.steps:
                        break
                    moved = adv.detach() + step_size(eps, step, self.steps) * grad.sign()
                    adv = (x + (moved - x).clamp(-eps, eps)).clamp(0, 1)
        return best


class BestLossAPGD:
    """APGD-CE or APGD-DLR (AutoAttack's, ``loss`` "ce" or "dlr") on ``DrawAverage(model, draws)`` for
    ``iters`` iterations and ``restarts`` restarts, returning per image the highest-loss iterate over the
    restarts (``perturb(best_loss=True)``'s rule), each restart from a per-image random start."""

    per_image = True

    def __init__(self, model: nn.Module, eps: float, iters: int, draws: int = 1, loss: str = "ce",
                 restarts: int = 1, seed: int = 0):
        if eps <= 0 or iters < 1 or restarts < 1:
            raise ValueError(f"APGD needs eps > 0, iters >= 1 and restarts >= 1; got {eps}, {iters}, {restarts}")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"APGD's loss is 'ce' or 'dlr', got {loss!r}")
        self.device = _device(model)
        # built with the budget: APGD derives its step-size checkpoints from n_iter in its constructor
        apgd = import_autoattack_part("autopgd_base").APGDAttack
        self.apgd = apgd(DrawAverage(model, draws), n_iter=iters, norm="Linf", eps=eps, loss=loss,
                         n_restarts=restarts, eot_iter=1, seed=seed, device=self.device)
        self.restarts, self.seed = restarts, seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        x, ids = images.detach().float(), _ids(ids, images)
        self.apgd.init_hyperparam(x)
        best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
        for restart in range(self.restarts):
            # APGD's own L-inf start, x + eps * t / max|t|, with t drawn per image
            t = random_start(ids, x.shape[1:], self.seed, restart, "apgd").to(x.device)
            start = x + self.apgd.eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            adv, _, loss, _ = self.apgd.attack_single_run(x, labels, x_init=start)
            better = loss > best_loss
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
            best_loss = torch.where(better, loss, best_loss)
        return best.detach()


class BestMarginSquare:
    """AutoAttack's Square attack (L-inf, margin loss, ``queries`` queries) on ``DrawAverage(model, draws)``,
    every query on every image: AutoAttack's Square stops attacking an image at its first query with a negative
    margin, which on a randomized defence is one noisy evaluation that fresh draws may overturn; here each image
    keeps its lowest-margin query over the whole budget."""

    def __init__(self, model: nn.Module, eps: float, queries: int, draws: int = 1, seed: int = 0):
        if eps <= 0 or queries < 1:
            raise ValueError(f"Square needs eps > 0 and queries >= 1; got {eps}, {queries}")
        self.device = _device(model)
        self.square = _full_budget_square()(DrawAverage(model, draws), p_init=0.8, n_queries=queries, eps=eps,
                                            norm="Linf", n_restarts=1, seed=seed, device=self.device,
                                            loss="margin", resc_schedule=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # attack_single_run on every image returns its lowest-margin iterate; ``perturb`` would keep the clean
        # image wherever its own evaluation of the result found the decision still right
        x = images.detach().float()
        self.square.init_hyperparam(x)
        with torch.no_grad():
            return self.square.attack_single_run(x, labels)[1].detach()


@functools.cache
def _full_budget_square() -> type:
    """AutoAttack's ``SquareAttack`` with its stopping margin shifted out of reach. Square stops attacking an image
    once its (stopping) margin is negative and accepts a query that improves the loss or makes that margin
    negative; with the margin shifted by ``SQUARE_NEVER_FOOLED`` and the loss (the true margin) unchanged, it
    accepts exactly the queries that lower the margin, on every image, for every query."""
    square = import_autoattack_part("square").SquareAttack

    class FullBudgetSquare(square):
        def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            margin, loss = super().margin_and_loss(x, y)
            return margin + SQUARE_NEVER_FOOLED, loss

    return FullBudgetSquare
