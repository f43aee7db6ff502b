"""The four CIFAR-10 classifiers of the paper (Section 4.3.4), built from RobustBench and torchvision parts.

Every model takes images in [0, 1] and normalises them inside (``Normalized``), so it composes with
``nn.Sequential(purifier, classifier)``, torchattacks and RobustBench. Each architecture has a ``width``
multiplier (1.0 is the published size) so that a small preset trains on a CPU; WideResNet also has a depth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_make_layers

from purify.infra.optional import import_robustbench

import_robustbench()  # robustbench's architectures must be imported after the autoattack alias is set
from robustbench.model_zoo.architectures.resnet import PreActBlock, PreActResNet  # noqa: E402
from robustbench.model_zoo.architectures.wide_resnet import WideResNet  # noqa: E402

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
NUM_CLASSES = 10


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]; mean/std are not saved in checkpoints."""

    def __init__(self, net: nn.Module, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class WidePreActResNet(PreActResNet):
    """RobustBench's ``PreActResNet`` with the stage widths ``(64, 128, 256, 512)`` scaled by ``width``.

    RobustBench hard-codes width 64; this constructor only replaces the layer sizes and reuses its blocks,
    ``_make_layer`` and ``forward`` (which pools with ``avg_pool2d(out, 4)``, i.e. 32x32 inputs).
    """

    def __init__(self, width: float = 1.0, num_blocks=(2, 2, 2, 2), num_classes: int = NUM_CLASSES):
        nn.Module.__init__(self)
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.in_planes, self.bn_before_fc, self.out_shortcut = planes[0], True, False
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(PreActBlock, planes[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(PreActBlock, planes[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(PreActBlock, planes[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(PreActBlock, planes[3], num_blocks[3], stride=2)
        # Final BN-ReLU of the pre-activation design (He et al., 2016); RobustBench's ``bn_before_fc``.
        self.bn = nn.BatchNorm2d(planes[3])
        self.linear = nn.Linear(planes[3], num_classes)


class CifarVGG(nn.Module):
    """VGG-16 with batch norm (torchvision's configuration "D"), CIFAR head: 1x1 feature map -> Linear."""

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES):
        super().__init__()
        cfg = [v if v == "M" else max(1, round(v * width)) for v in vgg_cfgs["D"]]
        self.features = vgg_make_layers(cfg, batch_norm=True)
        self.classifier = nn.Linear(cfg[-2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def cifar_mobilenet_v2(width: float = 1.0, stage2_stride: int = 1, num_classes: int = NUM_CLASSES) -> MobileNetV2:
    """torchvision's MobileNet-V2 with the usual CIFAR strides: stem stride 1 and second stage stride 1
    (``stage2_stride=2`` keeps ImageNet's stride there, 4x cheaper), so 32x32 images end at 4x4 (2x2)."""
    # t (expansion), c (channels), n (blocks), s (stride); ImageNet's second row has s = 2.
    setting = [[1, 16, 1, 1], [6, 24, 2, stage2_stride], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    net = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)
    net.features[0][0].stride = (1, 1)
    return net


def _check_unused(arch: str, size, depth_ok: tuple[int, ...]) -> None:
    if size.depth not in depth_ok:
        raise ValueError(f"{arch} supports depth {depth_ok[-1] or 'default'} only, got {size.depth}")
    if arch != "mobilenet" and size.stage2_stride != 1:
        raise ValueError(f"stage2_stride is a mobilenet setting; {arch} got {size.stage2_stride}")


def _preact(size) -> nn.Module:
    _check_unused("preact", size, (0, 18))
    return WidePreActResNet(size.width)


def _wrn(size) -> nn.Module:
    _check_unused("wrn", size, (size.depth,))
    depth = size.depth or 34
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 16, 28, 34), got {depth}")
    if size.width != int(size.width):
        raise ValueError(f"WideResNet widen factor must be a whole number, got {size.width}")
    return WideResNet(depth=depth, widen_factor=int(size.width))


def _vgg(size) -> nn.Module:
    _check_unused("vgg", size, (0, 16))
    return CifarVGG(size.width)


def _mobilenet(size) -> nn.Module:
    _check_unused("mobilenet", size, (0,))
    return cifar_mobilenet_v2(size.width, size.stage2_stride)


BUILDERS = {"preact": _preact, "wrn": _wrn, "vgg": _vgg, "mobilenet": _mobilenet}
ARCHS = tuple(BUILDERS)


def build_architecture(arch: str, size) -> nn.Module:
    """The [0, 1]-input network ``arch`` with the size ``size`` (a ``classifiers.config.ArchConfig``)."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; valid names are {', '.join(ARCHS)}")
    return Normalized(BUILDERS[arch](size))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
