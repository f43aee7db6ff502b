"""Every defence the toolkit evaluates, created by name through one registry::

    from purify.defences import make_defence
    jpeg = make_defence("jpeg", quality=75)
    bcm = make_defence("bcm", checkpoint="checkpoints/bcm/cifar10-small.pt", t_star=1.0)
    diffusion = make_defence("diffusion", checkpoint="checkpoints/bcm/cifar10-small.pt", steps=100)
    vote = make_defence("vote", checkpoint="checkpoints/bcm/cifar10-small.pt", base="bcm", n=10)
    defended = vote.wrap(classifier)

Defences map images in [0, 1] to images in [0, 1] (``purify.base.Defence``): ``none``; the BCM purifier
``bcm`` and its add-noise-then-denoise baseline ``denoise``; ``diffusion``, DiffPure-style purification with
the same network (100 steps); the classic input transformations ``jpeg`` (torchvision's codec), ``bits``
(bit-depth reduction, feature squeezing) and ``median`` (kornia's median filter); and ``vote``, which
classifies N independent purifications of a randomized defence and returns their majority (or mean-logit)
decision. Transformations without useful gradients declare ``differentiable = False``, so adaptive attacks
differentiate them by BPDA.
"""
from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn
from torchvision.io import decode_jpeg, encode_jpeg

from .base import Defence
from .infra.config import read_yaml
from .infra.images import to_uint8
from .infra.paths import CONFIG_DIR
from .purifier import BCMPurifier, DiffusionPurifier

DEFENCE_CONFIG_DIR = CONFIG_DIR / "defences"
VOTE_RULES = ("majority", "logits")


class JPEG(Defence):
    """JPEG re-compression at ``quality`` (1-100) with torchvision's codec (images quantised to uint8)."""

    name, differentiable = "jpeg", False

    def __init__(self, quality: int = 75):
        super().__init__()
        if int(quality) != quality or not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality must be an integer in [1, 100], got {quality}")
        self.quality = int(quality)

    def settings(self) -> dict:
        return {"quality": self.quality}

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8(images)
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec, which needs FFmpeg's libraries
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            decoded = decode_jpeg(encode_jpeg(list(pixels), quality=self.quality))
        return (torch.stack(decoded).float() / 255).to(device=images.device, dtype=images.dtype)


class BitDepth(Defence):
    """Bit-depth reduction (feature squeezing, Xu et al. 2018): each channel rounded to ``bits`` bits."""

    name, differentiable = "bits", False

    def __init__(self, bits: int = 5):
        super().__init__()
        if int(bits) != bits or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [1, 8], got {bits}")
        self.bits = int(bits)

    def settings(self) -> dict:
        return {"bits": self.bits}

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.bits - 1
        return torch.round(images * levels) / levels


class MedianSmoothing(Defence):
    """Median smoothing over a ``size`` x ``size`` window (kornia's median filter, reflected borders)."""

    name = "median"

    def __init__(self, size: int = 3):
        super().__init__()
        if int(size) != size or size < 1 or size % 2 == 0:
            raise ValueError(f"median size must be an odd positive integer, got {size}")
        self.size = int(size)

    def settings(self) -> dict:
        return {"size": self.size}

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        from kornia.filters import median_blur  # noqa: PLC0415 (kornia is only needed for this defence)

        return median_blur(images, self.size)


class Vote(Defence):
    """Classify ``n`` independent purifications by the randomized defence ``base`` and decide by majority of
    the predicted labels (``how="majority"``, the rule ``majority_vote``: the most frequent label, a tie going
    to the smallest of the tied labels) or by the mean logits (``how="logits"``). Cost: ``n`` times the
    base's. Use ``wrap(classifier)``: a vote decides labels, it does not return images."""

    name = "vote"

    def __init__(self, base: Defence, n: int = 10, how: str = "majority"):
        super().__init__()
        if not isinstance(base, Defence) or isinstance(base, Vote):
            raise ValueError(f"vote needs a defence to repeat (not a vote), got {base!r}")
        if int(n) != n or n < 1:
            raise ValueError(f"vote n must be a positive integer, got {n}")
        if how not in VOTE_RULES:
            raise ValueError(f"vote how must be one of {VOTE_RULES}, got {how!r}")
        self.base, self.n, self.how = base, int(n), how
        self.randomized, self.differentiable = base.randomized, base.differentiable and how == "logits"

    @property
    def nfe(self) -> int:
        return self.n * self.base.nfe

    @property
    def t_star(self) -> float | None:
        """The base's strength."""
        return getattr(self.base, "t_star", None)

    def settings(self) -> dict:
        return {"base": self.base.spec(), "n": self.n, "how": self.how}

    def family(self) -> str:
        return self.spec().replace(self.base.spec(), self.base.family())

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError("a vote decides labels, it does not return images: use vote.wrap(classifier)")

    def wrap(self, classifier: nn.Module) -> nn.Module:
        return VotedClassifier(self, classifier).train(classifier.training)


