"""The bench's results as tables and plots: the Table-3-style transfer Markdown, the defences side by side, the
trade-off summary, best t* and plot, from a numeric results frame (``common.numeric``). Used by the commands
that write them (``bench.transfer``, ``bench.tradeoff``) and by ``bench.report``, which rebuilds them."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

import classifiers

from .common import DATASET

SETTINGS = ["preset", "split", "defence", "n", "seed", "bf16"]
IMAGES = {"test": "test images", "val": "validation images (training images held out from the classifiers)"}


def _ordered(values) -> list:
    """Model names in ``classifiers.ARCHS`` order (others after them, sorted)."""
    values = list(dict.fromkeys(values))
    known = [a for a in classifiers.ARCHS if a in values]
    return known + sorted(v for v in values if v not in known)


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def _ms(seconds: float) -> str:
    return "not measured" if pd.isna(seconds) else f"{1000 * seconds:.3g} ms/image"


def defence_seconds(group: pd.DataFrame) -> float:
    """A defence's measured seconds per image: the median over its cells (each cell times its own purification,
    so one slowed by another job or a paused process does not move the figure)."""
    return group.groupby(["defence", "source", "eps"]).defence_s_per_image.first().median()


def cost(group: pd.DataFrame) -> str:
    """The cost of a defence as its rows record it: network evaluations and measured seconds per image."""
    row = group.iloc[0]
    evaluations = f"{row.nfe} network evaluation{'s' if row.nfe != 1 else ''} per image"
    if group.defence_s_per_image.isna().all() and group.step_s_per_image.isna().all():
        return f"{evaluations}; seconds not recorded for these rows"
    return (f"{evaluations}; defence alone {_ms(defence_seconds(group))}, one attack step through "
            f"defence and target {_ms(group.step_s_per_image.mean())} on the machine that ran it")


def _setting(group: pd.DataFrame) -> str:
    row = group.iloc[0]
    defence = "no defence" if row.defence == "none" else f"defence `{row.defence}` ({cost(group)})"
    precision = "bf16 autocast" if row.bf16 else "float32"
    return (f"{row.preset} preset, {defence}; {row.n:,} {IMAGES[row.split]} (seed {row.seed}) of {DATASET}; "
            f"PGD and defence in {precision}")


def _groups(frame: pd.DataFrame):
    return frame.groupby(SETTINGS, dropna=False, sort=False)


def defence_comparison(frame: pd.DataFrame, eps_values=(8, 16)) -> pd.DataFrame:
    """One row per defence setting: its cost, its clean accuracy after the defence (mean over the targets) and,
    per source and eps, the accuracy after the defence on the targets other than the source (a transfer
    attack), with the undefended row (``none``) for reference. Columns named for the README table."""
    rows = []
    groups = list(_groups(frame))
    if groups and "none" not in frame.defence.values:  # every row holds the undefended accuracy too
        groups.insert(0, (None, groups[0][1].assign(defence="none", nfe=0, defence_s_per_image=0.0,
                                                    step_s_per_image=math.nan)))
    for _, group in groups:
        clean = group[group.eps == 0]
        if clean.empty:
            continue
        defence = group.defence.iloc[0]
        after = "acc_before" if defence == "none" else "acc_after"
        entry = {"defence": defence, "NFE": int(group.nfe.iloc[0]),
                 "ms/image": 1000 * defence_seconds(group),
                 "attack step ms/image": 1000 * group.step_s_per_image.mean(),
                 "clean %": 100 * clean.groupby("target")[after].first().mean()}
        for source in _ordered(group[group.eps != 0].source):
            for eps in eps_values:
                cells = group[(group.source == source) & (group.eps == eps) & (group.target != source)]
                if not cells.empty:
                    entry[f"from {source}, eps {eps} %"] = 100 * cells[after].mean()
        rows.append(entry)
    return pd.DataFrame(rows)


def comparison_markdown(frame: pd.DataFrame) -> str:
    """The defences side by side (``defence_comparison``) with the threat model, or "" for a single setting."""
    table = defence_comparison(frame)
    if len(table) < 2:
        return ""
    row = frame.iloc[0]
    return (f"**The defences side by side** ({row.preset} preset, {row.n:,} {IMAGES[row.split]} of {DATASET}, "
            f"{'bf16 autocast' if row.bf16 else 'float32'}). Threat model: black-box transfer, the paper's PGD "
            f"(round(5k/4) steps of 2/255) crafted on the undefended source; `from S, eps k` = mean accuracy (%) "
            f"after the defence over the targets other than S; `clean` = mean over all targets; costs measured "
            f"on the machine that ran it (attack step: forward + backward through defence and target, BPDA for "
            f"a non-differentiable defence; `-`: not measured).\n\n"
            f"{table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt='.1f', missingval='-')}"
            f"\n\n")


def transfer_markdown(frame: pd.DataFrame) -> str:
    """The defences side by side (when there are several), then one Table-3-style table per setting: rows
    (source, eps/255), columns targets, cells "before -> after" accuracy in % (just "before" without
    purification)."""
    if frame.empty:
        return "(no results)\n"
    parts = [part for part in (comparison_markdown(frame),) if part]
    for _, group in _groups(frame):
        targets = _ordered(group.target)
        after = group.iloc[0].defence != "none"
        lines = [f"**{_setting(group)}.** Accuracy (%) of each target under L-inf PGD crafted on the source"
                 + (", before -> after purification." if after else "."), "",
                 "| Source | eps/255 | " + " | ".join(targets) + " |",
                 "|---|---|" + "---|" * len(targets)]
        for source in _ordered(group.source):
            rows = group[group.source == source]
            for i, eps in enumerate(sorted(rows.eps.unique())):
                cells = rows[rows.eps == eps].set_index("target")
                values = []
                for t in targets:
                    if t not in cells.index:
                        values.append("")
                    elif after:
                        values.append(f"{_pct(cells.acc_before[t])} -> {_pct(cells.acc_after[t])}")
                    else:
                        values.append(_pct(cells.acc_before[t]))
                lines.append(f"| {source if i == 0 else ''} | {eps} | " + " | ".join(values) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def tradeoff_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over targets after the defence: rows (family, t*; t* NaN for defences without a
    strength), columns eps/255."""
    return (frame.groupby(["family", "t_star", "eps"], dropna=False)["acc_after"].mean()
            .unstack("eps").sort_index())


