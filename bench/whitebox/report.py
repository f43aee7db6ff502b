"""The white-box grid's views: per setting a Markdown table of threats by t*, the figure of accuracy against
t*, and the paired comparison of each defence with its classifier alone."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from attacks import PROTOCOLS, SCORINGS
from purify.infra.checkpoint import atomic_write

from ..common import DATASET
from ..intervals import bootstrap_interval
from .schema import DETERMINISTIC_ATTACKS, RANDOMIZED_ATTACKS, THREATS, randomized


def markdown(frame: pd.DataFrame) -> str:
    """One table per (target, eps, protocol, split): rows t* (eps_inv), columns threats, cells
    "single / worst-of-N / vote" accuracy in %."""
    if frame.empty:
        return "(no results)\n"
    parts = []
    settings = ["preset", "family", "target", "split", "n", "data_seed", "protocol", "bf16"]
    for keys, group in frame.groupby(settings, sort=False):
        preset, family, target, split, n, data_seed, protocol, bf16 = keys
        clean = group[group.threat == "clean"]
        attacked = group[group.threat != "clean"]
        # a run of clean images alone (--threats clean) still gets its table, under no attack
        for eps, eps_group in attacked.groupby("eps") if len(attacked) else [(None, clean)]:
            rows = clean if eps is None else pd.concat([clean, eps_group])
            first = eps_group.iloc[0]
            proto = PROTOCOLS[protocol]
            threat_model = ("no attack (clean images only)" if eps is None else
                            f"L-inf eps = {eps}/255; suite {first.suite}, `{protocol}` protocol: "
                            + proto.describe(eps / 255, randomized=randomized(family)))
            images = {"test": "test images", "sealed": "sealed test images (bench.sealed)"}.get(
                split, "validation images (held-out training images)")
            parts.append(
                f"**{preset} preset, defence `{family}` ({first.nfe} network evaluations per image) before the "
                f"{target} classifier; {n:,} {images} "
                f"(seed {data_seed}) of {DATASET}; {threat_model}; attack seed {first.attack_seed}, evaluation "
                f"seed {first.eval_seed}; attack gradients in {'bf16 autocast' if bf16 else 'float32'}, scoring in "
                f"float32.** Accuracy (%) as "
                f"average of {proto.evals} / all {proto.evals} correct / strict majority of {proto.evals} (ties "
                f"wrong). `transfer` = PGD crafted on the undefended {target}; `worst` = per image the worst of "
                f"the white-box threats; `pgd-fixed` = the defence's noise frozen per image. The last column is "
                f"`worst` under the majority scoring with its 95% bootstrap interval.\n")
            threats = [t for t in THREATS if t in set(rows.threat)]
            lines = ["| t* | eps_inv | " + " | ".join(threats) + " | worst, majority (95% CI) | attack s/image |",
                     "|---|---|" + "---|" * len(threats) + "---|---|"]
            for (t_star, eps_inv), cells in rows.groupby(["t_star", "eps_inv"], dropna=False):
                values = []
                for threat in threats:
                    acc = {r.scoring: 100 * r.accuracy for r in cells[cells.threat == threat].itertuples()}
                    values.append(" / ".join(f"{acc[s]:.1f}" for s in ("single", "worst", "vote"))
                                  if len(acc) == 3 else "-")
                worst = cells[(cells.threat == "worst") & (cells.scoring == "vote")]
                values.append(f"{100 * worst.accuracy.iloc[0]:.1f} ({100 * worst.ci_low.iloc[0]:.1f}-"
                              f"{100 * worst.ci_high.iloc[0]:.1f})" if len(worst) else "-")
                attacked = cells.threat.isin([*RANDOMIZED_ATTACKS, *DETERMINISTIC_ATTACKS])
                wall = cells[attacked & (cells.scoring == "single")].s_per_image
                values.append(f"{wall.sum():.2f}" if len(wall) else "-")
                lines.append(f"| {_number(t_star)} | {_number(eps_inv)} | " + " | ".join(values) + " |")
            costs = eps_group.iloc[0]
            lines.append(f"\nCost on the machine that ran it: defend + classify {1000 * costs.purify_s_per_image:.1f} "
                         f"ms/image; one attack step (forward + backward through defence and classifier) "
                         f"{1000 * costs.step_s_per_image:.1f} ms/image per EOT draw.\n")
            parts.append("\n".join(lines))
    return "\n".join(parts)


def _number(value) -> str:
    return "-" if pd.isna(value) else f"{value:g}"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy against t*, one panel per scoring: clean, transfer and white-box lines (the white-box
    counterpart of the trade-off figure)."""
    import matplotlib  # noqa: PLC0415 (plotting only when writing figures)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    scorings = ("single", "worst", "vote")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    styles = {"clean": "k-", "transfer": "C0--", "pgd-margin": "C3-", "pgd-ce": "C3--", "apgd-ce": "C1-",
              "apgd-dlr": "C1--", "square": "C5-", "aa-standard": "C1-", "worst": "C4:", "pgd-fixed": "C2-."}
    for ax, scoring in zip(axes, scorings):
        sub = frame[frame.scoring == scoring]
        for (family, target, eps), group in sub[sub.t_star.notna()].groupby(["family", "target", "eps"]):
            for threat, line in group.groupby("threat"):
                line = line.groupby("t_star").accuracy.mean()
                label = (f"{family}, {target}: clean" if threat == "clean"
                         else f"{family}, {target}: {threat}, eps {eps}/255")
                ax.plot(line.index, 100 * line.values, styles.get(threat, "-"), marker="o", ms=3, label=label)
        ax.set_xscale("log")
        strengths = sorted(frame.t_star.dropna().unique())
        ax.set_xticks(strengths, [f"{t:g}" for t in strengths])
        ax.minorticks_off()
        ax.set_xlabel("t* (purification strength)")
        ax.set_title(f"scoring: {scoring}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if axes[-1].get_legend_handles_labels()[0]:  # a CSV of strengthless defences only (none, jpeg) draws no line
        axes[-1].legend(fontsize=7, loc="best")
    first = frame.iloc[0]
    fig.suptitle(f"Defences with a strength t*, {first.preset} preset, {first.split} split, n = {first.n}, `{first.protocol}` "
                 f"protocol ({DATASET})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def paired_differences(results: dict) -> str:
    """Markdown: each defended setting's worst-case accuracy minus that of its classifier alone (defence
    ``none``) on the same images, per scoring, with a 95% paired bootstrap interval; empty without a reference."""
    lines = []
    for (target, defence, eps), correct in results.items():
        reference = results.get((target, "none", eps))
        if defence == "none" or reference is None or "worst" not in correct or "worst" not in reference:
            continue
        for scoring in SCORINGS:
            diff, low, high = bootstrap_interval(correct["worst"][scoring] - reference["worst"][scoring])
            lines.append(f"| {target} | `{defence}` | {eps} | {scoring} | "
                         f"{100 * correct['worst'][scoring].mean():.1f} | {100 * reference['worst'][scoring].mean():.1f} | "
                         f"{100 * diff:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) |")
    if not lines:
        return ""
    return ("\n**Paired comparison with the classifier alone** (same images, same suite; `worst` threat; "
            "difference in points with its 95% paired bootstrap interval, 10,000 resamples of the images).\n\n"
            "| target | defence | eps | scoring | defended | alone | difference |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")
