"""Trainer: BCT learns, resume is exact, the budget stops cleanly, DDP runs with gloo."""
import csv
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_preset
from purify.bct import BCTLoss
from purify.infra.checkpoint import load_checkpoint
from purify.train import Trainer, main


def _small_images(images):
    return torch.nn.functional.avg_pool2d(images.float(), 2).to(torch.uint8)  # 16x16: four times cheaper


def _eval_loss(trainer, images, seed=123, reps=8):
    """A fixed, seeded estimate of the BCT loss at the first discretization (independent of training RNG)."""
    x = images.float() / 127.5 - 1
    fixed = BCTLoss(trainer.preset.loss, trainer.preset.train.total_steps, 0.002, 80.0)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        value = sum(fixed(trainer.ema.module, x, step=0)["loss"].mean().item() for _ in range(reps)) / reps
    torch.set_rng_state(state)
    return value


def test_bct_loss_decreases_on_a_tiny_subset(tmp_path, tiny_images):
    images = _small_images(tiny_images[:16])
    torch.manual_seed(0)
    trainer = Trainer(tiny_preset(total_steps=100_000, lr=5e-3, ema_decay=0.9), tmp_path, images=images)
    before = _eval_loss(trainer, images)
    trainer.run(max_steps=150, progress=False)
    after = _eval_loss(trainer, images)
    # Paired estimate (same seeded draws before and after): measured 18.5 -> 16.4 here; an untrained or
    # broken loss stays at ~18.5 (f = c_skip x cannot cancel the added noise).
    assert after < 0.92 * before, (before, after)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 150 and {"ct", "soft", "loss", "N"} <= set(rows[0])


def straight_and_resumed(preset, tmp_path, images) -> tuple[Trainer, Trainer, list, list]:
    """Six steps straight in ``tmp_path/a``; three steps, a fresh process's RNG, a resume and three more in
    ``tmp_path/b``: both trainers and both CSV logs, which must agree exactly."""
    torch.manual_seed(0)
    straight = Trainer(preset, tmp_path / "a", images=images)
    straight.run(max_steps=6, progress=False)

    torch.manual_seed(0)
    first = Trainer(preset, tmp_path / "b", images=images)
    first.run(max_steps=3, progress=False)
    del first  # "interrupted": a new process would start from the checkpoint alone
    torch.manual_seed(999)  # the resumed run must not depend on the fresh process's RNG
    resumed = Trainer(preset, tmp_path / "b", images=images, resume=True)
    assert resumed.step == 3
    resumed.run(max_steps=3, progress=False)

    assert resumed.step == straight.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    log_a = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    log_b = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    return straight, resumed, log_a, log_b


def test_resume_continues_from_the_same_step_and_weights(tmp_path, tiny_images):
    straight_and_resumed(tiny_preset(checkpoint_every=3), tmp_path, _small_images(tiny_images))


def test_time_budget_stops_with_a_checkpoint(tmp_path, tiny_images):
    trainer = Trainer(tiny_preset(), tmp_path, images=_small_images(tiny_images))
    assert trainer.run(max_minutes=0, progress=False) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt", ("model", "ema", "optimizer", "step", "rng", "config"))
    assert state["step"] == 0 and state["kind"] == "bcm"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_fine_tuning_starts_from_a_ct_checkpoint(tmp_path, tiny_images):
    images = _small_images(tiny_images)
    ct = tiny_preset()
    ct.loss.kind = "ct"
    ct_run = Trainer(ct, tmp_path / "ct", images=images)
    ct_run.run(max_steps=2, progress=False)
    bcm = Trainer(tiny_preset(), tmp_path / "bcm", images=images, init_from=str(tmp_path / "ct" / "checkpoint.pt"))
    assert bcm.step == 0
    for a, b in zip(ct_run.ema.module.state_dict().values(), bcm.model.state_dict().values()):
        assert torch.equal(a, b)


