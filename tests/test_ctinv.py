"""CT Inversion (spec §8): the noiser's boundary condition and preconditioning, the loss of the report's
Algorithm 1 by hand (target construction, stop-gradient, shared dropout), and training it with the BCT trainer:
checkpoints of their own kind, exact resume, loading."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_network, tiny_preset
from purify.bcm import BCMConfig, c_in, c_noise
from purify.bct import CTInversionLoss, LossConfig, make_loss
from purify.infra.checkpoint import load_checkpoint
from purify.noiser import Noiser, load_noiser
from purify.presets import load_preset
from purify.purifier import load_bcm
from purify.train import Trainer
from test_train import straight_and_resumed

EPS, T = 0.002, 80.0
SHAPE = (4, 3, 2, 2)                      # D = 12
HUBER_C = 0.00054 * math.sqrt(12)
N_IDX = torch.tensor([0, 4, 8, 9])        # 0-based interval indices at N = 11; index 9 ends at t_11 = T


def eq22(n: int) -> torch.Tensor:
    return torch.tensor([(EPS ** (1 / 7) + (i - 1) / (n - 1) * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
                         for i in range(1, n + 1)], dtype=torch.float64)


@pytest.fixture
def tiny_noiser() -> Noiser:
    """A small noiser whose G is not zero (the U-Net zero-initialises its last layers; see tiny_bcm)."""
    torch.manual_seed(0)
    noiser = Noiser(BCMConfig(network=tiny_network()))
    g = torch.Generator().manual_seed(1)
    for p in noiser.parameters():
        if not p.detach().any():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return noiser.eval()


def test_noiser_boundary_condition_is_exact(tiny_noiser):
    """g(x_T, T) = x_T bit for bit (c_skip = 1, c_out = T - T = 0), per sample in a batch of mixed times."""
    x = 80 * torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny_noiser(x, T), x)
        out = tiny_noiser(x, torch.tensor([T, 1.0, T]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert (out[1] - x[1]).abs().max() > 1e-3  # below T the network does contribute


def test_noiser_preconditioning(tiny_noiser):
    """g(x, t) = x + (T - t) G(c_in(t) x, c_noise(t), c_noise(T)), c_in(t) = 1 / sqrt(sigma_data^2 + t^2)."""
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 20.0])
    with torch.no_grad():
        G = tiny_noiser.net(c_in(t, 0.5).view(-1, 1, 1, 1) * x, c_noise(t), c_noise(torch.full((2,), T)))
        torch.testing.assert_close(tiny_noiser(x, t), x + (T - t).view(-1, 1, 1, 1) * G)


class AnalyticNoiser(nn.Module):
    """``g(x, t) = x + (T - t) w * mask * x / (1 + t)``: g(x, T) = x, one parameter, dropout (p = 0.5) on the input;
    records every pass's input, time, mask and whether gradients were on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def forward(self, x, t):
        t = t.view(-1, 1, 1, 1)
        mask = F.dropout(torch.ones_like(x), 0.5, self.training)
        self.calls.append({"x": x.detach().clone(), "t": t.flatten().clone(), "mask": mask,
                           "grad": torch.is_grad_enabled()})
        return x + (T - t) * self.w * mask * x / (1 + t)


def fix_draws(monkeypatch, z: torch.Tensor) -> None:
    """Fix the loss's random draws: the interval indices n (``N_IDX``) and the noise ``z``."""
    monkeypatch.setattr(torch, "multinomial", lambda p, n, replacement=False, generator=None: N_IDX[:n].clone())
    monkeypatch.setattr(torch, "randn_like", lambda like, **kw: z.clone().to(like))


@pytest.fixture
def fixed_draws(monkeypatch):
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    fix_draws(monkeypatch, z)
    return z


def hand_loss(x, z, w, mask, through_target=False, weight="inverse-gap"):
    """Algorithm 1 of the report, written out: x_n = x + t_n z, x_{n+1} = x_n + (t_{n+1} - t_n)(x_n - x) / t_n,
    L = lambda(t_n) d(g_sg(x_{n+1}, t_{n+1}), g(x_n, t_n)), d pseudo-Huber, lambda = 1 / (t_{n+1} - t_n) or 1."""
    times = eq22(11)
    t_n, t_n1 = times[N_IDX].view(-1, 1, 1, 1), times[N_IDX + 1].view(-1, 1, 1, 1)
    x_n = x + t_n * z
    x_n1 = x_n + (t_n1 - t_n) * (x_n - x) / t_n

    def g(x, t, w):
        return x + (T - t) * w * mask * x / (1 + t)

    target = g(x_n1, t_n1, w if through_target else w.detach())
    distance = ((target - g(x_n, t_n, w)).pow(2).flatten(1).sum(1) + HUBER_C**2).sqrt() - HUBER_C
    return distance / (t_n1 - t_n).flatten() if weight == "inverse-gap" else distance


def test_ct_inversion_loss_equals_algorithm_1_by_hand(fixed_draws):
    """The target's input is x + t_{n+1} z (the report's Euler step with x for E[x_0 | x_n]), at t_{n+1}, without
    gradients; the online pass sees x + t_n z at t_n; both share one dropout mask; the value is Algorithm 1's."""
    z = fixed_draws
    torch.manual_seed(0)
    model = AnalyticNoiser().train()
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    terms = CTInversionLoss(LossConfig(kind="ctinv"), total_steps=800, eps=EPS, T=T)(model, x, step=0)

    times = eq22(11)
    target_call, online_call = model.calls
    torch.testing.assert_close(target_call["t"].double(), times[N_IDX + 1])
    torch.testing.assert_close(online_call["t"].double(), times[N_IDX])
    x_n1 = x + times[N_IDX + 1].float().view(-1, 1, 1, 1) * z
    torch.testing.assert_close(target_call["x"], x_n1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online_call["x"], x + times[N_IDX].float().view(-1, 1, 1, 1) * z)
    assert not target_call["grad"] and online_call["grad"]
    assert torch.equal(target_call["mask"], online_call["mask"]) and 0 < (target_call["mask"] == 0).float().mean() < 1
    assert int(terms["N"]) == 11 and torch.equal(terms["ct"], terms["loss"]) and not terms["soft"].any()

    w = model.w.detach().double().requires_grad_(True)
    want = hand_loss(x.double(), z.double(), w, target_call["mask"].double())
    torch.testing.assert_close(terms["loss"].double(), want, rtol=1e-5, atol=0)


def test_uniform_weight_drops_the_inverse_gap(fixed_draws):
    """``ctinv_weight: uniform`` is lambda = 1: Algorithm 1's distance itself, not divided by t_{n+1} - t_n (which
    differs from 1 at every sampled interval, so the two weightings cannot agree by accident)."""
    z = fixed_draws
    torch.manual_seed(0)
    model = AnalyticNoiser().train()
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    terms = CTInversionLoss(LossConfig(kind="ctinv", ctinv_weight="uniform"), 800, EPS, T)(model, x, step=0)
    w = model.w.detach().double()
    want = hand_loss(x.double(), z.double(), w, model.calls[0]["mask"].double(), weight="uniform")
    torch.testing.assert_close(terms["loss"].double(), want, rtol=1e-5, atol=0)
    assert ((eq22(11)[N_IDX + 1] - eq22(11)[N_IDX]) - 1).abs().min() > 0.01
    with pytest.raises(ValueError, match="ctinv_weight must be one of inverse-gap, uniform, got 'ict'"):
        LossConfig(kind="ctinv", ctinv_weight="ict")


