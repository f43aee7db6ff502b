"""Train a CIFAR-10 classifier: ``python -m classifiers.train --arch wrn --preset paper|small``.

The ``paper`` preset is the recipe of the BCM paper (Section 4.3.4): SGD momentum 0.9, weight decay 5e-4,
batch 128, 200 epochs, lr 0.1 -> 0.01 at epoch 100 -> 0.001 at epoch 150, crop+flip augmentation and 1,000
training images held out as validation; the weights with the best validation accuracy are kept. The
``small`` preset trains reduced widths in about 30 minutes on one CPU core.

Files: ``{out-dir}/{arch}-{preset}.pt`` (best-validation weights in fp16 plus arch/preset/config, what
``classifiers.load_classifier`` reads), ``{run-dir}/{arch}-{preset}-state.pt`` (full training state for
``--resume``) and ``{results-dir}/{arch}-{preset}-train.csv`` (one row per epoch, the test accuracy last).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from purify.infra.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from purify.infra.config import from_dict, to_dict
from purify.infra.data import augment, default_data_root, load_cifar10, seeded_subset, train_val_split
from purify.infra.images import as_float
from purify.infra.paths import RESULTS_DIR, RUNS_DIR
from purify.infra.runtime import Budget, CSVLog, autocast
from purify.infra.training import STREAM_STRIDE, Session, resume_run_state, save_run_state

from .architectures import ARCHS, count_parameters
from .config import PRESETS, SPLIT_SEED, TrainConfig, load_preset
from .evaluate import accuracy
from .registry import DEFAULT_CHECKPOINT_DIR, build_classifier, checkpoint_path, load_classifier

LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "best_val_acc", "test_acc",
              "minutes", "images_per_s"]
Inputs = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Score = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, epochs: int, steps_per_epoch: int):
    """Per-step learning-rate schedule: the paper's steps (lr x gamma at each milestone epoch), or for short
    runs a one-cycle schedule (linear warm-up from lr/10 to lr over ``warmup_fraction`` of the steps, then
    linear decay to 0 at the last step)."""
    if config.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in config.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.gamma)
    total = epochs * steps_per_epoch
    warmup = max(1, round(config.warmup_fraction * total))

    def one_cycle(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total - step) / (total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle)


def _fp16_weights(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).clone()
            for k, v in model.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class _Files:
    """What a run writes: the best-validation weights, the resumable state, the per-epoch log, the preset's summary;
    ``variant`` (fine-tuning) names them."""
    variant: str | None
    checkpoint: Path
    state: Path
    log: Path
    summary: Path

    @classmethod
    def of(cls, arch: str, preset: str, variant: str | None, out_dir, run_dir, results_dir) -> _Files:
        checkpoint = checkpoint_path(arch, preset, out_dir, variant)
        return cls(variant, checkpoint, Path(run_dir) / f"{checkpoint.stem}-state.pt",
                   Path(results_dir) / f"{checkpoint.stem}-train.csv",
                   Path(results_dir) / f"{preset}{'' if variant is None else '-' + variant}.csv")


@dataclasses.dataclass
class _Data:
    """The training images (uint8, on the device; batches are augmented there) and the validation split."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @classmethod
    def load(cls, config: TrainConfig, data_root, train_subset: int | None, seed: int, device) -> _Data:
        """The validation split is taken from the full training set first, then ``train_subset`` of the rest."""
        images, labels = load_cifar10("train", data_root)
        train_idx, val_idx = train_val_split(len(images), config.n_val, seed=SPLIT_SEED)
        train_idx = train_idx[seeded_subset(len(train_idx), train_subset, seed)]
        return cls(images[train_idx].to(device), labels[train_idx].to(device), images[val_idx], labels[val_idx])


@dataclasses.dataclass
class _Epoch:
    """The running totals of one (possibly partial) epoch."""
    index: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.item() * len(y)
        self.correct += (logits.argmax(1) == y).sum().item()
        self.seen += len(y)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)


class _Run:
    """One classifier training run: its model, optimizer and schedule, its progress (step, best validation
    accuracy, minutes trained), and the steps ``train`` takes with them."""

    def __init__(self, arch: str, preset: str, config: TrainConfig, session: Session, seed: int, files: _Files,
                 bf16: bool, inputs: Inputs | None, evaluate: Score, metadata: dict | None):
        self.arch, self.preset, self.config, self.session = arch, preset, config, session
        self.seed, self.files = seed, files
        self.bf16, self.inputs, self.evaluate, self.metadata = bf16, inputs, evaluate, metadata
        self.step, self.best_val, self.minutes_before = 0, -1.0, 0.0

    def build(self, n_train: int, init_weights: dict | None) -> None:
        """The model (from ``init_weights`` if given), its DDP wrapper, the optimizer, the schedule and this
        rank's augmentation generator, for ``n_train`` training images."""
        config, device = self.config, self.session.device
        model = build_classifier(self.arch, config=config)
        if init_weights is not None:
            load_state_dict_strict(model, {k: v.float() if v.is_floating_point() else v
                                           for k, v in init_weights.items()}, "init_weights")
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(device).to(memory_format=self.memory_format)
        if self.session.distributed and device.type == "cuda":  # batch statistics over the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model, self.trained = model, self.session.wrap(model)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay)
        self.epochs = config.epochs_for(self.arch)
        self.batch_size = min(config.batch_size, n_train)
        if self.batch_size % self.session.world:
            raise ValueError(f"the batch of {self.batch_size} images is not divisible by the "
                             f"{self.session.world} DDP processes")
        self.steps_per_epoch = n_train // self.batch_size  # drop the last partial batch (BN dislikes tiny ones)
        self.scheduler = make_scheduler(self.optimizer, config, self.epochs, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.generator = torch.Generator().manual_seed(self.seed + STREAM_STRIDE * self.session.rank)

    def resume(self) -> None:
        """Continue from the saved state, if there is one (a state of another run is refused)."""
        path = self.files.state
        if not path.is_file():
            if self.session.main:
                print(f"no state at {path}; starting from scratch", file=sys.stderr)
            return
        state = load_checkpoint(path, required=("arch", "preset", "config", "model", "optimizer", "scheduler",
                                                "step", "rng", "generator"))
        if (state["arch"], state["preset"]) != (self.arch, self.preset) or \
                from_dict(TrainConfig, state["config"]) != self.config:
            raise ValueError(f"{path} was written by another run ({state['arch']}/{state['preset']} "
                             f"or a different config); remove it or drop --resume")
        if not isinstance(state["rng"], list):  # written by a single process before DDP: one pair of streams
            state["rng"] = [(state["rng"], state["generator"])]
        self.step = resume_run_state(state, str(path), self.model, self.optimizer, self.session, self.seed,
                                     self.generator)
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_val, self.minutes_before = state["best_val_acc"], state["minutes"]

    def minutes(self) -> float:
        return self.minutes_before + (time.monotonic() - self.started) / 60

    def save_state(self) -> None:
        """The resumable state (rank 0 writes it; a collective: every rank's RNG streams are gathered)."""
        save_run_state(self.files.state, self.session, lambda: {
            "arch": self.arch, "preset": self.preset, "config": to_dict(self.config),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "best_val_acc": self.best_val,
            "minutes": self.minutes(), "generator": self.generator.get_state()}, self.generator)

    def announce(self, data: _Data) -> None:
        if self.session.main:
            print(f"{self.arch}/{self.preset}: {count_parameters(self.model):,} parameters, {len(data.train_x)} "
                  f"train / {len(data.val_x)} val images, {self.epochs} epochs x {self.steps_per_epoch} steps of "
                  f"{self.batch_size} images ({self.session.world} process(es)), device {self.session.device}, "
                  f"{torch.get_num_threads()} threads, {'bf16 autocast' if self.bf16 else 'float32'}",
                  file=sys.stderr)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: _Epoch) -> None:
        """One optimizer step on the augmented batch ``x`` in [0, 1] (mapped by ``inputs`` if given)."""
        if self.inputs is not None:
            x = self.inputs(self.model, x, y)
        x = x.contiguous(memory_format=self.memory_format)
        with autocast(self.session.device, self.bf16):
            logits = self.trained(x)
        loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        epoch.add(loss, logits, y)

    def train_epoch(self, data: _Data, budget: Budget, progress: bool) -> tuple[_Epoch, bool]:
        """The rest of the current epoch, or until the budget is spent (then ``True``): each rank trains on its
        share of every global batch."""
        rank, world, size = self.session.rank, self.session.world, self.batch_size
        index, first = divmod(self.step, self.steps_per_epoch)
        # The epoch's order depends only on (seed, epoch), so a resumed run skips the batches it has seen.
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(self.seed * 100003 + index))
        epoch = _Epoch(index)
        bar = self.session.progress(progress, range(first, self.steps_per_epoch),
                                    desc=f"{self.arch} epoch {index + 1}/{self.epochs}",
                                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
        spent = False
        for i in bar:
            idx = order[i * size:(i + 1) * size][rank::world]  # this rank's share
            self.train_step(augment(as_float(data.train_x[idx]), self.generator), data.train_y[idx], epoch)
            bar.set_postfix(loss=f"{epoch.loss:.3f}", acc=f"{epoch.acc:.3f}", refresh=False)
            if self.session.should_stop(budget):
                spent = True
                break
        bar.close()
        return epoch, spent

    def validate(self, epoch: _Epoch, data: _Data, log: CSVLog) -> None:
        """After a complete epoch (rank 0): score the validation split, keep the best weights, log the epoch."""
        val_acc = self.evaluate(self.model, data.val_x, data.val_y)
        self.model.train()
        if val_acc > self.best_val:
            self.best_val = val_acc
            save_checkpoint({"arch": self.arch, "preset": self.preset, "config": to_dict(self.config),
                             "model": _fp16_weights(self.model), "epoch": epoch.index + 1, "val_acc": val_acc,
                             **(self.metadata or {})}, self.files.checkpoint)
        log.write(step=self.step, epoch=epoch.index + 1, lr=f"{self.scheduler.get_last_lr()[0]:.5g}",
                  train_loss=f"{epoch.loss:.4f}", train_acc=f"{epoch.acc:.4f}", val_acc=f"{val_acc:.4f}",
                  best_val_acc=f"{self.best_val:.4f}", test_acc="", minutes=f"{self.minutes():.2f}",
                  images_per_s=f"{epoch.seen / (time.monotonic() - epoch.started):.0f}")
        print(f"epoch {epoch.index + 1}: train loss {epoch.loss:.4f} acc {epoch.acc:.4f}, val acc {val_acc:.4f} "
              f"(best {self.best_val:.4f}), {self.minutes():.1f} min", file=sys.stderr)

    def train(self, data: _Data, log: CSVLog | None, max_minutes: float | None, progress: bool) -> str | None:
        """Train to the last epoch, saving the state after each (or part of one); returns why it stopped early,
        ``None`` when it finished."""
        budget, self.started, stopped = Budget(max_minutes), time.monotonic(), None
        self.model.train()
        try:
            while self.step < self.epochs * self.steps_per_epoch and stopped is None:
                epoch, spent = self.train_epoch(data, budget, progress)
                if spent:
                    stopped = f"--max-minutes {max_minutes} reached"
                if self.step % self.steps_per_epoch == 0 and self.session.main:
                    self.validate(epoch, data, log)
                self.save_state()
        except KeyboardInterrupt:
            stopped = "interrupted"
            self.save_state()
        return stopped

    def summary(self, finished: bool) -> dict:
        return {"arch": self.arch, "preset": self.preset, "params": count_parameters(self.model), "step": self.step,
                "epochs": self.step / self.steps_per_epoch, "best_val_acc": self.best_val,
                "train_minutes": self.minutes(), "threads": torch.get_num_threads(), "finished": finished,
                "test_acc": None}

    def test(self, summary: dict, log: CSVLog, data_root, test_subset: int | None, record: bool) -> None:
        """Test accuracy of the shipped checkpoint exactly as bench loads it (fp16 weights back in fp32), into
        ``summary``, the log and (``record``) the preset's summary CSV."""
        test_x, test_y = load_cifar10("test", data_root)
        keep = seeded_subset(len(test_x), test_subset, self.seed)
        variant = self.files.variant
        best = load_classifier(self.arch, self.preset, checkpoint_dir=self.files.checkpoint.parent,
                               device=self.session.device, variant=variant)
        summary["test_acc"] = self.evaluate(best, test_x[keep], test_y[keep])
        log.write(step=self.step, epoch=self.epochs, lr="", train_loss="", train_acc="", val_acc="",
                  best_val_acc=f"{self.best_val:.4f}", test_acc=f"{summary['test_acc']:.4f}",
                  minutes=f"{self.minutes():.2f}", images_per_s="")
        if record:
            _record_result(self.files.summary, summary)
        score = "test accuracy" if variant is None else "the selection score on the test images"
        print(f"{self.files.checkpoint.stem}: {score} {summary['test_acc']:.4f} (of {len(keep)} CIFAR-10 test "
              f"images given to it) (from {data_root or default_data_root()}), best val {self.best_val:.4f}, "
              f"{summary['train_minutes']:.1f} min", file=sys.stderr)


def train(arch: str, preset: str = "small", *, config: TrainConfig | None = None, data_root=None,
          out_dir=DEFAULT_CHECKPOINT_DIR, run_dir=RUNS_DIR / "classifiers",
          results_dir=RESULTS_DIR / "classifiers", device: str = "auto", seed: int = 0,
          threads: int | None = None, max_minutes: float | None = None, resume: bool = False,
          train_subset: int | None = None, test_subset: int | None = None, progress: bool = True,
          bf16: bool | None = None, variant: str | None = None, init_weights: dict | None = None,
          inputs: Inputs | None = None, evaluate: Score | None = None, metadata: dict | None = None) -> dict:
    """Train ``arch`` with ``preset`` (or an explicit ``config``); return a summary dict.

    ``bf16`` forces bfloat16 autocast on or off; by default the preset decides (``small``: on only where the
    device runs bf16 natively).

    Stops early (saving a resumable state) when ``max_minutes`` runs out or on KeyboardInterrupt.
    ``train_subset``/``test_subset`` use seeded subsets of the data (smoke tests); the validation split
    is always taken from the full training set first.

    Fine-tuning (``classifiers.finetune``) uses the rest: ``variant`` names the result
    (``{arch}-{preset}-{variant}.pt``, its own state and logs); ``init_weights`` are the weights to start from;
    ``inputs(model, x, y)`` maps each augmented batch in [0, 1] to what the classifier is trained on (e.g. the
    purified adversarial images), called with the model in training mode and without autocast; ``evaluate(model,
    x, y)`` is the accuracy in [0, 1] that selects the checkpoint on the validation split and is reported on the
    test images (default: clean accuracy); ``metadata`` is stored in the checkpoint.

    Under ``torchrun`` (several processes: NCCL on GPUs, gloo on CPUs) the model is wrapped in DDP (with
    synchronised batch norm on GPUs) and each rank trains on its share of every global batch of
    ``batch_size`` images; rank 0 validates, writes the checkpoints and the log, and every rank stops at the
    same step; the resumable state holds each rank's RNG streams.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names are {', '.join(ARCHS)}")
    config = config if config is not None else load_preset(preset)
    if threads:
        torch.set_num_threads(threads)
    session = Session.start(device)
    session.seed(seed)
    run = _Run(arch, preset, config, session, seed, _Files.of(arch, preset, variant, out_dir, run_dir, results_dir),
               config.use_bf16(session.device) if bf16 is None else bf16, inputs,
               evaluate or (lambda model, x, y: accuracy(model, x, y, device=session.device, progress=False)),
               metadata)
    data = _Data.load(config, data_root, train_subset, seed, session.device)
    run.build(len(data.train_x), init_weights)
    if resume:
        run.resume()
    log = session.csv_log(run.files.log, LOG_FIELDS, resume_step=run.step if resume else None)
    run.announce(data)
    stopped = run.train(data, log, max_minutes, progress)
    summary = run.summary(finished=stopped is None)
    session.close()
    if stopped is not None and session.main:
        print(f"stopped ({stopped}) at step {run.step}; continue with --resume", file=sys.stderr)
    if stopped is None and session.main:
        run.test(summary, log, data_root, test_subset, record=train_subset is None and test_subset is None)
    return summary


def _record_result(path: Path, summary: dict) -> None:
    """Upsert this architecture's row of ``results/classifiers/{preset}.csv``."""
    fields = ["arch", "params", "test_acc", "best_val_acc", "train_minutes", "epochs", "threads"]
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["arch"] != summary["arch"]]
    rows.append({"arch": summary["arch"], "params": summary["params"], "test_acc": f"{summary['test_acc']:.4f}",
                 "best_val_acc": f"{summary['best_val_acc']:.4f}",
                 "train_minutes": f"{summary['train_minutes']:.1f}", "epochs": f"{summary['epochs']:g}",
                 "threads": summary["threads"]})
    rows.sort(key=lambda r: ARCHS.index(r["arch"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a classifier training run that `classifiers.train` and `classifiers.finetune` share: where
    its resumable state and logs go, device, seed, threads, time budget, smoke subset, precision, progress."""
    parser.add_argument("--run-dir", default=str(RUNS_DIR / "classifiers"),
                        help="where the resumable training state is written")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR / "classifiers"),
                        help="where the per-epoch CSV log (and for a base classifier, the {preset}.csv summary) "
                             "is written")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialisation, data order, augmentation and any attack or purifier noise")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes of this invocation, saving a resumable state")
    parser.add_argument("--resume", action="store_true", help="continue from the state saved in --run-dir")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on a seeded subset of this many images (smoke runs)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="force bfloat16 autocast on or off (default: the preset's setting; small: on only "
                             "where the device runs bf16 natively, i.e. CUDA with bf16 or a CPU with "
                             "AMX/AVX-512-BF16, since emulated bf16 is 3-10x slower than float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_run_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``parser``'s arguments, with a non-positive ``--threads`` refused (exit status 2)."""
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    return args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m classifiers.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (CPU, one core): python -m classifiers.train --arch preact --preset small --threads 1 "
               "--max-minutes 30. Paper scale on a GPU: --preset paper --device cuda.")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="architecture short name")
    parser.add_argument("--preset", default="small", choices=PRESETS,
                        help="configs/classifiers/{preset}.yaml: 'paper' (published recipe) or 'small' (CPU)")
    parser.add_argument("--data-root", default=None,
                        help="CIFAR-10 root (ImageFolder copy or torchvision download dir); default $BCM_DATA")
    parser.add_argument("--out-dir", default=str(DEFAULT_CHECKPOINT_DIR),
                        help="where {arch}-{preset}.pt (best-validation weights) is written")
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv)
    try:  # missing data, unwritable folders, a state file of another run: one line, no traceback
        train(args.arch, args.preset, data_root=args.data_root, out_dir=args.out_dir, run_dir=args.run_dir,
              results_dir=args.results_dir, device=args.device, seed=args.seed, threads=args.threads,
              max_minutes=args.max_minutes, resume=args.resume, train_subset=args.train_subset,
              progress=not args.no_progress, bf16=args.bf16)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
