"""The core pinned to the spec, not to the implementation (issue 12): Eq. 15 term by term on an analytic model
with dropout, its stop-gradients, the curriculum as ``BCTLoss`` uses it, the preconditioning formulas, the
U-Net's dependence on ``u``, the trainer's EMA and ``start_step``."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purify.bct
from conftest import tiny_preset
from purify.bct import BCTLoss, LossConfig
from purify.infra.checkpoint import load_checkpoint
from purify.train import Trainer

EPS, T = 0.002, 80.0
SHAPE = (4, 3, 4, 4)                      # D = 48
HUBER_C = 0.00054 * math.sqrt(48)         # spec §3: c = 0.00054 sqrt(D)
# Fixed 0-based indices into p (n = 1..N-1 in the spec's numbering is index 0..N-2): the pairs differ for
# both soft starts (n' != n and n' != n + 1), and include n' > n (inversion) and n' < n (denoising).
N_IDX, N2_IDX = torch.tensor([0, 3, 5, 9]), torch.tensor([4, 1, 9, 2])


def eq22(n: int) -> torch.Tensor:
    """Spec §3, Eq. 22: ``t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho``, rho = 7."""
    return torch.tensor([(EPS ** (1 / 7) + (i - 1) / (n - 1) * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
                         for i in range(1, n + 1)], dtype=torch.float64)


def analytic_f(x, t, u, w, v, mask):
    """``f(x, t, u) = a(t, u) x + (t - u) (w * mask * x / (1 + t) + v ln(t / u))`` with a(t, t) = 1, so
    f(x, t, t) = x; ``mask`` is the (scaled) dropout mask. Works in the dtype of its inputs."""
    t, u = t.view(-1, 1, 1, 1), u.view(-1, 1, 1, 1)
    a = (0.25 + t * u) / (0.25 + t**2)
    return a * x + (t - u) * (w * mask * x / (1 + t) + v * (t / u).log())


class AnalyticModel(nn.Module):
    """Two parameters and dropout (p = 0.5) on the input; records the times and dropout mask of every pass."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.v = nn.Parameter(torch.tensor(-0.3))
        self.calls = []

    def forward(self, x, t, u):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        u = torch.as_tensor(u, dtype=x.dtype).expand(x.shape[0])
        mask = F.dropout(torch.ones_like(x), 0.5, self.training)
        self.calls.append({"t": t.detach().clone(), "u": u.detach().clone(), "mask": mask})
        return analytic_f(x, t, u, self.w, self.v, mask)


def hand_eq15(x, z, times, n, n2, mask, online, sg_outer=None, sg_target=None, soft_start="n", kind="bct"):
    """Eq. 15 written out from the spec, per sample. ``online = (w, v)`` are the parameters of the CT pass and
    of the soft term's inner pass; the soft term's outer pass and the target use ``sg_outer``/``sg_target``,
    by default the online ones detached, as Eq. 15 says (tests pass others to show that the choice matters)."""
    def d(a, b):
        return ((a - b).pow(2).flatten(1).sum(1) + HUBER_C**2).sqrt() - HUBER_C

    def b(s):
        return s.view(-1, 1, 1, 1)

    frozen = tuple(p.detach() for p in online)
    sg_outer = frozen if sg_outer is None else sg_outer
    sg_target = frozen if sg_target is None else sg_target
    eps = torch.full((x.shape[0],), EPS, dtype=x.dtype)
    t_n, t_n1, t_n2 = times[n], times[n + 1], times[n2]
    target = analytic_f(x.detach() + b(t_n) * z, t_n, eps, *sg_target, mask)
    ct = d(analytic_f(x + b(t_n1) * z, t_n1, eps, *online, mask), target) / (t_n1 - t_n)
    if kind == "ct":
        return ct, torch.zeros_like(ct)
    t_s = t_n1 if soft_start == "n+1" else t_n
    x_u = analytic_f(x + b(t_s) * z, t_s, t_n2, *online, mask)
    soft = d(analytic_f(x_u, t_n2, eps, *sg_outer, mask), target) / (t_s - t_n2).abs()
    return ct, soft


@pytest.fixture
def fixed_draws(monkeypatch):
    """Fix BCTLoss's random draws: the index pairs (recording what it asks for) and the noise z."""
    asked = {}

    def pairs(p, batch, exclude_offset=0, generator=None):
        asked.update(p=p.clone(), batch=batch, exclude_offset=exclude_offset)
        return N_IDX[:batch].clone(), N2_IDX[:batch].clone()

    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(purify.bct, "sample_index_pair", pairs)
    monkeypatch.setattr(torch, "randn_like", lambda like, **kw: z.clone().to(like))
    return asked, z


def _batch():
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("kind, soft_start", [("bct", "n"), ("bct", "n+1"), ("ct", "n")])
def test_bct_loss_equals_eq15_by_hand(fixed_draws, kind, soft_start):
    """Values and gradients (to both parameters and to x) of each term equal Eq. 15 computed by hand, with
    dropout on and one dropout mask shared by every pass."""
    asked, z = fixed_draws
    torch.manual_seed(0)
    model = AnalyticModel().train()
    x = _batch().requires_grad_(True)
    loss = BCTLoss(LossConfig(kind=kind, soft_start=soft_start), total_steps=800, eps=EPS, T=T)
    terms = loss(model, x, step=0)

    assert asked["exclude_offset"] == (1 if soft_start == "n+1" else 0)
    assert int(terms["N"]) == 11
    masks = [c["mask"] for c in model.calls]
    assert len(masks) == (2 if kind == "ct" else 4)
    assert all(torch.equal(m, masks[0]) for m in masks)  # compared passes share their dropout randomness
    assert 0 < (masks[0] == 0).float().mean() < 1      # ... and dropout is really on

    w, v = (p.detach().double().requires_grad_(True) for p in (model.w, model.v))
    x64 = x.detach().double().requires_grad_(True)
    ct, soft = hand_eq15(x64, z.double(), eq22(11), N_IDX, N2_IDX, masks[0].double(), (w, v),
                         soft_start=soft_start, kind=kind)
    torch.testing.assert_close(terms["ct"].double(), ct, rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["soft"].double(), soft, rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["loss"].double(), ct + soft, rtol=1e-4, atol=0)

    for name in ("ct", "soft"):
        if kind == "ct" and name == "soft":
            continue
        got = torch.autograd.grad(terms[name].sum(), [model.w, model.v, x], retain_graph=True)
        want = torch.autograd.grad({"ct": ct, "soft": soft}[name].sum(), [w, v, x64], retain_graph=True)
        for g, h in zip(got, want):
            torch.testing.assert_close(g.double(), h, rtol=1e-3, atol=1e-6)


def test_stop_gradients_of_eq15(fixed_draws):
    """The target carries no gradient at all; the soft term's outer pass carries none to the weights but
    does to its input x_u (else the soft term's gradient would be zero); the inner pass carries both.
    Gradients as functions of which passes see the parameters (torch.func); each alternative differs."""
    _, z = fixed_draws
    torch.manual_seed(0)
    model = AnalyticModel().train()
    x = _batch()
    terms = BCTLoss(LossConfig(), total_steps=800, eps=EPS, T=T)(model, x, step=0)
    grad_ct = torch.stack(torch.autograd.grad(terms["ct"].sum(), [model.w, model.v], retain_graph=True))
    grad_soft = torch.stack(torch.autograd.grad(terms["soft"].sum(), [model.w, model.v]))
    assert grad_soft.abs().min() > 0  # the inner pass reaches the weights

    theta = torch.stack([model.w, model.v]).detach().double()
    args = (x.double(), z.double(), eq22(11), N_IDX, N2_IDX, model.calls[0]["mask"].double())
    inner_only = torch.func.grad(lambda p: hand_eq15(*args, (p[0], p[1]))[1].sum())(theta)
    both = torch.func.grad(lambda p: hand_eq15(*args, (p[0], p[1]), sg_outer=(p[0], p[1]))[1].sum())(theta)
    online_only = torch.func.grad(lambda p: hand_eq15(*args, (p[0], p[1]))[0].sum())(theta)
    through_target = torch.func.grad(lambda p: hand_eq15(*args, (p[0], p[1]), sg_target=(p[0], p[1]))[0].sum())(theta)
    torch.testing.assert_close(grad_soft.double(), inner_only, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grad_ct.double(), online_only, rtol=1e-3, atol=1e-6)
    assert (both - inner_only).abs().max() > 1e-2 * inner_only.abs().max()
    assert (through_target - online_only).abs().max() > 1e-2 * online_only.abs().max()


def test_bct_on_the_unet_with_dropout_shares_masks_between_compared_passes(fixed_draws, monkeypatch):
    """With dropout 0.5 in the U-Net, every pass of one BCT step (target, CT, inner and outer soft pass) draws
    the same dropout masks in every layer, and the next step draws new ones."""
    from conftest import tiny_network
    from purify.bcm import BCM, BCMConfig

    torch.manual_seed(0)
    bcm = BCM(BCMConfig(network=tiny_network(dropout=0.5))).train()
    passes = []
    bcm.register_forward_pre_hook(lambda module, args: passes.append([]))
    for layer in bcm.modules():
        if isinstance(layer, nn.Dropout):
            layer.register_forward_hook(lambda module, args, out: passes[-1].append(out == 0))
    x = torch.rand(SHAPE[0], 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    monkeypatch.setattr(torch, "randn_like", lambda like, **kw: torch.zeros_like(like))
    loss = BCTLoss(LossConfig(), total_steps=800, eps=EPS, T=T)
    loss(bcm, x, step=0)
    assert len(passes) == 4 and len(passes[0]) > 1
    for masks in passes[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks, passes[0]))
    assert 0.3 < passes[0][0].float().mean() < 0.7
    loss(bcm, x, step=1)
    assert not torch.equal(passes[4][0], passes[0][0])


def test_curriculum_as_the_loss_uses_it(fixed_draws):
    """N(k) of Eq. 21 at k = 0, K'-1, K', 3K', the last step, and the t grid (Eq. 22) the indices point into."""
    asked, _ = fixed_draws
    K = 800                                  # K' = floor(800 / (log2(128) + 1)) = 100
    loss = BCTLoss(LossConfig(), total_steps=K, eps=EPS, T=T)
    model = AnalyticModel().eval()
    for step, expected_n in [(0, 11), (99, 11), (100, 21), (300, 81), (500, 321), (799, 1281)]:
        model.calls.clear()
        terms = loss(model, _batch(), step=step)
        assert int(terms["N"]) == expected_n, step
        grid = eq22(expected_n)
        assert asked["p"].numel() == expected_n - 1
        cdf = torch.erf((grid.log() + 1.1) / (math.sqrt(2) * 2.0))
        torch.testing.assert_close(asked["p"].double(), ((cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])))
        # The CT pass evaluates f at t_{n+1} of this grid, the target at t_n (recorded in call order:
        # the target first, then the online CT pass).
        ts = torch.stack([c["t"] for c in model.calls])
        assert any(torch.allclose(row.double(), grid[N_IDX + 1], rtol=1e-6) for row in ts), step
        assert any(torch.allclose(row.double(), grid[N_IDX], rtol=1e-6) for row in ts), step


def test_denoiser_warm_start_loss_by_hand(monkeypatch):
    """EDM's loss on the u = 0 branch: lambda(s) |f(x + s n, s, eps) - x|^2 per dimension, lognormal s
    (P_mean -1.2, P_std 1.2), lambda(s) = (s^2 + sd^2) / (s sd)^2 (Karras et al. 2022, Eq. 2 and Table 1)."""
    from purify.bct import DenoiserLoss

    normal = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: normal.clone())
    monkeypatch.setattr(torch, "randn_like", lambda like, **kw: noise.clone())
    model = AnalyticModel().eval()
    x = _batch()
    got = DenoiserLoss(LossConfig(kind="denoise"), sigma_data=0.5, eps=EPS, T=T)(model, x, step=0)["loss"]
    s = (normal.double() * 1.2 - 1.2).exp()
    denoised = analytic_f(x.double() + s.view(-1, 1, 1, 1) * noise, s, torch.full((4,), EPS, dtype=torch.float64),
                          model.w.detach(), model.v.detach(), torch.ones(SHAPE))
    want = (s**2 + 0.25) / (0.25 * s**2) * (denoised - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


# --- preconditioning (spec §2) ---------------------------------------------------------------------------

def test_preconditioning_at_generic_times_matches_the_formulas():
    from purify.bcm import c_in, c_out, c_skip

    sd = 0.5
    t = torch.tensor([0.003, 0.07, 0.3, 1.1, 6.0, 33.0, 80.0], dtype=torch.float64)
    u = torch.tensor([0.9, 5.0, 0.002, 0.2, 80.0, 1.5, 0.11], dtype=torch.float64)
    torch.testing.assert_close(c_skip(t, u, sd), (sd**2 + t * u) / (sd**2 + t**2), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_out(t, u, sd), sd * (t - u) / (sd**2 + t**2).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_in(t, sd), 1 / (sd**2 + t**2).sqrt(), rtol=1e-6, atol=0)
    # sigma_data really enters (not a hard-coded 0.5)
    torch.testing.assert_close(c_skip(t, u, 0.7), (0.49 + t * u) / (0.49 + t**2), rtol=1e-6, atol=0)


def test_bcm_forward_is_the_preconditioned_unet(tiny_bcm):
    """``f(x, t, u) = c_skip x + c_out F(c_in x, 250 ln t, 250 ln u)`` (spec §2), per sample in a batch."""
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    t, u = torch.tensor([0.3, 6.0, 80.0]), torch.tensor([2.0, 0.002, 0.11])
    sd = 0.5
    b = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    F_x = tiny_bcm.net(x / b((sd**2 + t**2).sqrt()), 250 * t.log(), 250 * u.log())
    want = b((sd**2 + t * u) / (sd**2 + t**2)) * x + b(sd * (t - u) / (sd**2 + t**2).sqrt()) * F_x
    got = tiny_bcm(x, t, u)
    assert F_x.abs().mean() > 1e-2  # the fixture's network is not trivial
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unet_output_depends_on_u_and_t_separately(tiny_bcm):
    """F(x, c_noise(t), c_noise(u)) changes with u at fixed t, with t at fixed u, and when t and u swap
    (tests/test_bcm.py checks the same through f)."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def net(t, u):
        return tiny_bcm.net(x, torch.full((2,), 250 * math.log(t)), torch.full((2,), 250 * math.log(u)))

    base = net(2.0, 0.002)
    for other in (net(2.0, 0.5), net(0.5, 0.002), net(0.002, 2.0)):
        assert (other - base).abs().mean() > 1e-3 * base.abs().mean()


# --- trainer: EMA and start_step -------------------------------------------------------------------------

def _small(images):
    return F.avg_pool2d(images[:16].float(), 2).to(torch.uint8)


def test_ema_is_the_average_of_the_online_weights_after_each_step(tmp_path, tiny_images):
    """AveragedModel's EMA: e_1 = w_1, e_k = d e_{k-1} + (1 - d) w_k, with w_k the weights *after* step k."""
    decay = 0.8
    torch.manual_seed(0)
    trainer = Trainer(tiny_preset(batch_size=4, lr=1e-2, ema_decay=decay), tmp_path, images=_small(tiny_images))
    expected = None
    for _ in range(3):
        trainer.train_step()
        online = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        expected = online if expected is None else {k: decay * expected[k] + (1 - decay) * online[k] for k in online}
    ema = trainer.ema.module.state_dict()
    moved = 0
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-7, msg=k)
        moved += not torch.equal(ema[k], trainer.model.state_dict()[k])
    assert moved  # the EMA lags the online weights, so the check is not vacuous


