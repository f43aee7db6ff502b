"""Fine-tuning a BCM from a single-time consistency model (spec §3, last bullet): the t-only network and its model,
the u input added so that f(x, t, eps) starts as the CT model's prediction, and the trainer's --init-from path."""
import dataclasses

import pytest
import torch

from conftest import tiny_network, tiny_preset
from purify.bcm import (CONSISTENCY_KIND, BCM, BCMConfig, ConsistencyModel, bcm_weights_from_consistency_model,
                        parameter_count)
from purify.infra.checkpoint import load_checkpoint
from purify.network import UNet, add_u_input
from purify.presets import load_preset
from purify.train import Trainer, main

# t from eps to T, with u = eps: the consistency model's only target time
TIMES = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])


def ct_preset(**train):
    """A tiny CT run whose network has no u input: what a single-time consistency model's checkpoint is here."""
    preset = tiny_preset(**train)
    preset.model.network = dataclasses.replace(preset.model.network, time_inputs=1)
    preset.loss.kind = "ct"
    return preset


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Small seeded random weights everywhere (the U-Net zero-initialises its last layers, so a fresh F is 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _images(images):
    return torch.nn.functional.avg_pool2d(images.float(), 2).to(torch.uint8)  # 16x16: four times cheaper


def test_single_time_network_is_the_ncsnpp_of_edm_and_takes_t_only():
    """The paper preset's network without u has exactly the parameter count of EDM's CIFAR-10 NCSN++ (SongUNet,
    its --arch ncsnpp settings): the t-only model a BCM is fine-tuned from in the authors' setting."""
    paper = load_preset("cifar10-paper").model
    single = dataclasses.replace(paper, network=dataclasses.replace(paper.network, time_inputs=1))
    assert parameter_count(ConsistencyModel(single)) == 56_395_523
    net = UNet(tiny_network())
    with pytest.raises(ValueError, match="takes 2 noise level"):
        net(torch.randn(1, 3, 32, 32), torch.zeros(1))
    with pytest.raises(ValueError, match="time_inputs = 2"):
        BCM(single)
    with pytest.raises(ValueError, match="time_inputs = 1"):
        ConsistencyModel(paper)


def test_consistency_model_is_the_bcm_form_at_u_eps_and_maps_to_eps_only():
    torch.manual_seed(0)
    cm = ConsistencyModel(BCMConfig(network=dataclasses.replace(tiny_network(), time_inputs=1)))
    randomize(cm)
    x = torch.randn(len(TIMES), 3, 32, 32)
    sd, eps = 0.5, 0.002
    with torch.no_grad():
        out = cm(x, TIMES, eps)
        F_x = cm.net(x / (sd**2 + TIMES**2).sqrt().view(-1, 1, 1, 1), 250 * TIMES.log())
    skip = ((sd**2 + TIMES * eps) / (sd**2 + TIMES**2)).view(-1, 1, 1, 1)
    c_out = (sd * (TIMES - eps) / (sd**2 + TIMES**2).sqrt()).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, skip * x + c_out * F_x)
    assert torch.equal(out[0], x[0])  # f(x, eps) = x: the boundary condition
    for u in (0.5, torch.tensor(0.002)):
        with pytest.raises(ValueError, match="maps to time eps") as err:
            cm(x, TIMES, u)
        assert "\n" not in str(err.value)


def test_added_u_input_keeps_the_prediction_at_u_eps_and_gives_u_gradients():
    """f_BCM(x, t, eps) = f_CM(x, t) for every t, up to float32 rounding: the widened layers hold the CT weights
    plus exact zeros, but a longer inner dimension changes the matrix products' summation order."""
    torch.manual_seed(0)
    network = dataclasses.replace(tiny_network(), time_inputs=1, embedding_type="fourier", conditioning="additive")
    cm = ConsistencyModel(BCMConfig(network=network)).eval()
    randomize(cm)
    bcm = BCM(BCMConfig(network=dataclasses.replace(network, time_inputs=2))).eval()
    bcm.load_state_dict(add_u_input(cm.state_dict()), strict=True)
    x = TIMES.view(-1, 1, 1, 1) * torch.randn(len(TIMES), 3, 32, 32)
    with torch.no_grad():
        expected = cm(x, TIMES, 0.002)
        torch.testing.assert_close(bcm(x, TIMES, 0.002), expected, rtol=1e-6, atol=1e-6)
        # and for any other u the network part F is still the CT model's (only c_skip and c_out change)
        sd, u = 0.5, torch.full_like(TIMES, 6.0)
        F_cm = (expected - ((sd**2 + TIMES * 0.002) / (sd**2 + TIMES**2)).view(-1, 1, 1, 1) * x) / (
            (sd * (TIMES - 0.002) / (sd**2 + TIMES**2).sqrt()).view(-1, 1, 1, 1))
        F_bcm = (bcm(x, TIMES, u) - ((sd**2 + TIMES * u) / (sd**2 + TIMES**2)).view(-1, 1, 1, 1) * x) / (
            (sd * (TIMES - u) / (sd**2 + TIMES**2).sqrt()).view(-1, 1, 1, 1))
    torch.testing.assert_close(F_bcm[1:], F_cm[1:], rtol=1e-4, atol=1e-4)  # t = eps: c_out(eps, eps) = 0

    # the zero columns that ignore u get gradients at once, so training can teach the blocks to read u
    bcm(x, TIMES, u).square().mean().backward()
    affine = bcm.net.encoder[0].affine
    half = affine.in_features // 2
    assert not affine.weight.detach()[:, half:].any() and affine.weight.grad[:, half:].abs().sum() > 0