def best_t_star(frame: pd.DataFrame, family: str) -> float:
    """The t* with the highest accuracy after the defence averaged over the evaluated eps (including the clean
    eps 0) and the targets: the balance of clean and robust accuracy the trade-off curve suggests."""
    summary = tradeoff_summary(frame[(frame.family == family) & frame.t_star.notna()])
    if summary.empty:
        raise ValueError(f"no {family!r} rows with a strength t* in the trade-off results")
    return float(summary.mean(axis=1).idxmax()[1])


def tradeoff_markdown(frame: pd.DataFrame) -> str:
    """Per setting: mean accuracy over the targets after purification for each t* and eps, the undefended
    accuracy, and the best t*."""
    parts = []
    for _, group in frame.groupby(["preset", "split", "n", "seed", "bf16", "source"], sort=False):
        row = group.iloc[0]
        summary = tradeoff_summary(group)
        eps_values = list(summary.columns)
        lines = [f"**Trade-off, {row.preset} preset, PGD crafted on {row.source}, mean over targets "
                 f"{', '.join(_ordered(group.target))}; {row.n:,} {IMAGES[row.split]} (seed {row.seed}) of "
                 f"{DATASET}.** "
                 f"Accuracy (%) after purification at strength t*; the column mean is the criterion for the "
                 f"best t*.", "",
                 "| defence | t* | " + " | ".join(f"eps {e}/255" for e in eps_values) + " | mean |",
                 "|---|---|" + "---|" * (len(eps_values) + 1)]
        undefended = group.groupby("eps")["acc_before"].mean()
        lines.append("| none | - | " + " | ".join(_pct(undefended[e]) for e in eps_values)
                     + f" | {_pct(undefended[eps_values].mean())} |")
        for (family, t_star), values in summary.iterrows():
            strength = "-" if pd.isna(t_star) else f"{t_star:g}"
            lines.append(f"| `{family}` | {strength} | " + " | ".join(_pct(values[e]) for e in eps_values)
                         + f" | {_pct(values.mean())} |")
        lines.append("\nCost per family (seconds: the median over its cells): " + "; ".join(
            f"`{family}`: {cost(rows)}" for family, rows in group.groupby("family", sort=False)) + ".")
        for family in sorted(group[group.t_star.notna()].family.unique()):
            best = best_t_star(group, family)
            lines.append(f"\nBest t* for `{family}`: **{best:g}**.")
            ratios = transfer_ratio(group[group.family == family], best)
            if not ratios.empty:
                lines.append(f"Transfer only (targets other than {row.source}) at t* = {best:g}: "
                             + "; ".join(f"eps {eps}/255 {_pct(r.after)} after purification, {r.ratio:.2f} x "
                                         f"their clean accuracy before ({_pct(r.clean)})"
                                         for eps, r in ratios.iterrows()) + ".")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def transfer_ratio(frame: pd.DataFrame, t_star: float) -> pd.DataFrame:
    """For one source and purifier at strength ``t_star``: rows eps/255 > 0; columns ``after`` (mean accuracy
    after purification on the targets other than the source, i.e. a transfer attack), ``clean`` (their mean clean
    accuracy before purification, from eps 0) and ``ratio = after / clean``. Empty without eps 0 or such
    targets."""
    transfer = frame[frame.target != frame.source]
    clean = transfer[transfer.eps == 0]
    if clean.empty:
        return pd.DataFrame(columns=["after", "clean", "ratio"])
    attacked = transfer[(transfer.eps != 0) & (transfer.t_star == t_star)]
    result = attacked.groupby("eps")["acc_after"].mean().to_frame("after")
    result["clean"] = clean.groupby("target")["acc_before"].first().mean()
    result["ratio"] = result.after / result.clean
    return result