def test_start_step_continues_the_curriculum(tmp_path, tiny_images):
    images = _small(tiny_images)
    first = Trainer(tiny_preset(batch_size=4), tmp_path / "a", images=images)
    first.run(max_steps=1, progress=False)
    ckpt = str(tmp_path / "a" / "checkpoint.pt")
    # total_steps 1000: K' = 125, so step 250 is the third stage, N = 41
    trainer = Trainer(tiny_preset(batch_size=4), tmp_path / "b", images=images, init_from=ckpt, start_step=250)
    assert trainer.step == 250
    for k, v in load_checkpoint(ckpt, ("ema",))["ema"].items():
        assert torch.equal(trainer.model.state_dict()[k], v)
    assert trainer.train_step()["N"] == 41 and trainer.step == 251
    with pytest.raises(ValueError, match="init_from"):
        Trainer(tiny_preset(), tmp_path / "c", images=images, start_step=250)
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="start_step"):
            Trainer(tiny_preset(), tmp_path / "d", images=images, init_from=ckpt, start_step=bad)


@pytest.mark.parametrize("soft_start", ["n", "n+1"])
def test_one_z_is_shared_by_every_pass_of_eq15(monkeypatch, soft_start):
    """Eq. 15 has one z per sample: x + t_n z (target and, for soft_start "n", the soft term's start) and
    x + t_{n+1} z (CT pass) are the same draw. Here every randn_like call returns a *new* normal draw, so a
    term that draws its own noise no longer equals Eq. 15 with the first draw (the fixed_draws fixture hands
    every call the same z and cannot see this)."""
    draws = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(2))
    calls = []

    def randn_like(like, **kw):
        calls.append(None)
        return draws[len(calls) - 1].clone().to(like)

    monkeypatch.setattr(torch, "randn_like", randn_like)
    monkeypatch.setattr(purify.bct, "sample_index_pair",
                        lambda p, batch, exclude_offset=0, generator=None: (N_IDX[:batch].clone(), N2_IDX[:batch].clone()))
    model = AnalyticModel().eval()                      # no dropout: mask of ones
    x = _batch()
    terms = BCTLoss(LossConfig(soft_start=soft_start), total_steps=800, eps=EPS, T=T)(model, x, step=0)
    assert len(calls) == 1
    ct, soft = hand_eq15(x.double(), draws[0].double(), eq22(11), N_IDX, N2_IDX, torch.ones(SHAPE, dtype=torch.float64),
                         (model.w.detach().double(), model.v.detach().double()), soft_start=soft_start)
    torch.testing.assert_close(terms["ct"].double(), ct, rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["soft"].double(), soft, rtol=1e-4, atol=0)
