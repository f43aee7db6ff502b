"""Clean vs robust accuracy as a function of the purification strength t* (the BCM paper's Figure 13; spec §7).

Small t* keeps more of the image (higher clean accuracy) but removes less of the attack; large t* the reverse.
PGD examples are crafted once per eps on the source, then purified at every t* and given to every target.
Writes a tidy CSV (same columns as bench.transfer), a Markdown summary with the best t* and a PNG plot next
to it; resumes like bench.transfer. t* is on the [-1, 1] data scale, where eps 8/255 is about 0.06.

    python -m bench.tradeoff --source preact --eps 0 8 32 --n 500
"""
from __future__ import annotations

import argparse
from pathlib import Path

import classifiers
from purify.infra.paths import RESULTS_DIR

from .common import T_STARS, check_defences, check_names, eps_list, from_args, run_command, split_suffix
from .grid import GridRequest, add_grid_arguments, evaluate_and_report
from .tables import tradeoff_markdown, tradeoff_plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tradeoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="preact", choices=classifiers.ARCHS,
                        help="model the PGD examples are crafted on (default: preact)")
    parser.add_argument("--eps", nargs="+", default=["0", "8", "32"], metavar="K",
                        help="attack budgets k of eps = k/255 from 0 4 8 12 16 24 32, or 'all'; 0 gives the clean "
                             "accuracy (default: 0 8 32)")
    parser.add_argument("--targets", nargs="+", default=list(classifiers.ARCHS), metavar="ARCH",
                        help=f"models evaluated (default: all four: {' '.join(classifiers.ARCHS)})")
    parser.add_argument("--t-stars", nargs="+", type=float, default=list(T_STARS), metavar="T",
                        help=f"purification strengths t* (default: {' '.join(f'{t:g}' for t in T_STARS)})")
    add_grid_arguments(parser, ". Each defence with a strength (bcm, denoise, diffusion, a vote of one of them) is "
                               "evaluated at every --t-stars value; the others once (default: bcm)",
                       "results CSV, resumed if it exists; .md and .png are written next to it "
                       "(default: results/tradeoff/<preset>-<source>.csv)")
    args = parser.parse_args(argv)
    try:
        eps, targets, defences = eps_list(args.eps), check_names(args.targets, "target"), check_defences(args.defence)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    if any(t <= 0 for t in args.t_stars):
        parser.error(f"--t-stars must be positive, got {args.t_stars}")
    out = (Path(args.out) if args.out else
           RESULTS_DIR / "tradeoff" / f"{args.preset}-{args.source}{split_suffix(args)}.csv")
    request = from_args(GridRequest, args, sources=[args.source], eps=eps, targets=targets, defences=defences,
                        t_stars=sorted(set(args.t_stars)), out=out)
    run_command(parser, tradeoff, request)


def tradeoff(request: GridRequest) -> None:
    """Run the command on validated arguments."""
    evaluate_and_report(request, tradeoff_markdown, tradeoff_plot)


if __name__ == "__main__":
    main()
