"""``--convergence``: margin-PGD as its steps and draws grow, and per image the worst of each budget and the next
(the paired drop the larger budget adds: the criterion for a converged default)."""
from __future__ import annotations

import time

import torch

from attacks import SCORINGS, SUITE, BestIteratePGD, correct_by_scoring, craft
from purify.infra.checkpoint import atomic_write
from purify.infra.runtime import pick_device

from ..common import DATASET, ResultTable, write_text
from ..intervals import bootstrap_interval
from .config import Run
from .grid import measure_costs
from .schema import COLUMNS, KEY, RUN_COLUMNS, unit_id
from .setting import Setting, Workload


def convergence(run: Run) -> None:
    """Margin-PGD with each budget of ``run.convergence`` on the first target, t* and eps, scored like the grid,
    written to convergence.csv/.md next to ``run.out`` (resumable: each budget's per-image predictions are
    cached)."""
    work = Workload.load(run, pick_device(run.device))
    setting = work.setting(run.targets[0], work.entries[0], run.eps[0])
    path = run.out.with_name("convergence.csv")
    table = ResultTable(path, KEY + ["steps", "eot"], COLUMNS)
    costs = measure_costs(setting, run.batch_size, run.bf16)
    correct = {}
    for steps, eot in run.convergence:
        base = dict(setting.row("pgd-margin"), steps=steps, eot=eot)
        table.refuse_mixing(dict(base, scoring="single"), RUN_COLUMNS)
        cache = run.out.with_name("convergence-predictions") / f"{unit_id(base)}-{steps}x{eot}.pt"
        predictions, wall = budget_predictions(setting, table, base, cache)
        correct[steps, eot] = correct_by_scoring(predictions, setting.labels)
        cells = []
        for scoring in SCORINGS:
            mean, low, high = bootstrap_interval(correct[steps, eot][scoring])
            cells.append(dict(base, scoring=scoring, accuracy=mean, ci_low=low, ci_high=high, wall_s=wall,
                              s_per_image=wall / len(setting.images), **costs))
        table.add(cells)
    lines = convergence_lines(setting, table, correct)
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def budget_predictions(setting: Setting, table: ResultTable, base: dict, cache) -> tuple[torch.Tensor, float]:
    """The per-image predictions under margin-PGD at the budget of ``base`` (steps x eot) and the seconds it took:
    from ``cache`` and ``table`` if this budget ran before, else attacked now and cached."""
    run, steps, eot = setting.run, base["steps"], base["eot"]
    if cache.is_file():
        predictions = torch.load(cache, weights_only=True)["predictions"].long()
        return predictions, float(table.rows[table.key(dict(base, scoring="single"))]["wall_s"])
    started = time.monotonic()
    attack = BestIteratePGD(setting.attacked, setting.eps / 255, steps, eot, "margin", setting.restarts)
    adversarial = craft(attack, setting.images, setting.labels, run.batch_size, seed=run.attack_seed, bf16=run.bf16,
                        progress=run.progress, desc=f"margin-PGD {steps}x{eot}", ids=setting.ids)
    predictions = setting.predictions("pgd-margin", adversarial)
    wall = time.monotonic() - started
    atomic_write(cache, lambda tmp: torch.save({"predictions": predictions.to(torch.int8), "ids": setting.ids,
                                                "row": base}, tmp))
    return predictions, wall


def convergence_lines(setting: Setting, table: ResultTable, correct: dict) -> list[str]:
    """The Markdown of the study: per budget its accuracies, the worst of it and the next one, and their drop."""
    run = setting.run
    lines = [f"**Margin-PGD budgets on {len(setting.images)} {run.split} images** ({run.preset} preset, defence "
             f"`{setting.defence.spec()}` before {setting.target}; eps = {setting.eps}/255; suite {SUITE}, step "
             f"eps/4 -> eps/8 -> eps/16, best iterate, prediction averaged over the draws; scored over N = "
             f"{setting.protocol.evals} fresh evaluations; {DATASET}). Accuracy (%) under the strict majority "
             f"of N; `with next` = per image the worst of this budget and the next one; `drop` = their paired "
             f"difference with its 95% bootstrap interval (converged when at most 1 point).\n",
             "| steps x draws | gradients per image | average of N | all N | majority | with next | drop | s/image |",
             "|---|---|---|---|---|---|---|---|"]
    budgets = list(run.convergence)
    for i, (steps, eot) in enumerate(budgets):
        acc = {s: 100 * correct[steps, eot][s].mean().item() for s in SCORINGS}
        both, drop = "-", "-"
        if i + 1 < len(budgets):
            vote = correct[steps, eot]["vote"]
            joint = torch.minimum(vote, correct[budgets[i + 1]]["vote"])
            d, low, high = bootstrap_interval(vote - joint)
            both, drop = f"{100 * joint.mean():.1f}", f"{100 * d:.1f} ({100 * low:.1f}-{100 * high:.1f})"
        wall = float(table.rows[table.key(dict(setting.row("pgd-margin"), steps=steps, eot=eot, scoring="single"))]
                     ["s_per_image"])
        lines.append(f"| {steps} x {eot} | {steps * eot} | {acc['single']:.1f} | {acc['worst']:.1f} | "
                     f"{acc['vote']:.1f} | {both} | {drop} | {wall:.1f} |")
    return lines
