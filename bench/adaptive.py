"""White-box (adaptive) evaluation of a defence: the attacker knows the defence and attacks through it.

For each defence (``--defence``, default the BCM purifier; a majority vote such as ``bcm-robust`` is evaluated as
its base with N = its n), target classifier, purification strength t* (and eps_inv) and eps, the defended
classifier is evaluated under these threat models (column ``threat``; attacks in ``attacks.eot``):

  clean        no attack
  transfer     black box: the paper's PGD (round(5k/4) steps of 2/255) crafted on the undefended target itself,
               then purified (Table 3's threat model with source = target)
  pgd-margin   white box: L-inf PGD on the margin of the prediction averaged over the protocol's draws of the
               defence's noise (exact gradients through both BCM passes; BPDA, the identity backward, for
               defences that are not differentiable), step 2 -> 1 -> 0.5 x eps/8, restarts, best iterate
  pgd-ce       the same on the cross-entropy of the averaged prediction
  apgd-ce      AutoAttack's APGD (its own step-size schedule at this budget) on the same averaged prediction,
  apgd-dlr     CE and DLR losses, highest-loss iterate per image (randomized defences)
  square       AutoAttack's gradient-free Square on the same averaged prediction (randomized defences; gpu and
               paper protocols)
  aa-standard  white box, deterministic defences (none, jpeg, bits, median): AutoAttack's standard version
               (APGD-CE, APGD-T, FAB-T, Square) at its published budgets, beside margin- and CE-PGD with restarts
  worst        per image the worst of the white-box threats above
  pgd-fixed    ablation for randomized defences: the noise frozen per image while attacking and evaluating

Each threat's examples are evaluated N times with fresh noise, drawn per image from the evaluation seed
(independent of the attack's seed and of batching), in float32, and scored three ways (column ``scoring``):
``single`` = average of N evaluations, ``worst`` = all N correct, ``vote`` = the true label holds a strict
majority of the N (ties wrong). Each cell carries a 95% bootstrap interval; with the classifier alone in the same
run (``--defence none bcm-robust``), the paired difference defended minus alone, with its interval, ends the
report. Runs on ``--split test`` or ``sealed`` are appended to ``results/adaptive/test-ledger.csv``.

Protocols (steps x draws for every white-box threat): ``cpu`` 20 x 4, ``gpu`` 100 x 10 with Square 1,000
queries, ``paper`` 200 x 20 with Square 5,000; N = 10. The suite's version (``attacks.SUITE``) and protocol are
in every results key, so a resumed CSV never mixes suites.

Writes a tidy CSV (one row per setting, threat and scoring, with the attack's parameters, seeds, checkpoint
ids, wall time and seconds per image), per-image predictions next to it (``<out>-predictions/``), a
Markdown table and a PNG (accuracy against t*). Reruns resume: finished (setting, threat) units are skipped.

    python -m bench.adaptive --split val --t-stars 0.5 1 --n 200                 # choose settings here, not on test
    python -m bench.adaptive --defence none bcm-robust --target preact:adv-fgsm-long --split sealed --n 500 \
        --protocol gpu --device cuda                                             # a sealed headline, paired
    python -m bench.adaptive --defence diffusion:t_star=0.1 --threats clean pgd-margin --n 50 --batch-size 4
                                   # one threat alone: an upper bound on the robust accuracy of a slow defence
    python -m bench.adaptive --sanity --split val --n 50                        # Carlini et al.'s sanity checks
    python -m bench.adaptive --convergence 20x4 40x8 --split val --n 500       # does doubling the budget add?
    python -m bench.adaptive --convergence 20x4 40x8 80x16 square:1000x10 --escalate --split val --n 500
                                   # the same criterion, each budget attacking only the images still right; then
                                   # Square on what margin-PGD left: does a gradient-free attack find more?
    python -m bench.adaptive --convergence 20x4 pgd-ce:100x10 apgd-ce:100x10 apgd-ce:200x20 --escalate --split val
                                   # other threats' budgets too (pgd-ce, apgd-ce, apgd-dlr): does doubling them add?
    python -m bench.adaptive --retime --target preact --t-stars 0.5 1 --n 200  # re-measure the costs
    python -m bench.adaptive --split val --n 100 --bf16 --out bf16.csv --compare fp32.csv   # does bf16 agree?
    python -m bench.adaptive --defence bcm-robust --target preact:adv-fgsm-long --split val --votes 1 3 5 10
                                   # re-score a run's stored predictions as votes of K purifications
"""
from __future__ import annotations

import argparse
import sys

import classifiers
from attacks import PROTOCOLS, SUITE

from .common import DEFENCE_HELP, add_common_arguments, add_split_argument, run_command
from .whitebox.compare import compare
from .whitebox.config import Run
from .whitebox.convergence import convergence
from .whitebox.grid import evaluate
from .whitebox.retime import retime
from .whitebox.sanity import sanity
from .whitebox.schema import THREATS
from .whitebox.votes import votes

