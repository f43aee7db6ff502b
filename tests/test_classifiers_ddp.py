"""classifiers.train under DDP (gloo, 2 CPU processes): each rank trains on its share of every global batch,
the ranks stay in sync, rank 0 writes the state, and a stopped run resumes to the same weights."""
from __future__ import annotations

import os

import pytest
import torch

from classifiers.train import train
from purify.infra.checkpoint import load_checkpoint
from test_classifiers import tiny_config
from test_train import _spawn


def _worker(rank, world, port, out, data_root, options):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    seen = []

    def inputs(model, x, y):  # records what this rank trains on, and its model
        seen.append((model, y.clone()))
        return x

    summary = train("preact", "small", config=tiny_config(epochs=2, batch_size=32), data_root=data_root,
                    out_dir=f"{out}/ck", run_dir=f"{out}/run", results_dir=f"{out}/res", device="cpu", threads=1,
                    progress=False, seed=0, train_subset=128, test_subset=16, inputs=inputs, **options)
    torch.save({"params": {k: v.detach() for k, v in seen[-1][0].named_parameters()},
                "labels": [y for _, y in seen], "step": summary["step"]}, f"{out}/rank{rank}.pt")


def _run(out, data_root, **options):
    """Train on 2 gloo ranks; each rank's last weights, the labels of each of its batches, its last step."""
    _spawn(_worker, 2, str(out), data_root, options)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ddp_ranks_share_each_batch_stay_in_sync_and_resume_identically(tmp_path, data_root):
    a0, a1 = _run(tmp_path / "a", data_root)
    assert a0["step"] == a1["step"] == 8  # 128 images / 32 per global batch x 2 epochs
    assert all(len(y) == 16 for y in a0["labels"] + a1["labels"])  # each rank: half of the global batch
    assert any(not torch.equal(y0, y1) for y0, y1 in zip(a0["labels"], a1["labels"]))  # different halves
    for name, value in a0["params"].items():  # gradients all-reduced: the same weights on both ranks
        torch.testing.assert_close(value, a1["params"][name], rtol=0, atol=1e-6, msg=name)
    state = load_checkpoint(tmp_path / "a" / "run" / "preact-small-state.pt")
    assert state["step"] == 8 and len(state["rng"]) == 2  # every rank's streams, written once by rank 0
    assert (tmp_path / "a" / "ck" / "preact-small.pt").is_file()

    b0, b1 = _run(tmp_path / "b", data_root, max_minutes=0.0)  # rank 0's clock stops both after one step
    assert b0["step"] == b1["step"] == 1
    b0, _ = _run(tmp_path / "b", data_root, resume=True)
    assert b0["step"] == 8
    for name, value in a0["params"].items():  # each rank continued its own RNG streams
        torch.testing.assert_close(value, b0["params"][name], rtol=0, atol=1e-6, msg=name)