def test_bf16_decision_is_injectable_and_keeps_the_ct_term_float32(tmp_path, tiny_images):
    """By default a CPU trainer runs float32; bf16=True autocasts the step (here on the CPU), where the CT term,
    whose passes are compared, is the float32 one and the soft term, whose x_u pass runs in bf16, is not."""
    images = _small_images(tiny_images)
    assert Trainer(tiny_preset(), tmp_path / "default", images=images).bf16 is False
    logged = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(tiny_preset(), tmp_path / str(bf16), images=images, bf16=bf16)
        g = torch.Generator().manual_seed(1)  # F = 0 at initialisation would be exact in any precision
        for p in trainer.model.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
        logged.append(trainer.train_step())
    assert logged[0]["ct"] == pytest.approx(logged[1]["ct"], rel=1e-6)
    assert logged[1]["soft"] != logged[0]["soft"]
    assert logged[1]["soft"] == pytest.approx(logged[0]["soft"], rel=2e-2)


def test_cli_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--resume"])
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path, tiny_images):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(tiny_preset(), tmp_path, images=tiny_images, resume=True)


def _ddp_worker(rank, world, port, out, images, accumulate=1):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(tiny_preset(batch_size=8, accumulate=accumulate), out, images=images, device="cpu")
    trainer.run(max_steps=2, progress=False)
    torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    trainer.close()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_with_gloo_keeps_ranks_in_sync(tmp_path, tiny_images, accumulate):
    """Each rank draws its own images; the all-reduce (with accumulation, once per step after the last micro-batch)
    keeps the weights equal."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), _small_images(tiny_images), accumulate), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for a, b in zip(w0.values(), w1.values()):
        assert torch.allclose(a, b, atol=1e-6)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 2 and len(state["rng"]) == 2


def test_denoiser_warm_start_learns(tmp_path, tiny_images):
    """The EDM warm start (loss kind "denoise") lowers its own loss on a tiny subset."""
    from purify.bct import DenoiserLoss

    images = _small_images(tiny_images[:16])
    preset = tiny_preset(lr=5e-3)
    preset.loss.kind = "denoise"
    torch.manual_seed(0)
    trainer = Trainer(preset, tmp_path, images=images)
    assert isinstance(trainer.loss, DenoiserLoss)

    def evaluate():
        torch.manual_seed(7)
        with torch.no_grad():
            x = images.float().repeat(8, 1, 1, 1) / 127.5 - 1  # 128 paired draws of noise level and noise
            return trainer.loss(trainer.ema.module, x, 0)["loss"].mean().item()

    before = evaluate()
    trainer.run(max_steps=100, progress=False)
    assert evaluate() < 0.8 * before  # measured about 0.7x here


def _spawn(worker, world, *args, timeout=300):
    """Run ``worker(rank, world, port, *args)`` on ``world`` gloo ranks; fail (instead of hanging) on a deadlock."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(worker, args=(world, port, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP ranks still running after {timeout} s: a hang")


