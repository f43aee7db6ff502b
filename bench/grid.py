"""The transfer grid behind ``bench.transfer`` and ``bench.tradeoff``: PGD crafted on source classifiers, purified
by each defence and given to target classifiers, every piece of work done once, the cells written to a resumable
``ResultTable``. The commands are thin command lines over ``GridRequest`` and ``evaluate``."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import classifiers
from attacks import craft, paper_pgd
from purify import Defence

from .batches import draws_accuracy, purify_draws
from .common import (
    DEFENCE_HELP,
    Entry,
    ResultTable,
    RunOptions,
    add_common_arguments,
    add_split_argument,
    attack_step_cost,
    build_defences,
    classifier_path,
    combine_ids,
    file_id,
    load_classifiers,
    load_split,
    numeric,
    resolve_bf16,
    start_runtime,
    write_text,
)


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
            images = self.adversarial(source, eps)
            started = time.perf_counter()
            purified = purify_draws(entry.defence, images, self.ids, self.seed, self.device, self.batch_size,
                                    self.bf16, self.progress)
            self.purify_seconds[key] = time.perf_counter() - started
            self._purified = (key, purified)
        return self._purified[1]

    def _target_accuracy(self, key: tuple, target: str, images, defence: Defence | None = None) -> float:
        if key + (target,) not in self._accuracy:
            model, draws = self.targets[target], images()
            if defence is None:
                accuracy = classifiers.accuracy(model, draws[0], self.labels, self.batch_size, progress=False)
            else:
                accuracy = draws_accuracy(model, draws, self.labels, defence, self.batch_size)
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
        return {t: self._target_accuracy(key, t, lambda: self.purified(source, eps, entry), entry.defence)
                for t in targets}

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


@dataclass(frozen=True)
class GridRequest(RunOptions):
    """What a transfer-grid command evaluates, from its validated arguments: PGD at each ``eps`` crafted on each
    of ``sources``, given to ``targets`` before and after each of ``defences`` (with ``t_stars``, every defence
    with a strength at each of them), written to ``out``; the rest are the shared options
    (``add_common_arguments``, ``add_split_argument``)."""
    sources: list[str]
    eps: list[int]
    targets: list[str]
    defences: list[str]
    t_stars: list[float] | None
    out: Path
    split: str
    classifier_dir: str

    def cells(self) -> list[tuple[str, int]]:
        return [(source, eps) for source in self.sources for eps in self.eps]


@dataclass(frozen=True)
class GridRun:
    """A grid over the request's classifiers and images, the ids of the classifiers' weights by name and the
    columns every row shares."""
    grid: TransferGrid
    checkpoint_ids: dict[str, str]
    meta: dict


@dataclass(frozen=True)
class GridResults:
    """Everything in the results file (``frame``) and the rows of this run's settings (``mine``), numeric."""
    frame: pd.DataFrame
    mine: pd.DataFrame


def add_grid_arguments(parser: argparse.ArgumentParser, defence_help: str, out_help: str) -> None:
    """The options every grid command ends with: ``--defence`` (default ``bcm``), ``--out``, the split and the
    shared options (``add_common_arguments``)."""
    parser.add_argument("--defence", nargs="+", default=["bcm"], metavar="SPEC", help=f"{DEFENCE_HELP}{defence_help}")
    parser.add_argument("--out", default=None, help=out_help)
    add_split_argument(parser)
    add_common_arguments(parser)


def load_grid(request: GridRequest, device: torch.device) -> GridRun:
    """The grid over the classifiers and images ``request`` names."""
    names = list(dict.fromkeys(request.sources + request.targets))
    models = load_classifiers(names, request.preset, request.classifier_dir, device)
    ids = {name: file_id(str(classifier_path(name, request.preset, request.classifier_dir))) for name in names}
    images, labels, image_ids = load_split(request.split, request.data_root, request.n, request.seed,
                                           classifiers.load_preset(request.preset).n_val)
    grid = TransferGrid({s: models[s] for s in request.sources}, {t: models[t] for t in request.targets}, images,
                        labels, ids=image_ids, seed=request.seed, batch_size=request.batch_size,
                        bf16=resolve_bf16(request), progress=not request.no_progress)
    return GridRun(grid, ids, dict(preset=request.preset, split=request.split, n=len(images), seed=request.seed))


def this_run(frame: pd.DataFrame, request: GridRequest, grid: TransferGrid) -> pd.Series:
    """Rows of ``frame`` with this run's preset, images, seed, precision, sources, eps and targets."""
    return ((frame.preset == request.preset) & (frame.split == request.split) & (frame.n == len(grid.images))
            & (frame.seed == grid.seed)
            & (frame.bf16 == grid.bf16) & frame.source.isin(list(grid.sources)) & frame.eps.isin(request.eps)
            & frame.target.isin(list(grid.targets)))


def evaluate(request: GridRequest) -> GridResults:
    """Run every cell of ``request`` not yet in its results file (resuming it) and read the file back."""
    device = start_runtime(request.threads, request.device)
    table = ResultTable(request.out)
    entries = build_defences(request, request.defences, device, t_stars=request.t_stars)
    run = load_grid(request, device)
    run_cells(run.grid, table, request.cells(), entries, request.targets, run.meta, run.checkpoint_ids)
    frame = numeric(table.frame())
    mine = frame[this_run(frame, request, run.grid) & frame.defence.isin([e.defence.spec() for e in entries])]
    return GridResults(frame, mine)


def evaluate_and_report(request: GridRequest, markdown: Callable[[pd.DataFrame], str],
                        plot: Callable[[pd.DataFrame, Path], None] | None = None) -> None:
    """A grid command's run: ``evaluate`` the request, write the ``markdown`` view of the whole results file
    (and its ``plot``) next to it, print this run's view and what was written."""
    started = time.monotonic()
    results = evaluate(request)
    written = [request.out, request.out.with_suffix(".md")]
    write_text(written[1], markdown(results.frame))
    if plot is not None:
        written.append(request.out.with_suffix(".png"))
        plot(results.frame, written[2])
    print(markdown(results.mine))
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr)
