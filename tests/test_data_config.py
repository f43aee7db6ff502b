"""Data module, configs and checkpoints."""
import os
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch

from purify.infra import data
from purify.infra.checkpoint import load_checkpoint, save_checkpoint
from purify.infra.config import from_dict
from purify.presets import load_preset

needs_data = pytest.mark.skipif(not os.environ.get("BCM_DATA"), reason="BCM_DATA (CIFAR-10 copy) not set")


@needs_data
def test_cifar10_test_split_loads_as_uint8():
    images, labels = data.load_cifar10("test")
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    assert data.load_cifar10("test")[0] is images  # cached in memory


def test_a_subset_decodes_only_its_files_and_equals_the_whole_splits_rows(tmp_path, monkeypatch):
    from PIL import Image

    from conftest import write_image_folder

    write_image_folder(tmp_path, n=30)
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    indices = torch.tensor([3, 17, 4, 29])
    images, labels = data.load_cifar10("test", tmp_path, indices)
    assert len(opened) == 4  # the four files, not the 30 of the split
    everything, all_labels = data.load_cifar10("test", tmp_path)
    assert len(opened) == 4 + 30
    assert torch.equal(images, everything[indices]) and torch.equal(labels, all_labels[indices])
    assert torch.equal(data.cifar10_labels("test", tmp_path), all_labels)


def test_missing_data_names_both_options(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="BCM_DATA") as err:
        data.load_cifar10("test", tmp_path / "nowhere")
    assert "download" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        data.load_cifar10("validation", tmp_path)


def test_train_val_split_is_deterministic_and_disjoint():
    train, val = data.train_val_split(50_000, 1_000, seed=0)
    assert len(train) == 49_000 and len(val) == 1_000
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, data.train_val_split(50_000, 1_000, seed=0)[1])
    assert not torch.equal(val, data.train_val_split(50_000, 1_000, seed=1)[1])
    assert torch.equal(data.seeded_subset(10, None), torch.arange(10))
    assert len(data.seeded_subset(10_000, 100, seed=0)) == 100


def test_augment_crops_and_flips_within_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = data.augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


@dataclass
class Inner:
    width: int = 1
    rates: list[float] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"
    clip: float | None = None


def test_config_rejects_unknown_and_mistyped_keys():
    assert from_dict(Outer, {"inner": {"width": 3, "rates": [1, 0.5]}, "clip": 2}).inner.rates == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\]"):
        from_dict(Outer, {"inner": {"widht": 3}})
    with pytest.raises(ValueError, match="inner.width: expected int"):
        from_dict(Outer, {"inner": {"width": "wide"}})
    with pytest.raises(FileNotFoundError, match="known presets"):
        load_preset("cifar10-huge")


def test_preset_yaml_unknown_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  batch_size: 8\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_preset(str(path))


def test_checkpoint_round_trip_and_errors(tmp_path):
    save_checkpoint({"a": torch.ones(2), "step": 3}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", ("a", "step"))["step"] == 3
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(tmp_path / "c.pt", ("ema",))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    assert sorted(os.listdir(tmp_path)) == ["bad.pt", "c.pt"]  # no temporary files left behind


def test_every_shipped_preset_loads_and_the_gpu_continuation_starts_where_the_shipped_model_stopped():
    """Every YAML under configs/bcm is a valid preset. The GPU continuation recipe trains the shipped weights on
    at the N they stopped at (41, the shipped log's last), for 4,000 steps, then at 81, never above."""
    from purify.bct import curriculum_boundaries
    from purify.infra.paths import REPO_ROOT

    names = sorted(path.stem for path in (REPO_ROOT / "configs" / "bcm").glob("*.yaml"))
    assert "cifar10-small-gpu-continue" in names
    presets = {name: load_preset(name) for name in names}
    shipped_n = int(pd.read_csv(REPO_ROOT / "results" / "bcm" / "cifar10-small-2-bct-log.csv").N.iloc[-1])
    preset = presets["cifar10-small-gpu-continue"]
    loss, train = preset.loss, preset.train
    n_at = [curriculum_boundaries(k, train.curriculum_steps, loss.s0, loss.s1) for k in (0, 3_999, 4_000, 99_999)]
    assert n_at == [shipped_n, shipped_n, 81, 81]
    assert train.batch_size == 512 and train.warmup_steps > 0 and train.n_val == 1000