def _ddp_trainer(rank, world, port, out, images, **kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return Trainer(tiny_preset(batch_size=12), out, images=images, device="cpu", **kwargs)


class _ChecksBudget:
    """A budget that runs out at its ``n``-th check: a clock that disagrees with the other ranks' clocks."""

    def __init__(self, n):
        self.left = n

    def exhausted(self):
        self.left -= 1
        return self.left < 0


def _ddp_stop_worker(rank, world, port, out, images, how):
    import signal

    import purify.train

    trainer = _ddp_trainer(rank, world, port, out, images)
    seen, train_step = [], trainer.train_step

    def recording_step(sync=True):
        terms = train_step(sync=True)  # every step's terms on the host, to compare them across ranks
        seen.append(terms)
        if how == "sigint" and rank == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches one rank only
        return terms

    trainer.train_step = recording_step
    if how == "budget":  # rank 0's clock runs out after 2 steps; rank 1's clock never would
        purify.train.Budget = lambda minutes: _ChecksBudget(2 if rank == 0 else 10**9)
    step = trainer.run(max_steps=6, max_minutes=1.0, progress=False)
    torch.save({"step": step, "terms": seen}, os.path.join(out, f"rank{rank}-{how}.pt"))
    trainer.close()


@pytest.mark.parametrize("how", ["budget", "sigint"])
def test_ddp_ranks_stop_at_the_same_step(tmp_path, tiny_images, how):
    """Rank 0 decides the budget for every rank and an interrupt on one rank stops all at the same step, so no
    rank waits in a collective the others never reach; the logged loss is the mean over ranks."""
    _spawn(_ddp_stop_worker, 2, str(tmp_path), _small_images(tiny_images), how)
    r0, r1 = (torch.load(tmp_path / f"rank{r}-{how}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert r0["terms"] == r1["terms"]  # the same averaged loss terms on both ranks (their batches differ)


def _ddp_resume_worker(rank, world, port, out, images, steps):
    trainer = _ddp_trainer(rank, world, port, out, images, resume=True)
    torch.save({"step": trainer.step, "rng": torch.get_rng_state()}, os.path.join(out, f"resumed{rank}-{world}.pt"))
    trainer.run(max_steps=steps, progress=False)
    trainer.close()


def test_resume_with_another_number_of_processes_gives_each_rank_its_own_stream(tmp_path, tiny_images):
    images = _small_images(tiny_images)
    Trainer(tiny_preset(batch_size=12), tmp_path, images=images, device="cpu").run(max_steps=2, progress=False)
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]) == 1
    _spawn(_ddp_resume_worker, 2, str(tmp_path), images, 2)  # 1 process -> 2
    r0, r1 = (torch.load(tmp_path / f"resumed{r}-2.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2 and not torch.equal(r0["rng"], r1["rng"])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and len(state["rng"]) == 2
    _spawn(_ddp_resume_worker, 2, str(tmp_path), images, 0)  # 2 -> 2: each rank continues its own stream
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"resumed{rank}-2.pt", weights_only=True)["rng"], state["rng"][rank]["cpu"])
    resumed = Trainer(tiny_preset(batch_size=12), tmp_path, images=images, device="cpu", resume=True)  # 2 -> 1
    assert resumed.step == 4 and not any(torch.equal(torch.get_rng_state(), s["cpu"]) for s in state["rng"])


def test_batch_is_on_the_minus_one_one_scale_with_horizontal_flips(tmp_path, monkeypatch):
    """uint8 0..255 -> [-1, 1] (x / 127.5 - 1, spec §1) and hflip mirrors the width axis (left-right), for the
    images whose flip draw is below 0.5."""
    images = torch.arange(4 * 3 * 16 * 16).remainder(256).to(torch.uint8).view(4, 3, 16, 16)  # holds 0 and 255
    trainer = Trainer(tiny_preset(batch_size=4), tmp_path, images=images)
    assert trainer.preset.train.hflip
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.arange(size[0]))
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.tensor([0.1, 0.9, 0.3, 0.7])[:n])  # flip 0 and 2
    x = trainer.batch()
    scaled = images.float() / 127.5 - 1
    assert scaled.min() == -1 and scaled.max() == 1
    want = torch.stack([scaled[0].flip(-1), scaled[1], scaled[2].flip(-1), scaled[3]])
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)


def test_warm_up_ramps_the_rate_from_the_optimizers_first_step_and_survives_a_resume(tmp_path, tiny_images):
    """lr(k) = lr * min(1, (k - k0 + 1) / warmup) with k0 the step the optimizer state began at: 0 for a fresh
    run, the start step for a continued curriculum, and unchanged by a resume (the optimizer is not fresh)."""
    images = _small_images(tiny_images)
    trainer = Trainer(tiny_preset(lr=1e-3, warmup_steps=4, checkpoint_every=2), tmp_path / "a", images=images)
    trainer.run(max_steps=5, progress=False)
    rates = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "a" / "log.csv"))]
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    resumed = Trainer(tiny_preset(), tmp_path / "a", images=images, resume=True)
    assert resumed.optimizer_start == 0 and resumed.learning_rate() == pytest.approx(1e-3)
    continued = Trainer(tiny_preset(lr=1e-3, warmup_steps=4), tmp_path / "b", images=images, start_step=10,
                        init_from=str(tmp_path / "a" / "checkpoint.pt"))
    assert continued.learning_rate() == pytest.approx(2.5e-4)  # a fresh optimizer warms up again


