"""``--sanity``: the sanity checks of Carlini et al. (2019, "On Evaluating Adversarial Robustness") for a
randomized, differentiable defence: the attack breaks the undefended classifier, accuracy falls and saturates
with the budget, the loss rises, a huge eps reaches 0, white-box is not above transfer, the gradients are right."""
from __future__ import annotations

import contextlib
import sys

import torch

from attacks import BestIteratePGD, craft, paper_pgd, predict_draws
from purify import Defence, image_noise
from purify.infra.images import as_float
from purify.infra.runtime import pick_device

from ..common import DATASET, write_text
from ..ledger import TEST_SPLITS, append_ledger
from .config import Run
from .grid import ledger_row
from .setting import Workload

SANITY_BUDGETS = [(5, 1), (10, 2), (20, 4), (40, 8)]  # PGD steps x EOT draws; the last but one is the cpu protocol's
SANITY_EVALS = 4  # evaluations behind each accuracy (single-evaluation means)


def sanity(run: Run) -> None:
    """The checks on the first target, t* and eps, written to sanity.md next to ``run.out``; exit status 1 if
    one fails."""
    work = Workload.load(run, pick_device(run.device))
    target, purifier, eps = run.targets[0], work.entries[0].defence, run.eps[0]
    images = work.images
    if not (purifier.randomized and purifier.differentiable):
        raise ValueError(f"--sanity checks a randomized, differentiable defence; {purifier.spec()} is not")
    checks = sanity_checks(work.models[target], purifier, images, work.labels, work.ids, eps, run)
    if run.split in TEST_SPLITS:  # test images attacked: the ledger records the checks (no accuracy of the vote)
        append_ledger([ledger_row(work.setting(target, work.entries[0], eps), study="sanity checks")])
    lines = ["# Sanity checks of the adaptive evaluation\n",
             f"{run.preset} preset, defence `{purifier.spec()}` before {target}; {len(images)} {run.split} "
             f"images of {DATASET}; "
             f"eps = {eps}/255; accuracies are single-evaluation means over {SANITY_EVALS} evaluations "
             f"(evaluation seed {run.eval_seed}, attack seed {run.attack_seed}).\n",
             "| check | result | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
    write_text(run.out.with_name("sanity.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(ok for _, ok, _ in checks):
        sys.exit(1)


def sanity_checks(classifier, purifier: Defence, images, labels, ids, eps: int, run: Run) -> list[tuple]:
    """(name, passed, measured) for each check on a randomized, differentiable defence; accuracies are
    single-evaluation means over ``SANITY_EVALS`` evaluations. ``run``: its batch size, seeds and bf16."""
    defended = purifier.wrap(classifier)
    shape = purifier.noise_shape(tuple(images.shape[1:]))
    common = dict(batch_size=run.batch_size, seed=run.attack_seed, bf16=run.bf16, progress=False)

    def accuracy(model, x, noisy=True) -> float:
        noise = ((lambda i, d: purifier.fixed_noise(image_noise(i, shape, run.eval_seed, d))) if noisy
                 else (lambda i, d: contextlib.nullcontext()))
        predictions = predict_draws(model, x, ids, SANITY_EVALS if noisy else 1, noise, run.batch_size)
        return (predictions == labels[None]).float().mean().item()

    def pgd(model, k: int, steps: int, draws: int, **kwargs) -> torch.Tensor:
        return craft(BestIteratePGD(model, k / 255, steps, draws, "margin"), images, labels, **common, **kwargs)

    checks = []
    # the attack itself must break the undefended classifier once eps is large enough (at the evaluated eps an
    # adversarially trained classifier keeps its robustness; 4 x eps breaks it)
    undefended = accuracy(classifier, pgd(classifier, 4 * eps, 50, 1), noisy=False)
    checks.append(("undefended classifier under margin-PGD goes to ~0 at 4 x eps", undefended <= 0.05,
                   f"{100 * undefended:.1f}% (50 steps at {4 * eps}/255)"))
    budgets = SANITY_BUDGETS
    curve = [accuracy(defended, pgd(defended, eps, s, m)) for s, m in budgets]
    cpu = curve[-2]
    slack = 0.03  # sampling noise of a few evaluations on a small subset
    monotone = all(b <= a + slack for a, b in zip(curve, curve[1:]))
    checks.append(("accuracy falls as PGD steps and draws grow", monotone,
                   ", ".join(f"{s}x{m}: {100 * a:.1f}%" for (s, m), a in zip(budgets, curve))))
    checks.append(("... and saturates (20x4 -> 40x8 within 5 points)", abs(curve[-1] - curve[-2]) <= 0.05,
                   f"{100 * abs(curve[-1] - curve[-2]):.1f} points"))
    growing = BestIteratePGD(defended, eps / 255, 20, 4, "margin", random_start=False)
    with torch.random.fork_rng():
        torch.manual_seed(run.attack_seed)
        growing(as_float(images[: run.batch_size]), labels[: run.batch_size])
    first, last = growing.history[0].item(), growing.history[-1].item()
    checks.append(("the attack's loss rises over the iterations", last > first,
                   f"mean margin loss {first:.3f} at the start, {last:.3f} after 20 steps"))
    huge = accuracy(defended, pgd(defended, 128, 20, 1))
    checks.append(("a huge eps (128/255) drives accuracy to ~0", huge <= 0.10, f"{100 * huge:.1f}%"))
    transfer_pgd = paper_pgd(classifier, eps, seed=run.attack_seed)
    transfer = accuracy(defended, craft(transfer_pgd, images, labels, **common))
    checks.append(("white-box is not above transfer from the same model", cpu <= transfer + slack,
                   f"white-box (20x4) {100 * cpu:.1f}% vs transfer {100 * transfer:.1f}%"))
    checks.append(finite_difference_check(defended, purifier, images[:4], labels[:4], ids[:4], shape, run))
    x = as_float(images[: run.batch_size]).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(defended(x), labels[: run.batch_size])
    grad, = torch.autograd.grad(loss, x)
    nonzero = (grad.flatten(1).abs().sum(1) > 0).float().mean().item()
    checks.append(("gradients through the purifier are finite and non-zero",
                   bool(torch.isfinite(grad).all()) and nonzero == 1.0,
                   f"finite: {bool(torch.isfinite(grad).all())}, non-zero for {100 * nonzero:.0f}% of images"))
    frozen = lambda i, d: purifier.fixed_noise(image_noise(i, shape, run.eval_seed, 0))  # noqa: E731
    fixed_adv = pgd(defended, eps, 20, 1, ids=ids, noise=frozen)
    fixed = (predict_draws(defended, fixed_adv, ids, 1, frozen, run.batch_size)
             == labels[None]).float().mean().item()
    checks.append(("fixed-randomness result reported beside the randomized one", True,
                   f"frozen noise {100 * fixed:.1f}% vs fresh noise {100 * cpu:.1f}% (20 steps)"))
    return checks


def finite_difference_check(defended, purifier, images, labels, ids, shape, run: Run, h: float = 1e-3) -> tuple:
    """Autograd through the purifier (its noise frozen) against a central finite difference of the loss along
    a random direction, per image, in float32: agreement within 5% of the larger magnitude. Images whose purified
    output saturates at the probes are left out: the output clamp passes gradients straight through by design
    (``purify.clamp_straight_through``), so there the two differ on purpose."""
    x = as_float(images).clamp(h, 1 - h)  # x +- h * direction stays a valid image
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(run.attack_seed))
    direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    purify = defended[0]
    with purifier.fixed_noise(image_noise(ids, shape, run.eval_seed, 0)):
        def loss(z):
            return torch.nn.functional.cross_entropy(defended(z).float(), labels, reduction="none")
        point = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(loss(point).sum(), point)
        with torch.no_grad():
            numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
            probes = torch.stack([purify(x + s * h * direction) for s in (-1, 0, 1)])
    inside = ((probes > 0) & (probes < 1)).flatten(2).all(2).all(0)
    if not inside.any():
        return ("autograd through the purifier agrees with finite differences", False,
                f"every one of {len(x)} images saturates the purified output: nothing to compare")
    analytic = (grad * direction).flatten(1).sum(1)[inside]
    numeric = numeric[inside]
    error = ((analytic - numeric).abs() / analytic.abs().clamp_min(numeric.abs()).clamp_min(1e-3)).max().item()
    return ("autograd through the purifier agrees with finite differences", error <= 0.05,
            f"largest relative difference {100 * error:.1f}% on {int(inside.sum())} of {len(x)} images whose "
            f"purified output does not saturate (step {h})")
