"""``--votes K [K ...]``: what a vote of K purifications would score on the adversarial examples a run already made,
from its stored predictions (no attack runs; the run's images are re-scored, not evaluated again).

Every threat's examples were evaluated N times with fresh noise (the protocol's N, 10). A vote of K <= N of those
evaluations is scored by the same strict-majority rule as the ``vote`` scoring (``attacks.majority_correct``,
ties wrong), averaged per image over all C(N, K) subsets of the N evaluations: an unbiased estimate of the
probability that a deployed vote of K fresh purifications decides the image right, less noisy than the first K
evaluations. K = N is the ``vote`` scoring itself; K = 1 the ``single`` one. ``worst`` is, per image, the lowest
of these probabilities over the white-box threats the run holds (the attacker picks the threat per image, as in
``worst_per_image``). The attacks are those of the run: aimed at the prediction averaged over the protocol's
draws, whatever K, so a vote of K faces the same examples it would at K = N."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from attacks import majority_correct
from purify.infra.runtime import pick_device

from ..common import ResultTable, write_text
from ..intervals import bootstrap_interval
from .compare import stored_predictions
from .config import Run
from .schema import COLUMNS, KEY, randomized, worst_per_image
from .setting import Workload

SETTING = ["target", "defence", "eps", "split", "protocol"]
# the classifier alone's worst case and the paired difference from it, on the worst-case rows of a run that holds it
PAIRED = ["alone", "diff", "diff_low", "diff_high"]
COLUMNS_OUT = [*SETTING, "threat", "votes", "nfe", "accuracy", "ci_low", "ci_high", *PAIRED, "n", "evals"]


def vote_of_k(predictions: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per image, the fraction of the K-subsets of the N evaluations ((N, n) predicted labels) whose labels give
    the true label a strict majority (ties wrong): the probability that a vote of K decides the image right."""
    evals = len(predictions)
    if not 1 <= k <= evals:
        raise ValueError(f"--votes: a vote of K needs 1 <= K <= N = {evals} stored evaluations, got {k}")
    total = torch.zeros(predictions.shape[1])
    for subset in itertools.combinations(range(evals), k):
        total += majority_correct(predictions[list(subset)], labels).float()
    return total / math.comb(evals, k)


def votes(run: Run) -> pd.DataFrame:
    """Every selected setting's stored threats in ``run.out`` re-scored as votes of each K in ``run.votes``;
    writes ``<out>-votes.csv`` and ``<out>-votes.md`` next to ``run.out`` (replacing those settings' rows, keeping
    the other settings') and returns this run's rows. Where the run also holds the classifier alone (``--defence
    none ...``), each K's worst case carries the paired difference from it on the same images."""
    if not run.out.is_file():
        raise FileNotFoundError(f"--votes: no results at {run.out}")
    table = ResultTable(run.out, KEY, COLUMNS)
    work = Workload.load(run, pick_device(run.device))
    settings, alone = [], {}
    for setting in work.settings():
        target, defence, eps = setting.target, setting.defence.spec(), setting.eps
        stored = {}
        for threat in [t for t in setting.threats if t != "worst"]:
            found = stored_predictions(table, run.out, setting.row(threat))
            if found is not None:
                stored[threat] = found[0]
        attacked = [t for t in setting.worst_of if t in stored]
        if defence == "none" and attacked:  # deterministic: every evaluation the same, K = 1 is exact
            alone[target, eps] = worst_per_image({t: {"vote": vote_of_k(stored[t], setting.labels, 1)}
                                                  for t in attacked}, attacked, ["vote"])["vote"]
        if not randomized(defence):
            print(f"{target}, {defence}: deterministic, every evaluation the same; skipped", file=sys.stderr)
        elif not stored:
            print(f"{target}, {defence}, eps = {eps}/255: not in {run.out}; skipped", file=sys.stderr)
        else:
            settings.append((setting, stored, attacked))
    rows = []
    for setting, stored, attacked in settings:
        target, defence, eps = setting.target, setting.defence.spec(), setting.eps
        evals = min(len(p) for p in stored.values())
        reference = alone.get((target, eps))
        for k in run.votes:
            correct = {t: {"vote": vote_of_k(p, setting.labels, k)} for t, p in stored.items()}
            if attacked:
                correct["worst"] = worst_per_image(correct, attacked, ["vote"])
            for threat, per_image in correct.items():
                mean, low, high = bootstrap_interval(per_image["vote"])
                paired = dict.fromkeys(PAIRED, math.nan)
                if threat == "worst" and reference is not None:
                    paired["alone"] = reference.double().mean().item()
                    paired["diff"], paired["diff_low"], paired["diff_high"] = bootstrap_interval(
                        per_image["vote"] - reference)
                rows.append(dict(target=target, defence=defence, eps=eps, split=run.split, protocol=run.protocol,
                                 threat=threat, votes=k, nfe=k * setting.row(threat)["nfe"], accuracy=mean,
                                 ci_low=low, ci_high=high, **paired, n=len(setting.labels), evals=evals))
    if not rows:
        raise ValueError(f"--votes: no setting of this run is in {run.out}")
    frame = pd.DataFrame(rows, columns=COLUMNS_OUT)
    out = run.out.with_name(f"{run.out.stem}-votes.csv")
    merged = frame
    if out.is_file():  # other settings of the same results file, re-scored earlier, stay
        earlier = pd.read_csv(out, dtype={"target": str, "defence": str, "split": str, "protocol": str})
        fresh = set(frame[SETTING].itertuples(index=False, name=None))
        keep = [tuple(r) not in fresh for r in earlier[SETTING].itertuples(index=False, name=None)]
        merged = pd.concat([earlier[keep], frame], ignore_index=True).reindex(columns=COLUMNS_OUT)
    write_text(out, merged.to_csv(index=False, float_format="%.4f"))
    write_text(out.with_suffix(".md"), markdown(merged, run.out))
    print(markdown(frame, run.out))
    print(f"wrote {out}, {out.with_suffix('.md')}", file=sys.stderr)
    return frame


