"""BCMPurifier: defaults, input checks, gradients, seeding, wrapping, checkpoints."""
import pytest
import torch
from torch import nn

from conftest import tiny_preset
from purify import BCMPurifier, DiffusionPurifier, clamp_straight_through
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict


def test_default_is_invert_011_to_80_then_one_step(tiny_bcm):
    calls = []
    forward = tiny_bcm.forward
    tiny_bcm.forward = lambda x, t, u: calls.append((float(t), float(u))) or forward(x, t, u)
    out = BCMPurifier(tiny_bcm)(torch.rand(2, 3, 32, 32))
    assert calls == [(0.11, 80.0), (80.0, 0.002)]
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_schedules_and_denoise_mode(tiny_bcm):
    calls = []
    forward = tiny_bcm.forward
    tiny_bcm.forward = lambda x, t, u: calls.append((round(float(t), 4), round(float(u), 4))) or forward(x, t, u)
    BCMPurifier(tiny_bcm, t_star=10.0, eps_inv=0.07, inversion_times=[1.5], denoise_times=[1.2])(torch.rand(1, 3, 32, 32))
    assert calls == [(0.07, 1.5), (1.5, 10.0), (10.0, 1.2), (1.2, 0.002)]
    calls.clear()
    BCMPurifier(tiny_bcm, t_star=0.5, mode="denoise")(torch.rand(1, 3, 32, 32))
    assert calls == [(0.5, 0.002)]


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 32, 32), "4-D"),
    (torch.rand(2, 1, 32, 32), "3 channels"),
    (torch.rand(2, 32, 32, 3), "channels"),
    (torch.rand(2, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.rand(2, 3, 32, 32) - 0.5, r"\[0, 1\]"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (torch.full((1, 3, 32, 32), float("inf")), "inf"),
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "dtype"),
    ([[0.5]], "Tensor"),
])
def test_bad_input_is_rejected_with_a_clear_message(tiny_bcm, bad, message):
    with pytest.raises(ValueError, match=message):
        BCMPurifier(tiny_bcm)(bad)


def test_bad_settings_are_rejected(tiny_bcm):
    with pytest.raises(ValueError, match="t_star"):
        BCMPurifier(tiny_bcm, t_star=100.0)
    with pytest.raises(ValueError, match="mode"):
        BCMPurifier(tiny_bcm, mode="diffpure")


def test_gradients_reach_the_input_and_not_the_bcm(tiny_bcm):
    for p in tiny_bcm.parameters():
        p.data.normal_(0, 0.05)
    purifier = BCMPurifier(tiny_bcm, t_star=1.0)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    purifier(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in purifier.parameters())


