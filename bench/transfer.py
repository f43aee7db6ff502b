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
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import classifiers
from attacks import craft, paper_pgd
from purify.defences import Vote
from purify.infra.paths import RESULTS_DIR
from purify.infra.runtime import pick_device

from . import report
from .common import (DEFENCE_HELP, Entry, ResultTable, add_common_arguments, add_split_argument,
                     attack_step_cost, build_defences, check_defences, check_names, classifier_path, combine_ids,
                     eps_list, file_id, load_classifiers, load_split, numeric, purify_images, resolve_bf16,
                     run_command, split_suffix, vote_accuracy, write_text)


class TransferGrid:
    """Table 3's experiment with every piece of work done once.

    Per (source, eps): the adversarial images are crafted once on the source (batched); every target's
    accuracy on them ("before") is computed once and shared by all defences; per defence the images are
    purified once (a ``vote`` of n: n times, with independent noise) and every target is evaluated ("after").
    At eps 0 the images are the clean ones for every source, so clean results are computed once for all
    sources. PGD's random start is seeded for every cell, and a randomized defence's noise is drawn per image
    from the seed, the draw and the image's index (``ids``), so a cell's numbers depend neither on which cells
    ran before it nor on the batch size.
    """

    def __init__(self, sources: dict[str, nn.Module], targets: dict[str, nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, *, ids: torch.Tensor | None = None, seed: int = 0, batch_size: int = 250,
                 bf16: bool = False, progress: bool = True):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.sources, self.targets = sources, targets
        self.images, self.labels = images, labels
        self.ids = torch.arange(len(images)) if ids is None else ids
        self.seed, self.batch_size, self.bf16, self.progress = seed, batch_size, bf16, progress
        self.device = next(next(iter(sources.values())).parameters()).device
        self._images: tuple[tuple, torch.Tensor] | None = None  # last crafted (cell, images); cells run in order
        self._purified: tuple[tuple, list[torch.Tensor]] | None = None  # last purified (cell, entry): one per draw
        self._accuracy: dict[tuple, float] = {}
        self._step_costs: dict[tuple, float] = {}  # per (entry, target): seconds per image of one attack step
        self.purify_seconds: dict[tuple, float] = {}  # per (cell, entry): wall time of its purification

    @staticmethod
    def cell(source: str, eps: int) -> tuple:
        return ("clean",) if eps == 0 else (source, eps)

    def adversarial(self, source: str, eps: int) -> torch.Tensor:
        """PGD examples at eps = ``eps``/255 crafted on ``source`` (float in [0, 1]; the clean images at eps 0)."""
        cell = self.cell(source, eps)
        if self._images is None or self._images[0] != cell:
            attack = paper_pgd(self.sources[source], eps)
            images = craft(attack, self.images, self.labels, self.batch_size, seed=self.seed, bf16=self.bf16,
                           progress=self.progress, desc=f"PGD {eps}/255 on {source}")
            self._images = (cell, images)
        return self._images[1]

    def purified(self, source: str, eps: int, entry: Entry) -> list[torch.Tensor]:
        """The adversarial images of (``source``, ``eps``) after ``entry``'s defence: one tensor per draw (the n
        purifications of a vote, else one)."""
        key = (self.cell(source, eps), id(entry))
        if self._purified is None or self._purified[0] != key:
            images, defence = self.adversarial(source, eps), entry.defence
            base, draws = (defence.base, defence.n) if isinstance(defence, Vote) else (defence, 1)
            started = time.perf_counter()
            purified = [purify_images(base, images, self.ids, self.seed, self.device, self.batch_size, self.bf16,
                                      self.progress, desc=f"purify ({base.spec()}) {d + 1}/{draws}", draw=d)
                        for d in range(draws)]
            self.purify_seconds[key] = time.perf_counter() - started
            self._purified = (key, purified)
        return self._purified[1]

    def _target_accuracy(self, key: tuple, target: str, images, vote: Vote | None = None) -> float:
        if key + (target,) not in self._accuracy:
            model, draws = self.targets[target], images()
            if vote is None:
                accuracy = classifiers.accuracy(model, draws[0], self.labels, self.batch_size, progress=False)
            else:
                accuracy = vote_accuracy(model, draws, self.labels, vote.how, self.batch_size)
            self._accuracy[key + (target,)] = accuracy
        return self._accuracy[key + (target,)]

    def before(self, source: str, eps: int, targets: list[str]) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the unpurified adversarial images."""
        key = (self.cell(source, eps), None)
        return {t: self._target_accuracy(key, t, lambda: [self.adversarial(source, eps)]) for t in targets}

    def after(self, source: str, eps: int, entry: Entry, targets: list[str]) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the adversarial images after ``entry``'s defence (for a vote,
        of the decision over its n purifications)."""
        if entry.defence.name == "none":
            return self.before(source, eps, targets)
        key = (self.cell(source, eps), id(entry))
        vote = entry.defence if isinstance(entry.defence, Vote) else None
        return {t: self._target_accuracy(key, t, lambda: self.purified(source, eps, entry), vote) for t in targets}

    def step_cost(self, entry: Entry, target: str) -> float:
        """Seconds per image of one attack step through ``entry``'s defence and ``target`` (measured once)."""
        key = (id(entry), target)
        if key not in self._step_costs:
            self._step_costs[key] = attack_step_cost(entry.defence, self.targets[target], self.images, self.device,
                                                     self.bf16)
        return self._step_costs[key]


def run_cells(grid: TransferGrid, table: ResultTable, cells: list[tuple[str, int]], entries: list[Entry],
              targets: list[str], meta: dict, checkpoint_ids: dict[str, str] | None = None) -> None:
    """Evaluate every (source, eps) of ``cells`` under every defence on ``targets``, skipping rows already in
    ``table`` and writing each finished (source, eps, defence) to it at once, with its cost. ``meta`` holds the
    columns that are the same for every row (preset, n, seed); ``checkpoint_ids`` maps model names to weight
    ids."""
    ids = checkpoint_ids or {}
    jobs = [(source, eps, entry) for source, eps in cells for entry in entries]
    bar = tqdm(jobs, desc="cells", disable=not grid.progress)
    for source, eps, entry in bar:
        defence = entry.defence
        bar.set_postfix_str(f"{source} eps {eps}/255 {defence.spec()}")
        rows = {t: dict(meta, bf16=grid.bf16, source=source, eps=eps, target=t, defence=defence.spec(),
                        family=defence.family(), t_star=entry.t_star, nfe=defence.nfe,
                        checkpoints=combine_ids(ids.get(source, ""), ids.get(t, ""), entry.checkpoint_id))
                for t in targets}
        todo = [t for t in targets if not table.done(rows[t])]
        if not todo:
            continue
        before, after = grid.before(source, eps, todo), grid.after(source, eps, entry, todo)
        seconds = grid.purify_seconds.get((grid.cell(source, eps), id(entry)))
        table.add([dict(rows[t], acc_before=before[t], acc_after=after[t],
                        defence_s_per_image=None if seconds is None else seconds / len(grid.images),
                        step_s_per_image=grid.step_cost(entry, t)) for t in todo])


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
    parser.add_argument("--defence", nargs="+", default=["bcm"], metavar="SPEC",
                        help=f"{DEFENCE_HELP} (default: bcm, e.g. --defence bcm denoise:t_star=0.3 jpeg:quality=75 "
                             f"diffusion vote:n=10)")
    parser.add_argument("--out", default=None,
                        help="results CSV, resumed if it exists; the Markdown table is written next to it "
                             "(default: results/transfer/<preset>.csv)")
    add_split_argument(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.eps = eps_list(args.eps)
        args.source, args.targets = check_names(args.source, "source"), check_names(args.targets, "target")
        args.defence = check_defences(args.defence)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    run_command(parser, transfer, args)


def transfer(args: argparse.Namespace) -> None:
    """Run the command on parsed, validated arguments."""
    started = time.monotonic()
    device = setup(args)
    out = Path(args.out) if args.out else RESULTS_DIR / "transfer" / f"{args.preset}{split_suffix(args)}.csv"
    table = ResultTable(out)
    entries = build_defences(args, args.defence, device)
    grid, ids, meta = grid_from_args(args, args.source, args.targets, device)
    run_cells(grid, table, [(s, e) for s in args.source for e in args.eps], entries, args.targets, meta, ids)

    frame = numeric(table.frame())
    write_text(out.with_suffix(".md"), report.transfer_markdown(frame))
    mine = frame[this_run(frame, args, grid) & frame.defence.isin([e.defence.spec() for e in entries])]
    print(report.transfer_markdown(mine))
    print(f"wrote {out} and {out.with_suffix('.md')} ({time.monotonic() - started:.0f} s)", file=sys.stderr)


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def grid_from_args(args: argparse.Namespace, sources: list[str], targets: list[str],
                   device: torch.device) -> tuple[TransferGrid, dict[str, str], dict]:
    """The grid over the classifiers and test images the arguments name, the ids of the classifiers'
    weights, and the columns shared by every row."""
    names = list(dict.fromkeys(sources + targets))
    models = load_classifiers(names, args.preset, args.classifier_dir, device)
    ids = {name: file_id(str(classifier_path(name, args.preset, args.classifier_dir))) for name in names}
    images, labels, image_ids = load_split(args.split, args.data_root, args.n, args.seed,
                                           classifiers.load_preset(args.preset).n_val)
    grid = TransferGrid({s: models[s] for s in sources}, {t: models[t] for t in targets}, images, labels,
                        ids=image_ids, seed=args.seed, batch_size=args.batch_size, bf16=resolve_bf16(args),
                        progress=not args.no_progress)
    return grid, ids, dict(preset=args.preset, split=args.split, n=len(images), seed=args.seed)


def this_run(frame: pd.DataFrame, args: argparse.Namespace, grid: TransferGrid) -> pd.Series:
    """Rows of ``frame`` with this run's preset, images, seed, precision, sources, eps and targets."""
    return ((frame.preset == args.preset) & (frame.split == args.split) & (frame.n == len(grid.images))
            & (frame.seed == grid.seed)
            & (frame.bf16 == grid.bf16) & frame.source.isin(list(grid.sources)) & frame.eps.isin(args.eps)
            & frame.target.isin(list(grid.targets)))


if __name__ == "__main__":
    main()
