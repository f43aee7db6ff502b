"""Work over a data set split across processes by blocks of images, resumable block by block.

The images (positions ``0 .. n-1``) are cut into blocks of ``batch_size``; block ``b`` belongs to rank
``b % world``. Each rank computes its blocks and saves each one as soon as it is done, so a job that is
killed and restarted recomputes only the blocks it had not finished; after a barrier every rank reads all
blocks back in order. As long as the computation of a block depends only on its images (randomness drawn
per image or seeded by the block's first image, ``attacks.craft``), the merged result is the one a single
process computes, for any number of processes. Under ``torchrun`` the ranks join a process group (gloo on
CPUs, NCCL on GPUs, ``runtime.init_distributed``); the block files must lie on a file system every rank sees.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .runtime import init_distributed


Result = Union[torch.Tensor, dict]


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def join(cls, device: str = "auto") -> tuple["Shard", str]:
        """Join the process group under ``torchrun`` (a single process stays alone); returns the shard and the
        device this rank runs on."""
        rank, world, device = init_distributed(device)
        return cls(rank, world), device

    @property
    def main(self) -> bool:
        """Whether this rank writes the job's outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def blocks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every block of ``batch_size`` positions out of ``n``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def map_blocks(compute: Callable[[int, int], Result], n: int, batch_size: int, folder: str | Path,
               shard: Shard = Shard(), progress: bool = True, desc: str = "blocks") -> Result:
    """``compute(start, stop)`` over every block: a CPU tensor, or a dict of them, whose first axis runs over
    positions ``start .. stop-1``. This rank's blocks are computed and saved under ``folder`` (one file per
    block, reused when present), then all blocks are read back and concatenated: the same result on every
    rank. A collective: every rank calls it with the same arguments."""
    folder = Path(folder)
    parts = blocks(n, batch_size)
    path = lambda start, stop: folder / f"{start:06d}-{stop:06d}.pt"  # noqa: E731
    mine = [(start, stop) for b, (start, stop) in enumerate(parts) if b % shard.world == shard.rank]
    for start, stop in tqdm(mine, desc=desc, disable=not progress, leave=False):
        if not path(start, stop).is_file():
            result = compute(start, stop)
            parts_of = result if isinstance(result, dict) else {"result": result}
            wrong = {k: len(v) for k, v in parts_of.items() if len(v) != stop - start}
            if wrong:
                raise ValueError(f"block {start}-{stop} computed {wrong} results instead of {stop - start}")
            save_checkpoint({k: v.cpu() for k, v in parts_of.items()}, path(start, stop))
    shard.barrier()
    saved = [load_checkpoint(path(start, stop)) for start, stop in parts]
    merged = {k: torch.cat([part[k] for part in saved]) for k in saved[0]}
    return merged["result"] if set(merged) == {"result"} else merged


def remove_blocks(folder: str | Path, shard: Shard = Shard()) -> None:
    """Delete the block files once every rank has read them, and the folder that holds ``folder`` (e.g. a
    ``.blocks`` beside the results) when nothing else is left in it (a collective; rank 0 deletes)."""
    shard.barrier()
    if shard.main:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            Path(folder).parent.rmdir()
        except OSError:
            pass  # other units' blocks (or other files) are still there
