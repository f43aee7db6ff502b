"""The transfer grid behind ``bench.transfer`` and ``bench.tradeoff``: PGD crafted on source classifiers, purified
by each defence and given to target classifiers, every piece of work done once, the cells written to a resumable
``ResultTable``. The commands are thin command lines over ``GridRequest`` and ``evaluate``."""
from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import tempfile
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
from purify.infra.runtime import gather_objects, leave_distributed
from purify.infra.shards import Shard, map_blocks, remove_blocks

from .batches import decisions_accuracy, draws_predictions, purify_draws
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
    """Table 3's experiment, cell by cell, every piece of work done once.

    A cell is a (source, eps): its adversarial images are crafted on the source; each target predicts on them
    once ("before"), shared by every defence; per defence the images are purified once (a ``vote`` of n: n times,
    with independent noise) and every target predicts on them ("after"). A cell runs block by block (one block is
    one batch, ``purify.infra.shards``): under ``torchrun`` the blocks are split across the ranks and every rank
    ends with every image's predictions. At eps 0 the images are the clean ones for every source, so the clean
    cell is computed once for all sources. PGD's random start and a randomized defence's noise are drawn per image
    from the seed and the image's index (``ids``), so a cell's numbers depend neither on which cells ran before
    it, nor on the batch size, nor on the number of processes. Block files go under ``blocks`` (a folder every
    rank sees; required with more than one process, else a temporary folder) and are removed once the cell is
    merged.
    """

    def __init__(self, sources: dict[str, nn.Module], targets: dict[str, nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, *, ids: torch.Tensor | None = None, seed: int = 0, batch_size: int = 250,
                 bf16: bool = False, progress: bool = True, shard: Shard = Shard(),
                 blocks: str | Path | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if blocks is None and shard.world > 1:
            raise ValueError("a sharded grid needs a blocks folder that every rank sees")
        self.sources, self.targets = sources, targets
        self.images, self.labels = images, labels
        self.ids = torch.arange(len(images)) if ids is None else ids
        self.seed, self.batch_size, self.bf16, self.progress = seed, batch_size, bf16, progress
        self._temporary = tempfile.TemporaryDirectory(ignore_cleanup_errors=True) if blocks is None else None
        self.shard, self.blocks = shard, Path(blocks if blocks is not None else self._temporary.name)
        self.device = next(next(iter(sources.values())).parameters()).device
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}  # per cell, the per-image outputs so far
        self._step_costs: dict[tuple, float] = {}  # per (defence spec, target): seconds per image of one attack step

    @staticmethod
    def cell(source: str, eps: int) -> tuple:
        return ("clean",) if eps == 0 else (source, eps)

    def adversarial(self, source: str, eps: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """PGD examples at eps = ``eps``/255 crafted on ``source`` for the images at positions ``start`` to
        ``stop`` - 1 (default: all), float in [0, 1]; the clean images at eps 0."""
        part = slice(start, len(self.images) if stop is None else stop)
        return craft(paper_pgd(self.sources[source], eps, seed=self.seed), self.images[part], self.labels[part],
                     self.batch_size, seed=self.seed, bf16=self.bf16, progress=False, ids=self.ids[part])

    def outputs(self, source: str, eps: int, entries: list[Entry], targets: list[str],
                unit: str | None = None) -> dict[str, torch.Tensor]:
        """Per image of the cell (``source``, ``eps``): the label each target predicts on the adversarial images
        (key ``before|T``) and after each of ``entries``' defences (``after|SPEC|T``, SPEC the defence's spec; a
        vote's decision), and the seconds each defence took per image (``seconds|SPEC``). Computed once per cell
        (blocks under ``blocks/unit``, default a name made of the cell and what it computes)."""
        have = self._outputs.setdefault(self.cell(source, eps), {})
        purifying = [e for e in entries if e.defence.name != "none"]
        needed = [f"before|{t}" for t in targets] + [f"after|{e.defence.spec()}|{t}" for e in purifying
                                                     for t in targets]
        if not set(needed) <= set(have):
            unit = unit or hashlib.sha256(repr((self.cell(source, eps), needed)).encode()).hexdigest()[:16]
            compute = functools.partial(self._block, source, eps, purifying, targets)
            desc = f"{source} eps {eps}/255" if eps else "clean"
            have.update(map_blocks(compute, len(self.images), self.batch_size, self.blocks / unit, self.shard,
                                   self.progress and self.shard.main, desc))
            remove_blocks(self.blocks / unit, self.shard)
        return have

    def _block(self, source: str, eps: int, entries: list[Entry], targets: list[str], start: int,
               stop: int) -> dict[str, torch.Tensor]:
        """``outputs`` for the images at positions ``start`` to ``stop`` - 1."""
        images, ids = self.adversarial(source, eps, start, stop), self.ids[start:stop]
        out = {f"before|{t}": draws_predictions(self.targets[t], [images], None, self.batch_size) for t in targets}
        for entry in entries:
            spec, started = entry.defence.spec(), time.perf_counter()
            draws = purify_draws(entry.defence, images, ids, self.seed, self.device, self.batch_size, self.bf16,
                                 progress=False)
            out[f"seconds|{spec}"] = torch.full((len(images),), (time.perf_counter() - started) / len(images),
                                                dtype=torch.float64)
            for t in targets:
                out[f"after|{spec}|{t}"] = draws_predictions(self.targets[t], draws, entry.defence, self.batch_size)
        return out

    def before(self, source: str, eps: int, targets: list[str], unit: str | None = None) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the unpurified adversarial images."""
        outputs = self.outputs(source, eps, [], targets, unit)
        return {t: decisions_accuracy(outputs[f"before|{t}"], self.labels) for t in targets}

    def after(self, source: str, eps: int, entry: Entry, targets: list[str],
              unit: str | None = None) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the adversarial images after ``entry``'s defence (for a vote,
        of the decision over its n purifications)."""
        if entry.defence.name == "none":
            return self.before(source, eps, targets, unit)
        outputs = self.outputs(source, eps, [entry], targets, unit)
        return {t: decisions_accuracy(outputs[f"after|{entry.defence.spec()}|{t}"], self.labels) for t in targets}

    def defence_seconds(self, source: str, eps: int, entry: Entry) -> float | None:
        """Seconds per image that ``entry``'s defence took on the cell's images (None without a defence)."""
        seconds = self._outputs.get(self.cell(source, eps), {}).get(f"seconds|{entry.defence.spec()}")
        return None if seconds is None else seconds.sum().item() / len(seconds)

    def step_costs(self, pairs: list[tuple[Entry, str]]) -> list[float]:
        """Per (entry, target) of ``pairs``, the seconds per image of one attack step through the entry's defence
        and the target, each measured once. A collective: under ``torchrun`` the ranks time the pairs in turn
        (pair i on rank i % world, each rank with its own threads), so timing is no serial part of the job."""
        keys = [(entry.defence.spec(), target) for entry, target in pairs]  # the same on every rank
        todo = list(dict.fromkeys(key for key in keys if key not in self._step_costs))
        entries = {entry.defence.spec(): entry for entry, _ in pairs}
        mine = {key: attack_step_cost(entries[key[0]].defence, self.targets[key[1]], self.images, self.device,
                                      self.bf16, self.batch_size)
                for i, key in enumerate(todo) if i % self.shard.world == self.shard.rank}
        for measured in gather_objects(mine):
            self._step_costs.update(measured)
        return [self._step_costs[key] for key in keys]


def run_cells(grid: TransferGrid, table: ResultTable, cells: list[tuple[str, int]], entries: list[Entry],
              targets: list[str], meta: dict, checkpoint_ids: dict[str, str] | None = None) -> None:
    """Evaluate every (source, eps) of ``cells`` under every defence on ``targets``, skipping rows already in
    ``table`` and writing each finished cell's rows to it at once, with their costs (the attack step's measured
    in turn by the ranks). ``meta`` holds the columns that are the same for every row (preset, n, seed);
    ``checkpoint_ids`` maps model names to weight ids."""
    ids = checkpoint_ids or {}
    bar = tqdm(cells, desc="cells", disable=not (grid.progress and grid.shard.main))
    for source, eps in bar:
        bar.set_postfix_str(f"{source} eps {eps}/255")
        todo = []
        for entry in entries:
            defence = entry.defence
            for t in targets:
                row = dict(meta, bf16=grid.bf16, source=source, eps=eps, target=t, defence=defence.spec(),
                           family=defence.family(), t_star=entry.t_star, nfe=defence.nfe,
                           checkpoints=combine_ids(ids.get(source, ""), ids.get(t, ""), entry.checkpoint_id))
                if not table.done(row):
                    todo.append((entry, t, row))
        if not todo:
            continue
        # what the cell computes, and with which weights, names its block files
        digest = hashlib.sha256(repr(sorted(table.key(row) + (row["checkpoints"],) for *_, row in todo)).encode())
        todo_entries = list({id(entry): entry for entry, *_ in todo}.values())
        todo_targets = [t for t in targets if any(t == target for _, target, _ in todo)]
        grid.outputs(source, eps, todo_entries, todo_targets, f"{table.path.stem}-{digest.hexdigest()[:16]}")
        steps = grid.step_costs([(entry, t) for entry, t, _ in todo])
        table.add([dict(row, acc_before=grid.before(source, eps, [t])[t],
                        acc_after=grid.after(source, eps, entry, [t])[t],
                        defence_s_per_image=grid.defence_seconds(source, eps, entry), step_s_per_image=step)
                   for (entry, t, row), step in zip(todo, steps)])


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


def load_grid(request: GridRequest, device: torch.device, shard: Shard = Shard()) -> GridRun:
    """The grid over the classifiers and images ``request`` names (this process's part of a sharded run: its
    block files in ``.blocks/`` next to the results file)."""
    names = list(dict.fromkeys(request.sources + request.targets))
    models = load_classifiers(names, request.preset, request.classifier_dir, device)
    ids = {name: file_id(str(classifier_path(name, request.preset, request.classifier_dir))) for name in names}
    images, labels, image_ids = load_split(request.split, request.data_root, request.n, request.seed,
                                           classifiers.load_preset(request.preset).n_val)
    grid = TransferGrid({s: models[s] for s in request.sources}, {t: models[t] for t in request.targets}, images,
                        labels, ids=image_ids, seed=request.seed, batch_size=request.batch_size,
                        bf16=resolve_bf16(request), progress=not request.no_progress, shard=shard,
                        blocks=request.out.parent / ".blocks")
    return GridRun(grid, ids, dict(preset=request.preset, split=request.split, n=len(images), seed=request.seed))


def this_run(frame: pd.DataFrame, request: GridRequest, grid: TransferGrid) -> pd.Series:
    """Rows of ``frame`` with this run's preset, images, seed, precision, sources, eps and targets."""
    return ((frame.preset == request.preset) & (frame.split == request.split) & (frame.n == len(grid.images))
            & (frame.seed == grid.seed)
            & (frame.bf16 == grid.bf16) & frame.source.isin(list(grid.sources)) & frame.eps.isin(request.eps)
            & frame.target.isin(list(grid.targets)))


def evaluate(request: GridRequest) -> GridResults | None:
    """Run every cell of ``request`` not yet in its results file (resuming it) and read the file back; under
    ``torchrun`` the ranks share each cell's images and only rank 0 writes and gets the results (the others
    None)."""
    shard, device = Shard.join(request.device)
    device = start_runtime(request.threads, device)
    table = ResultTable(request.out, writes=shard.main)
    entries = build_defences(request, request.defences, device, t_stars=request.t_stars)
    run = load_grid(request, device, shard)
    run_cells(run.grid, table, request.cells(), entries, request.targets, run.meta, run.checkpoint_ids)
    leave_distributed()
    if not shard.main:
        return None
    frame = numeric(table.frame())
    mine = frame[this_run(frame, request, run.grid) & frame.defence.isin([e.defence.spec() for e in entries])]
    return GridResults(frame, mine)


def evaluate_and_report(request: GridRequest, markdown: Callable[[pd.DataFrame], str],
                        plot: Callable[[pd.DataFrame, Path], None] | None = None) -> None:
    """A grid command's run: ``evaluate`` the request, write the ``markdown`` view of the whole results file
    (and its ``plot``) next to it, print this run's view and what was written (rank 0 of a sharded run)."""
    started = time.monotonic()
    results = evaluate(request)
    if results is None:
        return
    written = [request.out, request.out.with_suffix(".md")]
    write_text(written[1], markdown(results.frame))
    if plot is not None:
        written.append(request.out.with_suffix(".png"))
        plot(results.frame, written[2])
    print(markdown(results.mine))
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr)
