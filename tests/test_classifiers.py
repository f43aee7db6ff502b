"""Behaviour of the classifiers package: shapes, published sizes, learning, resume, checkpoint safety."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import classifiers
from classifiers.config import ArchConfig, Archs, load_preset
from classifiers.train import train
from purify.infra.checkpoint import load_checkpoint, save_checkpoint

torch.set_num_threads(1)

# Parameter counts of the paper-preset models as built here; the published approximate sizes are
# PreActResNet-18 ~11.2M, WRN-34-10 ~46.2M, VGG-16-BN ~14.7M (CIFAR head), MobileNet-V2 ~2.2M (CIFAR).
PAPER_PARAMS = {"preact": 11_172_170, "wrn": 46_160_474, "vgg": 14_728_266, "mobilenet": 2_236_682}


def tiny_config(**changes) -> classifiers.TrainConfig:
    """The small preset at a width that trains in seconds."""
    archs = Archs(preact=ArchConfig(width=0.125), wrn=ArchConfig(width=1, depth=10),
                  vgg=ArchConfig(width=0.125), mobilenet=ArchConfig(width=0.25, stage2_stride=2))
    return dataclasses.replace(load_preset("small"), archs=archs, **changes)


@pytest.mark.parametrize("arch", classifiers.ARCHS)
def test_forward_gives_ten_logits_for_unit_range_images(arch):
    model = classifiers.build_classifier(arch, config=tiny_config()).eval()
    logits = model(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", classifiers.ARCHS)
def test_paper_preset_has_published_size(arch):
    with torch.device("meta"):  # shapes only, no memory or init time for WRN-34-10's 46M weights
        model = classifiers.build_classifier(arch, "paper")
    assert classifiers.count_parameters(model) == PAPER_PARAMS[arch]


def test_small_preset_is_smaller_and_runs():
    for arch in classifiers.ARCHS:
        model = classifiers.build_classifier(arch, "small").eval()
        assert classifiers.count_parameters(model) < PAPER_PARAMS[arch] / 2
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_names_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="preact, wrn, vgg, mobilenet"):
        classifiers.build_classifier("resnet50")
    with pytest.raises(ValueError, match="paper"):
        classifiers.build_classifier("wrn", "huge")


def test_accuracy_accepts_uint8_and_float_images():
    model = classifiers.build_classifier("vgg", config=tiny_config())
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    a = classifiers.accuracy(model, images, labels, batch_size=7, progress=False)
    b = classifiers.accuracy(model, images.float() / 255, labels, batch_size=20, progress=False)
    assert a == pytest.approx(b) and 0.0 <= a <= 1.0


def _train(tmp_path, arch="preact", **kwargs):
    dirs = {"out_dir": tmp_path / "ck", "run_dir": tmp_path / "run", "results_dir": tmp_path / "res"}
    return train(arch, "small", threads=1, progress=False, seed=0, **dirs, **kwargs)


def test_tiny_training_run_beats_chance(tmp_path, data_root):
    config = tiny_config(epochs=4, batch_size=64, lr=0.2, warmup_fraction=0.2)
    summary = _train(tmp_path, config=config, data_root=data_root, train_subset=640, test_subset=500)
    assert summary["finished"]
    assert summary["test_acc"] > 0.20, summary  # chance is 0.10
    model = classifiers.load_classifier("preact", "small", checkpoint_dir=tmp_path / "ck")
    assert not model.training


def test_resume_restores_step_and_optimizer_and_finishes_identically(tmp_path, data_root):
    config = tiny_config(epochs=2, batch_size=64)
    common = dict(config=config, data_root=data_root, train_subset=256, test_subset=100)
    straight = _train(tmp_path / "straight", **common)

    stopped = _train(tmp_path / "resumed", max_minutes=0.0, **common)  # budget runs out after one step
    assert not stopped["finished"] and stopped["step"] == 1
    state = load_checkpoint(tmp_path / "resumed" / "run" / "preact-small-state.pt")
    assert state["step"] == 1 and state["optimizer"]["state"]  # momentum buffers were saved
    resumed = _train(tmp_path / "resumed", resume=True, **common)
    assert resumed["step"] == straight["step"] == 8
    a = load_checkpoint(tmp_path / "straight" / "run" / "preact-small-state.pt")
    b = load_checkpoint(tmp_path / "resumed" / "run" / "preact-small-state.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    for x, y in zip(momentum_a, momentum_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert resumed["test_acc"] == straight["test_acc"]


def _save_small(path, arch, preset="small"):
    model = classifiers.build_classifier(arch, config=tiny_config())
    save_checkpoint({"arch": arch, "preset": preset, "config": dataclasses.asdict(tiny_config()),
                     "model": model.state_dict()}, path / f"{arch}-{preset}.pt")


def test_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m classifiers.train --arch wrn --preset small"):
        classifiers.load_classifier("wrn", "small", checkpoint_dir=tmp_path)


def test_checkpoint_of_another_architecture_or_preset_is_refused(tmp_path):
    _save_small(tmp_path, "vgg")
    (tmp_path / "vgg-small.pt").rename(tmp_path / "preact-small.pt")  # a VGG file under PreAct's name
    with pytest.raises(ValueError, match="holds a vgg/small classifier, not the requested preact/small"):
        classifiers.load_classifier("preact", "small", checkpoint_dir=tmp_path)
    _save_small(tmp_path, "wrn", preset="paper")
    (tmp_path / "wrn-paper.pt").rename(tmp_path / "wrn-small.pt")
    with pytest.raises(ValueError, match="not the requested wrn/small"):
        classifiers.load_classifier("wrn", "small", checkpoint_dir=tmp_path)


def test_weights_of_another_architecture_fail_with_a_clear_message(tmp_path):
    vgg = classifiers.build_classifier("vgg", config=tiny_config())
    save_checkpoint({"arch": "preact", "preset": "small", "config": dataclasses.asdict(tiny_config()),
                     "model": vgg.state_dict()}, tmp_path / "preact-small.pt")
    with pytest.raises(ValueError, match="does not match the Normalized"):
        classifiers.load_classifier("preact", "small", checkpoint_dir=tmp_path)


def test_shipped_small_checkpoints_load():
    for arch in classifiers.ARCHS:
        try:
            model = classifiers.load_classifier(arch, "small")
        except FileNotFoundError:
            pytest.skip(f"{arch}-small.pt not trained yet")
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
