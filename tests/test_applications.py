"""The paper's applications (spec §6): interpolation, inpainting (Algorithm 6), blind restoration, and
``bench.applications`` end to end on a tiny BCM."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from PIL import Image

import bench.applications
from bench.common import load_split
from conftest import tiny_preset, write_image_folder
from purify.applications import (INPAINTING_TIMES, INTERPOLATION_TIMES, RESTORATION_TIMES, box_mask,
                                 compress_jpeg, half_mask, inpaint, interpolate, random_pixel_mask, restore, slerp)
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict
from purify.defences import JPEG
from purify.sampling import EPS, invert

torch.set_num_threads(1)


class Recorder:
    """Records the (t, u) of every network evaluation and the input it got; returns ``model``'s output."""

    def __init__(self, model):
        self.model, self.calls, self.inputs = model, [], []

    def __call__(self, x, t, u):
        self.calls.append((round(float(t), 6), round(float(u), 6)))
        self.inputs.append(x.clone())
        return self.model(x, t, u)


def _images(tiny_images, n=4):
    return tiny_images[:n].float() / 255 * 2 - 1


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- slerp

def test_slerp_of_orthogonal_unit_vectors_follows_the_circle_per_pair():
    e1, e2 = torch.eye(2)
    z1 = torch.stack([e1, e1])
    z2 = torch.stack([e2, 0.5 * e1 + math.sqrt(3) / 2 * e2])  # angles 90 and 60 degrees
    mid = slerp(z1, z2, 0.5)
    assert torch.allclose(mid[0], (e1 + e2) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(mid[1], torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # a third of the way: 30 and 20 degrees from z1, not symmetric, so swapped weights would show
    third = slerp(z1, z2, 1 / 3)
    assert torch.allclose(third[0], torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    assert torch.allclose(third[1], torch.tensor([math.cos(math.pi / 9), math.sin(math.pi / 9)]), atol=1e-6)
    assert torch.allclose(slerp(z1, z2, 0.0), z1) and torch.allclose(slerp(z1, z2, 1.0), z2, atol=1e-6)


def test_slerp_of_parallel_latents_is_linear_and_finite():
    z = torch.randn(2, 3, 4, 4, generator=_seeded())
    assert torch.allclose(slerp(z, 2 * z, 0.25), 1.25 * z, atol=1e-5)


# ------------------------------------------------------------------------------------------ interpolation

def test_interpolation_ends_are_the_one_step_reconstructions_of_each_images_own_latent(tiny_bcm, tiny_images):
    x = _images(tiny_images)
    x1, x2 = x[:2], x[2:]
    with torch.no_grad():
        path = interpolate(tiny_bcm, x1, x2, [0.0, 0.5, 1.0], generator=_seeded(3))
        generator = _seeded(3)
        z1 = invert(tiny_bcm, x1, INTERPOLATION_TIMES, generator=generator)
        z2 = invert(tiny_bcm, x2, INTERPOLATION_TIMES, generator=generator)
        assert path.shape == (2, 3, 3, 32, 32)
        assert torch.allclose(path[:, 0], tiny_bcm(z1, 80.0, EPS).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(path[:, 2], tiny_bcm(z2, 80.0, EPS).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(path[:, 1], tiny_bcm(slerp(z1, z2, 0.5), 80.0, EPS).clamp(-1, 1), atol=1e-5)


def test_interpolation_inverts_each_image_from_a_different_initial_noise():
    rec = Recorder(lambda x, t, u: x)
    x = torch.zeros(1, 3, 8, 8)
    interpolate(rec, x, x, [0.5], generator=_seeded())
    assert rec.calls == [(0.07, 1.5), (1.5, 6.0), (6.0, 80.0)] * 2 + [(80.0, EPS)]
    # same image twice: only the initial noise tells the two inversions apart
    assert not torch.equal(rec.inputs[0], rec.inputs[3])


# ---------------------------------------------------------------------------------------------- inpainting

def test_inpainting_keeps_known_pixels_bit_identical_and_fills_the_hole(tiny_bcm, tiny_images):
    x = _images(tiny_images)
    for mask in (box_mask(32, 32), half_mask(32, 32, "right"), random_pixel_mask(4, 32, 32, 0.3, _seeded())):
        with torch.no_grad():
            out = inpaint(tiny_bcm, x, mask, generator=_seeded())
        hole = mask.bool().expand_as(x)
        assert out.shape == x.shape
        assert torch.equal(out[~hole], x[~hole])
        assert (out[hole] - x[hole]).abs().mean() > 0.05
        assert out.abs().max() <= 1


def test_inpainting_follows_algorithm_6_step_by_step():
    """With an identity network, the input of every call is fixed by the algorithm and the noise draws in order:
    hole fill s z, initial noise t_1 z_1 on the whole image, then the hole replaced by t_n z_n after each step."""
    rec = Recorder(lambda x, t, u: x)
    x = torch.rand(2, 3, 8, 8, generator=_seeded(5)) * 2 - 1
    mask = half_mask(8, 8, "left")
    hole = mask.bool().expand_as(x)
    out = inpaint(rec, x, mask, s=0.5, generator=_seeded(1))

    generator = _seeded(1)
    fill, first, *fresh = [torch.randn(x.shape, generator=generator) for _ in range(2 + len(INPAINTING_TIMES) - 1)]
    x_t = torch.where(hole, 0.5 * fill, x) + INPAINTING_TIMES[0] * first
    expected_inputs = [x_t]
    for t, z in zip(INPAINTING_TIMES[1:], fresh):
        x_t = torch.where(hole, t * z, x_t)
        expected_inputs.append(x_t)
    assert rec.calls == [(0.07, 0.4), (0.4, 1.0), (1.0, 2.0), (2.0, EPS)]
    for got, want in zip(rec.inputs, expected_inputs):
        assert torch.allclose(got, want)
    assert torch.equal(out, torch.where(hole, expected_inputs[-1].clamp(-1, 1), x))


def test_inpainting_rejects_a_non_binary_mask(tiny_bcm):
    with pytest.raises(ValueError, match="only 0"):
        inpaint(tiny_bcm, torch.zeros(1, 3, 32, 32), torch.full((1, 1, 32, 32), 0.5))


def test_box_and_half_masks_cover_the_named_region():
    box = box_mask(32, 32)
    assert box.shape == (1, 1, 32, 32) and box.sum() == 16 * 16 and box[..., 8:24, 8:24].all()
    assert box_mask(32, 32, 0.25).sum() == 8 * 8
    regions = {"left": (slice(None), slice(0, 16)), "right": (slice(None), slice(16, 32)),
               "top": (slice(0, 16), slice(None)), "bottom": (slice(16, 32), slice(None))}
    for side, (rows, cols) in regions.items():
        mask = half_mask(32, 32, side)
        assert mask.shape == (1, 1, 32, 32) and mask.sum() == 512 and mask[0, 0, rows, cols].all(), side
    with pytest.raises(ValueError, match="side must be one of"):
        half_mask(32, 32, "middle")


def test_random_pixel_mask_has_the_exact_fraction_per_image_and_is_seeded():
    mask = random_pixel_mask(5, 32, 32, 0.3, _seeded(2))
    assert mask.shape == (5, 1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.flatten(1).sum(1).tolist() == [round(0.3 * 1024)] * 5
    assert not torch.equal(mask[0], mask[1])  # each image its own pixels
    assert torch.equal(mask, random_pixel_mask(5, 32, 32, 0.3, _seeded(2)))
    assert not torch.equal(mask, random_pixel_mask(5, 32, 32, 0.3, _seeded(3)))


# --------------------------------------------------------------------------------------------- restoration

def test_restore_inverts_along_the_schedule_then_denoises_in_one_step(tiny_bcm, tiny_images):
    rec = Recorder(tiny_bcm)
    x = _images(tiny_images)
    with torch.no_grad():
        out = restore(rec, x, generator=_seeded())
    assert rec.calls == [(0.07, 0.7), (0.7, 2.0), (2.0, EPS)]
    assert torch.allclose(rec.inputs[0], x + RESTORATION_TIMES[0] * torch.randn(x.shape, generator=_seeded()))
    assert out.shape == x.shape and out.abs().max() <= 1


def test_compress_jpeg_is_the_jpeg_defence_on_the_model_scale(tiny_images):
    x = _images(tiny_images)
    assert torch.equal(compress_jpeg(x, 30), JPEG(30)((x + 1) / 2) * 2 - 1)
    error = {q: (compress_jpeg(x, q) - x).pow(2).mean().item() for q in (5, 50, 95)}
    assert error[5] > error[50] > error[95] > 0


# ------------------------------------------------------------------------------------------------ command

@pytest.fixture
def setup(tmp_path, tiny_bcm):
    """A tiny BCM release file (step 7) and a 30-image test ImageFolder."""
    save_checkpoint({"kind": "bcm", "config": to_dict(tiny_preset()), "ema": tiny_bcm.state_dict(), "step": 7},
                    tmp_path / "bcm.pt")
    write_image_folder(tmp_path / "data", n=30)
    return tmp_path


def _run(root, *extra):
    bench.applications.main(["--bcm", str(root / "bcm.pt"), "--n", "20", "--seed", "0", "--pairs", "3",
                             "--alphas", "5", "--show", "4", "--batch-size", "8", "--threads", "1", "--no-progress",
                             "--data-root", str(root / "data"), "--out", str(root / "out"), *extra])


def test_command_writes_figures_and_sane_metrics(setup):
    _run(setup, "--masks", "box", "bottom", "pixels", "--qualities", "10", "40")
    out = setup / "out"
    assert Image.open(out / "interpolation.png").size == (7 * 34 + 2, 3 * 34 + 2)  # a pair per row, 2 + 5 images
    assert Image.open(out / "inpainting.png").size == (4 * 34 + 2, 9 * 34 + 2)  # 3 rows per mask
    assert Image.open(out / "jpeg_restoration.png").size == (4 * 34 + 2, 5 * 34 + 2)  # originals + 2 per quality

    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == bench.applications.COLUMNS
    assert (table[["n", "seed", "checkpoint_step"]] == [20, 0, 7]).all().all()
    assert table["psnr"].between(0, 100).all() and table["ssim"].between(-1, 1).all()
    output = table[table["images"] == "output"]
    assert (output["s_per_image"] > 0).all() and output["nfe"].tolist() == [4, 4, 4, 4, 3, 3]
    inpainting = table[table["application"] == "inpainting"]
    assert set(inpainting["region"]) == {"hole"} and len(inpainting) == 6
    assert inpainting["setting"].str.startswith(("box (25% missing)", "bottom (50% missing)",
                                                 "pixels (50% missing)")).all()
    restoration = table[table["application"] == "restoration"].set_index(["setting", "images"])
    assert restoration.loc[("JPEG quality 10", "degraded"), "psnr"] < restoration.loc[("JPEG quality 40", "degraded"),
                                                                                      "psnr"]

    # the grey hole's PSNR is measured on the hole only: recompute it for the box
    images = load_split("test", setup / "data", 20, 0)[0].float() / 255
    box = box_mask(32, 32).bool().expand_as(images)
    hole_mse = (images - 0.5).pow(2)[box].view(20, -1).mean(1)
    box_row = inpainting[inpainting["setting"].str.startswith("box") & (inpainting["images"] == "degraded")]
    assert box_row["psnr"].item() == pytest.approx((10 * torch.log10(1 / hole_mse)).mean().item(), abs=1e-3)

    text = (out / "metrics.md").read_text()
    assert "20 test images" in text and "seed 0" in text and "step 7" in text
    assert "kornia" in text and "FID" in text and "JPEG quality 40" in text


def test_command_is_reproducible(setup):
    _run(setup, "--masks", "pixels", "--qualities", "20")
    first = pd.read_csv(setup / "out" / "metrics.csv")
    _run(setup, "--masks", "pixels", "--qualities", "20")
    again = pd.read_csv(setup / "out" / "metrics.csv")
    pd.testing.assert_frame_equal(first.drop(columns="s_per_image"), again.drop(columns="s_per_image"))


@pytest.mark.parametrize("extra, message", [
    (["--bcm", "missing.pt"], "no BCM checkpoint at missing.pt"),
    (["--qualities", "0"], "--qualities must lie in [1, 100]"),
    (["--pairs", "11"], "--pairs 11 needs at least 22 images"),
    (["--alphas", "1"], "--alphas must be at least 2"),
])
def test_bad_input_ends_with_one_line_and_exit_status_2(setup, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        _run(setup, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (setup / "out").exists()
