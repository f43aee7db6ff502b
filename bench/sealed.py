"""The sealed test subset, the ledger of every evaluation on test images, and paired intervals.

Headline robustness numbers come from a *sealed* subset of the CIFAR-10 test set: images that no committed
result has used (``used_test_ids``: every seeded subset a results CSV names, every per-image prediction cache,
and the README's demo subset), drawn once with a seed and written to ``results/adaptive/sealed-test.json``
(``python -m bench.sealed --n 500``), then evaluated once per configuration. Every evaluation on test images
(``--split test`` or ``sealed``) appends a line to ``results/adaptive/test-ledger.csv``, so a reader can count
how many configurations have seen the test images.

    python -m bench.sealed --n 500 --seed 2026        # draw the sealed subset (refuses to redraw one)
    python -m bench.sealed --list                     # what is used, what is sealed, the ledger's length
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from .common import run_command
# sealed_ids: bench.common.load_split still reads the sealed subset from here (it belongs in bench.ledger)
from .ledger import LEDGER_PATH, SEALED_PATH, draw_sealed, sealed_ids, used_test_ids  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sealed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="draw a sealed subset of this many test images")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the draw (default: 2026)")
    parser.add_argument("--list", action="store_true", help="print what is used, sealed and in the ledger")
    args = parser.parse_args(argv)
    if args.n is None and not args.list:
        parser.error("give --n N to draw the sealed subset, or --list")
    run_command(parser, sealed, args)


def sealed(args: argparse.Namespace) -> None:
    if args.n is not None:
        if args.n < 1:
            raise ValueError(f"--n must be positive, got {args.n}")
        record = draw_sealed(args.n, args.seed)
        print(f"sealed {record['n']} test images (seed {record['seed']}; {record['excluded']} used ids "
              f"excluded) -> {SEALED_PATH}")
    if args.list:
        ledger = pd.read_csv(LEDGER_PATH, dtype=str) if LEDGER_PATH.is_file() else pd.DataFrame()
        sealed = len(sealed_ids()) if SEALED_PATH.is_file() else 0
        print(f"test ids used by results: {len(used_test_ids())}; sealed: {sealed}; ledger: {len(ledger)} "
              f"evaluations of {ledger[['defence', 'target']].drop_duplicates().shape[0] if len(ledger) else 0} "
              f"configurations")


if __name__ == "__main__":
    sys.exit(main())
