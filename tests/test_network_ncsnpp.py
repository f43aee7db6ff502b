"""The NCSN++ options of the U-Net (issue 16): Fourier embedding, FIR resampling, residual encoder path, additive
conditioning, attention after the last decoder block of a level; the paper preset uses all five, and the default
network (the shipped small BCM) is unchanged by them."""
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_network
from purify.bcm import BCM, BCMConfig
from purify.network import FourierEmbedding, InputResidual, NetworkConfig, Resample, ResBlock, SelfAttention, UNet
from purify.presets import load_preset
from purify.purifier import load_bcm, shipped_bcm_path


def perturb_zero_init(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter that starts at zero (output conv, last layer of each branch, norm shifts) a small
    seeded random value, so that F is not zero and gradients reach every layer."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if not p.detach().any():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_paper_preset_is_ncsnpp_and_runs_forward_and_backward_on_cpu():
    network = load_preset("cifar10-paper").model.network
    assert (network.embedding_type, network.noise_mult, network.fourier_scale) == ("fourier", 2, 16.0)
    assert network.resample_filter == [1, 3, 3, 1] and network.encoder_type == "residual"
    assert (network.conditioning, network.decoder_attention, network.time_inputs) == ("additive", "last", 2)
    torch.manual_seed(0)
    bcm = BCM(load_preset("cifar10-paper").model).train()  # dropout 0.3 active
    net = bcm.net
    assert isinstance(net.map_noise, FourierEmbedding) and net.map_noise.freqs.shape == (128,)
    assert net.map_layer0.in_features == 2 * 256  # 256 Fourier features for t, 256 for u
    assert sorted(net.encoder_residual) == ["4", "9"]  # after the two down-sampling blocks
    fir = torch.tensor([1.0, 3.0, 3.0, 1.0])
    resamplers = [m for m in net.modules() if isinstance(m, Resample)]
    assert len(resamplers) == 6  # 2 down blocks, 2 up blocks, 2 residual-path levels
    for resample in resamplers:
        gain = 4 if resample.direction == "up" else 1
        assert torch.equal(resample.kernel[0, 0], gain * torch.outer(fir, fir) / 64)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 33 and all(b.additive and b.affine.out_features == b.conv0.out_channels for b in blocks)
    # NCSN++'s attention: the four 16x16 encoder blocks, the first 8x8 middle block, the last 16x16 decoder block
    attention = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert len(attention) == 6 and all(a.heads == 1 for a in attention)

    perturb_zero_init(bcm)
    x = torch.randn(2, 3, 32, 32)
    out = bcm(x, torch.tensor([1.0, 20.0]), torch.tensor([0.002, 40.0]))
    assert out.shape == x.shape and out.isfinite().all()
    out.square().mean().backward()
    for name, p in bcm.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.any(), name


def test_fourier_embedding_matches_hand_computation_and_is_saved():
    embedding = FourierEmbedding(8, scale=16.0)
    f = embedding.freqs.double()
    assert f.shape == (4,) and f.abs().max() > 1  # N(0, 16^2) draws, not unit-scale ones
    x = torch.tensor([-0.3, 0.0, 0.05, 0.7])
    angles = 2 * math.pi * f[None, :] * x.double()[:, None]
    expected = torch.cat([angles.cos(), angles.sin()], dim=1)  # cos block first, then sin
    torch.testing.assert_close(embedding(x).double(), expected, rtol=0, atol=1e-4)
    # the frequencies are fixed: the same for every build, exactly proportional to the scale, not trained
    assert torch.equal(FourierEmbedding(8, scale=16.0).freqs, embedding.freqs)
    assert torch.equal(FourierEmbedding(8, scale=1.0).freqs * 16, embedding.freqs)
    config = dataclasses.replace(tiny_network(), embedding_type="fourier")
    net = UNet(config)
    assert "map_noise.freqs" in net.state_dict()
    assert "map_noise.freqs" not in dict(net.named_parameters())
    # saved and loaded with the weights: a network whose frequencies differ gets the saved ones back
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    other = UNet(config)
    other.map_noise.freqs.mul_(2)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    assert torch.equal(other.map_noise.freqs, net.map_noise.freqs)


def test_fourier_embedding_leaves_the_weight_initialisation_alone():
    """The frequencies come from their own generator: with the same seed, the Fourier network's weights are the
    positional one's (same embedding width), and the global random stream continues identically."""
    nets, next_draws = [], []
    for kind in ("positional", "fourier"):
        torch.manual_seed(0)
        nets.append(UNet(dataclasses.replace(tiny_network(), embedding_type=kind)))
        next_draws.append(torch.rand(1))
    params = [dict(net.named_parameters()) for net in nets]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    assert torch.equal(next_draws[0], next_draws[1])


def test_fir_resampling_keeps_a_constant_and_matches_a_hand_computed_example():
    taps = [1, 3, 3, 1]
    down, up = Resample("down", taps), Resample("up", taps)
    constant = torch.full((1, 2, 16, 16), 5.0)
    low, high = down(constant), up(constant)
    assert low.shape == (1, 2, 8, 8) and high.shape == (1, 2, 32, 32)
    # normalised filter: a constant stays the constant except where the zero padding enters (one border pixel)
    torch.testing.assert_close(low[..., 1:-1, 1:-1], torch.full((1, 2, 6, 6), 5.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(high[..., 1:-1, 1:-1], torch.full((1, 2, 30, 30), 5.0), rtol=0, atol=1e-6)

    # 1-D by hand along the width (the image is constant down its height), k = [1, 3, 3, 1] / 8, padding 1:
    # down: y[i] = sum_j k[j] v[2i - 1 + j]; v = [0, 0, 8, 0, 0, 0, 0, 0] -> [1, 3, 0, 0]
    v = torch.tensor([0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    y = down(v.expand(1, 1, 8, 8))
    torch.testing.assert_close(y[0, 0, 1:-1], torch.tensor([1.0, 3.0, 0.0, 0.0]).expand(2, 4))
    # border rows lose the padded tap 1/8 of the height filter
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([1.0, 3.0, 0.0, 0.0]) * 7 / 8)
    # up: the filter is 4 k k^T, i.e. 2 k = [1, 3, 3, 1] / 4 per axis: out[2i + j - 1] += 2 k[j] v[i];
    # v = [0, 4, 0, 0] -> [0, 1, 3, 3, 1, 0, 0, 0]
    v = torch.tensor([0.0, 4.0, 0.0, 0.0])
    y = up(v.expand(1, 1, 4, 4))
    torch.testing.assert_close(y[0, 0, 1:-1], torch.tensor([0.0, 1.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0]).expand(6, 8))

    # the default filter [1, 1] is exactly average pooling and nearest-neighbour up-sampling
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(Resample("down", [1, 1])(x), F.avg_pool2d(x, 2))
    assert torch.equal(Resample("up", [1, 1])(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_residual_encoder_path_changes_the_output_and_has_the_pyramid_shapes():
    config = dataclasses.replace(tiny_network(), encoder_type="residual", resample_filter=[1, 3, 3, 1])
    torch.manual_seed(0)
    residual = UNet(config).eval()
    perturb_zero_init(residual)
    # tiny network: channel_mult [1, 2, 2], one block per level -> down blocks at encoder indices 1 and 3
    assert sorted(residual.encoder_residual) == ["1", "3"]
    levels = [residual.encoder_residual["1"], residual.encoder_residual["3"]]
    assert all(isinstance(level, InputResidual) for level in levels)
    assert [tuple(level.conv.weight.shape[:2]) for level in levels] == [(8, 3), (16, 8)]  # image -> 8 -> 16 ch

    shapes = []
    hooks = [level.register_forward_hook(lambda module, args, out: shapes.append(
        (tuple(args[0].shape), tuple(args[1].shape), tuple(out.shape)))) for level in levels]
    x, t, u = torch.randn(2, 3, 32, 32), torch.tensor([2.0, 30.0]), torch.tensor([-1.0, 4.0])
    with torch.no_grad():
        out = residual(x, t, u)
    for hook in hooks:
        hook.remove()
    # (pyramid in, block output, sum): the image at 32x32, then the first sum at 16x16 feeds the second level
    assert shapes == [((2, 3, 32, 32), (2, 8, 16, 16), (2, 8, 16, 16)),
                      ((2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 8, 8))]

    # one level by hand: with an identity 3x3 convolution, h' = (h + down(a)) / sqrt(2); a constant 2, h = 1
    level = InputResidual(2, 2, [1, 3, 3, 1])
    with torch.no_grad():
        level.conv.weight.zero_()
        level.conv.weight[[0, 1], [0, 1], 1, 1] = 1.0
        level.conv.bias.zero_()
        combined = level(torch.full((1, 2, 16, 16), 2.0), torch.ones(1, 2, 8, 8))
    assert combined.shape == (1, 2, 8, 8)
    torch.testing.assert_close(combined[..., 1:-1, 1:-1], torch.full((1, 2, 6, 6), 3 / math.sqrt(2)))

    # the same weights without the residual path: every other key loads strictly, and the output differs
    standard = UNet(dataclasses.replace(config, encoder_type="standard")).eval()
    standard.load_state_dict({k: v for k, v in residual.state_dict().items()
                              if not k.startswith("encoder_residual.")}, strict=True)
    with torch.no_grad():
        assert not torch.allclose(standard(x, t, u), out, rtol=1e-3, atol=1e-4)


def _norm1_inputs_and_output(block: ResBlock, x: torch.Tensor, emb: torch.Tensor):
    seen = []
    hook = block.norm1.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = block(x, emb)
    hook.remove()
    return seen[0], out


def test_additive_conditioning_shifts_by_the_embedding_without_a_scale():
    """NCSN++ (EDM's adaptive_scale=False): the block adds one vector A e + b per channel to conv0's output before
    norm1, h = silu(norm1(conv0(.) + A e + b)); scale-shift leaves norm1's input alone and modulates its output."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 6)
    other = emb + torch.randn(2, 6)
    additive = ResBlock(4, 8, emb_channels=6, dropout=0.0, conditioning="additive").eval()
    perturb_zero_init(additive)
    assert additive.affine.out_features == 8  # one vector: no scale half
    norm_in, out = _norm1_inputs_and_output(additive, x, emb)
    norm_in_other, out_other = _norm1_inputs_and_output(additive, x, other)
    shift = additive.affine(emb) - additive.affine(other)
    torch.testing.assert_close(norm_in - norm_in_other, shift.detach()[:, :, None, None].expand(2, 8, 8, 8))
    assert not torch.allclose(out, out_other, atol=1e-4)
    with torch.no_grad():  # the whole block by hand
        h = additive.conv0(F.silu(additive.norm0(x))) + additive.affine(emb)[:, :, None, None]
        h = additive.conv1(F.silu(additive.norm1(h)))
        torch.testing.assert_close(out, (additive.skip(x) + h) / math.sqrt(2))

    scale_shift = ResBlock(4, 8, emb_channels=6, dropout=0.0).eval()
    perturb_zero_init(scale_shift)
    assert scale_shift.affine.out_features == 16  # a scale and a shift per channel
    norm_in, out = _norm1_inputs_and_output(scale_shift, x, emb)
    norm_in_other, out_other = _norm1_inputs_and_output(scale_shift, x, other)
    assert torch.equal(norm_in, norm_in_other) and not torch.allclose(out, out_other, atol=1e-4)


def _attention_sites(config: NetworkConfig) -> list[tuple[str, int, int]]:
    """(part, resolution, index of the block in the encoder's or decoder's list) of every attention layer that
    runs in a forward pass."""
    net = UNet(config).eval()
    sites, hooks = [], []
    for part in ("encoder", "decoder"):
        for index, block in enumerate(getattr(net, part)):
            if block.attention is not None:
                hooks.append(block.attention.register_forward_hook(
                    lambda m, args, out, part=part, position=index: sites.append((part, args[0].shape[-1], position))))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32), torch.zeros(1), torch.zeros(1))
    for hook in hooks:
        hook.remove()
    return sites


def test_decoder_attention_every_block_or_last_of_each_level():
    """EDM's SongUNet: every encoder block at an attention resolution attends; in the decoder the first block of
    the lowest level always does, and at an attention resolution only the last block of the level (NCSN++)."""
    config = dataclasses.replace(tiny_network(), num_blocks=2, attn_resolutions=[16])
    # encoder: conv, [32: 2 blocks], down, [16: 2 blocks], down, [8: 2 blocks] -> blocks 0-1, 2 (down), 3-4, ...
    # decoder: [8: in0 (attends), in1, 3 blocks], up, [16: 3 blocks], up, [32: 3 blocks]
    every = _attention_sites(dataclasses.replace(config, decoder_attention="every"))
    last = _attention_sites(dataclasses.replace(config, decoder_attention="last"))
    assert every == [("encoder", 16, 3), ("encoder", 16, 4), ("decoder", 8, 0),
                     ("decoder", 16, 6), ("decoder", 16, 7), ("decoder", 16, 8)]
    assert last == [("encoder", 16, 3), ("encoder", 16, 4), ("decoder", 8, 0), ("decoder", 16, 8)]
    # two attention resolutions: one decoder attention per level, after its last block
    both = _attention_sites(dataclasses.replace(config, attn_resolutions=[16, 32], decoder_attention="last"))
    assert [site for site in both if site[0] == "decoder"] == [("decoder", 8, 0), ("decoder", 16, 8),
                                                              ("decoder", 32, 12)]


@pytest.mark.parametrize("bad, field", [
    ({"embedding_type": "gaussian"}, "embedding_type"),
    ({"encoder_type": "skip"}, "encoder_type"),
    ({"resample_filter": [1, 3, 3]}, "resample_filter"),
    ({"resample_filter": [1]}, "resample_filter"),
    ({"resample_filter": [1, -1]}, "resample_filter"),
    ({"noise_mult": 0}, "noise_mult"),
    ({"fourier_scale": 0.0}, "fourier_scale"),
    ({"conditioning": "film"}, "conditioning"),
    ({"conditioning": "adaptive"}, "conditioning"),
    ({"decoder_attention": "first"}, "decoder_attention"),
    ({"decoder_attention": True}, "decoder_attention"),
    ({"time_inputs": 3}, "time_inputs"),
    ({"time_inputs": 0}, "time_inputs"),
])
def test_bad_ncsnpp_options_are_one_line_errors_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=f"network.{field}") as err:
        NetworkConfig(**bad)
    assert "\n" not in str(err.value)


# BCM output of the shipped small checkpoint on the input below, recorded with the code before the NCSN++
# options were added: mean, mean |.|, and out[:, 0, ::11, ::11]
SMALL_REFERENCE_MEAN, SMALL_REFERENCE_ABS_MEAN = -0.03806935250759125, 3.6678097248077393
SMALL_REFERENCE_PIXELS = [
    [[0.1293017864227295, 0.11414238065481186, 0.057638294994831085],
     [-0.02837439998984337, -0.006421509198844433, 0.35286957025527954],
     [-0.045728474855422974, -0.06234642118215561, 0.0949380099773407]],
    [[6.804224491119385, 12.992362022399902, -17.697826385498047],
     [8.679162979125977, 17.845924377441406, 1.6176629066467285],
     [-6.034649848937988, -13.263826370239258, -17.496793746948242]],
]


def test_small_preset_and_shipped_checkpoint_are_unchanged():
    """The default network gained no state_dict key (the checkpoint loads strictly into a fresh build of the
    small preset) and computes what it computed before: denoising at t = 1 and inverting 0.3 -> 6."""
    bcm, preset = load_bcm(shipped_bcm_path("cifar10-small"))  # strict load
    assert preset.model.network == load_preset("cifar10-small").model.network
    network = preset.model.network  # the checkpoint's config predates the options: it gets their defaults
    assert (network.conditioning, network.decoder_attention, network.time_inputs) == ("scale-shift", "every", 2)
    assert list(BCM(load_preset("cifar10-small").model).state_dict()) == list(bcm.state_dict())
    assert not [k for k in bcm.state_dict() if "freqs" in k or "encoder_residual" in k]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 3, 32, 32, generator=g)
    t, u = torch.tensor([1.0, 0.3]), torch.tensor([0.002, 6.0])
    with torch.no_grad():
        out = bcm.eval()(x + t.view(-1, 1, 1, 1) * z, t, u)
    assert out.mean().item() == pytest.approx(SMALL_REFERENCE_MEAN, abs=1e-5)
    assert out.abs().mean().item() == pytest.approx(SMALL_REFERENCE_ABS_MEAN, rel=1e-5)
    torch.testing.assert_close(out[:, 0, ::11, ::11], torch.tensor(SMALL_REFERENCE_PIXELS), rtol=1e-4, atol=1e-5)
