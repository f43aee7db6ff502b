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
- ``pareto``: no other configuration is at least as robust for at most the cost (and better in one).

Writes a CSV, a Markdown table and a PNG (robust accuracy against seconds per image, log scale).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from attacks import PROTOCOLS, SCORINGS, SUITE
from purify.defences import BCM_DEFENCES
from purify.infra.checkpoint import atomic_write
from purify.infra.paths import RESULTS_DIR

from .common import run_command, write_text
from .whitebox.schema import DATASET, numeric_adaptive

GROUP = ["suite", "preset", "defence", "family", "target", "split", "n", "data_seed", "protocol", "bf16",
         "checkpoints"]
TARGET_ROBUST, TARGET_CLEAN = 0.35, 0.70  # issue 11's targets at eps 8/255


def randomized(spec: str) -> bool:
    """Whether a defence spec is one of the randomized (BCM-noise) defences, whose decision is a vote of N."""
    return spec.split("(", 1)[0] in BCM_DEFENCES


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
        version = "standard" if len(per_attack["aa-standard"]) else "apgd"
        autoattack = (_first(per_attack["aa-standard"]) if version == "standard"
                      else min(_first(per_attack["apgd-ce"]), _first(per_attack["apgd-dlr"])))
        draws = int(worst.evals.iloc[0]) if scoring != "single" and randomized(row["defence"]) else 1
        row.update(eps=eps, scoring=scoring, clean=clean.accuracy.iloc[0], robust=worst.accuracy.iloc[0],
                   robust_low=worst.ci_low.iloc[0], robust_high=worst.ci_high.iloc[0],
                   pgd_margin=_first(per_attack["pgd-margin"]), autoattack=autoattack, autoattack_version=version,
                   draws=draws, nfe=int(worst.nfe.iloc[0]) * draws,
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


def markdown(table: pd.DataFrame) -> str:
    """The frontier as a Markdown table with its threat model."""
    if table.empty:
        return "(no configuration has both clean and worst-case rows at this eps)\n"
    first = table.iloc[0]
    protocol = PROTOCOLS[first.protocol]
    header = (f"**Robustness against cost, {first.preset} preset, {first.split} split ({first.n:,} images of "
              f"{DATASET}), white-box L-inf eps = {first.eps}/255, suite {first.suite}, `{first.protocol}` protocol: randomized "
              f"defences: {protocol.describe(first.eps / 255)}; deterministic ones: "
              f"{protocol.describe(first.eps / 255, randomized=False)}; `{first.scoring}` scoring.** `robust`: "
              f"per image the worst of the white-box threats, with its 95% bootstrap interval; `AutoAttack`: the "
              f"better of APGD-CE/-DLR on the averaged prediction (`apgd`) or the standard version (`standard`); "
              f"`s/decision`: measured defend + classify seconds per image on the machine that ran it, "
              f"times the N = {protocol.evals} evaluations a vote takes for a randomized defence; `pareto`: no "
              f"configuration is as robust for less. Targets (issue 11): robust >= {100 * TARGET_ROBUST:.0f}% "
              f"with clean >= {100 * TARGET_CLEAN:.0f}%.\n")
    view = pd.DataFrame({
        "defence": table.defence.map(lambda d: f"`{d}`"), "classifier": table.target,
        "clean %": 100 * table.clean, "robust %": 100 * table.robust,
        "95% CI": [f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in zip(table.robust_low, table.robust_high)],
        "margin-PGD %": 100 * table.pgd_margin,
        "AutoAttack %": 100 * table.autoattack,
        "AutoAttack": table.autoattack_version, "NFE/decision": table.nfe, "ms/decision": 1000 * table.decision_s,
        "attack step ms": 1000 * table.attack_step_s, "pareto": table.pareto.map({True: "yes", False: ""}),
        "meets target": table.meets_target.map({True: "yes", False: ""})})
    return header + "\n" + view.to_markdown(index=False, floatfmt=".1f") + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Robust accuracy against seconds per decision (log scale), clean accuracy in each label; the Pareto
    front as a step line and the target as a dashed line."""
    import matplotlib  # noqa: PLC0415 (plotting only when writing figures)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (target, group) in enumerate(table.groupby("target", sort=False)):
        ax.scatter(group.decision_s, 100 * group.robust, color=f"C{i}", label=f"before {target}", zorder=3)
        for r in group.itertuples():
            ax.annotate(f"{r.defence} (clean {100 * r.clean:.0f}%)", (r.decision_s, 100 * r.robust), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    front = table[table.pareto].sort_values("decision_s")
    ax.step(front.decision_s, 100 * front.robust, where="post", color="grey", lw=1, label="Pareto front")
    ax.axhline(100 * TARGET_ROBUST, color="k", ls="--", lw=0.8, label=f"target {100 * TARGET_ROBUST:.0f}%")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image per decision (defend + classify, x N for a vote)")
    ax.set_ylabel("robust accuracy (%), worst of the white-box threats")
    first = table.iloc[0]
    ax.set_title(f"{first.preset} preset, {first.split} split, n = {first.n}, eps {first.eps}/255, "
                 f"`{first.protocol}` protocol, {first.scoring} scoring", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
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
    table = frontier_table(frame, args.eps, args.scoring)
    if table.empty:
        raise ValueError(f"no configuration in {', '.join(args.results)} has clean and worst-case rows at eps "
                         f"{args.eps}/255")
    out = Path(args.out)
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    write_text(out.with_suffix(".md"), markdown(table))
    plot(table, out.with_suffix(".png"))
    print(markdown(table))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
