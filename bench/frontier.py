"""The robustness-cost frontier: ``python -m bench.frontier`` (issue 11).

Reads the adaptive evaluation's CSVs (``bench.adaptive``) and puts every configuration evaluated there (a
defence with its settings before a classifier, e.g. ``bcm(eps_inv=0.3, t_star=1)`` before ``preact`` or before
``preact:bcm-fgsm``, the baselines included) on one plane: white-box robust accuracy against the seconds per
image the defended classifier costs to run, with its clean accuracy. Per configuration, at one eps and one
scoring of the randomized defences:

- ``robust``: accuracy under the per-image worst of the suite's white-box threats (the ``worst`` threat), with
  its 95% bootstrap interval (``robust_low``, ``robust_high``); beside it margin-PGD alone (``pgd_margin``)
  and AutoAttack (``autoattack``): the better of APGD-CE and APGD-DLR on the averaged prediction for a
  randomized defence (version ``apgd``), the standard version for a deterministic one (e.g. an adversarially
  trained classifier with no defence; version ``standard``);
- ``clean``: accuracy on the clean images, scored the same way;
- ``decision_s``: measured seconds per image of one decision: defend + classify, times N for the vote of N
  evaluations of a randomized defence (a deterministic one decides once); ``nfe`` likewise;
- ``pareto``: no other configuration is at least as robust for at most the cost (and better in one);
- ``worst_of``: the white-box threats the run had (a run of margin-PGD alone is an upper bound).

Next to our points: the published robustness of diffusion purification (``--published``, default
``configs/frontier/published.yaml``: DiffPure re-evaluated with exact gradients, a one-step consistency purifier),
marked as published: other models, images and budgets, references rather than a comparison one to one.

Writes a CSV, a Markdown table and a PNG (robust accuracy against seconds per decision, and against network
evaluations per decision with the published anchors; log scales).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from attacks import PROTOCOLS, SCORINGS, SUITE
from purify.infra.checkpoint import atomic_write
from purify.infra.config import read_yaml
from purify.infra.paths import CONFIG_DIR, RESULTS_DIR

from .common import run_command, write_text
from .common import DATASET
from .whitebox.schema import DETERMINISTIC_ATTACKS, RANDOMIZED_ATTACKS, numeric_adaptive, randomized

GROUP = ["suite", "preset", "defence", "family", "target", "split", "n", "data_seed", "protocol", "bf16",
         "checkpoints"]
TARGET_ROBUST, TARGET_CLEAN = 0.35, 0.70  # issue 11's targets at eps 8/255
PUBLISHED = CONFIG_DIR / "frontier" / "published.yaml"
WHITE_BOX = tuple(dict.fromkeys((*RANDOMIZED_ATTACKS, *DETERMINISTIC_ATTACKS)))  # the threats `worst` can cover


def frontier_table(frame: pd.DataFrame, eps: int, scoring: str) -> pd.DataFrame:
    """One row per configuration evaluated at ``eps`` (and clean), under ``scoring``; see the module doc."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    scored = frame[frame.scoring == scoring]
    rows = []
    for keys, group in scored.groupby(GROUP, sort=False, dropna=False):
        clean = group[group.threat == "clean"]
        worst = group[(group.threat == "worst") & (group.eps == eps)]
        if clean.empty or worst.empty:
            continue
        row = dict(zip(GROUP, keys))
        per_attack = {t: group[(group.threat == t) & (group.eps == eps)].accuracy
                      for t in ("pgd-margin", "apgd-ce", "apgd-dlr", "aa-standard")}
        apgd = [per_attack[t].iloc[0] for t in ("apgd-ce", "apgd-dlr") if len(per_attack[t])]
        if len(per_attack["aa-standard"]):
            version, autoattack = "standard", per_attack["aa-standard"].iloc[0]
        elif apgd:
            version, autoattack = "apgd", min(apgd)
        else:  # a run without AutoAttack's attacks (e.g. margin-PGD alone)
            version, autoattack = "", float("nan")
        draws = int(worst.evals.iloc[0]) if scoring != "single" and randomized(row["defence"]) else 1
        row.update(eps=eps, scoring=scoring, clean=clean.accuracy.iloc[0], robust=worst.accuracy.iloc[0],
                   robust_low=worst.ci_low.iloc[0], robust_high=worst.ci_high.iloc[0],
                   pgd_margin=_first(per_attack["pgd-margin"]), autoattack=autoattack, autoattack_version=version,
                   draws=draws, nfe=int(worst.nfe.iloc[0]) * draws,
                   worst_of=", ".join(t for t in WHITE_BOX if ((group.threat == t) & (group.eps == eps)).any()),
                   # the setting's costs, measured with each of its attacks: their mean
                   decision_s=group.purify_s_per_image.mean() * draws, attack_step_s=group.step_s_per_image.mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["pareto"] = [not ((table.decision_s <= r.decision_s) & (table.robust >= r.robust)
                            & ((table.decision_s < r.decision_s) | (table.robust > r.robust))).any()
                       for r in table.itertuples()]
    table["meets_target"] = (table.robust >= TARGET_ROBUST) & (table.clean >= TARGET_CLEAN)
    return table.sort_values(["decision_s", "robust"]).reset_index(drop=True)


def _first(values: pd.Series) -> float:
    return values.iloc[0] if len(values) else float("nan")


def load_published(path: str | Path) -> pd.DataFrame:
    """The published anchors of ``path`` (see ``configs/frontier/published.yaml``), one row each, with ranges
    split into ``robust_low/high`` and ``nfe_low/high``; a ValueError naming the entry and field otherwise."""
    entries = read_yaml(path)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: published anchors are a non-empty list of entries")
    rows = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}, entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: an entry is a mapping, got {type(entry).__name__}")
        missing = [k for k in ("name", "source", "attack", "scoring", "robust", "nfe_per_decision") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if entry["scoring"] not in SCORINGS:
            raise ValueError(f"{where}: scoring must be one of {', '.join(SCORINGS)}, got {entry['scoring']!r}")
        robust, nfe = _range(entry["robust"], where, "robust"), _range(entry["nfe_per_decision"], where, "nfe")
        if not 0 <= robust[0] <= robust[1] <= 1:
            raise ValueError(f"{where}: robust is a range of accuracies in [0, 1], got {entry['robust']}")
        if not 0 < nfe[0] <= nfe[1]:
            raise ValueError(f"{where}: nfe_per_decision is a positive range, got {entry['nfe_per_decision']}")
        rows.append(dict(name=str(entry["name"]), source=str(entry["source"]), attack=str(entry["attack"]),
                         scoring=entry["scoring"], robust_low=robust[0], robust_high=robust[1], nfe_low=nfe[0],
                         nfe_high=nfe[1]))
    return pd.DataFrame(rows)


def _range(value, where: str, field: str) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}: {field} is a [low, high] pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])


def markdown(table: pd.DataFrame, published: pd.DataFrame | None = None) -> str:
    """The frontier as a Markdown table with its threat model, then the published anchors."""
    if table.empty:
        return "(no configuration has both clean and worst-case rows at this eps)\n"
    first = table.iloc[0]
    protocol = PROTOCOLS[first.protocol]
    runs = run_labels(table)
    mixed = runs.nunique() > 1
    where = ("runs as in the `run` column" if mixed else
             f"{first.split} split ({first.n:,} images of {DATASET}, seed {first.data_seed}), `{first.protocol}` "
             f"protocol")
    suite = ("each run's protocol (docs/adaptive.md)" if mixed else
             f"randomized defences: {protocol.describe(first.eps / 255)}; deterministic ones: "
             f"{protocol.describe(first.eps / 255, randomized=False)}")
    header = (f"**Robustness against cost, {first.preset} preset, {where}, white-box L-inf eps = {first.eps}/255, "
              f"suite {first.suite}, {suite}; `{first.scoring}` scoring.** "
              f"`robust`: per image the worst of the white-box threats the run had (`worst of`: margin-PGD alone "
              f"is an upper bound), with its 95% bootstrap interval; `AutoAttack`: the "
              f"better of APGD-CE/-DLR on the averaged prediction (`apgd`) or the standard version (`standard`); "
              f"`s/decision`: measured defend + classify seconds per image on the machine that ran it, "
              + (f"times the N = {protocol.evals} evaluations a vote takes for a randomized defence"
                 if first.scoring == "vote" else "one evaluation" if first.scoring == "single" else
                 f"times the N = {protocol.evals} evaluations that must all be right for a randomized defence")
              + "; `pareto`: no "
              f"configuration is as robust for less. Targets (issue 11): robust >= {100 * TARGET_ROBUST:.0f}% "
              f"with clean >= {100 * TARGET_CLEAN:.0f}%.\n")
    view = pd.DataFrame({
        "defence": table.defence.map(lambda d: f"`{d}`"), "classifier": table.target,
        **({"run": runs} if mixed else {}),
        "clean %": 100 * table.clean, "robust %": 100 * table.robust,
        "95% CI": [f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in zip(table.robust_low, table.robust_high)],
        "worst of": table.worst_of,
        "margin-PGD %": 100 * table.pgd_margin,
        "AutoAttack %": (100 * table.autoattack).astype(object).where(table.autoattack.notna(), None),
        "AutoAttack": table.autoattack_version, "NFE/decision": table.nfe, "ms/decision": 1000 * table.decision_s,
        "attack step ms": 1000 * table.attack_step_s, "pareto": table.pareto.map({True: "yes", False: ""}),
        "meets target": table.meets_target.map({True: "yes", False: ""})})
    text = header + "\n" + view.to_markdown(index=False, floatfmt=".1f", missingval="-") + "\n"
    if published is not None and len(published):
        anchors = pd.DataFrame({
            "published": published["name"], "scoring": published.scoring,
            "robust %": [_span(100 * lo, 100 * hi, ".0f")
                         for lo, hi in zip(published.robust_low, published.robust_high)],
            "NFE/decision": [_span(lo, hi, ",.0f") for lo, hi in zip(published.nfe_low, published.nfe_high)],
            "attack": published.attack, "source": published.source})
        text += ("\n**Published anchors** (diffusion purification on the official CIFAR-10 test set at eps 8/255, "
                 "large classifiers and score networks, their own attacks and images: where our points stand, not "
                 "a comparison one to one):\n\n" + anchors.to_markdown(index=False) + "\n")
    return text


