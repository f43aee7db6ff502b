"""The defence registry: every defence's interface, seeding, cost metadata, bad input and the registry's errors;
the reverse-diffusion purifier against the exact probability-flow map of Gaussian data."""
import math

import pytest
import torch
from torch import nn
from torchvision.io import decode_jpeg, encode_jpeg

from conftest import tiny_preset
from purify import DEFENCES, BCMPurifier, DiffusionPurifier, image_noise, make_defence, parse_defence
from purify.base import Defence
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict
from purify.defences import BitDepth, JPEG, MedianSmoothing, Vote, majority_vote
from purify.sampling import sample_reverse_diffusion


@pytest.fixture
def bcm_path(tmp_path, tiny_bcm):
    preset = tiny_preset()
    preset.purifier.t_star, preset.purifier.eps_inv = 0.5, 0.1
    save_checkpoint({"kind": "bcm", "config": to_dict(preset), "ema": tiny_bcm.state_dict()}, tmp_path / "bcm.pt")
    return tmp_path / "bcm.pt"


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 8, 8, generator=g)
    return nn.functional.interpolate(small, size=32, mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("name, options, spec, nfe, differentiable, randomized", [
    ("none", {}, "none", 0, True, False),
    ("bcm", {}, "bcm(eps_inv=0.1, t_star=0.5)", 2, True, True),
    ("bcm", {"t_star": 2.0, "inversion_times": [1.0]}, "bcm(eps_inv=0.1, inversion_times=[1], t_star=2)", 3, True,
     True),
    ("denoise", {"t_star": 0.3}, "denoise(t_star=0.3)", 1, True, True),
    ("bcm", {"rounds": 3}, "bcm(eps_inv=0.1, rounds=3, t_star=0.5)", 6, True, True),
    ("diffusion", {"steps": 5}, "diffusion(solver=sde, steps=5, t_star=0.5)", 5, True, True),
    ("diffusion", {"steps": 4, "solver": "ode"}, "diffusion(solver=ode, steps=4, t_star=0.5)", 4, True, True),
    ("jpeg", {"quality": 50}, "jpeg(quality=50)", 0, False, False),
    ("bits", {}, "bits(bits=5)", 0, False, False),
    ("median", {"size": 5}, "median(size=5)", 0, True, False),
    ("vote", {"n": 3, "t_star": 1.0}, "vote(base=bcm(eps_inv=0.1, t_star=1), how=majority, n=3)", 6, False, True),
    ("vote", {"base": "diffusion", "steps": 2, "how": "logits"},
     "vote(base=diffusion(solver=sde, steps=2, t_star=0.5), how=logits, n=10)", 20, True, True),
])
def test_each_defence_builds_by_name_with_its_settings_and_cost(bcm_path, name, options, spec, nfe, differentiable,
                                                                randomized):
    defence = make_defence(name, checkpoint=bcm_path, seed=0, **options)
    assert isinstance(defence, Defence)
    assert (defence.spec(), defence.nfe, defence.differentiable, defence.randomized) == (
        spec, nfe, differentiable, randomized)
    if name != "vote":
        x = images()
        out = defence(x)
        assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1


def test_the_registry_lists_every_defence_the_issue_names():
    assert set(DEFENCES) == {"none", "bcm", "denoise", "diffusion", "jpeg", "bits", "median", "vote"}


@pytest.mark.parametrize("name, kwargs, message", [
    ("nosuch", {}, "unknown defence 'nosuch'; known defences: none, bcm"),
    ("jpeg", {"qualty": 50}, "unknown option.*qualty.*valid: quality"),
    ("bcm", {"steps": 3}, "unknown option.*steps.*valid: t_star, eps_inv"),
    ("diffusion", {"eps_inv": 0.1}, "unknown option.*eps_inv"),
    ("bcm", {"checkpoint": None}, "needs a BCM checkpoint"),
    ("bcm", {"checkpoint": "/nonexistent/bcm.pt"}, "no BCM checkpoint at /nonexistent/bcm.pt"),
    ("vote", {"base": "vote"}, "not another vote"),
    ("vote", {"n": 0}, "positive integer"),
    ("vote", {"how": "mean"}, "how must be one of"),
    ("jpeg", {"quality": 0}, r"quality must be an integer in \[1, 100\]"),
    ("bits", {"bits": 9}, r"bits must be an integer in \[1, 8\]"),
    ("median", {"size": 2}, "odd positive integer"),
    ("diffusion", {"steps": 0}, "steps must be a positive integer"),
    ("diffusion", {"solver": "heun"}, "solver must be one of"),
    ("diffusion", {"t_star": 100.0}, r"t_star must be in"),
])
def test_registry_errors_name_the_problem(bcm_path, name, kwargs, message):
    kwargs = {"checkpoint": bcm_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_defence(name, **kwargs)


@pytest.mark.parametrize("name", ["none", "jpeg", "bits", "median", "bcm", "diffusion"])
@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 32, 32), "4-D"),
    (torch.rand(2, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "dtype"),
    (torch.rand(0, 3, 32, 32), "empty batch"),
])
def test_bad_input_is_a_clear_error_for_every_defence(bcm_path, name, bad, message):
    defence = make_defence(name, checkpoint=bcm_path, steps=2) if name == "diffusion" else \
        make_defence(name, checkpoint=bcm_path)
    with pytest.raises(ValueError, match=message):
        defence(bad)


def test_a_vote_returns_no_images():
    with pytest.raises(ValueError, match="use vote.wrap"):
        Vote(JPEG(), n=2)(images())


@pytest.mark.parametrize("text, parsed", [
    ("jpeg", ("jpeg", {})),
    ("jpeg:quality=50", ("jpeg", {"quality": 50})),
    ("bcm:t_star=2,eps_inv=0.3", ("bcm", {"t_star": 2, "eps_inv": 0.3})),
    ("bcm:inversion_times=[0.5, 1],t_star=2", ("bcm", {"inversion_times": [0.5, 1], "t_star": 2})),
    ("vote:base=diffusion,n=4,solver=ode", ("vote", {"base": "diffusion", "n": 4, "solver": "ode"})),
])
def test_parse_defence_specs(text, parsed):
    assert parse_defence(text) == parsed


def test_the_shipped_defence_files_resolve_by_name(bcm_path):
    assert parse_defence("diffpure") == ("diffusion", {"t_star": 1.0, "steps": 100, "solver": "sde"})
    name, options = parse_defence("bcm-vote10")
    assert make_defence(name, checkpoint=bcm_path, **options).spec() == \
        "vote(base=bcm(eps_inv=0.1, t_star=0.5), how=majority, n=10)"
    name, options = parse_defence("bcm-robust")
    assert make_defence(name, checkpoint=bcm_path, eps_inv=0.3, **options).spec() == \
        "vote(base=bcm(eps_inv=0.25, t_star=0.5), how=majority, n=10)"
    name, options = parse_defence("bcm-noisy")
    assert make_defence(name, checkpoint=bcm_path, **options).spec() == \
        "vote(base=bcm(eps_inv=0.7, t_star=1.4), how=majority, n=10)"


def test_parse_defence_reads_yaml_files_and_rejects_bad_specs(tmp_path):
    path = tmp_path / "strong.yaml"
    path.write_text("name: vote\nbase: bcm\nn: 5\nt_star: 2.0\n")
    assert parse_defence(str(path)) == ("vote", {"base": "bcm", "n": 5, "t_star": 2.0})
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    with pytest.raises(ValueError, match="mapping with a 'name' key"):
        parse_defence(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        parse_defence(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="write key=value"):
        parse_defence("jpeg:quality")


@pytest.mark.parametrize("name, options", [("bcm", {}), ("denoise", {}), ("diffusion", {"steps": 3}),
                                           ("diffusion", {"steps": 3, "solver": "ode"})])
def test_randomized_defences_are_seeded_and_use_per_image_noise(bcm_path, name, options):
    x = images(6)
    a = make_defence(name, checkpoint=bcm_path, seed=3, **options)
    b = make_defence(name, checkpoint=bcm_path, seed=3, **options)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), make_defence(name, checkpoint=bcm_path, seed=4, **options)(x))
    # per-image noise: purifying the batch at once or in two halves gives the same images
    ids = torch.arange(10, 16)
    noise = image_noise(ids, a.noise_shape(x.shape[1:]), seed=0)
    with a.fixed_noise(noise):
        whole = a(x)
    halves = []
    for part in (slice(0, 2), slice(2, 6)):
        with a.fixed_noise(image_noise(ids[part], a.noise_shape(x.shape[1:]), seed=0)):
            halves.append(a(x[part]))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        with a.fixed_noise(noise[:, 0] if noise.ndim == 5 else noise[:3]):
            a(x)


@pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
def test_jpeg_is_torchvisions_codec_and_loses_more_at_low_quality():
    x = images(3)
    pixels = (x * 255).round().to(torch.uint8)
    expected = torch.stack(decode_jpeg(encode_jpeg(list(pixels), quality=30))).float() / 255
    assert torch.equal(JPEG(30)(x), expected)
    errors = [(JPEG(q)(x) - x).abs().mean().item() for q in (10, 50, 95)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03


def test_bit_depth_by_hand():
    x = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.5, 0.84, 1.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7).contiguous()
    out = BitDepth(2)(x)[0, 0, 0]  # levels 0, 1/3, 2/3, 1
    torch.testing.assert_close(out, torch.tensor([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1]))
    assert set(BitDepth(1)(images()).unique().tolist()) <= {0.0, 1.0}


def test_median_removes_an_isolated_spike_and_keeps_edges():
    x = torch.full((1, 3, 9, 9), 0.25)
    x[:, :, :, 5:] = 0.75            # a vertical edge
    spiked = x.clone()
    spiked[:, :, 2, 2] = 1.0          # an isolated outlier
    torch.testing.assert_close(MedianSmoothing(3)(spiked), x)


def test_gradients_reach_the_input_through_the_differentiable_defences(bcm_path):
    x = images(2).requires_grad_(True)
    for name, options in (("bcm", {}), ("diffusion", {"steps": 3}), ("median", {})):
        grad, = torch.autograd.grad(make_defence(name, checkpoint=bcm_path, **options)(x).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


class _Cycle(Defence):
    """A randomized stand-in whose k-th call returns the k-th of some fixed images."""
    randomized = True

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def purify(self, images):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


class _Brightness(nn.Module):
    """Class = round(9 * mean brightness); logits peaked at it."""

    def forward(self, x):
        label = (x.mean((1, 2, 3)) * 9).round().long()
        return nn.functional.one_hot(label, 10).float() * 5


def test_vote_takes_the_majority_of_n_purifications_and_mean_logits():
    a, b = torch.full((1, 3, 4, 4), 2 / 9), torch.full((1, 3, 4, 4), 7 / 9)
    voted = Vote(_Cycle([a, b, a]), n=3).wrap(_Brightness())
    scores = voted(torch.rand(1, 3, 4, 4))
    assert scores.argmax(1).item() == 2 and scores[0, 2].item() == pytest.approx(2 / 3)
    assert scores[0, 7].item() == pytest.approx(1 / 3)
    mean = Vote(_Cycle([a, b, b]), n=3, how="logits").wrap(_Brightness())(torch.rand(1, 3, 4, 4))
    assert mean.argmax(1).item() == 7 and mean[0, 7].item() == pytest.approx(10 / 3)


def test_a_tied_majority_vote_goes_to_the_smallest_label():
    assert majority_vote(torch.tensor([3, 3, 5, 5])).item() == 3
    assert majority_vote(torch.tensor([5, 5, 3, 3])).item() == 3  # whatever the order of the votes
    votes = torch.tensor([[7, 1, 4], [2, 9, 4], [7, 9, 0], [2, 1, 0]])  # 4 draws x 3 images, each a 2-2 tie
    assert majority_vote(votes).tolist() == [2, 1, 0]
    assert majority_vote(torch.tensor([[5, 1], [3, 1], [5, 6]])).tolist() == [5, 1]  # no tie: the majority
    # the deployed vote decides the same: its vote shares' argmax
    a, b = torch.full((1, 3, 4, 4), 3 / 9), torch.full((1, 3, 4, 4), 5 / 9)
    scores = Vote(_Cycle([b, a, b, a]), n=4).wrap(_Brightness())(torch.rand(1, 3, 4, 4))
    assert scores[0, 3] == scores[0, 5] == 0.5 and scores.argmax(1).item() == 3


def test_reverse_diffusion_matches_the_exact_maps_of_gaussian_data():
    """For data ~ N(0, s^2) the exact denoiser is D(x, t) = s^2/(s^2 + t^2) x; the probability-flow ODE maps
    x_t to x_t s / sqrt(s^2 + t^2), and the reverse SDE turns N(0, s^2 + t^2) samples into N(0, s^2) ones."""
    s, t_star = 0.5, 2.0
    denoiser = lambda x, t, u: s * s / (s * s + t * t) * x  # noqa: E731
    times = [*torch.linspace(t_star, 0.002, 400).tolist(), 0.0]
    x_t = torch.linspace(-3, 3, 13)[:, None]
    ode = sample_reverse_diffusion(denoiser, x_t, times, "ode")
    torch.testing.assert_close(ode, x_t * s / math.sqrt(s * s + t_star * t_star), rtol=2e-2, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    n, steps = 20000, len(times) - 1
    x_t = torch.randn(n, 1, generator=g) * math.sqrt(s * s + t_star * t_star)
    noise = torch.randn(n, steps, 1, generator=g)
    sde = sample_reverse_diffusion(denoiser, x_t, times, "sde", noise=noise)
    assert sde.std().item() == pytest.approx(s, rel=0.03)
    # one SDE step by hand: x_s = D + (s/t)^2 (x_t - D) + (s/t) sqrt(t^2 - s^2) z
    x, z = torch.tensor([[1.0]]), torch.tensor([[[0.0]], [[0.7]]]).reshape(1, 2, 1)
    one = sample_reverse_diffusion(lambda x, t, u: 0.5 * x, x, [2.0, 1.0, 0.0], "sde", noise=z)
    d1 = 0.5  # D at t=2
    x1 = d1 + 0.25 * (1.0 - d1) + 0.5 * math.sqrt(3.0) * 0.7
    assert one.item() == pytest.approx(0.5 * x1)  # the last step lands on D(x_1, 1)


def test_diffusion_purifier_calls_the_u0_branch_on_a_decreasing_karras_grid(tiny_bcm):
    calls = []
    forward = tiny_bcm.forward
    tiny_bcm.forward = lambda x, t, u: calls.append((float(t), float(u))) or forward(x, t, u)
    DiffusionPurifier(tiny_bcm, t_star=1.0, steps=4, solver="ode")(images(1))
    ts = [t for t, _ in calls]
    assert len(calls) == 4 and all(u == 0.002 for _, u in calls)
    assert ts[0] == pytest.approx(1.0) and ts[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(ts, ts[1:]))
    rho = 7  # Karras spacing: t^(1/rho) is uniform
    roots = [t ** (1 / rho) for t in ts]
    torch.testing.assert_close(torch.tensor(roots).diff(), torch.full((3,), (roots[-1] - roots[0]) / 3))


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_diffusion_purifier_returns_images_on_the_inputs_scale(tiny_bcm, monkeypatch, solver):
    """With a denoiser that knows the clean image (on the network's [-1, 1] scale) every step lands on it, so
    the purifier must give back its input: the [0, 1] -> [-1, 1] -> [0, 1] round trip, not the [-1, 1] image."""
    x = images(3)
    x[0, 0] = 0.0  # the ends of the range too
    x[0, 1] = 1.0
    monkeypatch.setattr(tiny_bcm, "forward", lambda x_t, t, u: x * 2 - 1)
    out = DiffusionPurifier(tiny_bcm, t_star=0.5, steps=4, solver=solver, seed=0)(x)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_bcm_defence_from_the_registry_is_the_purifier(bcm_path):
    defence = make_defence("bcm", checkpoint=bcm_path, seed=0, t_star=2.0, eps_inv=0.3)
    reference = BCMPurifier.from_checkpoint(bcm_path, seed=0, t_star=2.0, eps_inv=0.3)
    x = images()
    assert torch.equal(defence(x), reference(x))


@pytest.mark.parametrize("mode", ["bcm", "denoise"])
def test_rounds_purify_the_last_rounds_output_again_with_fresh_noise(bcm_path, mode):
    x = images(3)  # as many images as rounds, so noise indexed [r] instead of [:, r] has the right shape
    several = make_defence(mode, checkpoint=bcm_path, rounds=3, t_star=1.0)
    once = make_defence(mode, checkpoint=bcm_path, t_star=1.0)
    assert several.noise_shape(x.shape[1:]) == (3, *x.shape[1:])
    noise = torch.randn(3, 3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    expected = x
    for r in range(3):
        with once.fixed_noise(noise[:, r]):
            expected = once(expected)
    with several.fixed_noise(noise):  # up to float32 rounding, which three rounds of the random tiny net amplify
        torch.testing.assert_close(several(x), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="rounds must be a whole number >= 1"):
        make_defence(mode, checkpoint=bcm_path, rounds=0)
