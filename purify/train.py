"""Train a BCM with BCT (Algorithm 1): ``python -m purify.train --config cifar10-small --out runs/bcm-small``.

The same trainer trains the CT Inversion noiser of spec §8 (``--config cifar10-small-ctinv``, loss kind ``ctinv``)
and single-time consistency models (``network.time_inputs: 1`` with loss kind ``ct``), from which a BCM can be
fine-tuned (``--init-from``, spec §3).

RAdam on the online weights, an EMA of them for sampling, periodic atomic checkpoints holding everything
needed to resume (model, EMA, optimizer, step, RNG state, config), a CSV log of the loss terms, a wall-clock
budget, bf16 autocast on GPUs that run it natively (the passes a consistency loss compares stay float32), and
DDP when started by ``torchrun --nproc_per_node=N``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .bcm import CONSISTENCY_KIND, BCM, ConsistencyModel, bcm_weights_from_consistency_model
from .bct import make_loss
from .infra.checkpoint import bcm_weights, load_checkpoint, load_state_dict_strict
from .infra.config import to_dict
from .infra.data import VAL_SPLIT_SEED, load_cifar10, train_val_split
from .infra.runtime import Budget, autocast, native_bf16
from .infra.training import Session, resume_run_state, save_run_state
from .noiser import KIND as NOISER, Noiser
from .presets import Preset, load_preset, preset_from_dict

LOG_FIELDS = ["step", "N", "loss", "ct", "soft", "lr", "images_per_s", "elapsed_min"]
CHECKPOINT_KEYS = ("kind", "config", "model", "ema", "optimizer", "step", "rng")
SINGLE_TIME_LOSSES = ("ct", "denoise")  # the loss kinds that evaluate the model at u = eps only


def build_model(preset: Preset) -> tuple[str, nn.Module]:
    """The network a preset trains and the checkpoint kind it is saved under: a single-time consistency model
    ``f(x, t)`` for a network without the ``u`` input, the CT Inversion noiser ``g(x_t, t)`` for loss kind
    ``ctinv``, else a BCM ``f(x, t, u)``."""
    if preset.model.network.time_inputs == 1:
        if preset.loss.kind not in SINGLE_TIME_LOSSES:
            raise ValueError(f"loss.kind {preset.loss.kind!r} needs a network with both times (network.time_inputs "
                             f"2); a t-only network trains as a consistency model with loss.kind 'ct'")
        return CONSISTENCY_KIND, ConsistencyModel(preset.model)
    if preset.loss.kind == "ctinv":
        return NOISER, Noiser(preset.model)
    return "bcm", BCM(preset.model)


class LossModule(nn.Module):
    """The trained network together with its loss, so one DDP forward computes all passes of a step (four for BCT)."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return self.loss(self.model, x, step)