COMMANDS = {"grid": evaluate, "sanity": sanity, "convergence": convergence, "retime": retime, "compare": compare,
            "votes": votes}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        run = Run.from_args(args, argv)
    except ValueError as err:
        parser.error(str(err))
    run_command(parser, COMMANDS[run.mode], run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", nargs="+", default=["preact"], metavar="NAME",
                        help=f"classifier(s) behind the defence: ARCH from {', '.join(classifiers.ARCHS)}, or "
                             f"ARCH:VARIANT for one fine-tuned by `python -m classifiers.finetune --recipe VARIANT`, "
                             f"e.g. preact:bcm-fgsm (default: preact)")
    parser.add_argument("--defence", nargs="+", default=["bcm"], metavar="SPEC",
                        help=f"{DEFENCE_HELP}. A majority vote of n purifications (e.g. bcm-robust) is evaluated "
                             f"as its base with N = n evaluations: its decision is the 'vote' scoring of every row, "
                             f"and the attacks aim at the prediction averaged over n draws (default: bcm)")
    parser.add_argument("--t-stars", nargs="+", type=float, default=None, metavar="T",
                        help="purification strengths t* of every defence that has one (default: the value its spec "
                             "gives, else the BCM checkpoint's preset value)")
    parser.add_argument("--eps-inv", nargs="+", type=float, default=None, metavar="E",
                        help="initial inversion noise(s) of the bcm defence (default: the checkpoint's preset value; "
                             "capped at t*/2)")
    parser.add_argument("--eps", nargs="+", type=int, default=[8], metavar="K",
                        help="L-inf budgets k of eps = k/255, e.g. 4 8 16 (default: 8)")
    parser.add_argument("--protocol", default="cpu", choices=tuple(PROTOCOLS),
                        help="budget of every white-box threat, STEPS x DRAWS: 'cpu' 20x4 (2 CPU cores); 'gpu' 100x10 "
                             "and Square 1,000 queries (the sealed headline's); 'paper' 200x20 and Square 5,000; "
                             "N = 10 evaluations each (default: cpu)")
    add_split_argument(parser)
    parser.add_argument("--threats", nargs="+", default=None, choices=[t for t in THREATS if t != "worst"],
                        metavar="THREAT",
                        help="run only these threats (e.g. clean pgd-margin: an upper bound for a defence too slow for "
                             "the whole suite); 'worst' combines the white-box threats that ran (default: every threat "
                             "that applies to the defence)")
    parser.add_argument("--attack-seed", type=int, default=0, help="seed of the attacks' randomness (default: 0)")
    parser.add_argument("--eval-seed", type=int, default=1,
                        help="seed of the defence's noise at evaluation, drawn per image and evaluation (default: 1)")
    parser.add_argument("--sanity", action="store_true",
                        help="run the sanity checks of Carlini et al. on the first target, t* and eps instead of the grid "
                             "and write sanity.md next to --out; exit status 1 if a check fails")
    parser.add_argument("--convergence", nargs="+", default=None, metavar="BUDGET",
                        help="instead of the grid: margin-PGD with each budget STEPSxEOT (e.g. 20x4 40x8) on the first "
                             "target, t* and eps, scored like the grid, and per image the worst of each budget and the "
                             "next (paired: how much the larger budget adds), written to convergence.csv/.md next to "
                             "--out; THREAT:STEPSxEOT runs another threat at that budget (pgd-ce, apgd-ce, apgd-dlr: "
                             "e.g. apgd-ce:100x10), square:QUERIESxEOT the gradient-free Square, a check for gradient "
                             "masking")
    parser.add_argument("--escalate", action="store_true",
                        help="with --convergence: each budget after the first attacks only the images every earlier "
                             "budget left correct (majority of N), as AutoAttack runs each attack on the points still "
                             "robust; reports the worst so far and the paired drop each budget adds, at a fraction of "
                             "the cost (convergence-escalated.csv/.md)")
    parser.add_argument("--retime", action="store_true",
                        help="instead of the grid: re-measure the costs (defend + classify, one attack step) of every "
                             "selected setting already in --out, in this one process, and write them into its rows, so "
                             "that costs first measured on different machines or under different load compare")
    parser.add_argument("--compare", metavar="CSV", default=None,
                        help="instead of the grid: compare the selected settings in --out with the same settings in "
                             "CSV (e.g. --bf16 against float32, or another --attack-seed), image by image: per threat "
                             "and scoring the paired difference with its 95%% interval, written to "
                             "<out>-vs-<CSV>.md")
    parser.add_argument("--votes", nargs="+", type=int, default=None, metavar="K",
                        help="instead of the grid: re-score the selected settings already in --out as majority "
                             "votes of K purifications (1 <= K <= N = 10; ties wrong), each image averaged over all "
                             "K-subsets of its N stored evaluations, with the network evaluations per decision; no "
                             "attack runs. Writes <out>-votes.csv/.md")
    parser.add_argument("--export-adversarial", metavar="DIR", default=None,
                        help="also write each newly attacked (configuration, threat)'s adversarial images, with ids "
                             "and labels, to DIR/<target>-<defence>-eps<k>-<threat>.pt, for re-scoring elsewhere")
    parser.add_argument("--out", default=None,
                        help=f"results CSV, resumed if it exists (default: results/adaptive/{SUITE}/<preset>-<split>.csv); "
                             "Markdown, PNG and per-image predictions go next to it")
    add_common_arguments(parser, n=200, batch_size=100, seed_help="seed of the image subset")
    for action in parser._actions:  # this command's own default: float32 attacks
        if "--bf16" in action.option_strings:
            action.help = ("bfloat16 autocast for the attacks' network passes (default: off, float32: bf16 is for "
                           "a budget where it was shown to agree with float32); scoring is always float32")
    return parser


if __name__ == "__main__":
    main()
