"""Transfer attack through the BCM purifier: the BCM paper's Table 3 (Section 4.3.4, Appendix A.3.4; spec §7).

L-inf PGD is crafted on a *source* classifier (eps = k/255, round(5k/4) steps of 2/255) and the adversarial
images are given to four *target* classifiers, before and after purification. Writes a tidy CSV (one row per
source, eps, target), a Markdown table laid out like Table 3 next to it, and prints the table. A rerun resumes:
cells already in the CSV (same settings and checkpoints) are not recomputed.

    python -m bench.transfer --source wrn --eps 8
    python -m bench.transfer --source preact wrn --eps all --n 1000 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import classifiers
from attacks import autocast, craft, paper_pgd
from purify import BCMPurifier, image_noise
from purify.runtime import pick_device

from . import report
from .common import (PURIFIERS, RESULTS_DIR, ResultTable, add_common_arguments, check_names, classifier_path,
                     combine_ids, default_bcm_path, eps_list, file_id, load_classifiers, load_purifier,
                     load_split, numeric, resolve_bf16, run_command, write_text)


@dataclass(frozen=True)
class Defence:
    """What is evaluated after the attack: a purifier (``None`` for ``none``) and the settings it reports."""
    mode: str                              # "bcm", "denoise" or "none"
    purifier: BCMPurifier | None = None
    checkpoint_id: str = ""                # id of the BCM weights, part of each row's ``checkpoints``

    @property
    def t_star(self) -> float | None:
        return None if self.purifier is None else self.purifier.t_star

    @property
    def eps_inv(self) -> float | None:
        return self.purifier.eps_inv if self.purifier is not None and self.mode == "bcm" else None


class TransferGrid:
    """Table 3's experiment with every piece of work done once.

    Per (source, eps): the adversarial images are crafted once on the source (batched); every target's
    accuracy on them ("before") is computed once and shared by all defences; per defence the images are
    purified once and every target is evaluated ("after"). At eps 0 the images are the clean ones for every
    source, so clean results are computed once for all sources. PGD's random start is seeded for every cell,
    and the purifier's noise is drawn per image from the seed and the image's index (``ids``), so a cell's
    numbers depend neither on which cells ran before it nor on the batch size.
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
        self._images: tuple[tuple, torch.Tensor] | None = None    # last crafted (cell, images); cells run in order
        self._purified: tuple[tuple, torch.Tensor] | None = None  # last purified (cell, defence, images)
        self._accuracy: dict[tuple, float] = {}

    @staticmethod
    def _cell(source: str, eps: int) -> tuple:
        return ("clean",) if eps == 0 else (source, eps)

    def adversarial(self, source: str, eps: int) -> torch.Tensor:
        """PGD examples at eps = ``eps``/255 crafted on ``source`` (float in [0, 1]; the clean images at eps 0)."""
        cell = self._cell(source, eps)
        if self._images is None or self._images[0] != cell:
            attack = paper_pgd(self.sources[source], eps)
            images = craft(attack, self.images, self.labels, self.batch_size, seed=self.seed, bf16=self.bf16,
                           progress=self.progress, desc=f"PGD {eps}/255 on {source}")
            self._images = (cell, images)
        return self._images[1]

    def purified(self, source: str, eps: int, defence: Defence) -> torch.Tensor:
        """The adversarial images of (``source``, ``eps``) after ``defence``'s purifier."""
        key = (self._cell(source, eps), defence)
        if self._purified is None or self._purified[0] != key:
            images = self.adversarial(source, eps)
            self._purified = (key, purify(defence.purifier, images, self.ids, self.seed, self.batch_size, self.bf16,
                                          self.progress, desc=f"purify ({defence.mode}, t*={defence.t_star:g})"))
        return self._purified[1]

    def _target_accuracy(self, key: tuple, target: str, images) -> float:
        if key + (target,) not in self._accuracy:
            self._accuracy[key + (target,)] = classifiers.accuracy(
                self.targets[target], images(), self.labels, self.batch_size, progress=False)
        return self._accuracy[key + (target,)]

    def before(self, source: str, eps: int, targets: list[str]) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the unpurified adversarial images."""
        key = (self._cell(source, eps), None)
        return {t: self._target_accuracy(key, t, lambda: self.adversarial(source, eps)) for t in targets}

    def after(self, source: str, eps: int, defence: Defence, targets: list[str]) -> dict[str, float]:
        """Accuracy in [0, 1] of each target on the adversarial images after ``defence``."""
        if defence.purifier is None:
            return self.before(source, eps, targets)
        key = (self._cell(source, eps), defence)
        return {t: self._target_accuracy(key, t, lambda: self.purified(source, eps, defence)) for t in targets}


@torch.inference_mode()
def purify(purifier: BCMPurifier, images: torch.Tensor, ids: torch.Tensor, seed: int, batch_size: int = 250,
           bf16: bool = False, progress: bool = True, desc: str = "purify") -> torch.Tensor:
    """``purifier`` applied to float images in [0, 1] in batches; image ``i``'s noise is drawn from ``seed``
    and ``ids[i]`` (``image_noise``), so the result does not depend on the batch size."""
    device = next(purifier.bcm.parameters()).device
    out = torch.empty_like(images)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        noise = image_noise(ids[start:start + batch_size], x.shape[1:], seed)
        with purifier.fixed_noise(noise), autocast(device, bf16):
            out[start:start + len(x)] = purifier(x).float().cpu()
    return out


def run_cells(grid: TransferGrid, table: ResultTable, cells: list[tuple[str, int]], defences: list[Defence],
              targets: list[str], meta: dict, checkpoint_ids: dict[str, str] | None = None) -> None:
    """Evaluate every (source, eps) of ``cells`` under every defence on ``targets``, skipping rows already in
    ``table`` and writing each finished (source, eps, defence) to it at once. ``meta`` holds the columns that
    are the same for every row (preset, n, seed); ``checkpoint_ids`` maps model names to weight ids."""
    ids = checkpoint_ids or {}
    jobs = [(source, eps, defence) for source, eps in cells for defence in defences]
    bar = tqdm(jobs, desc="cells", disable=not grid.progress)
    for source, eps, defence in bar:
        bar.set_postfix_str(f"{source} eps {eps}/255 {defence.mode}")
        rows = {t: dict(meta, bf16=grid.bf16, source=source, eps=eps, target=t, purifier=defence.mode,
                        t_star=defence.t_star, eps_inv=defence.eps_inv,
                        checkpoints=combine_ids(ids.get(source, ""), ids.get(t, ""), defence.checkpoint_id))
                for t in targets}
        todo = [t for t in targets if not table.done(rows[t])]
        if not todo:
            continue
        before, after = grid.before(source, eps, todo), grid.after(source, eps, defence, todo)
        table.add([dict(rows[t], acc_before=before[t], acc_after=after[t]) for t in todo])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=["preact", "wrn"], metavar="ARCH",
                        help=f"model(s) the PGD examples are crafted on, from {', '.join(classifiers.ARCHS)} "
                             f"(default: the paper's two, preact wrn)")
    parser.add_argument("--eps", nargs="+", default=["8"], metavar="K",
                        help="attack budget(s) k of eps = k/255 from the paper's grid 0 4 8 12 16 24 32, or 'all' "
                             "(default: 8)")
    parser.add_argument("--targets", nargs="+", default=list(classifiers.ARCHS), metavar="ARCH",
                        help=f"models the examples are transferred to "
                             f"(default: all four: {' '.join(classifiers.ARCHS)})")
    parser.add_argument("--purifier", default="bcm", choices=PURIFIERS,
                        help="defence after the attack: 'bcm' = invert eps_inv -> t* in one step, then f(., t*, 0) "
                             "(the paper's purifier); 'denoise' = baseline with the same network: x + t* z, then "
                             "f(., t*, 0); 'none' = no purification (default: bcm)")
    parser.add_argument("--t-star", type=float, default=None,
                        help="purification strength t* on the [-1, 1] scale (default: the BCM checkpoint's preset "
                             "value: 80 for the paper preset as in the paper; the small preset records the best "
                             "value of its trade-off curve)")
    parser.add_argument("--out", default=None,
                        help="results CSV, resumed if it exists; the Markdown table is written next to it "
                             "(default: results/transfer/<preset>-<purifier>.csv)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.eps = eps_list(args.eps)
        args.source, args.targets = check_names(args.source, "source"), check_names(args.targets, "target")
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    run_command(parser, transfer, args)


def transfer(args: argparse.Namespace) -> None:
    """Run the command on parsed, validated arguments."""
    started = time.monotonic()
    device = setup(args)
    out = Path(args.out) if args.out else RESULTS_DIR / "transfer" / f"{args.preset}-{args.purifier}.csv"
    defence = Defence("none") if args.purifier == "none" else load_defence(args, args.purifier, args.t_star, device)
    grid, ids, meta = grid_from_args(args, args.source, args.targets, device)
    table = ResultTable(out)
    run_cells(grid, table, [(s, e) for s in args.source for e in args.eps], [defence], args.targets, meta, ids)

    frame = numeric(table.frame())
    write_text(out.with_suffix(".md"), report.transfer_markdown(frame))
    mine = frame[this_run(frame, args, grid) & (frame.purifier == defence.mode)]
    if defence.purifier is not None:
        mine = mine[(mine.t_star - defence.t_star).abs() < 1e-9]
    print(report.transfer_markdown(mine))
    print(f"wrote {out} and {out.with_suffix('.md')} ({time.monotonic() - started:.0f} s)", file=sys.stderr)


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def load_defence(args: argparse.Namespace, mode: str, t_star: float | None, device: torch.device) -> Defence:
    """The ``mode`` purifier of ``--bcm`` (default: the preset's shipped BCM) at ``t_star`` (default: the
    preset's), seeded with ``--seed``, with the id of its weights."""
    path = Path(args.bcm) if args.bcm else default_bcm_path(args.preset)
    return Defence(mode, load_purifier(path, args.preset, device, mode, t_star, args.seed), file_id(str(path)))


def grid_from_args(args: argparse.Namespace, sources: list[str], targets: list[str],
                   device: torch.device) -> tuple[TransferGrid, dict[str, str], dict]:
    """The grid over the classifiers and test images the arguments name, the ids of the classifiers'
    weights, and the columns shared by every row."""
    names = list(dict.fromkeys(sources + targets))
    models = load_classifiers(names, args.preset, args.classifier_dir, device)
    ids = {name: file_id(str(classifier_path(name, args.preset, args.classifier_dir))) for name in names}
    images, labels, image_ids = load_split("test", args.data_root, args.n, args.seed)
    grid = TransferGrid({s: models[s] for s in sources}, {t: models[t] for t in targets}, images, labels,
                        ids=image_ids, seed=args.seed, batch_size=args.batch_size, bf16=resolve_bf16(args),
                        progress=not args.no_progress)
    return grid, ids, dict(preset=args.preset, n=len(images), seed=args.seed)


def this_run(frame: pd.DataFrame, args: argparse.Namespace, grid: TransferGrid) -> pd.Series:
    """Rows of ``frame`` with this run's preset, images, seed, precision, sources, eps and targets."""
    return ((frame.preset == args.preset) & (frame.n == len(grid.images)) & (frame.seed == grid.seed)
            & (frame.bf16 == grid.bf16) & frame.source.isin(list(grid.sources)) & frame.eps.isin(args.eps)
            & frame.target.isin(list(grid.targets)))


if __name__ == "__main__":
    main()
