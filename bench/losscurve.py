"""Loss curves of training runs: ``python -m bench.losscurve RUN/log.csv [RUN2/log.csv ...] --out loss.png``.

Reads the CSV logs ``purify.train`` writes (step, N, loss, ct, soft, lr, images_per_s, elapsed_min) and draws
one figure: the raw values faint, a rolling mean on top, one line style per run. Two kinds of run are kept
apart because their losses are different quantities:

- the EDM denoiser warm start (loss kind ``denoise``; it logs ct = soft = 0): its loss is the EDM denoising
  loss, drawn alone in the first panel;
- BCT runs: the total loss, the consistency term (ct) and the soft term (soft) of Eq. 15 in their own panels,
  with dotted vertical lines where the curriculum's discretisation N changes (the loss jumps there).

Prints the first and last smoothed value of every term of every run.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from purify.infra.checkpoint import atomic_write
from purify.infra.paths import RESULTS_DIR

TERMS = ("loss", "ct", "soft")
STYLES = ("-", "--", "-.", ":")
PANELS = {"denoise": "EDM denoising loss (warm start)", "loss": "BCT total loss", "ct": "BCT consistency term (ct)",
          "soft": "BCT soft term (soft)"}


def read_log(path: str | Path) -> pd.DataFrame:
    """A training log without rows cut off mid-write (a log being written may end in a partial row)."""
    log = pd.read_csv(path)
    missing = {"step", *TERMS} - set(log.columns)
    if missing:
        raise ValueError(f"{path} is not a purify.train log: it lacks the columns {sorted(missing)}")
    return log.dropna(subset=["step", *TERMS]).sort_values("step").reset_index(drop=True)


def is_denoise_run(log: pd.DataFrame) -> bool:
    """The denoiser warm start logs ct = soft = 0 at every step; a BCT run never does."""
    return bool((log["ct"] == 0).all() and (log["soft"] == 0).all())


def run_name(path: Path) -> str:
    """``runs/bcm-small/log.csv`` -> ``bcm-small`` (the run folder); a bare file keeps its stem."""
    return path.parent.name if path.name == "log.csv" and path.parent.name else path.stem


def smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean()


def default_window(rows: int) -> int:
    """About 1/20 of the log (at least 3 rows), so a curve keeps its shape but loses the batch-to-batch noise."""
    return max(3, round(rows / 20))


def wants_log_scale(values: pd.Series) -> bool:
    """Log y-scale when the positive values span more than a factor of 10."""
    positive = values[values > 0]
    return len(positive) > 1 and positive.max() / positive.min() > 10


def summary(runs: dict[str, pd.DataFrame], window: int | None) -> pd.DataFrame:
    """First and last smoothed value of every term of every run."""
    rows = []
    for name, log in runs.items():
        kind = "denoise" if is_denoise_run(log) else "bct"
        w = window or default_window(len(log))
        for term in ("loss",) if kind == "denoise" else TERMS:
            curve = smooth(log[term], w)
            rows.append({"run": name, "kind": kind, "term": "edm" if kind == "denoise" else term,
                         "first_step": int(log["step"].iloc[0]), "first": curve.iloc[0],
                         "last_step": int(log["step"].iloc[-1]), "last": curve.iloc[-1], "window": w})
    return pd.DataFrame(rows)


def plot(runs: dict[str, pd.DataFrame], path: Path, window: int | None, yscale: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    denoise = {name: log for name, log in runs.items() if is_denoise_run(log)}
    bct = {name: log for name, log in runs.items() if name not in denoise}
    panels = (["denoise"] if denoise else []) + (list(TERMS) if bct else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    style = {name: STYLES[i % len(STYLES)] for i, name in enumerate(runs)}
    for ax, panel in zip(axes[0], panels):
        group, term = (denoise, "loss") if panel == "denoise" else (bct, panel)
        values = []
        for name, log in group.items():
            raw = log[term]
            line, = ax.plot(log["step"], smooth(raw, window or default_window(len(log))), style[name], label=name)
            ax.plot(log["step"], raw, color=line.get_color(), alpha=0.2, lw=0.8)
            if panel != "denoise":
                for step in log.loc[log["N"].diff().fillna(0) != 0, "step"]:
                    ax.axvline(step, color="grey", ls=":", lw=0.7)
            values.append(raw)
        if yscale == "log" or (yscale == "auto" and wants_log_scale(pd.concat(values))):
            ax.set_yscale("log")
        ax.set_title(PANELS[panel], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.losscurve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="training logs (RUN/log.csv), e.g. the warm start, then BCT")
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality" / "loss_curve.png"),
                        help="PNG to write (default: results/quality/loss_curve.png)")
    parser.add_argument("--window", type=int,
                        help="rolling-mean window in log rows (default: 1/20 of each log, at least 3)")
    parser.add_argument("--yscale", choices=("auto", "log", "linear"), default="auto",
                        help="y-axis scale; auto: log when a panel's values span more than a factor of 10")
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 1:
        parser.error("--window must be at least 1")

    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the PNG file to write")

    runs = {}
    for log_path in map(Path, args.logs):
        name = run_name(log_path)
        if name in runs:  # two runs with the same folder name: tell them apart by the full path
            name = str(log_path)
        try:
            runs[name] = read_log(log_path)
        except (OSError, ValueError) as err:  # missing, unreadable or not a CSV log (pandas' errors are ValueErrors)
            parser.exit(2, f"{parser.prog}: error: cannot read {log_path}: {str(err).splitlines()[0]}\n")
        if runs[name].empty:
            parser.error(f"{log_path} has no complete rows yet")
    try:
        plot(runs, Path(args.out), args.window, args.yscale)
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: cannot write {args.out}: {err}\n")
    table = summary(runs, args.window)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}" if math.isfinite(v) else "nan"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
