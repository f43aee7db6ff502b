"""Small pieces every trainer and benchmark shares: devices, precision, seeding, RNG state, CSV logs, time budgets."""
from __future__ import annotations

import contextlib
import csv
import os
import platform
import random
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 natively, the one place that decides bf16 autocast's default.

    CUDA: a GPU with bf16 support. CPU: oneDNN's bf16 kernels, which need AVX-512-BF16 or AMX; elsewhere (e.g.
    AVX2-only CPUs) torch emulates bf16 and autocast runs 3-10x slower than float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: torch.device | str, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op context: fast where bf16 is native (recent
    GPUs, CPUs with AMX/AVX-512-BF16), 3-10x slower than float32 where it is emulated (``native_bf16`` tells)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def cpu_capability() -> str:
    """The CPU's capability as torch reports it (e.g. ``AVX2``, ``AVX512``) and whether bf16 is native."""
    return f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native_bf16('cpu') else 'no'}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` reports)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


DIST_TIMEOUT_S = 24 * 3600


def dist_timeout() -> timedelta:
    """How long a rank waits for the others at a collective: ``BCM_DIST_TIMEOUT`` seconds, else a day.

    torch's default, 30 minutes, is shorter than the wait at the barrier that ends a sharded evaluation
    (``shards.map_blocks``) when a rank has blocks left that the others already finished: one block of a
    converged attack takes longer than that on a CPU, and a restarted job's ranks find unequal numbers of blocks
    already saved. A rank that fails still stops the job at once (torchrun ends the others)."""
    value = os.environ.get("BCM_DIST_TIMEOUT", str(DIST_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"BCM_DIST_TIMEOUT must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def init_distributed(device: str = "auto") -> tuple[int, int, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the process group, NCCL with each rank on its
    ``LOCAL_RANK`` GPU (set before the group, so NCCL binds the right one), gloo on CPUs, waiting at most
    ``dist_timeout()`` at a collective; returns ``(rank, world, device)``. A single process returns
    ``(0, 1, device)`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    import torch.distributed as dist  # noqa: PLC0415 (only distributed runs need it)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=dist_timeout())
    return dist.get_rank(), dist.get_world_size(), device


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over every rank of the process group (``flag`` itself without one): a collective, so
    every rank must call it at the same point."""
    import torch.distributed as dist  # noqa: PLC0415
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group); a collective."""
    import torch.distributed as dist  # noqa: PLC0415
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def leave_distributed() -> None:
    """Leave the process group together: a barrier first, so that no rank tears its gloo/NCCL threads down while
    another is still in a collective (which aborts the other rank)."""
    import torch.distributed as dist  # noqa: PLC0415
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Torch RNG states as tensors (loadable with ``weights_only=True``)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CSVLog:
    """Append rows to a CSV file, writing the header once; rows past ``resume_step`` are dropped on resume."""

    def __init__(self, path: str | os.PathLike, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = Path(path), list(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Keep only rows the checkpoint we resume from has seen, so the log matches the weights.
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._rewrite(rows)
        elif not self.path.exists() or resume_step is None:
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


class Budget:
    """Wall-clock budget for ``--max-minutes``; ``None`` means unlimited."""

    def __init__(self, max_minutes: float | None):
        self.deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes

    def exhausted(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline
