"""Network and parameterization (spec §2)."""
import pytest
import torch

from purify.bcm import BCM, c_in, c_out, c_skip, c_skip_ct, parameter_count
from purify.presets import load_preset

TIMES = torch.tensor([0.002, 0.01, 0.11, 0.5, 1.0, 6.0, 80.0], dtype=torch.float64)


def test_boundary_condition_f_x_t_t_is_identity(tiny_bcm):
    torch.manual_seed(1)
    # Make F non-trivial first: the output conv is zero-initialised, which alone would give f = c_skip x.
    for p in tiny_bcm.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(4, 3, 32, 32)
    for t in [0.002, 0.3, 5.0, 80.0]:
        assert torch.equal(tiny_bcm(x, t, t), x)
    t = torch.tensor([0.01, 1.0, 20.0, 80.0])
    assert torch.equal(tiny_bcm(x, t, t), x)
    assert not torch.allclose(tiny_bcm(x, 1.0, 0.5), x, atol=1e-3)


def test_coefficients_at_u_equal_t():
    assert torch.equal(c_skip(TIMES, TIMES, 0.5), torch.ones_like(TIMES))
    assert torch.equal(c_out(TIMES, TIMES, 0.5), torch.zeros_like(TIMES))


def test_reduces_to_consistency_model_form_at_u_eps():
    """Paper Appendix B: c_in and c_out equal the CM form (Eq. 25) at u = eps; c_skip differs negligibly."""
    eps, sd = 0.002, 0.5
    u = torch.full_like(TIMES, eps)
    cm_out = sd * (TIMES - eps) / (sd**2 + TIMES**2).sqrt()
    assert torch.allclose(c_out(TIMES, u, sd), cm_out, rtol=0, atol=1e-15)
    assert torch.allclose(c_in(TIMES, sd), 1 / (sd**2 + TIMES**2).sqrt())
    diff = (c_skip(TIMES, u, sd) - c_skip_ct(TIMES, sd, eps)).abs()
    assert diff.max() < 2e-3
    # ... but c_skip is the BCM form, exactly, not the CM one (whose value differs at u = eps by < 2e-3)
    torch.testing.assert_close(c_skip(TIMES, u, sd), (sd**2 + TIMES * eps) / (sd**2 + TIMES**2), rtol=1e-6, atol=0)
    assert (diff / c_skip(TIMES, u, sd)).max() > 1e-5
    assert c_skip(TIMES[:1], u[:1], sd).item() == pytest.approx(1.0, abs=1e-5)  # f(x, eps, eps) ~ x


def test_separate_t_and_u_embeddings_change_the_output(tiny_bcm):
    """F itself (not only c_skip and c_out) depends on u: F = (f - c_skip x) / c_out differs between targets."""
    for p in tiny_bcm.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    t, sd = torch.tensor(2.0), 0.5
    F_of = [(tiny_bcm(x, t, u) - c_skip(t, u, sd) * x) / c_out(t, u, sd)
            for u in (torch.tensor(0.002), torch.tensor(0.5))]
    assert not torch.allclose(F_of[0], F_of[1], rtol=1e-3, atol=1e-4)


def test_presets_build():
    """Paper preset: the CIFAR-10 NCSN++ U-Net (ch 128, mult 2-2-2, 4 blocks, attention at 16 after the last
    decoder block, Fourier embedding, FIR [1, 3, 3, 1], residual encoder path, additive conditioning) with the
    BCM's doubled embedding layers; small preset: the CPU network."""
    paper, small = load_preset("cifar10-paper"), load_preset("cifar10-small")
    n_paper = parameter_count(BCM(paper.model))
    n_small = parameter_count(BCM(small.model))
    # EDM's NCSN++ 56,395,523 + the doubled t/u embedding layers 1,180,672 + the blocks' conditioning layers
    # reading the doubled embedding 4,325,376 (docs/training.md)
    assert n_paper == 56_395_523 + 1_180_672 + 4_325_376 == 61_901_571
    assert 1_000_000 < n_small < 5_000_000
    assert paper.train.batch_size == 1024 and paper.train.total_steps == 400_000
    assert paper.train.ema_decay == 0.99993 and paper.purifier.t_star == 80.0


def test_channels_last_gives_the_same_output(tiny_bcm):
    x = torch.randn(2, 3, 32, 32)
    for p in tiny_bcm.parameters():
        p.data.normal_(0, 0.05)
    ref = tiny_bcm(x, 1.0, 0.002)
    fast = tiny_bcm.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), 1.0, 0.002)
    assert torch.allclose(ref, fast, atol=1e-5)
