"""``--convergence``: margin-PGD (or another white-box threat: CE-PGD, APGD-CE, APGD-DLR) as its steps and draws
grow, and per image the worst of each budget and the next (the paired drop the larger budget adds: the criterion
for a converged default); a Square budget after them checks that no gradient-free attack removes robustness the
gradients could not (gradient masking)."""
from __future__ import annotations

import hashlib

import torch

from attacks import SCORINGS, SUITE, correct_by_scoring, craft
from purify.infra.checkpoint import atomic_write
from purify.infra.runtime import leave_distributed, pick_device
from purify.infra.shards import Shard, map_timed_blocks, remove_blocks

from ..common import DATASET, ResultTable, write_text
from ..intervals import bootstrap_interval
from ..ledger import TEST_SPLITS, append_ledger
from .config import Run
from .grid import ledger_row, measure_costs
from .schema import ATTACK_NAMES, COLUMNS, COST_COLUMNS, KEY, RUN_COLUMNS, unit_id
from .setting import Setting, Workload

TIMING_COLUMNS = ("wall_s", "s_per_image", *COST_COLUMNS)  # a budget's time columns, kept with its cache


def convergence(run: Run) -> None:
    """Each budget of ``run.convergence`` (margin-PGD's unless it names another threat) on the first target, t*
    and eps, scored like the grid, written to convergence.csv/.md next to ``run.out`` (resumable: each budget's
    per-image predictions are cached). With ``run.escalate``, each budget after the first attacks only the images
    that every earlier one left correct under the majority of N, and the study goes to convergence-escalated.csv/.md.
    Under ``torchrun`` each budget's images are split across the ranks by blocks, as in the grid; rank 0 writes."""
    shard, device = Shard.join(run.device)
    work = Workload.load(run, pick_device(device))
    setting = work.setting(run.targets[0], work.entries[0], run.eps[0])
    name = "convergence-escalated" if run.escalate else "convergence"
    path = run.out.with_name(f"{name}.csv")
    table = ResultTable(path, KEY + ["steps", "eot"], COLUMNS, writes=shard.main)
    costs = {}  # measured once, when a budget is attacked now; a cached budget keeps the costs and times stored with it
    n = len(setting.images)
    correct, attacked, ran = {}, {}, False
    standing = torch.ones(n)  # escalated: 1 where every budget so far left the majority right
    for budget in run.convergence:
        base = dict(setting.row(budget.threat), steps=budget.steps, eot=budget.eot)
        if run.escalate:
            base["attack"] += "; only the images earlier budgets left correct (majority), scored as the worst so far"
        table.refuse_mixing(dict(base, scoring="vote"), RUN_COLUMNS)  # "vote": the row both kinds of study write
        cache = run.out.with_name(f"{name}-predictions") / f"{unit_id(base)}-{budget.steps}x{budget.eot}.pt"
        index = standing.nonzero().squeeze(1)
        part = setting.subset(index)
        predictions, timing = budget_predictions(part, table, base, cache, budget.desc, shard)
        if not set(COST_COLUMNS) <= timing.keys():  # attacked now
            costs = costs or measure_costs(setting, run.batch_size, run.bf16)
            timing.update(costs)
            ran = True
        attacked[budget] = len(index)
        if run.escalate:
            right = torch.zeros(n)
            right[index] = correct_by_scoring(predictions, part.labels)["vote"]
            before, standing = standing, standing * right
            correct[budget] = {"before": before, "vote": standing}
            scored = {"vote": standing}
        else:
            correct[budget] = scored = correct_by_scoring(predictions, setting.labels)
        cells = []
        for scoring, per_image in scored.items():
            mean, low, high = bootstrap_interval(per_image)
            cells.append(dict(base, scoring=scoring, accuracy=mean, ci_low=low, ci_high=high, **timing))
        table.add(cells)
    leave_distributed()
    if not shard.main:
        return
    if ran and run.split in TEST_SPLITS:  # test images attacked: the ledger records the study, worst of its budgets
        worst = standing if run.escalate else torch.stack([c["vote"] for c in correct.values()]).amin(0)
        study = "convergence " + ", ".join(b.desc for b in run.convergence) + (", escalated" if run.escalate else "")
        append_ledger([ledger_row(setting, robust=worst, study=study)])
    lines = (escalated_lines(setting, table, correct, attacked) if run.escalate
             else convergence_lines(setting, table, correct))
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def budget_predictions(setting: Setting, table: ResultTable, base: dict, cache, desc: str,
                       shard: Shard = Shard()) -> tuple[torch.Tensor, dict]:
    """The per-image predictions under the threat of ``base`` at its budget (steps or queries x eot) on
    ``setting``'s images, and their time columns: from ``cache`` and ``table`` if this budget ran before on these
    images (every time column as stored), else attacked now (its random starts and the purifier's noise drawn per
    image, as in the grid) block by block, the finished blocks kept across an interruption, and cached (its time
    is one process's, ``map_timed_blocks``; the costs are the caller's to measure)."""
    run, steps, eot = setting.run, base["steps"], base["eot"]
    row = table.rows.get(table.key(dict(base, scoring="vote")))
    if cache.is_file() and row is not None:
        stored = torch.load(cache, weights_only=True)
        if torch.equal(stored["ids"], setting.ids):
            return stored["predictions"].long(), {column: row[column] for column in TIMING_COLUMNS}
    if not len(setting.images):
        return torch.zeros(setting.protocol.evals, 0, dtype=torch.long), {"wall_s": 0.0, "s_per_image": 0.0}
    attack = setting.attack(base["threat"], steps, eot)

    def block(start: int, stop: int) -> torch.Tensor:
        part = setting.part(start, stop)
        adversarial = craft(attack, part.images, part.labels, run.batch_size, seed=run.attack_seed, bf16=run.bf16,
                            progress=False, desc=desc, ids=part.ids, noise=part.attack_noise)
        return part.predictions(base["threat"], adversarial).T.contiguous()

    images = hashlib.sha256(setting.ids.numpy().tobytes()).hexdigest()[:8]  # an escalated budget's survivors
    blocks = cache.parent / ".blocks" / f"{unit_id(base, run_columns=True)}-{steps}x{eot}-{images}"
    predictions, seconds = map_timed_blocks(block, len(setting.images), run.batch_size, blocks, shard,
                                            progress=run.progress and shard.main, desc=desc)
    predictions = predictions.T
    if shard.main:
        atomic_write(cache, lambda tmp: torch.save({"predictions": predictions.to(torch.int8), "ids": setting.ids,
                                                    "row": base}, tmp))
    remove_blocks(blocks, shard)
    return predictions, {"wall_s": seconds * len(setting.images), "s_per_image": seconds}


