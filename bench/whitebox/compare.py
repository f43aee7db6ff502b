"""``--compare OTHER.csv``: the same settings evaluated in two results files (e.g. attack gradients in bf16 and in
float32, or two attack seeds), compared image by image: per threat and scoring, this run's accuracy minus the
other's on the same images, with a 95% paired bootstrap interval."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from attacks import SCORINGS, correct_by_scoring
from purify.infra.runtime import pick_device

from ..common import ResultTable, text, write_text
from ..intervals import bootstrap_interval
from .config import Run
from .schema import COLUMNS, KEY, RUN_COLUMNS, predictions_dir, unit_id, worst_per_image
from .setting import Workload


def compare(run: Run) -> list[dict]:
    """Every selected setting's threats found in both ``run.out`` and ``run.compare`` (same key and checkpoints),
    compared per image; ``worst`` is recomputed from the white-box threats both files hold. Writes
    ``<out>-vs-<other>.md`` next to ``run.out`` and returns its rows."""
    files = {"this": run.out, "other": run.compare}
    tables = {}
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"--compare: no results at {path}")
        tables[name] = ResultTable(path, KEY, COLUMNS)
    work = Workload.load(run, pick_device(run.device))
    rows = []
    for setting in work.settings():
        target, defence, eps = setting.target, setting.defence.spec(), setting.eps
        correct = {name: {} for name in files}
        runs = {}
        for threat in [t for t in setting.threats if t != "worst"]:
            base = setting.row(threat)
            stored = {name: stored_correct(tables[name], files[name], base, setting.labels) for name in files}
            if any(found is None for found in stored.values()):
                continue
            for name, (per_image, row) in stored.items():
                correct[name][threat] = per_image
                runs[name] = ", ".join(f"{c} {row[c]}" for c in RUN_COLUMNS)
        attacked = [t for t in setting.worst_of if t in correct["this"]]
        if attacked:
            for name in files:
                correct[name]["worst"] = worst_per_image(correct[name], attacked, SCORINGS)
        for threat in correct["this"]:
            for scoring in SCORINGS:
                this, other = correct["this"][threat][scoring], correct["other"][threat][scoring]
                diff, low, high = bootstrap_interval(this - other)
                rows.append(dict(target=target, defence=defence, eps=eps, threat=threat,
                                 scoring=scoring, this=this.mean().item(), other=other.mean().item(),
                                 difference=diff, ci_low=low, ci_high=high, this_run=runs["this"],
                                 other_run=runs["other"], n=len(this)))
        if not correct["this"]:
            print(f"{target}, {defence}, eps = {eps}/255: not in both files; skipped", file=sys.stderr)
    if not rows:
        raise ValueError(f"--compare: no setting of this run is in both {run.out} and {run.compare}")
    out = run.out.with_name(f"{run.out.stem}-vs-{run.compare.stem}.md")
    write_text(out, markdown(rows, run.out, run.compare))
    print(markdown(rows, run.out, run.compare))
    print(f"wrote {out}", file=sys.stderr)
    return rows


def stored_correct(table: ResultTable, path: Path, base: dict, labels: torch.Tensor):
    """Per-image correctness under each scoring of the unit ``base`` as ``table`` (at ``path``) stored it, and its
    row; None when the file lacks it (or holds it for other checkpoints)."""
    found = stored_predictions(table, path, base)
    return None if found is None else (correct_by_scoring(found[0], labels), found[1])


def stored_predictions(table: ResultTable, path: Path, base: dict):
    """The (N, n) predicted labels of the unit ``base`` as ``table`` (at ``path``) stored them, and its row; None
    when the file lacks it (or holds it for other checkpoints)."""
    key = dict(base, scoring="single")
    cache = predictions_dir(path) / f"{unit_id(base)}.pt"
    row = table.rows.get(table.key(key))
    if row is None or row["checkpoints"] != text(base["checkpoints"]) or not cache.is_file():
        return None
    return torch.load(cache, weights_only=True)["predictions"].long(), row


def markdown(rows: list[dict], this: Path, other: Path) -> str:
    first = rows[0]
    lines = [f"**{this.name} minus {other.name}, image by image** ({first['n']} images; this file: "
             f"{first['this_run']}; the other: {first['other_run']}). Accuracy (%) in each file and the paired "
             f"difference in points with its 95% bootstrap interval (10,000 resamples of the images); `worst` = "
             f"per image the worst of the white-box threats both files hold.\n",
             "| target | defence | eps | threat | scoring | this | other | difference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | `{r['defence']}` | {r['eps']} | {r['threat']} | {r['scoring']} | "
                     f"{100 * r['this']:.1f} | {100 * r['other']:.1f} | {100 * r['difference']:+.1f} "
                     f"({100 * r['ci_low']:+.1f} to {100 * r['ci_high']:+.1f}) |")
    return "\n".join(lines) + "\n"