def test_clamp_straight_through_is_the_clamp_forward_and_the_identity_backward():
    values = [-float("inf"), -3e8, -2.5, -1.0, -0.3, -0.0, 0.0, 0.7, 1.0, 1.5, 300.0, 3e8, float("inf")]
    weights = torch.arange(1.0, len(values) + 1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor(values).to(dtype).requires_grad_(True)
        out = clamp_straight_through(x, -1, 1)
        expected = x.detach().clamp(-1, 1)
        assert torch.equal(out, expected) and torch.equal(out.signbit(), expected.signbit()), dtype
        grad, = torch.autograd.grad((out * weights.to(dtype)).sum(), x)
        assert torch.equal(grad, weights.to(dtype)), dtype  # d out / d x = 1, also outside [-1, 1]


@pytest.mark.parametrize("make", [
    lambda bcm: BCMPurifier(bcm, t_star=1.0, seed=0),
    lambda bcm: BCMPurifier(bcm, t_star=0.5, mode="denoise", seed=0),
    lambda bcm: DiffusionPurifier(bcm, t_star=1.0, steps=3, seed=0),
], ids=["bcm", "denoise", "diffusion"])
def test_gradients_pass_the_output_clamp_where_the_purified_image_saturates(tiny_bcm, make, monkeypatch):
    """A network that returns 10 more than the tiny BCM saturates every purified pixel at 1; a plain clamp
    would then give the attacker a zero gradient. The input gradient must be the one without any clamp."""
    forward = tiny_bcm.forward
    monkeypatch.setattr(tiny_bcm, "forward", lambda x, t, u: forward(x, t, u) + 10)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = make(tiny_bcm)(x)
    assert torch.equal(out, torch.ones_like(out))
    grad, = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    monkeypatch.setattr("purify.purifier.clamp_straight_through", lambda x, low, high: x)
    unclamped, = torch.autograd.grad(make(tiny_bcm)(x).sum(), x)
    torch.testing.assert_close(grad, unclamped, rtol=0, atol=0)


def test_seeded_noise_is_reproducible(tiny_bcm):
    x = torch.rand(2, 3, 32, 32)
    a = BCMPurifier(tiny_bcm, seed=3)
    first = a(x)
    assert not torch.equal(first, a(x))  # the stream advances
    a.reseed()
    assert torch.equal(first, a(x))
    assert torch.equal(first, BCMPurifier(tiny_bcm, seed=3)(x))


def test_wrap_composes_with_any_classifier(tiny_bcm):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    defended = BCMPurifier(tiny_bcm, seed=0).wrap(classifier)
    defended.train()  # the purifier's BCM must stay in eval mode regardless
    assert not defended[0].bcm.training
    assert defended(torch.rand(4, 3, 32, 32)).shape == (4, 10)


def test_from_checkpoint_uses_the_preset_defaults(tmp_path, tiny_bcm):
    preset = tiny_preset()
    preset.purifier.t_star = 0.3
    path = tmp_path / "bcm.pt"
    save_checkpoint({"kind": "bcm", "config": to_dict(preset), "ema": tiny_bcm.state_dict()}, path)
    purifier = BCMPurifier.from_checkpoint(path)
    assert purifier.t_star == 0.3 and purifier.eps_inv == 0.11
    assert BCMPurifier.from_checkpoint(path, t_star=2.0).t_star == 2.0
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(BCMPurifier.from_checkpoint(path, seed=1)(x), BCMPurifier(tiny_bcm, 0.3, seed=1)(x))


def test_from_checkpoint_rejects_mismatched_and_corrupt_files(tmp_path, tiny_bcm):
    preset = tiny_preset()
    preset.model.network.channels = 16  # config says 16 channels, weights have 8
    save_checkpoint({"kind": "bcm", "config": to_dict(preset), "ema": tiny_bcm.state_dict()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="does not match"):
        BCMPurifier.from_checkpoint(tmp_path / "m.pt")
    (tmp_path / "c.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        BCMPurifier.from_checkpoint(tmp_path / "c.pt")
    with pytest.raises(FileNotFoundError):
        BCMPurifier.from_checkpoint(tmp_path / "missing.pt")


def test_export_keeps_ema_and_records_the_purifier_default(tmp_path, tiny_images):
    from purify.export import export
    from purify.train import Trainer

    trainer = Trainer(tiny_preset(), tmp_path / "run", images=tiny_images)
    trainer.run(max_steps=2, progress=False)  # the EMA copies the first step's weights, then lags
    export(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "release.pt"), t_star=0.3)
    purifier = BCMPurifier.from_checkpoint(tmp_path / "release.pt")
    assert purifier.t_star == 0.3
    for a, b in zip(trainer.ema.module.state_dict().values(), purifier.bcm.state_dict().values()):
        assert torch.equal(a, b)
    export(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "online.pt"), weights="online")
    online = BCMPurifier.from_checkpoint(tmp_path / "online.pt").bcm.state_dict()
    assert all(torch.equal(a, online[k]) for k, a in trainer.model.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(online.values(), purifier.bcm.state_dict().values()))
    with pytest.raises(ValueError, match="weights must be"):
        export(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "x.pt"), weights="swa")


def test_a_half_precision_release_is_half_the_file_and_purifies_like_the_float32_one(tmp_path, tiny_images):
    from purify.export import export, main
    from purify.train import Trainer

    trainer = Trainer(tiny_preset(), tmp_path / "run", images=tiny_images)
    trainer.run(max_steps=2, progress=False)
    export(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "full.pt"))
    main([str(tmp_path / "full.pt"), str(tmp_path / "half.pt"), "--half"])   # a release re-exported in half
    stored = torch.load(tmp_path / "half.pt", weights_only=True)["weights"]
    assert {value.dtype for value in stored.values() if value.is_floating_point()} == {torch.float16}
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    full, half = (BCMPurifier.from_checkpoint(tmp_path / name, seed=0) for name in ("full.pt", "half.pt"))
    assert next(half.bcm.parameters()).dtype == torch.float32
    for name, value in full.bcm.state_dict().items():  # each weight rounded to float16, nothing else changed
        assert torch.equal(half.bcm.state_dict()[name], value.half().to(value.dtype))
    images = tiny_images[:4].float() / 255
    assert (half(images) - full(images)).abs().max() < 1e-2


def test_small_strengths_cap_the_initial_noise(tiny_bcm):
    purifier = BCMPurifier(tiny_bcm, t_star=0.1)
    assert purifier.inversion_times == [0.05, 0.1]
    assert BCMPurifier(tiny_bcm, t_star=80.0).inversion_times == [0.11, 80.0]