def tradeoff_plot(frame: pd.DataFrame, path: str | Path) -> None:
    """Accuracy after the defence against t* (log scale), one panel per target, one colour per attack eps
    (eps 0 = clean accuracy), one line style per defence family (a defence without a strength is a horizontal
    line in its style); dotted horizontal lines are the undefended accuracy at the same eps. Reading along x
    shows where clean and robust accuracy meet."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    targets = _ordered(frame.target)
    cols = min(2, len(targets))
    rows = math.ceil(len(targets) / cols)
    height = 3.6 * rows + 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 5.5 * cols), height), sharex=True, sharey=True,
                             squeeze=False)
    eps_values = sorted(frame.eps.unique())
    attacked = [e for e in eps_values if e != 0]
    palette = plt.get_cmap("plasma")([0.15 + 0.7 * i / max(1, len(attacked) - 1) for i in range(len(attacked))])
    colours = {0: "black", **dict(zip(attacked, palette))}
    line_styles = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1))]
    families = list(dict.fromkeys(frame.family))
    styles = {family: line_styles[i % len(line_styles)] for i, family in enumerate(families)}
    for ax, target in zip(axes.flat, targets):
        data = frame[frame.target == target]
        for eps in eps_values:
            at_eps = data[data.eps == eps]
            for family, style in styles.items():
                curve = at_eps[at_eps.family == family].sort_values("t_star")
                if curve.t_star.notna().any():
                    ax.plot(curve.t_star, 100 * curve.acc_after, ls=style, marker="o", ms=3, color=colours[eps])
                elif len(curve):
                    ax.axhline(100 * curve.acc_after.mean(), ls=style, lw=1.5, color=colours[eps])
            ax.axhline(100 * at_eps.acc_before.mean(), color=colours[eps], ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"target {target}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("purification strength t* ([-1, 1] scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[e], lw=2, label="clean" if e == 0 else f"PGD eps {e}/255")
               for e in eps_values]
    handles += [Line2D([], [], color="gray", ls=style, label=f"after {family}") for family, style in styles.items()]
    handles.append(Line2D([], [], color="gray", ls=":", lw=1, label="no purification"))
    ncol = min(len(handles), 3 * cols)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    row = frame.iloc[0]
    fig.suptitle(f"Clean vs robust accuracy against purification strength t*\n{row.preset} preset, PGD crafted "
                 f"on {row.source}, {row.n:,} {IMAGES[row.split]} of {DATASET}", fontsize=10)
    fig.tight_layout(rect=(0, (0.15 + 0.22 * math.ceil(len(handles) / ncol)) / height, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