def markdown(frame: pd.DataFrame, results: Path) -> str:
    """One table per setting: rows K (with network evaluations per decision), columns threats."""
    parts = [f"**Votes of K purifications, re-scored from {results.name}'s stored predictions.** Accuracy (%) of "
             f"a strict majority of K (ties wrong), averaged per image over all K-subsets of the N stored "
             f"evaluations; the attacks are the run's, aimed at the prediction averaged over the protocol's draws; "
             f"`worst` = per image the lowest over the white-box threats; "
             f"95% bootstrap interval on `worst`. K = N is the run's `vote` scoring, K = 1 its `single` one. Where the "
             f"run holds the classifier alone, the worst case minus the classifier's on the same images, with a "
             f"95% paired bootstrap interval (10,000 resamples of the images).\n"]
    for (target, defence, eps, split, protocol), group in frame.groupby(SETTING, sort=False):
        threats = [t for t in dict.fromkeys(group.threat) if t != "worst"]
        first, paired = group.iloc[0], bool(group["diff"].notna().any())
        alone = group["alone"].dropna()
        lines = [f"`{defence}` before {target}, eps {eps}/255, {first.n} {split} images, `{protocol}` protocol, "
                 f"N = {first.evals}" + (f"; the classifier alone keeps {100 * alone.iloc[0]:.1f} (worst)" if paired
                                         else "") + ":\n",
                 "| K | NFE/decision | " + " | ".join(threats) + " | worst (95% CI) |"
                 + (" minus alone, paired (95% CI) |" if paired else ""),
                 "|---|---|" + "---|" * (len(threats) + 1 + paired)]
        for k, cells in group.groupby("votes", sort=False):
            acc = {r.threat: r for r in cells.itertuples()}
            values = [f"{100 * acc[t].accuracy:.1f}" for t in threats]
            worst = acc.get("worst")
            values.append("-" if worst is None else
                          f"{100 * worst.accuracy:.1f} ({100 * worst.ci_low:.1f}-{100 * worst.ci_high:.1f})")
            if paired:
                values.append("-" if worst is None or pd.isna(worst.diff) else
                              f"{100 * worst.diff:+.1f} ({100 * worst.diff_low:+.1f} to {100 * worst.diff_high:+.1f})")
            lines.append(f"| {k} | {cells.nfe.iloc[0]} | " + " | ".join(values) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