def test_n_val_holds_the_validation_images_out_of_training(tmp_path, monkeypatch):
    """train.n_val removes the classifiers' validation split (train_val_split, seed 0) from the images BCT sees."""
    import purify.train
    from purify.infra.data import train_val_split

    images = torch.arange(200, dtype=torch.uint8).repeat_interleave(3 * 16 * 16).view(200, 3, 16, 16)
    monkeypatch.setattr(purify.train, "load_cifar10", lambda split, root: (images, torch.zeros(200)))
    trainer = Trainer(tiny_preset(n_val=20), tmp_path, device="cpu")
    kept, held_out = train_val_split(200, 20, seed=0)
    seen = set(trainer.images[:, 0, 0, 0].tolist())
    assert seen == set(kept.tolist()) and not seen & set(held_out.tolist())


def test_curriculum_steps_set_k_apart_from_the_runs_length(tmp_path, tiny_images):
    """train.curriculum_steps is K of Eq. 21 when given: N doubles every K' = K / (log2(s1/s0) + 1) steps of
    it and stays at s1 + 1 afterwards, however long the run."""
    preset = tiny_preset(curriculum_steps=80, total_steps=10_000)
    preset.loss.s0, preset.loss.s1 = 10, 40  # 3 stages, K' = 26
    loss = Trainer(preset, tmp_path, images=_small_images(tiny_images)).loss
    assert [loss.discretization(k).numel() for k in (0, 25, 26, 52, 80, 5000)] == [11, 11, 21, 41, 41, 41]


def _deterministic_terms(model, x, step):
    """A loss without random draws (a fixed pair of times), so two ways of batching see the same function."""
    t = torch.full((x.shape[0],), 2.0)
    per_image = model(x, t, torch.full_like(t, 0.5)).pow(2).flatten(1).mean(1) * (2 + x.flatten(1).mean(1))
    return {"loss": per_image, "ct": per_image * 2, "soft": per_image * 3, "N": torch.tensor(11)}


def test_accumulated_micro_batches_give_the_full_batchs_gradient_and_loss(tmp_path, tiny_images):
    """train.accumulate k: k forward/backward passes over equal slices of the batch, one optimizer step, the
    gradient and the logged terms those of the whole batch at once."""
    from purify.train import LossModule

    images = _small_images(tiny_images)
    runs = {}
    for k in (1, 4):
        torch.manual_seed(0)  # same initial weights, same batch
        trainer = Trainer(tiny_preset(batch_size=8, accumulate=k), tmp_path / str(k), images=images)
        trainer.module = LossModule(trainer.model, _deterministic_terms)
        calls = []
        trainer.module.register_forward_hook(lambda mod, inputs, out: calls.append(inputs[0].shape[0]))
        terms = trainer.train_step()
        runs[k] = terms, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, calls
    (full, grads_full, calls_full), (acc, grads_acc, calls_acc) = runs[1], runs[4]
    assert calls_full == [8] and calls_acc == [2, 2, 2, 2]
    assert full["loss"] == pytest.approx(acc["loss"], rel=1e-5) and full["soft"] == pytest.approx(acc["soft"], rel=1e-5)
    assert sum(g.abs().sum() for g in grads_full.values()) > 0
    for name, g in grads_full.items():
        torch.testing.assert_close(grads_acc[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_accumulate_must_divide_each_ranks_batch(tmp_path, tiny_images):
    with pytest.raises(ValueError, match="accumulate"):
        Trainer(tiny_preset(batch_size=8, accumulate=3), tmp_path, images=_small_images(tiny_images))
    with pytest.raises(ValueError, match="positive"):
        Trainer(tiny_preset(batch_size=8, accumulate=0), tmp_path, images=_small_images(tiny_images))