class Trainer:
    """One training run in ``out_dir``; ``run()`` trains until ``total_steps`` or the budget is spent.

    ``model`` is the trained network (a BCM, a single-time consistency model or the CT Inversion noiser, as
    ``kind`` says), ``ema`` its average, ``session`` this process's place in a DDP run."""

    def __init__(self, preset: Preset, out_dir: str | os.PathLike, data_root=None, device: str = "auto",
                 resume: bool = False, init_from: str | None = None, start_step: int = 0,
                 images: torch.Tensor | None = None, bf16: bool | None = None):
        self.session = Session.start(device)
        self.device = self.session.device
        if self.device.type == "cuda":  # fixed shapes every step: let cuDNN pick its fastest convolutions once
            torch.backends.cudnn.benchmark = True
        # bf16 autocast: by default only on GPUs that run it natively; on CPUs training stays float32
        self.bf16 = (self.device.type == "cuda" and native_bf16(self.device)) if bf16 is None else bf16
        self.out_dir = Path(out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"

        start = load_checkpoint(self.checkpoint_path, CHECKPOINT_KEYS) if resume else None
        if start is not None:
            preset = preset_from_dict(start["config"], f"{self.checkpoint_path} config")
        self.preset = preset
        tc = preset.train
        if tc.accumulate < 1:
            raise ValueError(f"train.accumulate must be a positive number of micro-batches, got {tc.accumulate}")
        if tc.batch_size % (self.session.world * tc.accumulate):
            raise ValueError(f"batch_size {tc.batch_size} is not divisible by the {self.session.world} DDP processes "
                             f"x {tc.accumulate} micro-batches (train.accumulate)")
        self.session.seed(tc.seed)

        self.kind, model = build_model(preset)
        self.model = model.to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if init_from is not None and start is None:
            # Fine-tuning (spec §3, last bullet): start from a CT or BCM training checkpoint's EMA weights, or
            # from the weights a release file ships; a single-time consistency model gains the u input first.
            source = load_checkpoint(init_from)
            source_kind = source.get("kind", "bcm")
            weights = bcm_weights(source, init_from)[0]
            if source_kind == CONSISTENCY_KIND and self.kind == "bcm":
                if "config" not in source:
                    raise ValueError(f"{init_from} holds no config: it cannot be checked against this preset")
                source_model = preset_from_dict(source["config"], f"{init_from} config").model
                weights = bcm_weights_from_consistency_model(source_model, weights, preset.model, init_from)
            elif source_kind != self.kind:  # a BCM and a noiser share the U-Net's shapes: refuse, don't mix them
                raise ValueError(f"{init_from} is a {source_kind!r} checkpoint; this preset trains a {self.kind!r}")
            load_state_dict_strict(self.model, weights, init_from)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=tc.lr)
        curriculum = tc.curriculum_steps or tc.total_steps
        self.loss = make_loss(preset.loss, curriculum, preset.model.sigma_data, preset.model.eps, preset.model.T)
        self.module = self.session.wrap(LossModule(self.model, self.loss))
        if not 0 <= start_step < tc.total_steps:
            raise ValueError(f"start_step must be in [0, {tc.total_steps}), got {start_step}")
        if start_step and init_from is None:
            raise ValueError("start_step needs init_from: it continues the curriculum of the weights it loads")
        # Continuing a released model's curriculum: the weights of step ``start_step`` with a fresh optimizer.
        self.step = start_step
        self.optimizer_start = start_step  # the step at which the optimizer state began (warm-up counts from it)
        if start is not None:
            self.step = resume_run_state(start, str(self.checkpoint_path), self.model, self.optimizer, self.session,
                                         tc.seed)
            self.ema.module.load_state_dict(start["ema"])
            self.ema.n_averaged.fill_(start.get("ema_n_averaged", 1))
            self.optimizer_start = start.get("optimizer_start", 0)

        if images is None:
            images, _ = load_cifar10("train", data_root)
            if tc.n_val:  # never train on the images settings are chosen on
                images = images[train_val_split(len(images), tc.n_val, seed=VAL_SPLIT_SEED)[0]]
        self.images = images.to(self.device)
        self.log = self.session.csv_log(self.out_dir / "log.csv", LOG_FIELDS, resume_step=self.step)

    def batch(self) -> torch.Tensor:
        """A random batch on the [-1, 1] scale (with random horizontal flips when configured)."""
        per_rank = self.preset.train.batch_size // self.session.world
        # drawn on the images' device: no host-device copy, so no synchronisation, per step
        idx = torch.randint(0, self.images.shape[0], (per_rank,), device=self.images.device)
        x = self.images[idx].float() / 127.5 - 1
        if self.preset.train.hflip:
            flip = torch.rand(per_rank, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.preset.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def learning_rate(self) -> float:
        """The configured rate, ramped up linearly over ``warmup_steps`` from the optimizer's first step."""
        tc = self.preset.train
        if tc.warmup_steps <= 0:
            return tc.lr
        return tc.lr * min(1.0, (self.step - self.optimizer_start + 1) / tc.warmup_steps)

    def train_step(self, sync: bool = True) -> dict[str, float | torch.Tensor]:
        """One optimizer step; with ``sync=False`` the logged terms stay on the device (no host synchronisation)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        micro_batches = self.batch().chunk(self.preset.train.accumulate)
        self.optimizer.zero_grad(set_to_none=True)
        logged = []
        for i, x in enumerate(micro_batches):
            # DDP all-reduces the summed gradients once, in the last micro-batch's backward
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not self.session.distributed else self.module.no_sync():
                # the losses run their compared passes in float32 inside (purify.bct.float32_passes)
                with autocast(self.device, self.bf16):
                    terms = self.module(x, self.step)
                loss = terms["loss"].mean() / len(micro_batches)  # equal micro-batches: the mean over the batch
                loss.backward()
            logged.append(torch.stack([terms[k].mean().detach() for k in ("loss", "ct", "soft")]).float())
        logged = torch.stack(logged).mean(0)  # equal micro-batches: the whole batch's means
        if self.preset.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.preset.train.grad_clip)
        self.optimizer.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        self.session.mean(logged)  # log the loss of the global batch, not rank 0's share of it
        if not sync:
            return {"logged": logged, "N": int(terms["N"])}
        loss, ct, soft = logged.tolist()
        return {"loss": loss, "ct": ct, "soft": soft, "N": int(terms["N"])}

    def save(self) -> None:
        """Atomic checkpoint with everything needed to resume (rank 0 writes it; RNG states of every rank)."""
        save_run_state(self.checkpoint_path, self.session, lambda: {
            "kind": self.kind, "config": to_dict(self.preset), "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(), "ema_n_averaged": int(self.ema.n_averaged),
            "optimizer": self.optimizer.state_dict(), "step": self.step, "optimizer_start": self.optimizer_start})

    def close(self) -> None:
        """Leave the process group together, DDP's reducer first."""
        self.module = None
        self.session.close()

    def run(self, max_steps: int | None = None, max_minutes: float | None = None, progress: bool = True) -> int:
        """Train until ``total_steps`` (or ``max_steps`` more steps, or the time budget); returns the step."""
        tc = self.preset.train
        end = tc.total_steps if max_steps is None else min(tc.total_steps, self.step + max_steps)
        budget, started, window_start, window_steps = Budget(max_minutes), time.monotonic(), time.monotonic(), 0
        bar = self.session.progress(progress, total=tc.total_steps, initial=self.step,
                                    desc=self.preset.loss.kind.upper(), unit="step", dynamic_ncols=True)
        try:
            with _deferred_interrupts() as interrupted:
                while self.step < end and not self.session.should_stop(budget, interrupted()):
                    # the loss is read back to the host (a synchronisation) only on the steps that log it
                    report = self.step + 1 == end or (self.step + 1) % tc.log_every == 0
                    terms = self.train_step(sync=report)
                    window_steps += 1
                    bar.update(1)
                    if report:
                        bar.set_postfix(loss=f"{terms['loss']:.4f}", ct=f"{terms['ct']:.4f}",
                                        soft=f"{terms['soft']:.4f}", N=terms["N"])
                    if report and self.log is not None:
                        now = time.monotonic()
                        self.log.write(step=self.step, N=terms["N"], loss=terms["loss"], ct=terms["ct"],
                                       soft=terms["soft"], lr=self.optimizer.param_groups[0]["lr"],
                                       images_per_s=window_steps * tc.batch_size / (now - window_start),
                                       elapsed_min=(now - started) / 60)
                        window_start, window_steps = now, 0
                    if self.step % tc.checkpoint_every == 0:
                        self.save()
                if interrupted() and self.session.main:
                    tqdm.write(f"interrupted at step {self.step}; saving a checkpoint to resume from")
        finally:
            bar.close()
        # Only after a clean stop (every rank at the same step): an exception leaves the last periodic checkpoint.
        self.save()
        return self.step


@contextlib.contextmanager
def _deferred_interrupts():
    """Within the block, Ctrl-C (SIGINT) and SIGTERM (what torchrun sends its workers) only set a flag, read by
    calling the yielded function, so training stops between steps, on every rank at the same one; a second
    Ctrl-C interrupts at once."""
    received = []

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m purify.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10-small",
                        help="preset name under configs/bcm (cifar10-small, cifar10-paper, cifar10-small-ctinv for "
                             "the CT Inversion noiser) or a YAML path")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.csv and config.yaml go here")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (its stored config wins over --config)")
    parser.add_argument("--init-from", metavar="CKPT",
                        help="fine-tune: start from a training checkpoint's EMA weights (e.g. a CT-only run, spec "
                             "§3) or from the weights a release file ships; a single-time consistency model's "
                             "(network.time_inputs 1, loss kind ct) gains the u input so that f(x, t, eps) starts "
                             "as its prediction")
    parser.add_argument("--start-step", type=int, default=0, metavar="K",
                        help="with --init-from: continue the curriculum from step K (e.g. a release file's step) "
                             "with a fresh optimizer, when the run folder that trained the weights is gone")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly with a checkpoint after this wall time")
    parser.add_argument("--max-steps", type=int, help="stop after this many more steps (curriculum K unchanged)")
    parser.add_argument("--data-root", help="CIFAR-10 root (default: $BCM_DATA or the download cache)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast for the passes the loss does not compare (BCT: the soft term's online "
                             "pass; the denoiser loss: all); the compared passes run in float32 either way "
                             "(default: on for GPUs that run bf16 natively, off on CPUs)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a run folder")
    if not args.resume and (out / "checkpoint.pt").exists():
        parser.error(f"{out}/checkpoint.pt exists: pass --resume to continue it, or choose another --out")
    if args.resume and not (out / "checkpoint.pt").exists():
        parser.error(f"--resume given but {out}/checkpoint.pt does not exist")
    if args.start_step and not args.init_from:
        parser.error("--start-step needs --init-from")
    try:  # unknown preset, bad YAML key, corrupt or mismatched checkpoint: one line, no traceback
        preset = load_preset(args.config)
        trainer = Trainer(preset, out, data_root=args.data_root, device=args.device, resume=args.resume,
                          init_from=args.init_from, start_step=args.start_step, bf16=args.bf16)
    except (OSError, ValueError) as err:  # also an --out that cannot be a folder
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if trainer.session.main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(trainer.preset), sort_keys=False))
    step = trainer.run(max_steps=args.max_steps, max_minutes=args.max_minutes)
    if trainer.session.main:
        print(f"stopped at step {step}/{trainer.preset.train.total_steps}; checkpoint: {trainer.checkpoint_path}")
    trainer.close()


if __name__ == "__main__":
    main()