def header(setting: Setting, escalated: bool) -> str:
    """The opening of the study's Markdown: what was attacked, with which attacks, scored how."""
    run = setting.run
    names = list(dict.fromkeys(b.name for b in run.convergence))  # the attacks, in the order they first ran
    threats = {b.threat for b in run.convergence}
    title = f"{names[0][0].upper()}{names[0][1:]} budgets" + (f", then {', '.join(names[1:])}" if names[1:] else "")
    pgd = " and ".join(ATTACK_NAMES[t] for t in ("pgd-margin", "pgd-ce") if t in threats)
    return (f"**{title}{', escalated,' if escalated else ''} on {len(setting.images)} {run.split} images** "
            f"({run.preset} preset, defence `{setting.defence.spec()}` before {setting.target}; eps = "
            f"{setting.eps}/255; suite {SUITE}"
            + (f"; {pgd}: step eps/4 -> eps/8 -> eps/16, best iterate" if pgd else "")
            + ("; APGD: AutoAttack's step-size schedule for its iterations, best-loss iterate"
               if threats & {"apgd-ce", "apgd-dlr"} else "")
            + "; every step on the prediction averaged over the draws"
            + ("; Square: AutoAttack's gradient-free Square on the margin of the same averaged prediction, the "
               "lowest-margin query per image, its cost in forward passes" if "square" in threats else "")
            + f"; scored over N = {setting.protocol.evals} fresh evaluations; {DATASET}).")


def cost(budget) -> str:
    """A budget's attack cost per image: gradients for PGD, forward passes for Square."""
    return f"{budget.steps * budget.eot}" + (" forwards" if budget.threat == "square" else "")


def convergence_lines(setting: Setting, table: ResultTable, correct: dict) -> list[str]:
    """The Markdown of the study: per budget its accuracies, the worst of it and the next one, and their drop."""
    lines = [header(setting, escalated=False) + " Accuracy (%) under the strict majority of N; `with next` = per "
             "image the worst of this budget and the next one; `drop` = their paired difference with its 95% "
             "bootstrap interval (converged when at most 1 point).\n",
             "| steps x draws | gradients per image | average of N | all N | majority | with next | drop | s/image |",
             "|---|---|---|---|---|---|---|---|"]
    budgets = list(setting.run.convergence)
    for i, budget in enumerate(budgets):
        acc = {s: 100 * correct[budget][s].mean().item() for s in SCORINGS}
        both, drop = "-", "-"
        if i + 1 < len(budgets):
            vote = correct[budget]["vote"]
            joint = torch.minimum(vote, correct[budgets[i + 1]]["vote"])
            d, low, high = bootstrap_interval(vote - joint)
            both, drop = f"{100 * joint.mean():.1f}", f"{100 * d:.1f} ({100 * low:.1f}-{100 * high:.1f})"
        wall = float(table.rows[table.key(dict(setting.row(budget.threat), steps=budget.steps, eot=budget.eot,
                                               scoring="single"))]["s_per_image"])
        lines.append(f"| {budget.label} | {cost(budget)} | {acc['single']:.1f} | {acc['worst']:.1f} | "
                     f"{acc['vote']:.1f} | {both} | {drop} | {wall:.1f} |")
    return lines


def escalated_lines(setting: Setting, table: ResultTable, correct: dict, attacked: dict) -> list[str]:
    """The Markdown of an escalated study: per budget the images it attacked, the worst so far and its drop."""
    lines = [header(setting, escalated=True) + " Each budget after the first attacks only the images every "
             "earlier budget left correct under the strict majority of N (as AutoAttack runs each attack on the "
             "points still robust). `worst so far` = accuracy (%) under the majority when each image counts as "
             "broken once any budget broke it; `drop` = what this budget takes off it, paired, with its 95% "
             "bootstrap interval (converged when at most 1 point).\n",
             "| steps x draws | gradients per image | images attacked | worst so far | drop | s/image attacked |",
             "|---|---|---|---|---|---|"]
    for i, budget in enumerate(setting.run.convergence):
        scored = correct[budget]
        drop = "-"
        if i:
            d, low, high = bootstrap_interval(scored["before"] - scored["vote"])
            drop = f"{100 * d:.1f} ({100 * low:.1f}-{100 * high:.1f})"
        row = table.rows[table.key(dict(setting.row(budget.threat), steps=budget.steps, eot=budget.eot,
                                        scoring="vote"))]
        lines.append(f"| {budget.label} | {cost(budget)} | {attacked[budget]} | "
                     f"{100 * scored['vote'].mean():.1f} | {drop} | {float(row['s_per_image']):.1f} |")
    return lines
