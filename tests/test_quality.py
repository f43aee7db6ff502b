"""bench.quality and bench.losscurve end to end on a tiny BCM, tiny classifiers and 20 ImageFolder images."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import bench.losscurve
import bench.quality
import classifiers
from classifiers.config import ArchConfig, Archs, TrainConfig
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict
from purify.infra.data import CLASSES, load_cifar10
from conftest import tiny_preset

torch.set_num_threads(1)

TINY = TrainConfig(archs=Archs(preact=ArchConfig(width=0.0625), wrn=ArchConfig(width=1, depth=10),
                               vgg=ArchConfig(width=0.0625), mobilenet=ArchConfig(width=0.1, stage2_stride=2)))
T_STARS = ["0.1", "2", "80"]


# Every class once, then classes 0, 3, 8, 9 more often: an untrained classifier tends to predict one class for
# everything, and unequal class sizes give the four classifiers different accuracies to tell apart.
UNBALANCED = list(range(10)) + [0, 3, 3, 8, 8, 8, 9, 9, 9, 9]


def _write_images(folder, labels: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(len(labels), 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(small, size=32, mode="bilinear")
    for i, (image, label) in enumerate(zip((images * 255).to(torch.uint8), labels)):
        path = folder / CLASSES[label] / f"{i:04d}.png"  # PNG: lossless, so the test compares exact pixels
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


@pytest.fixture
def setup(tmp_path, tiny_bcm):
    """A tiny BCM release file (with a step), tiny untrained classifiers, a 20+10-image ImageFolder."""
    for i, arch in enumerate(classifiers.ARCHS):
        torch.manual_seed(i)
        model = classifiers.build_classifier(arch, config=TINY)
        save_checkpoint({"arch": arch, "preset": "small", "config": to_dict(TINY), "model": model.state_dict()},
                        tmp_path / "cls" / f"{arch}-small.pt")
    save_checkpoint({"kind": "bcm", "config": to_dict(tiny_preset()), "ema": tiny_bcm.state_dict(), "step": 7},
                    tmp_path / "bcm.pt")
    _write_images(tmp_path / "data" / "test", UNBALANCED, seed=0)
    _write_images(tmp_path / "data" / "train", list(range(10)), seed=1)
    return tmp_path


def _run(root, *extra):
    bench.quality.main(["--bcm", str(root / "bcm.pt"), "--n", "20", "--seed", "0", "--grid", "4",
                        "--batch-size", "8", "--t-stars", *T_STARS, "--data-root", str(root / "data"),
                        "--classifier-dir", str(root / "cls"), "--out", str(root / "out"), "--threads", "1",
                        *extra])


def test_quality_writes_every_result_with_sane_values(setup):
    _run(setup)
    out = setup / "out"
    for name in ["samples_nfe1.png", "samples_nfe2.png", "samples_nfe3.png", "samples_nfe4.png",
                 "reconstruction.png", "reconstruction.csv", "reconstruction.md",
                 "purified_clean.csv", "purified_clean.md", "purified_clean.png"]:
        assert (out / name).stat().st_size > 0, name
    assert Image.open(out / "reconstruction.png").size == (10 * 34 + 2, 3 * 34 + 2)  # a class per column, 3 rows

    recon = pd.read_csv(out / "reconstruction.csv")
    bcm = recon[recon["method"] == "bcm"]
    assert bcm["nfe"].tolist() == [1, 2, 3, 4] and bcm["total_nfe"].tolist() == [2, 3, 4, 5]
    assert (recon["mse"] >= 0).all() and (recon["mean_image_mse"] > 0).all()
    assert bcm["paper_mse"].tolist() == [0.00526, 0.00451, 0.00377, 0.00362]
    assert (recon[["n", "seed", "checkpoint_step"]] == [20, 0, 7]).all().all()
    _check_reconstruction_rows(recon, ct_inversion=False)
    assert "CT Inversion rows skipped" in (out / "reconstruction.md").read_text()

    clean = pd.read_csv(out / "purified_clean.csv")
    assert set(clean["arch"]) == set(classifiers.ARCHS)
    assert clean["accuracy"].between(0, 1).all()
    assert len(clean) == len(classifiers.ARCHS) * (1 + 2 * len(T_STARS))
    purified = clean[clean["defence"] != "none"]
    assert sorted(set(purified["t_star"])) == [float(t) for t in T_STARS]
    assert set(purified["family"]) == {"bcm(eps_inv=0.11)", "denoise"}
    # the BCM mode inverts upwards from eps_inv, capped at t*/2 for small strengths
    assert clean.loc[clean["t_star"] == 0.1, "defence"].isin(["bcm(eps_inv=0.05, t_star=0.1)",
                                                               "denoise(t_star=0.1)"]).all()
    assert set(clean.loc[clean["family"] == "denoise", "nfe"]) == {1}

    images, labels = load_cifar10("test", setup / "data")
    for arch in classifiers.ARCHS:
        model = classifiers.load_classifier(arch, "small", setup / "cls")
        row = clean[(clean["arch"] == arch) & (clean["defence"] == "none")]
        assert row["accuracy"].item() == classifiers.accuracy(model, images, labels, progress=False)


def _check_reconstruction_rows(recon: pd.DataFrame, ct_inversion: bool) -> None:
    """The ODE baselines (and CT Inversion) next to BCM inversion, each decoded by one BCM step and by the ODE,
    with their exact NFE, sane PSNR / SSIM and the references."""
    rows = recon.set_index(["method", "inversion_times", "decoder"])
    want = {("ode-euler", "0.07 -> 80, 9 steps"): 9, ("ode-euler", "0.07 -> 80, 19 steps"): 19,
            ("ode-heun", "0.07 -> 80, 5 steps"): 10, ("ode-heun", "0.07 -> 80, 10 steps"): 20}
    for (method, inversion), nfe in want.items():
        by_bcm, by_ode = rows.loc[(method, inversion, "bcm")], rows.loc[(method, inversion, method)]
        assert by_bcm["nfe"] == by_ode["nfe"] == nfe and by_ode["decoder_nfe"] == nfe  # the mirror grid
        assert by_bcm["total_nfe"] == nfe + 1 and by_ode["total_nfe"] == 2 * nfe
        assert math.isnan(by_bcm["paper_mse"]) and by_ode["paper_mse"] == (0.01326 if nfe in (9, 10) else 0.00421)
        assert "EDM ODE inversion" in by_ode["reference"]
    ct = recon[recon["method"] == "ct-inversion"]
    if ct_inversion:
        assert ct["decoder"].tolist() == ["bcm", "ode-heun"] and ct["total_nfe"].tolist() == [2, 21]
        assert ct["reference"].str.contains("PSNR 18.07").tolist() == [True, False]
    else:
        assert ct.empty
    assert len(recon) == 4 + 2 * len(want) + 2 * ct_inversion
    # PSNR is the mean over images of 10 log10(1 / MSE_i), at least 10 log10(1 / mean MSE) (Jensen)
    assert (recon["psnr"] >= 10 * (1 / recon["mse"]).map(math.log10) - 1e-6).all()
    assert recon["ssim"].between(-1, 1).all() and (recon["s_per_image"] > 0).all() and (recon["latent_std"] > 0).all()


def test_quality_adds_ct_inversion_rows_from_a_noiser_checkpoint(setup, tiny_images):
    from purify.train import Trainer

    preset = tiny_preset()
    preset.loss.kind = "ctinv"
    Trainer(preset, setup / "ctinv", images=tiny_images[:8]).run(max_steps=1, progress=False)
    _run(setup, "--skip-samples", "--skip-classifiers", "--ct-inversion", str(setup / "ctinv" / "checkpoint.pt"))
    _check_reconstruction_rows(pd.read_csv(setup / "out" / "reconstruction.csv"), ct_inversion=True)
    assert "CT Inversion rows: noiser" in (setup / "out" / "reconstruction.md").read_text()


def test_ct_inversion_option_refuses_a_bcm_and_skip_reconstruction(setup, capsys):
    with pytest.raises(SystemExit):
        _run(setup, "--skip-samples", "--skip-classifiers", "--ct-inversion", str(setup / "bcm.pt"))
    assert "not a CT Inversion noiser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(setup, "--skip-reconstruction", "--ct-inversion", str(setup / "bcm.pt"))
    assert "drop --skip-reconstruction" in capsys.readouterr().err


def test_quality_measures_any_registry_defence(setup):
    _run(setup, "--skip-samples", "--skip-reconstruction", "--defence", "jpeg:quality=40", "vote:n=2,base=denoise",
         "--t-stars", "0.5")
    clean = pd.read_csv(setup / "out" / "purified_clean.csv").set_index(["arch", "defence"])
    assert set(clean.index.get_level_values("defence")) == {
        "none", "jpeg(quality=40)", "vote(base=denoise(t_star=0.5), how=majority, n=2)"}
    assert clean.loc[("vgg", "vote(base=denoise(t_star=0.5), how=majority, n=2)"), "nfe"] == 2
    assert "`jpeg(quality=40)`" in (setup / "out" / "purified_clean.md").read_text()


def test_quality_is_reproducible_and_parts_can_be_skipped(setup):
    _run(setup, "--skip-samples", "--skip-reconstruction")
    first = pd.read_csv(setup / "out" / "purified_clean.csv")
    assert not (setup / "out" / "reconstruction.csv").exists()
    assert not (setup / "out" / "samples_nfe1.png").exists()
    _run(setup, "--skip-samples", "--skip-reconstruction")
    pd.testing.assert_frame_equal(first, pd.read_csv(setup / "out" / "purified_clean.csv"))


def test_missing_checkpoints_give_clear_errors_or_are_skipped(setup, capsys):
    with pytest.raises(SystemExit):
        bench.quality.main(["--bcm", str(setup / "missing.pt")])
    assert "python -m purify.export runs/bcm-small/checkpoint.pt checkpoints/bcm/cifar10-small.pt" in \
        capsys.readouterr().err

    (setup / "cls" / "wrn-small.pt").unlink()
    with pytest.raises(SystemExit):  # one line naming the training command, exit status 2, no traceback
        _run(setup, "--skip-samples", "--skip-reconstruction")
    assert "python -m classifiers.train --arch wrn" in capsys.readouterr().err
    _run(setup, "--skip-samples", "--skip-reconstruction", "--allow-missing-classifiers")
    assert "skipping wrn" in capsys.readouterr().err
    clean = pd.read_csv(setup / "out" / "purified_clean.csv")
    assert set(clean["arch"]) == set(classifiers.ARCHS) - {"wrn"}


def test_quality_under_torchrun_writes_what_one_process_writes(setup):
    """2 ranks (gloo) in blocks of 3 against one process in blocks of 3 and of 8, through randomized purifiers
    and a vote: every per-image-derived number equal (reconstruction to the last bit in the same blocks, the
    accuracies in any), rank 0's images the same, and no block files left."""
    root = Path(__file__).resolve().parent.parent
    _spread_predictions(setup / "cls")
    options = ["--defence", "bcm", "denoise", "vote:n=3,base=denoise", "--t-stars", "0.5", "80"]
    out = setup / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bench.quality", "--", "--bcm", str(setup / "bcm.pt"), "--n", "20", "--seed", "0",
               "--grid", "4", "--batch-size", "3", "--data-root", str(setup / "data"), "--classifier-dir",
               str(setup / "cls"), "--out", str(setup / "sharded"), "--threads", "1", "--no-progress", *options]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too
        raise
    assert process.returncode == 0, stderr[-3000:]
    sharded = _tables(setup / "sharded")
    _run(setup, "--batch-size", "3", *options)  # later options win: blocks of 3, as the ranks'
    same_blocks = _tables(out)
    pngs = {name: (out / name).read_bytes() for name in ["samples_nfe1.png", "samples_nfe4.png",
                                                           "reconstruction.png", "purified_clean.png"]}
    _run(setup, *options)  # blocks of 8
    other_blocks = _tables(out)

    recon, clean = sharded
    assert len(recon) == 12 and len(clean) == 4 * (1 + 3 * 2) and (recon["s_per_image"] > 0).all()
    timing = ["s_per_image"]
    pd.testing.assert_frame_equal(recon.drop(columns=timing), same_blocks[0].drop(columns=timing), check_exact=True)
    pd.testing.assert_frame_equal(clean, same_blocks[1], check_exact=True)
    pd.testing.assert_frame_equal(clean, other_blocks[1], check_exact=True)  # decisions do not depend on blocks
    # other blocks: the network runs on other batches, equal up to float rounding
    pd.testing.assert_frame_equal(recon.drop(columns=timing), other_blocks[0].drop(columns=timing),
                                  check_exact=False, rtol=1e-5, atol=0)
    assert clean["accuracy"].nunique() >= 3  # the accuracies tell the defences and classifiers apart
    for name, png in pngs.items():  # rank 0 alone draws the samples and the grid, as one process does
        assert (setup / "sharded" / name).read_bytes() == png, name
    for folder in (setup / "sharded", out):
        assert not (folder / ".blocks").exists()


