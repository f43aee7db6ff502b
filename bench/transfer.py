"""Transfer attack through a defence: the BCM paper's Table 3 (Section 4.3.4, Appendix A.3.4; spec §7).

L-inf PGD is crafted on a *source* classifier (eps = k/255, round(5k/4) steps of 2/255) and the adversarial
images are given to four *target* classifiers, before and after each defence (the BCM purifier by default;
any of the registry's: ``--defence bcm denoise diffusion jpeg bits median vote``). Writes a tidy CSV (one row
per defence with its full settings, source, eps, target, with the defence's cost: network evaluations and
measured seconds per image for the defence and for one attack step through it), a Markdown table laid out like
Table 3 next to it, and prints the table. A rerun resumes: cells already in the CSV (same settings and
checkpoints) are not recomputed.

    python -m bench.transfer --source wrn --eps 8
    python -m bench.transfer --source preact wrn --eps all --n 1000 --threads 2
    python -m bench.transfer --source preact --eps 8 --defence bcm diffusion jpeg:quality=75 vote:n=10
    torchrun --standalone --nproc-per-node 4 -m bench.transfer -- --source wrn --eps all   # images split 4 ways
"""
from __future__ import annotations

import argparse
from pathlib import Path

import classifiers
from purify.infra.paths import RESULTS_DIR

from .common import check_defences, check_names, eps_list, from_args, run_command, split_suffix
from .grid import GridRequest, add_grid_arguments, evaluate_and_report
from .tables import transfer_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=["preact", "wrn"], metavar="ARCH",
                        help=f"model(s) the PGD examples are crafted on, from {', '.join(classifiers.ARCHS)} "
                             f"(default: the paper's two, preact wrn)")
    parser.add_argument("--eps", nargs="+", default=["8"], metavar="K",
                        help="attack budget(s) k of eps = k/255 from the paper's grid 0 4 8 12 16 24 32, or 'all' "
                             "(default: 8)")
    parser.add_argument("--targets", nargs="+", default=list(classifiers.ARCHS), metavar="NAME",
                        help=f"models the examples are transferred to: ARCH, or ARCH:VARIANT for a fine-tuned one "
                             f"(classifiers.finetune) (default: all four: {' '.join(classifiers.ARCHS)})")
    add_grid_arguments(parser, " (default: bcm, e.g. --defence bcm denoise:t_star=0.3 jpeg:quality=75 diffusion "
                               "vote:n=10)",
                       "results CSV, resumed if it exists; the Markdown table is written next to it "
                       "(default: results/transfer/<preset>.csv)")
    args = parser.parse_args(argv)
    try:
        request = from_args(
            GridRequest, args, eps=eps_list(args.eps), sources=check_names(args.source, "source"),
            targets=check_names(args.targets, "target"), defences=check_defences(args.defence), t_stars=None,
            out=Path(args.out) if args.out else RESULTS_DIR / "transfer" / f"{args.preset}{split_suffix(args)}.csv")
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    run_command(parser, transfer, request)


def transfer(request: GridRequest) -> None:
    """Run the command on validated arguments."""
    evaluate_and_report(request, transfer_markdown)


if __name__ == "__main__":
    main()
