"""Pieces every bench command shares: presets, loading models, purifiers and data, the resumable results table."""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch
from torch import nn

import classifiers
from attacks import BPDA, EPS_GRID
from classifiers.registry import checkpoint_path
from purify import DEFENCES, Defence, make_defence, parse_defence
from purify.defences import Vote, needs_bcm
from purify.infra.checkpoint import atomic_write
from purify.infra.data import cifar10_labels, default_data_root, load_cifar10, seeded_subset, train_val_split
from purify.infra.images import as_float
from purify.infra.runtime import autocast, pick_device
from purify.purifier import shipped_bcm_path

# A bench preset names both the classifier preset and the BCM preset it is evaluated with.
BCM_PRESETS = {"small": "cifar10-small", "paper": "cifar10-paper"}
PRESETS = tuple(BCM_PRESETS)
SPLITS = ("test", "val", "sealed")
DATASET = "CIFAR-10 (JPEG q75 copy)"  # how the reports name the data
# The purification strengths a trade-off sweeps by default (bench.tradeoff, bench.quality).
T_STARS = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
# The tidy results schema shared by bench.transfer and bench.tradeoff: one row per evaluated cell. ``defence`` is
# the defence with its full settings (``Defence.spec()``), so rows of different settings never mix; ``family`` is
# the same without the strength t*, i.e. one trade-off curve. Costs: network evaluations per image, measured
# seconds per image of the defence alone and of one attack step (forward + backward) through defence and target.
KEY = ["preset", "split", "defence", "n", "seed", "bf16", "source", "eps", "target"]
# Columns added to the schema since files were written: an older CSV without them reads with these values.
LEGACY_DEFAULTS = {"split": "test"}
COLUMNS = KEY + ["family", "t_star", "nfe", "acc_before", "acc_after", "defence_s_per_image", "step_s_per_image",
                 "checkpoints"]
DEFENCE_HELP = ("defence(s) after the attack, each NAME or NAME:key=value,... or a YAML file (a path, or a name "
                "under configs/defences/): none; bcm (invert eps_inv -> t* in one step, then f(., t*, 0): the "
                "paper's purifier; t_star, eps_inv, inversion_times, denoise_times, rounds, t_star_max: each image's t* "
                "drawn log-uniformly in [t_star, t_star_max]); denoise (x + t* z, then f(., t*, 0); t_star, rounds, "
                "t_star_max); diffusion (DiffPure-style with the same network: x + t* z, then 100 "
                "reverse-SDE steps; t_star, steps, solver=sde|ode); jpeg (quality); bits (bits); median (size); vote "
                "(majority of n purifications by base; base, n, how=majority|logits and the base's options). "
                "The BCM defences default to the checkpoint's t* and eps_inv")


@dataclass(frozen=True, eq=False)
class Entry:
    """A defence as the bench evaluates it, with the id of the BCM weights it uses ("" for none)."""
    defence: Defence
    checkpoint_id: str = ""

    @property
    def t_star(self) -> float | None:
        return getattr(self.defence, "t_star", None)


def default_bcm_path(preset: str) -> Path:
    return shipped_bcm_path(BCM_PRESETS[preset])


def bcm_path(bcm: str | os.PathLike | None, preset: str) -> Path:
    """The BCM checkpoint of ``--bcm``, default the preset's shipped one."""
    return Path(bcm) if bcm else default_bcm_path(preset)


def missing_bcm_message(path: Path, preset: str) -> str:
    name = BCM_PRESETS[preset]
    return (f"no BCM checkpoint at {path}; train and export one with `python -m purify.train --config {name} "
            f"--out runs/bcm-{preset}` and `python -m purify.export runs/bcm-{preset}/checkpoint.pt "
            f"checkpoints/bcm/{name}.pt`, or point --bcm at an exported BCM checkpoint")


