"""Views of the bench CSVs: Table-3-style Markdown and trade-off plots, rebuilt without re-running attacks.

    python -m bench.report                  # every results/transfer/*.csv -> .md, results/tradeoff/*.csv -> .md + .png

Accuracies are on CIFAR-10 (JPEG q75 copy), the offline copy of the test set (see ../shared/data/README.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from purify.infra.paths import RESULTS_DIR

from .common import ResultTable, numeric, write_text
from .tables import tradeoff_markdown, tradeoff_plot, transfer_markdown


def load(path: str | Path) -> pd.DataFrame:
    return numeric(ResultTable(path).frame())


def rebuild(results_dir: str | Path = RESULTS_DIR) -> list[Path]:
    """Regenerate every Markdown table and plot under ``results_dir`` from its CSVs; returns the files written."""
    results_dir, written = Path(results_dir), []
    for csv in sorted((results_dir / "transfer").glob("*.csv")):
        write_text(csv.with_suffix(".md"), transfer_markdown(load(csv)))
        written.append(csv.with_suffix(".md"))
    for csv in sorted((results_dir / "tradeoff").glob("*.csv")):
        frame = load(csv)
        write_text(csv.with_suffix(".md"), tradeoff_markdown(frame))
        tradeoff_plot(frame, csv.with_suffix(".png"))
        written += [csv.with_suffix(".md"), csv.with_suffix(".png")]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS_DIR),
                        help="results folder holding transfer/*.csv and tradeoff/*.csv (default: results/)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        parser.error(f"--results {args.results} is not a folder")
    try:
        written = rebuild(args.results)
    except (OSError, ValueError, KeyError) as err:  # a CSV of another layout, an unwritable folder
        parser.exit(2, f"{parser.prog}: error: {str(err).splitlines()[0] if str(err) else repr(err)}\n")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