def test_bct_fine_tunes_a_trained_ct_checkpoint(tmp_path, tiny_images):
    """--init-from a CT run of a t-only network: the BCM's f(x, t, eps) equals the CT model's EMA prediction at
    step 0, then BCT steps run and change the weights the u input reaches."""
    images = _images(tiny_images)
    torch.manual_seed(0)
    ct_run = Trainer(ct_preset(), tmp_path / "ct", images=images)
    assert ct_run.kind == CONSISTENCY_KIND and isinstance(ct_run.model, ConsistencyModel)
    ct_run.run(max_steps=3, progress=False)
    # three steps barely move F off its zero initialisation, which would make any u input pass: save random EMA
    # weights instead, so that F(x, t) is far from 0 and depends on t
    randomize(ct_run.ema.module)
    ct_run.save()
    ct_checkpoint = tmp_path / "ct" / "checkpoint.pt"
    assert load_checkpoint(ct_checkpoint)["kind"] == CONSISTENCY_KIND

    bcm_run = Trainer(tiny_preset(), tmp_path / "bcm", images=images, init_from=str(ct_checkpoint))
    cm, bcm = ct_run.ema.module.eval(), bcm_run.model.eval()
    x = TIMES.view(-1, 1, 1, 1) * torch.randn(len(TIMES), 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(bcm(x, TIMES, 0.002), cm(x, TIMES, 0.002), rtol=1e-6, atol=1e-6)
        F_x = cm.net(x, 250 * TIMES.log())
    assert F_x.abs().mean() > 0.05 and (F_x[1] - F_x[2]).abs().mean() > 0.01  # the check has something to keep
    before = {k: v.clone() for k, v in bcm.state_dict().items()}
    assert bcm_run.run(max_steps=2, progress=False) == 2
    after = bcm_run.model.state_dict()
    key = "net.encoder.0.affine.weight"
    half = after[key].shape[1] // 2
    assert not before[key][:, half:].any() and after[key][:, half:].any()  # BCT reached the u half
    rows = (tmp_path / "bcm" / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and float(rows[-1].split(",")[4]) > 0  # step, N, loss, ct, soft: a soft term ran


def test_incompatible_checkpoints_are_one_line_errors(tmp_path, tiny_images):
    images = _images(tiny_images)
    Trainer(ct_preset(), tmp_path / "ct", images=images).run(max_steps=1, progress=False)
    ct_checkpoint = str(tmp_path / "ct" / "checkpoint.pt")
    Trainer(ct_preset(), tmp_path / "again", images=images, init_from=ct_checkpoint)  # CT from CT: allowed
    wider = tiny_preset()
    wider.model.network = dataclasses.replace(wider.model.network, channels=16)
    with pytest.raises(ValueError, match="configs differ in network.channels 8 != 16") as err:
        Trainer(wider, tmp_path / "bad", images=images, init_from=ct_checkpoint)
    assert "\n" not in str(err.value)
    bcm_preset = tiny_preset()
    bcm_preset.loss.kind = "ct"  # a CT run of the two-time network is a BCM checkpoint
    Trainer(bcm_preset, tmp_path / "bcm-ct", images=images).run(max_steps=1, progress=False)
    with pytest.raises(ValueError, match="is a 'bcm' checkpoint; this preset trains a 'consistency'"):
        Trainer(ct_preset(), tmp_path / "bad2", images=images, init_from=str(tmp_path / "bcm-ct" / "checkpoint.pt"))
    with pytest.raises(ValueError, match="network takes u already"):
        bcm_weights_from_consistency_model(bcm_preset.model, {}, bcm_preset.model)
    for kind in ("bct", "ctinv"):
        preset = ct_preset()
        preset.loss.kind = kind
        with pytest.raises(ValueError, match=f"loss.kind '{kind}' needs a network with both times"):
            Trainer(preset, tmp_path / kind, images=images)
    # the command line prints the same line and exits with status 2
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "cifar10-small", "--out", str(tmp_path / "cli"), "--init-from", ct_checkpoint])
    assert exit_.value.code == 2