def build_defences(args: argparse.Namespace, specs: list[str], device: torch.device,
                   t_stars: list[float] | None = None) -> list[Entry]:
    """The defences of ``--defence`` specs on ``device`` (BCM ones from ``--bcm``, default the preset's shipped
    BCM); with ``t_stars``, every defence that has a strength is built at each of them."""
    path = bcm_path(args.bcm, args.preset)
    entries = []
    for text in specs:
        name, options = parse_defence(text)
        uses_bcm = needs_bcm(name, options)
        strengths = [options.pop("t_star", None)] if t_stars is None or not uses_bcm else list(t_stars)
        if uses_bcm and not path.is_file():
            raise FileNotFoundError(missing_bcm_message(path, args.preset))
        for t_star in strengths:
            strength = {} if t_star is None else {"t_star": t_star}
            defence = make_defence(name, checkpoint=path if uses_bcm else None, device=device, **options, **strength)
            if uses_bcm:
                defence.to(memory_format=torch.channels_last)
            entries.append(Entry(defence, file_id(str(path)) if uses_bcm else ""))
    return entries


def attack_step_cost(defence: Defence, classifier: nn.Module, images: torch.Tensor, device: torch.device,
                     bf16: bool, batch: int) -> float:
    """Seconds per image of one attack step, forward + backward through ``defence`` (BPDA where it is not
    differentiable; one draw of a vote's base) and ``classifier``, on a batch of ``batch`` images (the batch the
    command runs: the per-image cost of a GPU depends on it), after a warm-up step at that batch."""
    base = defence.base if isinstance(defence, Vote) else defence
    model = nn.Sequential(base if base.differentiable else BPDA(base), classifier).eval()
    x = as_float(images[:batch]).to(device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with autocast(device, bf16):
        torch.autograd.grad(model(x).float().sum(), x)  # warm-up at the timed batch (cuDNN picks its kernels)
    started = device_clock(device)
    with autocast(device, bf16):
        loss = model(x).float().logsumexp(1).sum()
    torch.autograd.grad(loss, x)
    return (device_clock(device) - started) / len(x)


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has finished: CUDA kernels run
    asynchronously, so a clock read without synchronising times their launch, not their run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def load_classifiers(names: Iterable[str], preset: str, checkpoint_dir: str | os.PathLike | None,
                     device: torch.device, allow_missing: bool = False) -> dict[str, nn.Module]:
    """Trained classifiers by name (``ARCH`` or ``ARCH:VARIANT``, see ``split_name``), eval mode, channels-last
    (faster convolutions on CPUs); with ``allow_missing``, a missing checkpoint is skipped with a warning
    instead of stopping."""
    models = {}
    for name in names:
        arch, variant = split_name(name)
        try:
            models[name] = classifiers.load_classifier(arch, preset, checkpoint_dir, device, variant).to(
                memory_format=torch.channels_last)
        except FileNotFoundError as err:
            if not allow_missing:
                raise
            print(f"warning: skipping {name}: {err}", file=sys.stderr)
    return models


@dataclass(frozen=True)
class RunOptions:
    """The options of ``add_common_arguments`` as a command's validated arguments hold them (a command's own
    dataclass adds its options after these)."""
    preset: str
    bcm: str | os.PathLike | None
    n: int | None
    seed: int
    data_root: str | None
    batch_size: int
    bf16: bool | None
    device: str
    threads: int | None
    no_progress: bool


def from_args(cls, args: argparse.Namespace, **values):
    """An instance of the dataclass ``cls`` (a command's validated arguments) from the parsed ``args`` of the
    same names, with ``values`` (validated or derived) for the fields they name."""
    return cls(**{f.name: values[f.name] if f.name in values else getattr(args, f.name) for f in fields(cls)})


def start_runtime(threads: int | None, device: str) -> torch.device:
    """Apply ``--threads`` (when given) and return the device of ``--device``."""
    if threads:
        torch.set_num_threads(threads)
    return pick_device(device)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as a shell would run it, for the reports: ``python -m module`` and its arguments (``argv``,
    default the process's)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def run_command(parser: argparse.ArgumentParser, command, args: argparse.Namespace) -> None:
    """Run ``command(args)``; a missing or bad checkpoint, data root or value, or an output that cannot be
    written, ends with a one-line error and exit status 2, no traceback."""
    try:
        command(args)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def split_name(name: str) -> tuple[str, str | None]:
    """A classifier name: ``ARCH`` (``{arch}-{preset}.pt``) or ``ARCH:VARIANT``, a fine-tuned variant
    (``{arch}-{preset}-{variant}.pt``, written by ``classifiers.finetune``) -> (arch, variant or None)."""
    arch, _, variant = name.partition(":")
    return arch, variant or None


def classifier_path(name: str, preset: str, checkpoint_dir: str | os.PathLike) -> Path:
    arch, variant = split_name(name)
    return checkpoint_path(arch, preset, checkpoint_dir, variant)


def load_split(split: str, data_root: str | os.PathLike | None, n: int | None, seed: int,
               n_val: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images (uint8), labels and their indices in the split (a seeded subset; all when ``n`` is None).

    ``test`` is the CIFAR-10 test set the published tables use; ``sealed`` the subset of it no earlier result
    has seen (``bench.sealed``), for headline numbers; ``val`` is the classifiers' validation split:
    the ``n_val`` training images held out from classifier training (``classifiers.train``; the preset's
    ``n_val``), on which any setting chosen by looking at accuracy (t*, eps_inv, which weights ship) is chosen."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    if split == "test":
        pool = torch.arange(len(cifar10_labels("test", data_root)))
    elif split == "sealed":  # the sealed test subset (bench.sealed): headline numbers, evaluated once each
        from .ledger import sealed_ids  # noqa: PLC0415 (only this split reads the file)
        pool = sealed_ids()
    else:
        _, pool = train_val_split(len(cifar10_labels("train", data_root)), n_val, seed=classifiers.SPLIT_SEED)
    if n is not None and not 0 < n <= len(pool):
        raise ValueError(f"--n must be in [1, {len(pool)}] for the {split} split, got {n}")
    ids = pool[seeded_subset(len(pool), n, seed)]
    images, labels = load_cifar10("train" if split == "val" else "test", data_root, ids)
    return images, labels, ids


@functools.lru_cache(maxsize=None)
def file_id(path: str) -> str:
    """Short content hash of a checkpoint file, so results can tell which weights produced them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def combine_ids(*ids: str) -> str:
    """One short id for the checkpoints behind a result row (empty ids are skipped)."""
    ids = [i for i in ids if i]
    return hashlib.sha256("+".join(ids).encode()).hexdigest()[:12] if ids else ""


def text(value) -> str:
    """A cell value as the CSV stores it, so keys compare equal after a round trip through the file."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def _sort_key(value: str):
    """Order for table rows: short model names in ``classifiers.ARCHS`` order, numbers numerically."""
    if value in classifiers.ARCHS:
        return (1, classifiers.ARCHS.index(value), "")
    try:
        return (2, float(value), "")
    except ValueError:
        return (0, 0.0, value)


class ResultTable:
    """A tidy CSV that a long run fills cell by cell and resumes.

    Rows are identified by the ``key`` columns (default: ``KEY``, the transfer/trade-off schema). A row counts
    as done only if its ``checkpoints`` id matches the current one, so results of replaced weights are
    recomputed (and overwritten) instead of mixed in.
    Every ``add`` rewrites the file sorted by key, to a temporary file renamed over the old one: an
    interrupted run never leaves a half-written CSV, and a resumed run ends with the same file as an
    uninterrupted one.
    """

    def __init__(self, path: str | os.PathLike, key: list[str] = KEY, columns: list[str] = COLUMNS,
                 writes: bool = True):
        self.path, self.key_columns, self.columns = Path(path), list(key), list(columns)
        self.writes = writes  # False on the ranks of a sharded run that only follow rank 0's table
        if self.path.is_dir():  # found now, not after the first cell's work
            raise ValueError(f"--out {self.path} is a directory; give the CSV file to write")
        if self.path.is_file():
            frame = pd.read_csv(self.path, dtype=str, keep_default_na=False)
            missing = [c for c in self.columns if c not in frame.columns]
            if missing and set(missing) <= set(LEGACY_DEFAULTS) and \
                    [c for c in self.columns if c in frame.columns] == list(frame.columns):
                frame = frame.assign(**{c: LEGACY_DEFAULTS[c] for c in missing})[self.columns]
            if list(frame.columns) != self.columns:
                raise ValueError(f"{self.path} has columns {list(frame.columns)}, expected {self.columns}; "
                                 f"write to another --out or move the old file away")
            rows = frame.to_dict("records")
        else:
            rows = []
        self.rows = {self.key(row): row for row in rows}

    def key(self, row: dict) -> tuple[str, ...]:
        return tuple(text(row[column]) for column in self.key_columns)

    def done(self, row: dict) -> bool:
        """Whether the cell of ``row`` (its KEY columns and ``checkpoints`` id) is already in the table."""
        old = self.rows.get(self.key(row))
        return old is not None and old["checkpoints"] == text(row["checkpoints"])

    def refuse_mixing(self, row: dict, columns: tuple[str, ...]) -> None:
        """Raise ``ValueError`` if the cell of ``row`` is in the table, for the same checkpoints, with another
        value in one of ``columns`` (settings outside the key, such as the precision or a seed): resuming would
        pass the old cell off as this run's, and recomputing would overwrite it."""
        old = self.rows.get(self.key(row))
        if old is None or old["checkpoints"] != text(row["checkpoints"]):
            return
        for column in columns:
            if old[column] != text(row[column]):
                raise ValueError(f"{self.path} holds this setting ({', '.join(filter(None, self.key(row)))}) with "
                                 f"{column} = {old[column]}, this run has {text(row[column])}; write to another --out")

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[self.key(row)] = {column: text(row[column]) for column in self.columns}
        if self.writes:
            frame = self.frame()
            atomic_write(self.path, lambda tmp: frame.to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        """All rows, sorted by key, as strings (``numeric(frame)`` converts the numeric columns)."""
        ordered = [self.rows[k] for k in sorted(self.rows, key=lambda k: [_sort_key(v) for v in k])]
        return pd.DataFrame(ordered, columns=self.columns)


def numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """A results frame with numbers as numbers (``t_star`` and unmeasured costs are NaN where there are none)."""
    frame = frame.copy()
    for column in ("t_star", "acc_before", "acc_after", "defence_s_per_image", "step_s_per_image"):
        frame[column] = pd.to_numeric(frame[column].replace("", float("nan")))
    for column in ("n", "seed", "eps", "nfe"):
        frame[column] = frame[column].astype(int)
    frame["bf16"] = frame["bf16"].map({"true": True, "false": False, True: True, False: False})
    return frame


def write_text(path: str | os.PathLike, content: str) -> None:
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(content)
    atomic_write(path, write)


def eps_list(values: list[str]) -> list[int]:
    """``--eps`` values: ``all`` or integers k (eps = k/255) from the paper's grid."""
    if values == ["all"]:
        return list(EPS_GRID)
    out = []
    for value in values:
        try:
            k = int(value)
        except ValueError:
            k = None
        if k not in EPS_GRID:
            raise argparse.ArgumentTypeError(
                f"invalid eps {value!r}: give 'all' or values k (eps = k/255) from {', '.join(map(str, EPS_GRID))}")
        if k not in out:
            out.append(k)
    return out


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def add_common_arguments(parser: argparse.ArgumentParser, n: int | None = None, batch_size: int = 250,
                         seed_help: str = "seed of the test subset, of PGD's random start and of the purifier's "
                                          "noise", classifier_dir: bool = True) -> None:
    """Options shared by the bench commands that evaluate trained models on CIFAR-10: presets and checkpoints
    (``--classifier-dir`` only for the commands with classifiers), data, hardware (``n``, ``batch_size``: the
    command's defaults; ``seed_help``: what ``--seed`` seeds)."""
    add_preset_arguments(parser, bcm=True, classifier_dir=classifier_dir)
    parser.add_argument("--n", type=positive_int, default=n,
                        help=f"number of images: a seeded subset when smaller than the split "
                             f"(default: {'all' if n is None else n})")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")
    parser.add_argument("--data-root", default=None,
                        help=f"CIFAR-10 root (default: $BCM_DATA, else the download cache; now {default_data_root()})")
    add_runtime_arguments(parser, batch_size)


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    """``--split``: the images a command evaluates, the test set or the validation split settings are chosen on."""
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="'test': the CIFAR-10 test set of the published tables; 'sealed': the test images no "
                             "earlier result has used (bench.sealed), for headline numbers evaluated once; 'val': the "
                             "1,000 training images held out from the classifiers, where settings are chosen "
                             "(default: test)")


def split_suffix(args: argparse.Namespace) -> str:
    """What a default output name adds for ``--split``: nothing for the test set, ``-val`` for the validation
    split, so that results chosen on and reported on never share a file."""
    return "" if args.split == "test" else f"-{args.split}"


def add_preset_arguments(parser: argparse.ArgumentParser, bcm: bool = True, classifier_dir: bool = True) -> None:
    """``--preset`` and where the trained BCM (``bcm``) and classifiers (``classifier_dir``) are read from."""
    parser.add_argument("--preset", default="small", choices=PRESETS,
                        help="classifier preset AND BCM preset: 'small' = classifiers 'small' + BCM cifar10-small "
                             "(CPU scale, shipped), 'paper' = classifiers 'paper' + BCM cifar10-paper (default: small)")
    if bcm:
        parser.add_argument("--bcm", default=None, metavar="PATH",
                            help="BCM checkpoint: an exported release file or a training checkpoint (default: "
                                 "checkpoints/bcm/cifar10-<preset>.pt in the repository)")
    if classifier_dir:
        parser.add_argument("--classifier-dir", default=str(classifiers.registry.DEFAULT_CHECKPOINT_DIR),
                            metavar="DIR", help="folder of the classifier checkpoints <arch>-<preset>.pt "
                                                "(default: checkpoints/classifiers in the repository)")


def add_runtime_arguments(parser: argparse.ArgumentParser, batch_size: int | None = 250, device: bool = True,
                          progress: bool = True) -> None:
    """Precision, threads and, where the command has them, ``--batch-size``, ``--device`` and ``--no-progress``."""
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast for the network passes of attacks and defences (accuracies are "
                             "always measured in float32); default: the classifier preset's bf16 setting, which for the "
                             "small preset means on only where the device runs bf16 natively (CUDA with bf16, CPUs "
                             "with AMX/AVX-512-BF16; elsewhere bf16 is emulated and 3-10x slower)")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                            help=f"images per batch (default: {batch_size})")
    if device:
        parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_bf16(args: argparse.Namespace, device: torch.device | None = None) -> bool:
    """``--bf16``/``--no-bf16`` when given, else the classifier preset's setting on ``device`` (default:
    ``--device``)."""
    if args.bf16 is not None:
        return args.bf16
    return classifiers.load_preset(args.preset).use_bf16(device or pick_device(args.device))


def check_defences(specs: list[str]) -> list[str]:
    """``--defence`` specs whose names the registry knows, or ValueError naming the problem."""
    for text in specs:
        name, _ = parse_defence(text)
        if name not in DEFENCES:
            raise ValueError(f"unknown defence {name!r} in --defence {text!r}; known defences: {', '.join(DEFENCES)}")
    return list(dict.fromkeys(specs))


def check_names(names: list[str], what: str) -> list[str]:
    """Deduplicated model names (``ARCH`` or ``ARCH:VARIANT``), or ValueError listing the valid ones."""
    unknown = [name for name in names if split_name(name)[0] not in classifiers.ARCHS]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; "
                         f"valid names are {', '.join(classifiers.ARCHS)}")
    return list(dict.fromkeys(names))
