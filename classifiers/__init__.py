"""The four CIFAR-10 classifiers of the paper (PreActResNet-18, WRN-34-10, VGG-16-BN, MobileNet-V2).

Short names ``preact``, ``wrn``, ``vgg``, ``mobilenet``; presets ``paper`` (published sizes and recipe)
and ``small`` (trains on one CPU core in about 30 minutes). Models take images in [0, 1].
"""
from .architectures import ARCHS, count_parameters
from .config import PRESETS, SPLIT_SEED, TrainConfig, load_preset
from .evaluate import accuracy
from .registry import build_classifier, load_classifier

__all__ = ["ARCHS", "PRESETS", "SPLIT_SEED", "TrainConfig", "accuracy", "build_classifier", "count_parameters",
           "load_classifier", "load_preset"]