def _spread_predictions(folder) -> None:
    """Rewrite the untrained classifiers with batch-norm statistics of smooth random images, so that they predict
    many classes and their decisions follow the purifier's noise (untrained statistics give one class for all)."""
    g = torch.Generator().manual_seed(2)
    images = torch.nn.functional.interpolate(torch.rand(64, 3, 8, 8, generator=g), size=32, mode="bilinear")
    for path in folder.glob("*.pt"):
        checkpoint = torch.load(path, weights_only=True)
        model = classifiers.build_classifier(checkpoint["arch"], config=TINY)
        model.load_state_dict(checkpoint["model"])
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # the plain mean over the batch
        with torch.no_grad():
            model.train()(images)
        save_checkpoint(dict(checkpoint, model=model.state_dict()), path)


def _tables(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "reconstruction.csv"), pd.read_csv(out / "purified_clean.csv")


def test_losscurve_plots_and_summarises_a_denoise_and_a_bct_log(tmp_path, capsys):
    header = "step,N,loss,ct,soft,lr,images_per_s,elapsed_min\n"
    denoise = tmp_path / "denoise-small" / "log.csv"
    bct = tmp_path / "bcm-small" / "log.csv"
    denoise.parent.mkdir()
    bct.parent.mkdir()
    denoise.write_text(header + "".join(f"{s},0,{1 / s},0.0,0.0,0.0003,50,{s / 100}\n" for s in range(20, 420, 20)))
    bct.write_text(header + "".join(f"{s},{11 + s // 200},{30 - s / 100},{25 - s / 100},5.0,0.0002,10,{s / 10}\n"
                                    for s in range(20, 620, 20)) + "620,12,29.5")  # last row cut off mid-write
    bench.losscurve.main([str(denoise), str(bct), "--out", str(tmp_path / "loss.png")])
    assert Image.open(tmp_path / "loss.png").format == "PNG"
    printed = capsys.readouterr().out
    assert "denoise-small" in printed and "bcm-small" in printed and "ct" in printed
