import os

import pytest
import torch

from purify.bcm import BCM, BCMConfig
from purify.network import NetworkConfig
from purify.presets import Preset, TrainConfig

torch.set_num_threads(1)


def tiny_network(dropout: float = 0.0) -> NetworkConfig:
    return NetworkConfig(channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=dropout)


def tiny_preset(**train) -> Preset:
    train = {"batch_size": 8, "total_steps": 1000, "lr": 1e-3, "ema_decay": 0.9, "checkpoint_every": 1000,
             "log_every": 1, **train}
    return Preset(model=BCMConfig(network=tiny_network()), train=TrainConfig(**train))


@pytest.fixture
def tiny_bcm() -> BCM:
    """A small BCM whose F is not zero. The U-Net zero-initialises its output convolution and the last layer
    of every residual and attention branch, so a fresh F is 0 and ignores t and u; here every parameter that
    starts at zero (those layers and the GroupNorm shifts) gets a seeded small random init instead."""
    torch.manual_seed(0)
    bcm = BCM(BCMConfig(network=tiny_network()))
    g = torch.Generator().manual_seed(1)
    for name, p in bcm.named_parameters():
        if not p.detach().any():
            p.data.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.endswith("bias") else 0.1))
    return bcm.eval()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    """64 smooth-ish random uint8 images (upsampled 8x8 noise), a stand-in for CIFAR in fast tests."""
    g = torch.Generator().manual_seed(0)
    small = torch.rand(64, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(small, size=32, mode="bilinear") * 255).to(torch.uint8)


def write_image_folder(root, n: int = 30) -> None:
    """``n`` smooth random PNG test images in torchvision's ImageFolder layout under ``root/test/<class>/``."""
    from PIL import Image

    from purify.infra.data import CLASSES

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    for i, image in enumerate((images * 255).to(torch.uint8)):
        folder = root / "test" / CLASSES[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="session")
def data_root():
    """The CIFAR-10 copy of ``BCM_DATA``, for the tiny training runs on real images; skips without it."""
    root = os.environ.get("BCM_DATA")
    if not root:
        pytest.skip("BCM_DATA is unset: point it at the CIFAR-10 copy (e.g. ../shared/data/cifar10) to run the "
                    "tiny training runs on real images")
    return root


@pytest.fixture(autouse=True, scope="session")
def committed_ledger_untouched():
    """No test may write the committed test ledger, not even a subprocess that ``ledger_in_tmp`` cannot reach:
    the suite fails if the ledger changed while it ran. The file is left as it is, since an evaluation running
    beside the tests may have written a real line: remove only lines whose command names a pytest folder."""
    import bench.ledger

    path = bench.ledger.LEDGER_PATH
    before = path.read_text() if path.is_file() else ""
    yield
    after = path.read_text() if path.is_file() else ""
    if after != before:
        new = [line for line in after.splitlines() if line not in set(before.splitlines())]
        pytest.fail(f"the committed ledger {path} changed while the tests ran; point every test's ledger into its own "
                    f"folder. New lines:\n" + "\n".join(new))


@pytest.fixture(autouse=True)
def ledger_in_tmp(tmp_path, monkeypatch):
    """Evaluations the tests run on test images go to a ledger in the test's folder, never the committed one."""
    import bench.ledger

    monkeypatch.setattr(bench.ledger, "LEDGER_PATH", tmp_path / "test-ledger.csv")
