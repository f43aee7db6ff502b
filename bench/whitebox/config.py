"""The white-box command's settings, resolved once from its arguments: which run, on what, with which budgets."""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from attacks import SUITE, get_protocol
from purify import parse_defence
from purify.infra.paths import RESULTS_DIR

from ..common import check_defences, check_names
from .schema import ATTACK_NAMES, RANDOMIZED_ATTACKS

MODES = ("grid", "sanity", "convergence", "retime", "compare", "votes")


@dataclass(frozen=True)
class Run:
    """What ``python -m bench.adaptive`` was asked to do, checked and with its defaults resolved (``from_args``);
    the ``--...`` options of the same names, ``targets``/``defences`` for ``--target``/``--defence``."""
    mode: str                                   # one of MODES
    targets: tuple[str, ...]
    defences: tuple[str, ...]                   # checked specs; a vote is given as its base (``vote_base``)
    t_stars: tuple[float, ...] | None
    eps_inv: tuple[float, ...] | None
    eps: tuple[int, ...]
    protocol: str
    split: str
    threats: tuple[str, ...] | None             # None: every threat that applies
    attack_seed: int
    eval_seed: int
    convergence: tuple[Budget, ...] | None      # the budgets of ``--convergence``
    escalate: bool                              # ``--escalate``: later budgets attack only the images still right
    export_adversarial: Path | None
    compare: Path | None                        # the other results file of ``--compare``
    votes: tuple[int, ...] | None               # the vote sizes K of ``--votes``
    out: Path                                   # the results CSV, ``--out`` or this suite's default
    preset: str
    bcm: str | None
    classifier_dir: str
    n: int | None
    seed: int                                   # of the image subset
    data_root: str | None
    bf16: bool                                  # the attacks' autocast: float32 unless --bf16
    batch_size: int
    device: str
    threads: int | None
    progress: bool
    command: str                                # the command line, for the test ledger

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> "Run":
        """The settings of parsed arguments (``argv``: the command's arguments); ValueError on a bad value."""
        targets = check_names(args.target, "target")
        evals = get_protocol(args.protocol).evals
        defences = [vote_base(spec, evals) for spec in check_defences(args.defence)]
        for k in args.eps:
            if not 0 < k <= 255:
                raise ValueError(f"--eps values are k in eps = k/255 with 0 < k <= 255, got {k}")
        budgets = tuple(budget(b) for b in args.convergence) if args.convergence else None
        for k in args.votes or ():
            if not 1 <= k <= evals:
                raise ValueError(f"--votes values are vote sizes K with 1 <= K <= N = {evals} (the protocol's "
                                 f"evaluations), got {k}")
        if args.escalate and not budgets:
            raise ValueError("--escalate is an option of --convergence: give the budgets with --convergence")
        modes = [m for m, asked in (("sanity", args.sanity), ("convergence", budgets), ("retime", args.retime),
                                    ("compare", args.compare), ("votes", args.votes)) if asked]
        if len(modes) > 1:
            raise ValueError(f"--{' and --'.join(modes)} are separate modes: give one")
        mode = modes[0] if modes else "grid"
        out = Path(args.out) if args.out else RESULTS_DIR / "adaptive" / SUITE / f"{args.preset}-{args.split}.csv"
        return cls(mode=mode, targets=tuple(targets), defences=tuple(defences), t_stars=_tuple(args.t_stars),
                   eps_inv=_tuple(args.eps_inv), eps=tuple(args.eps), protocol=args.protocol, split=args.split,
                   threats=_tuple(args.threats), attack_seed=args.attack_seed, eval_seed=args.eval_seed,
                   convergence=budgets, escalate=args.escalate,
                   export_adversarial=Path(args.export_adversarial) if args.export_adversarial else None,
                   compare=Path(args.compare) if args.compare else None, votes=_tuple(args.votes),
                   out=out, preset=args.preset, bcm=args.bcm, classifier_dir=args.classifier_dir, n=args.n,
                   seed=args.seed, data_root=args.data_root, bf16=bool(args.bf16), batch_size=args.batch_size,
                   device=args.device, threads=args.threads, progress=not args.no_progress,
                   command=shlex.join(["python", "-m", "bench.adaptive", *argv]))


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


def vote_base(spec: str, evals: int) -> str:
    """A majority vote of ``evals`` purifications is evaluated as its base with N = ``evals`` evaluations (its
    decision is the ``vote`` scoring, with ties counted wrong); other specs are returned unchanged."""
    name, options = parse_defence(spec)
    if name != "vote":
        return spec
    base, n, how = options.pop("base", "bcm"), options.pop("n", 10), options.pop("how", "majority")
    if how != "majority" or n != evals:
        raise ValueError(f"--defence {spec}: a vote is evaluated as the majority of the protocol's N = {evals} "
                         f"evaluations of its base; this one is how={how}, n={n}")
    return base + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


# the threats a convergence budget can name (``THREAT:STEPSxEOT``): every white-box threat of a randomized defence
BUDGET_THREATS = RANDOMIZED_ATTACKS


class Budget(NamedTuple):
    """One budget of a convergence study: a white-box threat's steps (APGD's iterations, Square's queries) x draws."""
    threat: str  # a key of BUDGET_THREATS
    steps: int
    eot: int

    @property
    def name(self) -> str:
        """The attack's name: "margin-PGD", "CE-PGD", "APGD-CE", "APGD-DLR" or "Square"."""
        return ATTACK_NAMES[self.threat]

    @property
    def label(self) -> str:
        """As the Markdown shows it: "20 x 4" (margin-PGD, the study's default), "Square 1000 x 10"."""
        return f"{'' if self.threat == 'pgd-margin' else self.name + ' '}{self.steps} x {self.eot}"

    @property
    def desc(self) -> str:
        """As its progress bar names it: "margin-PGD 20x4", "Square 1000x10"."""
        return f"{self.name} {self.steps}x{self.eot}"


def budget(text: str) -> Budget:
    """``"STEPSxEOT"`` -> margin-PGD's (steps, eot); ``"THREAT:STEPSxEOT"`` -> that threat's (a key of
    BUDGET_THREATS, e.g. ``pgd-ce:100x10``, ``square:1000x10`` for Square's queries); both positive."""
    threat, _, spec = text.lower().rpartition(":")
    threat = threat or "pgd-margin"
    usage = (f"a budget is STEPSxEOT (margin-PGD) or THREAT:STEPSxEOT with THREAT one of {', '.join(BUDGET_THREATS)}, "
             f"e.g. 50x4, pgd-ce:100x10 or square:1000x10; got {text!r}")
    if threat not in BUDGET_THREATS:
        raise ValueError(usage)
    try:
        steps, eot = (int(v) for v in spec.split("x"))
    except ValueError:
        raise ValueError(usage) from None
    if steps < 1 or eot < 1:
        raise ValueError(f"a budget needs at least 1 step (query) and 1 EOT draw; got {text!r}")
    return Budget(threat, steps, eot)
