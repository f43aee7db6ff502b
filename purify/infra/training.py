"""What every trainer shares: the process's place in a DDP run (``Session``), the stop decision, rank-0 logging,
and the resumable run state (weights, optimizer, step and every rank's RNG streams, written atomically)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_state_dict_strict, save_checkpoint
from .runtime import (Budget, CSVLog, any_rank, gather_objects, init_distributed, leave_distributed, pick_device,
                      rng_state, seed_everything, set_rng_state)

STREAM_STRIDE = 1_000_003  # seeds of different ranks and steps are this far apart, so no two streams coincide


@dataclasses.dataclass
class Session:
    """This process in a training run: its ``rank`` of ``world`` processes (0 of 1 without ``torchrun``) and its
    device. Rank 0 writes the checkpoints and the logs; every method that says "collective" must be called by
    every rank at the same point."""
    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device: str = "auto") -> Session:
        """Join the process group under ``torchrun`` (``init_distributed``) and pick the device."""
        rank, world, device = init_distributed(device)
        return cls(rank, world, pick_device(device))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0

    def seed(self, seed: int) -> None:
        """Seed this rank's global RNG streams (``seed + rank``: each rank draws its own)."""
        seed_everything(seed + self.rank)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DDP when there are several processes (its gradients are all-reduced), else itself."""
        if not self.distributed:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def should_stop(self, budget: Budget, interrupted: bool = False) -> bool:
        """Whether every rank stops before the next step; a collective. Rank 0's clock decides the budget for all
        (each rank's own clock could stop them at different steps, one in the gradient all-reduce, another in the
        checkpoint's gather: a hang), and an interrupt on any rank stops all of them at the same step."""
        return any_rank((self.main and budget.exhausted()) or interrupted, self.device)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks, in place; a collective (``value`` itself in a single process)."""
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world
        return value

    def csv_log(self, path: str | os.PathLike, fields: list[str], resume_step: int | None) -> CSVLog | None:
        """The run's CSV log on rank 0 (``CSVLog``), ``None`` on the other ranks."""
        return CSVLog(path, fields, resume_step=resume_step) if self.main else None

    def progress(self, enabled: bool, iterable=None, **options) -> tqdm:
        """A progress bar shown by rank 0 only, and only when ``enabled``."""
        return tqdm(iterable, disable=not enabled or not self.main, **options)

    def close(self) -> None:
        """Leave the process group together (``leave_distributed``); a no-op in a single process."""
        leave_distributed()


def save_run_state(path: str | os.PathLike, session: Session, state: Callable[[], dict],
                   generator: torch.Generator | None = None) -> None:
    """Write ``state()`` with every rank's RNG streams under ``rng`` to ``path`` atomically; a collective (the
    streams are gathered), and only rank 0 builds the state and writes it. A rank's streams are its global RNG
    state, paired with ``generator``'s state when the trainer draws from its own generator too."""
    streams = gather_objects(rng_state() if generator is None else (rng_state(), generator.get_state()))
    if session.main:
        save_checkpoint({**state(), "rng": streams}, path)


def resume_run_state(state: dict, source: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     session: Session, seed: int, generator: torch.Generator | None = None) -> int:
    """Continue the run ``state`` (written by ``save_run_state``, read from ``source``): load its weights into
    ``model``, its optimizer state, and this rank's RNG streams; returns its step.

    With the same number of processes each rank continues its own streams; with another number each rank starts
    fresh ones, distinct from every other rank's and step's (the global RNG from ``seed``, ``generator`` from a
    seed past every rank's global one)."""
    load_state_dict_strict(model, state["model"], source)
    optimizer.load_state_dict(state["optimizer"])
    step, streams = state["step"], state["rng"]
    if len(streams) == session.world:
        own = streams[session.rank]
        set_rng_state(own if generator is None else own[0])
        if generator is not None:
            generator.set_state(own[1])
    else:
        seed_everything(seed + STREAM_STRIDE * step + session.rank)
        if generator is not None:
            generator.manual_seed(seed + STREAM_STRIDE * (step + session.world) + session.rank)
    return step