@pytest.mark.parametrize("settings, message", [
    (dict(t_star=0.003), "below the model's eps"),                        # eps_inv capped at 0.0015 < eps
    (dict(t_star=1.0, eps_inv=0.001), "below the model's eps"),
    (dict(t_star=1.0, eps_inv=float("nan")), "below the model's eps"),
    (dict(t_star=1.0, eps_inv=0.3, inversion_times=[0.2]), "inversion times"),   # below eps_inv
    (dict(t_star=1.0, inversion_times=[1.5]), "inversion times"),                # above t*
    (dict(t_star=1.0, inversion_times=[0.4, 0.4]), "inversion times"),           # not strictly increasing
    (dict(t_star=1.0, denoise_times=[0.001]), "denoise_times"),                  # below eps
    (dict(t_star=1.0, denoise_times=[1.0]), "denoise_times"),                    # not below t*
    (dict(t_star=1.0, denoise_times=[0.5, 0.2]), "denoise_times"),
    (dict(t_star=float("inf")), "t_star"),
])
def test_the_effective_schedule_is_validated_at_construction(tiny_bcm, settings, message):
    """Every time the network would be evaluated at lies in [eps, T]: eps_inv is checked after its cap."""
    with pytest.raises(ValueError, match=message):
        BCMPurifier(tiny_bcm, **settings)


def test_the_denoise_baseline_needs_no_inversion_schedule(tiny_bcm):
    assert BCMPurifier(tiny_bcm, t_star=0.003, mode="denoise").denoise_times == [0.003]


def test_release_files_name_what_they_hold_and_old_ones_still_load(tmp_path, tiny_images):
    """A release stores ``weights`` + ``weights_from``; a file of the old layout (``ema``, origin under
    ``weights``) still loads, re-exports to the new layout with identical tensors, and seeds --init-from."""
    from purify.export import export
    from purify.train import Trainer

    trainer = Trainer(tiny_preset(), tmp_path / "run", images=tiny_images)
    trainer.run(max_steps=2, progress=False)
    release = export(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "new.pt"), weights="online")
    assert set(release) == {"kind", "config", "weights", "weights_from", "step"} and release["weights_from"] == "online"

    online = trainer.model.state_dict()
    old = {"kind": "bcm", "config": release["config"], "ema": online, "weights": "online", "step": 2}
    save_checkpoint(old, tmp_path / "old.pt")
    assert all(torch.equal(a, online[k]) for k, a in
               BCMPurifier.from_checkpoint(tmp_path / "old.pt").bcm.state_dict().items())
    again = export(str(tmp_path / "old.pt"), str(tmp_path / "again.pt"), t_star=0.5)
    assert again["weights_from"] == "online" and again["config"]["purifier"]["t_star"] == 0.5
    assert all(torch.equal(a, online[k]) for k, a in again["weights"].items())
    with pytest.raises(ValueError, match="release file holding online"):
        export(str(tmp_path / "old.pt"), str(tmp_path / "x.pt"), weights="ema")
    with pytest.raises(ValueError, match="directory"):
        export(str(tmp_path / "old.pt"), str(tmp_path))
    for path in ("old.pt", "again.pt"):  # fine-tuning starts from the weights a release ships, old or new
        tuned = Trainer(tiny_preset(), tmp_path / f"ft-{path}", images=tiny_images, init_from=str(tmp_path / path))
        assert all(torch.equal(a, online[k]) for k, a in tuned.model.state_dict().items())
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("make", [lambda bcm, **kw: BCMPurifier(bcm, t_star=1.0, eps_inv=0.3, **kw),
                                  lambda bcm, **kw: DiffusionPurifier(bcm, t_star=0.5, steps=3, **kw)],
                         ids=["bcm", "diffusion"])
def test_recomputed_activations_give_the_same_gradients_with_a_seeded_purifier(tiny_bcm, make, monkeypatch):
    """recompute=True re-runs every U-Net block in the backward pass (counted below) and replays nothing
    random there: the seeded noise is drawn once per call, so outputs and input gradients equal those of a
    purifier that keeps its activations; the flag is off again after the call."""
    from purify.network import ResBlock

    x = torch.rand(3, 3, 32, 32)
    calls, forward = [], ResBlock.forward
    monkeypatch.setattr(ResBlock, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    results = []
    for recompute in (False, True):
        purifier = make(tiny_bcm, seed=5, recompute=recompute)
        calls.clear()
        point = x.clone().requires_grad_(True)
        out = purifier(point)
        forward_calls = len(calls)
        grad, = torch.autograd.grad((out ** 2).sum(), point)
        results.append((out.detach(), grad, len(calls) - forward_calls))
    (out_kept, grad_kept, recomputed_kept), (out_re, grad_re, recomputed) = results
    assert torch.equal(out_kept, out_re)
    torch.testing.assert_close(grad_re, grad_kept, rtol=1e-5, atol=1e-7)
    assert recomputed_kept == 0 and recomputed > 0  # the backward pass re-ran the block
    assert not any(getattr(m, "recompute", False) for m in tiny_bcm.modules())