@pytest.mark.parametrize("index", ["lognormal", "uniform"])
def test_index_distribution(monkeypatch, index):
    """``ctinv_index``: n ~ Eq. 20 over the N - 1 intervals (at N = 11 the last one, [45.3, 80], gets 0.4%), or
    uniform (1/10 each)."""
    seen = []

    def multinomial(p, n, replacement=False, generator=None):
        seen.append(p.clone())
        return N_IDX[:n].clone()

    monkeypatch.setattr(torch, "multinomial", multinomial)
    CTInversionLoss(LossConfig(kind="ctinv", ctinv_index=index), 800, EPS, T)(AnalyticNoiser(), torch.zeros(SHAPE), 0)
    (p,) = seen
    times = eq22(11)
    cdf = torch.erf((times.log() + 1.1) / (math.sqrt(2) * 2.0))
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    want = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]) if index == "lognormal" else uniform
    torch.testing.assert_close(p.double(), want)
    if index == "lognormal":
        assert 0.003 < float(p[-1]) < 0.005
    with pytest.raises(ValueError, match="ctinv_index must be one of lognormal, uniform"):
        LossConfig(kind="ctinv", ctinv_index="cm")


def test_a_tiny_example_by_hand(monkeypatch):
    """x = 0.5 and z = 2 everywhere, an identity noiser (w = 0): the target's input is x_{n+1} = x_n + (t_{n+1} - t_n)
    (x_n - x) / t_n = 0.5 + 2 t_{n+1} (e.g. t_n = 1, t_{n+1} = 3: 2.5 + 2 * 2 / 1 = 6.5), and the loss is
    d(x_{n+1}, x_n) / (t_{n+1} - t_n) = (sqrt(D (2 h)^2 + c^2) - c) / h with h = t_{n+1} - t_n, D = 12."""
    fix_draws(monkeypatch, torch.full(SHAPE, 2.0))
    model = AnalyticNoiser().eval()
    model.w.data.zero_()
    terms = CTInversionLoss(LossConfig(kind="ctinv"), total_steps=800, eps=EPS, T=T)(model, torch.full(SHAPE, 0.5), 0)
    times = eq22(11).float()
    t_n, t_n1 = times[N_IDX], times[N_IDX + 1]
    torch.testing.assert_close(model.calls[0]["x"][:, 0, 0, 0], 0.5 + 2 * t_n1)
    torch.testing.assert_close(model.calls[1]["x"][:, 0, 0, 0], 0.5 + 2 * t_n)
    h = (t_n1 - t_n).double()
    torch.testing.assert_close(terms["loss"].double(), ((12 * (2 * h) ** 2 + HUBER_C**2).sqrt() - HUBER_C) / h,
                               rtol=1e-5, atol=0)


def test_gradients_flow_only_through_the_online_branch(fixed_draws):
    """d L / d w equals the hand loss's gradient with the target detached, and differs from the gradient that would
    also flow through the target."""
    z = fixed_draws
    torch.manual_seed(0)
    model = AnalyticNoiser().train()
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    terms = CTInversionLoss(LossConfig(kind="ctinv"), total_steps=800, eps=EPS, T=T)(model, x, step=0)
    (got,) = torch.autograd.grad(terms["loss"].sum(), [model.w])
    mask = model.calls[0]["mask"].double()
    w = model.w.detach().double().requires_grad_(True)
    (online_only,) = torch.autograd.grad(hand_loss(x.double(), z.double(), w, mask).sum(), [w])
    (both,) = torch.autograd.grad(hand_loss(x.double(), z.double(), w, mask, through_target=True).sum(), [w])
    torch.testing.assert_close(got.double(), online_only, rtol=1e-4, atol=1e-8)
    assert (both - online_only).abs() > 1e-2 * online_only.abs()


def test_make_loss_and_the_shipped_preset():
    preset = load_preset("cifar10-small-ctinv")
    assert preset.loss.kind == "ctinv" and preset.train.batch_size == 32
    assert preset.model == load_preset("cifar10-small").model  # the same network as the BCM it serves
    assert isinstance(make_loss(preset.loss, preset.train.total_steps, 0.5, EPS, T), CTInversionLoss)
    with pytest.raises(ValueError, match="loss.kind"):
        LossConfig(kind="ct-inversion")


# ---------------------------------------------------------------------------------------- training it

def ctinv_preset(**train):
    preset = tiny_preset(**train)
    preset.loss.kind = "ctinv"
    return preset


