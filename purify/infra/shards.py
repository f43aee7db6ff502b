"""Work over a data set split across processes by blocks of images, resumable block by block.

The images (positions ``0 .. n-1``) are cut into blocks of ``batch_size``; block ``b`` belongs to rank
``b % world``. Each rank computes its blocks and saves each one as soon as it is done, so a job that is
killed and restarted recomputes only the blocks it had not finished; after a barrier every rank reads all
blocks back in order. As long as the computation of a block depends only on its images (randomness drawn
per image or seeded by the block's first image, ``attacks.craft``), the merged result is the one a single
process computes, for any number of processes. Each block file also keeps the seconds its computation took, so
that a job's cost (``map_timed_blocks``) is one process's time whichever ranks or restarts computed it. Under
``torchrun`` the ranks join a process group (gloo on CPUs, NCCL on GPUs, ``runtime.init_distributed``); the block
files must lie on a file system every rank sees.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .runtime import init_distributed


Result = Union[torch.Tensor, dict]
SECONDS = "_seconds"  # a block file's entry for the seconds its block took (not a result)


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
    block, with the seconds it took, reused when present), then all blocks are read back and concatenated: the
    same result on every rank. A collective: every rank calls it with the same arguments."""
    return map_timed_blocks(compute, n, batch_size, folder, shard, progress, desc)[0]


def map_timed_blocks(compute: Callable[[int, int], Result], n: int, batch_size: int, folder: str | Path,
                     shard: Shard = Shard(), progress: bool = True, desc: str = "blocks") -> tuple[Result, float]:
    """``map_blocks``, and the seconds per position its blocks took: one process's time, the same whichever ranks
    computed the blocks and however often the job was restarted in between (the wall time of the last run would
    count only what it computed, and a rank's share of it). Averaged over the blocks that recorded their time
    (files saved before blocks were timed did not); nan when none did."""
    folder = Path(folder)
    parts = blocks(n, batch_size)
    mine = [(start, stop) for b, (start, stop) in enumerate(parts) if b % shard.world == shard.rank]
    todo = [(start, stop) for start, stop in mine if not _block_path(folder, start, stop).is_file()]
    # a resumed job's bar starts at the blocks it already has, so its count and rate are this run's
    for start, stop in tqdm(todo, desc=desc, disable=not progress, leave=False, initial=len(mine) - len(todo),
                            total=len(mine)):
        started = time.monotonic()
        result = compute(start, stop)
        parts_of = {k: v.cpu() for k, v in (result if isinstance(result, dict) else {"result": result}).items()}
        seconds = time.monotonic() - started  # after the copy to the host, which waits for a GPU's work
        wrong = {k: len(v) for k, v in parts_of.items() if len(v) != stop - start}
        if wrong:
            raise ValueError(f"block {start}-{stop} computed {wrong} results instead of {stop - start}")
        save_checkpoint({**parts_of, SECONDS: torch.tensor(seconds, dtype=torch.float64)},
                        _block_path(folder, start, stop))
    shard.barrier()
    saved = [load_checkpoint(_block_path(folder, start, stop)) for start, stop in parts]
    merged = {k: torch.cat([part[k] for part in saved]) for k in saved[0] if k != SECONDS}
    timed = [(part[SECONDS].item(), stop - start) for part, (start, stop) in zip(saved, parts) if SECONDS in part]
    seconds = sum(s for s, _ in timed) / sum(k for _, k in timed) if timed else math.nan
    return (merged["result"] if set(merged) == {"result"} else merged), seconds


def _block_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"{start:06d}-{stop:06d}.pt"


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