def vote_shares(labels: torch.Tensor, num_classes: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The share of the votes each class gets: ``labels`` (n, ...) -> (..., classes). Every vote and every
    majority scoring counts its votes here."""
    return nn.functional.one_hot(labels, num_classes).to(dtype).mean(0)


def vote_scores(logits: torch.Tensor, how: str) -> torch.Tensor:
    """The scores whose argmax is a vote's decision, from the logits (n, ..., classes) of ``n`` purifications:
    the vote shares of the predicted labels (``how="majority"``) or the mean logits (``how="logits"``)."""
    if how == "logits":
        return logits.mean(0)
    return vote_shares(logits.argmax(-1), logits.shape[-1], logits.dtype)


def majority_vote(labels: torch.Tensor) -> torch.Tensor:
    """The deployed decision of a majority vote (``Vote`` with ``how="majority"``): for ``labels`` of shape
    (n, ...), the n predicted labels of each image, the most frequent label of each image, a tie going to the
    smallest of the tied labels (votes [3, 3, 5, 5] decide 3). That is the argmax of the vote shares
    ``vote.wrap(classifier)`` returns, as ``torch.argmax`` takes the first of equal maxima."""
    return vote_shares(labels).argmax(-1)


class VotedClassifier(nn.Module):
    """``vote.wrap(classifier)``: scores whose argmax is the vote's decision (the vote shares, whose argmax is
    ``majority_vote`` of the predicted labels, or the mean logits)."""

    def __init__(self, vote: Vote, classifier: nn.Module):
        super().__init__()
        self.vote, self.classifier = vote, classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return vote_scores(torch.stack([self.classifier(self.vote.base(images)) for _ in range(self.vote.n)]),
                           self.vote.how)


_BCM_DEFENCES = {"bcm": BCMPurifier, "denoise": BCMPurifier, "diffusion": DiffusionPurifier}
BCM_DEFENCES = tuple(_BCM_DEFENCES)  # the defences built on a BCM checkpoint
_TRANSFORMS = {"none": Defence, "jpeg": JPEG, "bits": BitDepth, "median": MedianSmoothing}
DEFENCES = ("none", "bcm", "denoise", "diffusion", "jpeg", "bits", "median", "vote")


def needs_bcm(name: str, options: dict) -> bool:
    """Whether the defence ``name`` with ``options`` is built on a BCM checkpoint."""
    return name in BCM_DEFENCES or (name == "vote" and options.get("base", "bcm") in BCM_DEFENCES)


def make_defence(name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 seed: int | None = None, **options) -> Defence:
    """The defence ``name`` (one of ``DEFENCES``) with ``options``; ``checkpoint`` is the BCM of ``bcm``,
    ``denoise`` and ``diffusion`` (their t* defaults to the value its preset records), ``seed`` seeds their
    noise. ``vote`` takes ``base`` (a defence name, default ``bcm``), ``n``, ``how`` and the base's options."""
    if name not in DEFENCES:
        raise ValueError(f"unknown defence {name!r}; known defences: {', '.join(DEFENCES)}")
    if name == "vote":
        vote_options = {k: options.pop(k) for k in ("n", "how") if k in options}
        base = options.pop("base", "bcm")
        if base == "vote":
            raise ValueError("vote needs a randomized defence to repeat as its base, not another vote")
        return Vote(make_defence(base, checkpoint, device, seed, **options), **vote_options)
    if name in _TRANSFORMS:
        cls = _TRANSFORMS[name]
        _check_options(name, cls.__init__, options, ())
        return cls(**options)
    cls = _BCM_DEFENCES[name]
    _check_options(name, cls.__init__, options, ("bcm", "mode", "seed"))
    if checkpoint is None:
        raise ValueError(f"the {name!r} defence needs a BCM checkpoint (checkpoint=... or --bcm)")
    if not Path(checkpoint).is_file():
        raise ValueError(f"no BCM checkpoint at {checkpoint}")
    if name != "diffusion":
        options["mode"] = name
    return cls.from_checkpoint(checkpoint, device=device, seed=seed, **options)


def _check_options(name: str, init, options: dict, internal: tuple[str, ...]) -> None:
    valid = [p for p in inspect.signature(init).parameters if p not in ("self", *internal)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for defence {name!r}; valid: "
                         f"{', '.join(valid) or 'none'}")


def parse_defence(text: str) -> tuple[str, dict]:
    """A defence spec from the command line: ``NAME``, ``NAME:key=value,key=value`` (values read as YAML
    scalars or lists, e.g. ``jpeg:quality=50``, ``vote:base=bcm,n=10,t_star=2``,
    ``bcm:inversion_times=[0.5, 1],t_star=2``), or a YAML file (a path, or
    a name under ``configs/defences/``) holding ``name:`` and the options."""
    path = Path(text)
    if not path.is_file() and ":" not in text and (DEFENCE_CONFIG_DIR / f"{text}.yaml").is_file():
        path = DEFENCE_CONFIG_DIR / f"{text}.yaml"
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"defence file {text} does not exist")
        spec = read_yaml(path)
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{path}: a defence file is a mapping with a 'name' key and the options")
        return str(spec.pop("name")), spec
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, _split_top_level(rest)):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad defence option {item!r} in {text!r}: write key=value")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"bad value {value!r} of defence option {key.strip()!r} in {text!r}") from None
    return name.strip(), options


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets, so list values (``inversion_times=[0.5, 1]``) stay whole."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]