@pytest.fixture
def images(tiny_images):
    return F.avg_pool2d(tiny_images.float(), 2).to(torch.uint8)  # 16x16: four times cheaper


def test_training_runs_checkpoints_and_resumes_bit_identically(tmp_path, images):
    preset = ctinv_preset(checkpoint_every=3)
    straight, resumed, log_a, _ = straight_and_resumed(preset, tmp_path, images)
    assert isinstance(straight.model, Noiser) and isinstance(resumed.model, Noiser)
    assert isinstance(straight.loss, CTInversionLoss) and len(log_a) == 6
    assert all(r["ct"] == r["loss"] and float(r["soft"]) == 0 and r["N"] == "11" for r in log_a)

    state = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert state["kind"] == "noiser" and state["step"] == 6 and state["config"]["loss"]["kind"] == "ctinv"
    noiser, loaded = load_noiser(tmp_path / "a" / "checkpoint.pt")
    assert loaded.loss.kind == "ctinv"
    for a, b in zip(straight.ema.module.state_dict().values(), noiser.state_dict().values()):
        assert torch.equal(a, b)  # the EMA weights, as for a BCM


def test_noiser_and_bcm_checkpoints_are_not_mixed(tmp_path, images):
    Trainer(ctinv_preset(), tmp_path / "ctinv", images=images).run(max_steps=1, progress=False)
    Trainer(tiny_preset(), tmp_path / "bcm", images=images).run(max_steps=1, progress=False)
    with pytest.raises(ValueError, match="not a BCM"):
        load_bcm(tmp_path / "ctinv" / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a CT Inversion noiser"):
        load_noiser(tmp_path / "bcm" / "checkpoint.pt")
    with pytest.raises(ValueError, match="'bcm' checkpoint; this preset trains a 'noiser'"):
        Trainer(ctinv_preset(), tmp_path / "c", images=images, init_from=str(tmp_path / "bcm" / "checkpoint.pt"))
    tuned = Trainer(ctinv_preset(), tmp_path / "d", images=images, init_from=str(tmp_path / "ctinv" / "checkpoint.pt"))
    assert isinstance(tuned.model, Noiser)


def test_export_ships_the_noisers_ema_weights(tmp_path, images):
    """``purify.export`` writes a small noiser release file: the EMA weights (or online ones on request), which
    ``load_noiser`` reads back bit for bit and ``load_bcm`` refuses; it has no t* to record; a release can seed
    a continued run (``--init-from``, ``--start-step``)."""
    from purify.export import export
    run = tmp_path / "ctinv"
    trainer = Trainer(ctinv_preset(), run, images=images)
    trainer.run(max_steps=2, progress=False)
    release = export(str(run / "checkpoint.pt"), str(tmp_path / "noiser.pt"))
    assert release["kind"] == "noiser" and release["weights_from"] == "ema" and release["step"] == 2
    assert set(load_checkpoint(tmp_path / "noiser.pt")) == {"kind", "config", "weights", "weights_from", "step"}
    noiser, _ = load_noiser(tmp_path / "noiser.pt")
    ema, online = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(noiser.state_dict()[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], online[k]) for k in ema)  # so the check above tells EMA from online
    export(str(run / "checkpoint.pt"), str(tmp_path / "online.pt"), weights="online")
    noiser, _ = load_noiser(tmp_path / "online.pt")
    assert all(torch.equal(noiser.state_dict()[k], online[k]) for k in online)
    with pytest.raises(ValueError, match="not a BCM"):
        load_bcm(tmp_path / "noiser.pt")
    with pytest.raises(ValueError, match="noiser: it has no purifier t"):
        export(str(run / "checkpoint.pt"), str(tmp_path / "x.pt"), t_star=1.0)
    assert not (tmp_path / "x.pt").exists()
    continued = Trainer(ctinv_preset(), tmp_path / "more", images=images, init_from=str(tmp_path / "online.pt"),
                        start_step=2)
    assert continued.step == 2 and all(torch.equal(continued.model.state_dict()[k], online[k]) for k in online)