def run_labels(frame: pd.DataFrame) -> pd.Series:
    """Per row the run it comes from: split, number of images, their seed and the protocol."""
    return (frame.split + " n=" + frame.n.astype(str) + " seed " + frame.data_seed.astype(str) + ", `"
            + frame.protocol + "`")


def _span(low: float, high: float, fmt: str) -> str:
    return f"{low:{fmt}}" if low == high else f"{low:{fmt}}-{high:{fmt}}"


def plot(table: pd.DataFrame, path: Path, published: pd.DataFrame | None = None) -> None:
    """Left: robust accuracy against seconds per decision (log scale), clean accuracy in each label, the Pareto
    front as a step line and the target as a dashed line. Right: robust accuracy against network evaluations per
    decision (symmetric log scale, so a classifier alone sits at 0), with the published anchors as ranges."""
    import matplotlib  # noqa: PLC0415 (plotting only when writing figures)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, (ax, by_nfe) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, (target, group) in enumerate(table.groupby("target", sort=False)):
        for axis, x in ((ax, group.decision_s), (by_nfe, group.nfe)):
            axis.scatter(x, 100 * group.robust, color=f"C{i}", label=f"ours, before {target}", zorder=3)
            for r, xi in zip(group.itertuples(), x):
                axis.annotate(f"{r.defence} (clean {100 * r.clean:.0f}%)", (xi, 100 * r.robust), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
    front = table[table.pareto].sort_values("decision_s")
    ax.step(front.decision_s, 100 * front.robust, where="post", color="grey", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image per decision (defend + classify, x N for a vote)")
    by_nfe.set_xscale("symlog", linthresh=1)
    by_nfe.set_xlabel("network evaluations per decision (x N for a vote)")
    if published is not None and len(published):
        for r in published.itertuples():
            x, y = (r.nfe_low * r.nfe_high) ** 0.5, 50 * (r.robust_low + r.robust_high)
            by_nfe.errorbar(x, y, yerr=[[y - 100 * r.robust_low], [100 * r.robust_high - y]],
                            xerr=[[x - r.nfe_low], [r.nfe_high - x]], fmt="s", mfc="none", color="k", capsize=3,
                            zorder=2)
            by_nfe.annotate(f"published: {r.name} ({r.scoring})", (x, y), fontsize=6, xytext=(4, -9),
                            textcoords="offset points")
    first = table.iloc[0]
    for axis in (ax, by_nfe):
        axis.axhline(100 * TARGET_ROBUST, color="k", ls="--", lw=0.8, label=f"target {100 * TARGET_ROBUST:.0f}%")
        axis.set_ylabel("robust accuracy (%), worst of the white-box threats")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    where = (f"{first.split} split, n = {first.n}, `{first.protocol}` protocol" if run_labels(table).nunique() == 1
             else "runs as in the table")
    fig.suptitle(f"{first.preset} preset, {where}, eps {first.eps}/255, {first.scoring} scoring; published "
                 f"anchors: other models and images", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=[str(RESULTS_DIR / "adaptive" / SUITE / "small-sealed.csv")],
                        metavar="CSV", help=f"bench.adaptive CSVs (default: results/adaptive/{SUITE}/small-sealed.csv)")
    parser.add_argument("--eps", type=int, default=8, help="L-inf budget k of eps = k/255 (default: 8)")
    parser.add_argument("--scoring", default="vote", choices=SCORINGS,
                        help="scoring of randomized defences: 'vote' (majority of N, the deployed decision), "
                             "'worst' (all N correct) or 'single' (one evaluation) (default: vote)")
    parser.add_argument("--published", default=str(PUBLISHED), metavar="YAML",
                        help="published anchors drawn beside our points, or 'none' (default: "
                             "configs/frontier/published.yaml)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "frontier" / "small-sealed.csv"),
                        help="frontier CSV; .md and .png are written next to it (default: results/frontier/"
                             "small-sealed.csv)")
    args = parser.parse_args(argv)
    missing = [path for path in args.results if not Path(path).is_file()]
    if missing:
        parser.error(f"no adaptive results at {', '.join(missing)}; run `python -m bench.adaptive` first")
    run_command(parser, frontier, args)


def frontier(args: argparse.Namespace) -> None:
    frame = numeric_adaptive(pd.concat([pd.read_csv(path, dtype=str, keep_default_na=False)
                                        for path in args.results]))
    twice = frame[frame.duplicated(GROUP + ["eps", "threat", "scoring"], keep=False)]
    if len(twice):
        r = twice.iloc[0]
        raise ValueError(f"{r.defence} before {r.target} ({run_labels(twice).iloc[0]}) is in more than one of the "
                         f"results files: pass each configuration once")
    published = None if args.published == "none" else load_published(args.published)
    table = frontier_table(frame, args.eps, args.scoring)
    if table.empty:
        raise ValueError(f"no configuration in {', '.join(args.results)} has clean and worst-case rows at eps "
                         f"{args.eps}/255")
    out = Path(args.out)
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    text = markdown(table, published)
    write_text(out.with_suffix(".md"), text)
    plot(table, out.with_suffix(".png"), published)
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
