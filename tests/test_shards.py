"""Sharded evaluation (purify.infra.shards): block assignment, resume by block, each block's recorded time, and
under torchrun (gloo, 2-3 processes) the merged result of an attack through a purifier equal to one process's, for
any world size and batch size, after a rank is killed and the job restarted, a rank that raises stopping the job,
and the process group's timeout (BCM_DIST_TIMEOUT)."""
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purify.infra import shards
from purify.infra.runtime import dist_timeout
from purify.infra.shards import SECONDS, blocks, map_blocks, map_timed_blocks

WORKER = Path(__file__).resolve().parent / "shard_worker.py"
ROOT = WORKER.parent.parent


def test_blocks_cover_the_positions_once():
    assert blocks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="batch size must be positive"):
        blocks(7, 0)


def test_map_blocks_computes_this_ranks_blocks_and_reuses_saved_ones(tmp_path):
    calls = []
    compute = lambda start, stop: calls.append(start) or torch.arange(start, stop).view(-1, 1).repeat(1, 2)  # noqa
    merged = map_blocks(compute, 7, 3, tmp_path, progress=False)
    assert torch.equal(merged, torch.arange(7).view(-1, 1).repeat(1, 2)) and calls == [0, 3, 6]
    assert torch.equal(map_blocks(compute, 7, 3, tmp_path, progress=False), merged) and len(calls) == 3
    both = map_blocks(lambda start, stop: {"a": torch.arange(start, stop), "b": -torch.arange(start, stop)}, 5, 2,
                      tmp_path / "dict", progress=False)
    assert torch.equal(both["a"], torch.arange(5)) and torch.equal(both["b"], -torch.arange(5))
    with pytest.raises(ValueError, match="computed {'result': 1} results instead of 2"):
        map_blocks(lambda start, stop: torch.zeros(1), 4, 2, tmp_path / "bad", progress=False)


def test_a_resumed_jobs_progress_bar_counts_the_blocks_it_already_has(tmp_path, capsys):
    compute = lambda start, stop: torch.arange(start, stop)  # noqa: E731
    map_blocks(compute, 2, 1, tmp_path, progress=False)  # 2 of 3 blocks saved, as by an interrupted job
    capsys.readouterr()
    assert torch.equal(map_blocks(compute, 3, 1, tmp_path, desc="resumed"), torch.arange(3))
    bar = capsys.readouterr().err
    assert "resumed:  67%" in bar and "2/3" in bar and "0/3" not in bar


class FakeClock:
    """``time`` for ``purify.infra.shards``: ``monotonic()`` advances by ``step`` seconds at every read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_timed_blocks_give_one_process_time_per_position_over_the_blocks_that_recorded_it(tmp_path, monkeypatch):
    compute = lambda start, stop: torch.arange(start, stop)  # noqa: E731
    seconds = lambda folder, n, batch_size: map_timed_blocks(compute, n, batch_size, folder, progress=False)[1]  # noqa
    monkeypatch.setattr(shards, "time", FakeClock(6.0))  # each block: two reads, 6 s apart
    map_blocks(compute, 7, 3, tmp_path, progress=False)
    assert seconds(tmp_path, 7, 3) == pytest.approx(18 / 7)  # 3 blocks x 6 s over 7 positions
    first = tmp_path / "000000-000003.pt"  # as saved before blocks were timed: left out of the average
    torch.save({"result": torch.load(first, weights_only=True)["result"]}, first)
    assert seconds(tmp_path, 7, 3) == pytest.approx(12 / 4)
    assert torch.equal(map_blocks(compute, 7, 3, tmp_path, progress=False), torch.arange(7))  # still merges
    (tmp_path / "untimed").mkdir()
    torch.save({"result": torch.arange(2)}, tmp_path / "untimed" / "000000-000002.pt")
    assert math.isnan(seconds(tmp_path / "untimed", 2, 2))
    assert SECONDS not in map_blocks(lambda start, stop: {"a": torch.arange(start, stop)}, 2, 2, tmp_path / "d",
                                     progress=False)


def torchrun(out: Path, world: int, *args: str, timeout: int = 240, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """Run the worker under torchrun in a session of its own, killed whole (workers included) on a timeout;
    ``env`` adds environment variables."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(WORKER), str(out), *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                    **(env or {})})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("single")
    result = torchrun(out, 1, "--batch-size", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out / "predictions.pt", weights_only=True)


@pytest.mark.parametrize("world, batch_size", [(2, 2), (3, 4)])
def test_sharded_attack_and_evaluation_equal_one_process(tmp_path, single, world, batch_size):
    result = torchrun(tmp_path, world, "--batch-size", str(batch_size))
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "predictions.pt", weights_only=True), single)
    computed = [(tmp_path / f"computed-rank{rank}.txt").read_text().split() for rank in range(world)]
    assert sorted(sum(computed, [])) == sorted(f"{a}-{b}" for a, b in blocks(10, batch_size))  # each block once
    assert all(computed) and not (tmp_path / "blocks").exists()


def test_a_killed_rank_and_a_restarted_job_give_the_uninterrupted_result(tmp_path, single):
    killed = torchrun(tmp_path, 2, "--batch-size", "2", "--fail", "kill")
    assert killed.returncode != 0 and not (tmp_path / "predictions.pt").exists()
    before = (tmp_path / "computed-rank1.txt").read_text().split()  # rank 1 finished its first block
    restarted = torchrun(tmp_path, 2, "--batch-size", "2")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "predictions.pt", weights_only=True), single)
    again = (tmp_path / "computed-rank1.txt").read_text().split()
    assert len(before) == 1 and again[0] == before[0] and before[0] not in again[1:]  # not recomputed


def test_a_rank_that_raises_stops_the_job_with_its_message(tmp_path):
    result = torchrun(tmp_path, 2, "--batch-size", "2", "--fail", "raise", timeout=120)
    assert result.returncode != 0
    assert "cannot be attacked on rank 1" in result.stderr + result.stdout


def test_ranks_wait_for_each_other_a_day_unless_bcm_dist_timeout_says_otherwise(monkeypatch):
    monkeypatch.delenv("BCM_DIST_TIMEOUT", raising=False)
    assert dist_timeout().total_seconds() == 24 * 3600  # not torch's 30 minutes: one CPU block can take longer
    monkeypatch.setenv("BCM_DIST_TIMEOUT", "2.5")
    assert dist_timeout().total_seconds() == 2.5
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("BCM_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="BCM_DIST_TIMEOUT must be a positive number of seconds"):
            dist_timeout()


def test_the_process_group_waits_at_a_barrier_as_long_as_bcm_dist_timeout(tmp_path):
    # rank 1 sleeps 20 s before its blocks while rank 0 waits for it at the barrier that ends map_blocks
    result = torchrun(tmp_path, 2, "--batch-size", "2", "--slow", "20", env={"BCM_DIST_TIMEOUT": "3"}, timeout=120)
    assert result.returncode != 0 and "Timed out" in result.stderr + result.stdout
