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
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from purify.infra.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from purify.infra.config import from_dict, to_dict
from purify.infra.data import augment, default_data_root, load_cifar10, seeded_subset, train_val_split
from purify.infra.images import as_float
from purify.infra.paths import RESULTS_DIR, RUNS_DIR
from purify.infra.runtime import (Budget, CSVLog, any_rank, autocast, gather_objects, init_distributed,
                                  leave_distributed, pick_device, rng_state, seed_everything, set_rng_state)

from .architectures import ARCHS, count_parameters
from .config import PRESETS, SPLIT_SEED, TrainConfig, load_preset
from .evaluate import accuracy
from .registry import DEFAULT_CHECKPOINT_DIR, build_classifier, checkpoint_path, load_classifier

LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "best_val_acc", "test_acc",
              "minutes", "images_per_s"]


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


def train(arch: str, preset: str = "small", *, config: TrainConfig | None = None, data_root=None,
          out_dir=DEFAULT_CHECKPOINT_DIR, run_dir=RUNS_DIR / "classifiers",
          results_dir=RESULTS_DIR / "classifiers", device: str = "auto", seed: int = 0,
          threads: int | None = None, max_minutes: float | None = None, resume: bool = False,
          train_subset: int | None = None, test_subset: int | None = None, progress: bool = True,
          bf16: bool | None = None, variant: str | None = None, init_weights: dict | None = None,
          inputs: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor], float] | None = None,
          metadata: dict | None = None) -> dict:
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
    rank, world, device = init_distributed(device)
    seed_everything(seed + rank)
    out_path = checkpoint_path(arch, preset, out_dir, variant)
    state_path = Path(run_dir) / f"{out_path.stem}-state.pt"
    log_path = Path(results_dir) / f"{out_path.stem}-train.csv"
    evaluate = evaluate or (lambda model, x, y: accuracy(model, x, y, device=device, progress=False))

    images, labels = load_cifar10("train", data_root)
    train_idx, val_idx = train_val_split(len(images), config.n_val, seed=SPLIT_SEED)
    train_idx = train_idx[seeded_subset(len(train_idx), train_subset, seed)]
    train_x, train_y, val_x, val_y = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    device = pick_device(device)
    bf16 = config.use_bf16(device) if bf16 is None else bf16
    train_x, train_y = train_x.to(device), train_y.to(device)  # uint8 on the device; batches augmented there

    model = build_classifier(arch, config=config)
    if init_weights is not None:
        load_state_dict_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in init_weights.items()},
                               "init_weights")
    model = model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if world > 1 and device.type == "cuda":  # batch statistics over the global batch, as on one GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if world > 1 else model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    epochs = config.epochs_for(arch)
    batch_size = min(config.batch_size, len(train_x))
    if batch_size % world:
        raise ValueError(f"the batch of {batch_size} images is not divisible by the {world} DDP processes")
    steps_per_epoch = len(train_x) // batch_size  # drop the last partial batch (BN dislikes tiny batches)
    scheduler = make_scheduler(optimizer, config, epochs, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)  # augmentation randomness, per rank
    step, best_val, minutes_before = 0, -1.0, 0.0

    if resume and state_path.is_file():
        state = load_checkpoint(state_path, required=("arch", "preset", "config", "model", "optimizer",
                                                      "scheduler", "step", "rng", "generator"))
        if (state["arch"], state["preset"]) != (arch, preset) or \
                from_dict(TrainConfig, state["config"]) != config:
            raise ValueError(f"{state_path} was written by another run ({state['arch']}/{state['preset']} "
                             f"or a different config); remove it or drop --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_val, minutes_before = state["step"], state["best_val_acc"], state["minutes"]
        streams = state["rng"] if isinstance(state["rng"], list) else [(state["rng"], state["generator"])]
        if len(streams) == world:  # the same number of processes: each continues its own streams
            set_rng_state(streams[rank][0])
            generator.set_state(streams[rank][1])
        else:  # another number: fresh streams per rank, distinct from every other rank's and step's
            seed_everything(seed + 1_000_003 * step + rank)
            generator.manual_seed(seed + 1_000_003 * (step + world) + rank)
    elif resume and rank == 0:
        print(f"no state at {state_path}; starting from scratch", file=sys.stderr)
    log = CSVLog(log_path, LOG_FIELDS, resume_step=step if resume else None) if rank == 0 else None
    budget, start = Budget(max_minutes), time.monotonic()

    def minutes() -> float:
        return minutes_before + (time.monotonic() - start) / 60

    def save_state() -> None:
        """The resumable state (rank 0 writes it; a collective: every rank's RNG streams are gathered)."""
        streams = gather_objects((rng_state(), generator.get_state()))
        if rank == 0:
            save_checkpoint({"arch": arch, "preset": preset, "config": to_dict(config), "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "step": step, "best_val_acc": best_val, "minutes": minutes(), "rng": streams,
                             "generator": streams[0][1]}, state_path)

    if rank == 0:
        print(f"{arch}/{preset}: {count_parameters(model):,} parameters, {len(train_x)} train / {len(val_x)} val "
              f"images, {epochs} epochs x {steps_per_epoch} steps of {batch_size} images ({world} process(es)), "
              f"device {device}, {torch.get_num_threads()} threads, {'bf16 autocast' if bf16 else 'float32'}",
              file=sys.stderr)
    stopped = None
    model.train()
    try:
        while step < epochs * steps_per_epoch and stopped is None:
            epoch, first = divmod(step, steps_per_epoch)
            # The epoch's order depends only on (seed, epoch), so a resumed run skips the batches it has seen.
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            loss_sum, correct, seen, epoch_start = 0.0, 0, 0, time.monotonic()
            bar = tqdm(range(first, steps_per_epoch), desc=f"{arch} epoch {epoch + 1}/{epochs}",
                       disable=not progress or rank != 0, mininterval=1.0 if sys.stderr.isatty() else 30.0)
            for i in bar:
                idx = order[i * batch_size:(i + 1) * batch_size][rank::world]  # this rank's share
                x = augment(as_float(train_x[idx]), generator)
                y = train_y[idx]
                if inputs is not None:
                    x = inputs(model, x, y)
                x = x.contiguous(memory_format=memory_format)
                with autocast(device, bf16):
                    logits = trained(x)
                loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
                if any_rank(rank == 0 and budget.exhausted(), device):  # rank 0's clock stops every rank
                    stopped = f"--max-minutes {max_minutes} reached"
                    break
            bar.close()
            if step % steps_per_epoch == 0 and rank == 0:  # a complete epoch: validate and keep the best weights
                val_acc = evaluate(model, val_x, val_y)
                model.train()
                if val_acc > best_val:
                    best_val = val_acc
                    save_checkpoint({"arch": arch, "preset": preset, "config": to_dict(config),
                                     "model": _fp16_weights(model), "epoch": epoch + 1,
                                     "val_acc": val_acc, **(metadata or {})}, out_path)
                log.write(step=step, epoch=epoch + 1, lr=f"{scheduler.get_last_lr()[0]:.5g}",
                          train_loss=f"{loss_sum / max(seen, 1):.4f}", train_acc=f"{correct / max(seen, 1):.4f}",
                          val_acc=f"{val_acc:.4f}", best_val_acc=f"{best_val:.4f}", test_acc="",
                          minutes=f"{minutes():.2f}",
                          images_per_s=f"{seen / (time.monotonic() - epoch_start):.0f}")
                print(f"epoch {epoch + 1}: train loss {loss_sum / max(seen, 1):.4f} acc {correct / max(seen, 1):.4f}"
                      f", val acc {val_acc:.4f} (best {best_val:.4f}), {minutes():.1f} min", file=sys.stderr)
            save_state()
    except KeyboardInterrupt:
        stopped = "interrupted"
        save_state()
    summary = {"arch": arch, "preset": preset, "params": count_parameters(model), "step": step,
               "epochs": step / steps_per_epoch, "best_val_acc": best_val, "train_minutes": minutes(),
               "threads": torch.get_num_threads(), "finished": stopped is None, "test_acc": None}
    leave_distributed()
    if stopped is not None or rank != 0:
        if stopped is not None and rank == 0:
            print(f"stopped ({stopped}) at step {step}; continue with --resume", file=sys.stderr)
        return summary

    # Test accuracy of the shipped checkpoint exactly as bench loads it (fp16 weights back in fp32).
    test_x, test_y = load_cifar10("test", data_root)
    keep = seeded_subset(len(test_x), test_subset, seed)
    best = load_classifier(arch, preset, checkpoint_dir=out_path.parent, device=device, variant=variant)
    summary["test_acc"] = evaluate(best, test_x[keep], test_y[keep])
    log.write(step=step, epoch=epochs, lr="", train_loss="", train_acc="", val_acc="",
              best_val_acc=f"{best_val:.4f}", test_acc=f"{summary['test_acc']:.4f}", minutes=f"{minutes():.2f}",
              images_per_s="")
    if train_subset is None and test_subset is None:
        _record_result(Path(results_dir) / f"{preset}{'' if variant is None else '-' + variant}.csv", summary)
    score = "test accuracy" if variant is None else "the selection score on the test images"
    print(f"{out_path.stem}: {score} {summary['test_acc']:.4f} (of {len(keep)} CIFAR-10 test images given to it) "
          f"(from {data_root or default_data_root()}), "
          f"best val {best_val:.4f}, {summary['train_minutes']:.1f} min", file=sys.stderr)
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
    parser.add_argument("--run-dir", default=str(RUNS_DIR / "classifiers"),
                        help="where the resumable training state {arch}-{preset}-state.pt is written")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR / "classifiers"),
                        help="where the per-epoch CSV log and the {preset}.csv summary are written")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes of this invocation, saving a resumable state")
    parser.add_argument("--resume", action="store_true", help="continue from {run-dir}/{arch}-{preset}-state.pt")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on a seeded subset of this many images (smoke runs)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="force bfloat16 autocast on or off (default: the preset's setting; small: on only "
                             "where the device runs bf16 natively, i.e. CUDA with bf16 or a CPU with "
                             "AMX/AVX-512-BF16, since emulated bf16 is 3-10x slower than float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    try:  # missing data, unwritable folders, a state file of another run: one line, no traceback
        train(args.arch, args.preset, data_root=args.data_root, out_dir=args.out_dir, run_dir=args.run_dir,
              results_dir=args.results_dir, device=args.device, seed=args.seed, threads=args.threads,
              max_minutes=args.max_minutes, resume=args.resume, train_subset=args.train_subset,
              progress=not args.no_progress, bf16=args.bf16)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
