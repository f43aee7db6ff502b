"""Fine-tune a trained classifier *through* a defence: ``python -m classifiers.finetune --arch preact --recipe NAME``.

A recipe (``configs/finetune/{name}.yaml``) names a defence from the registry (``purify.make_defence``; e.g.
the BCM purifier) and an optional attack. Every training batch is (1) augmented as in ``classifiers.train``,
(2) with an attack, perturbed within the L-inf ball by an attack on the *defended* classifier (the gradient
flows through the purifier's two network evaluations, with fresh purifier noise), (3) passed through the
defence with fresh noise, and the classifier alone is trained on the result (the BCM stays frozen):

- ``attack: none``: fine-tuning on purified clean images (the classifier learns the purifier's output
  distribution);
- ``attack: fgsm``: FGSM with a uniform random start and step 1.25 eps, "fast adversarial training" (Wong,
  Rice & Kolter 2020), torchattacks' ``FFGSM``;
- ``attack: pgd``: ``steps`` of L-inf PGD with a random start (Madry et al. 2018), torchattacks' ``PGD``.

With ``defence: none`` the same recipe adversarially fine-tunes the classifier on its own: the deterministic
reference of the robustness comparison. The checkpoint with the best validation score is kept: accuracy on
the 1,000 held-out training images after the defence, and with an attack, accuracy under ``val_steps``-step PGD
through the defence on ``val_n`` of them. It is written as ``{out-dir}/{arch}-{preset}-{recipe}.pt``, which
the bench commands load with ``--classifier-variant {recipe}``; training resumes (``--resume``) and stops
cleanly on a time budget like ``classifiers.train``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torchattacks
from torch import nn

from purify import Defence, make_defence, parse_defence
from purify.defences import needs_bcm
from purify.infra.config import from_dict, load_yaml, to_dict
from purify.infra.data import seeded_subset
from purify.infra.images import as_float
from purify.infra.paths import CONFIG_DIR
from purify.infra.runtime import autocast, pick_device
from purify.purifier import shipped_bcm_path

from .architectures import ARCHS
from .config import PRESETS, TrainConfig
from .evaluate import accuracy
from .registry import DEFAULT_CHECKPOINT_DIR, checkpoint_path, load_classifier_state
from .train import add_run_arguments, parse_run_arguments, train

RECIPE_DIR = CONFIG_DIR / "finetune"
FINETUNE_ATTACKS = ("none", "fgsm", "pgd")  # the attacks a recipe trains against


@dataclasses.dataclass
class Recipe:
    """How to fine-tune: the defence trained through, the attack, the schedule and the selection."""
    defence: str = "bcm"          # a registry spec (``NAME`` or ``NAME:key=value,...``)
    attack: str = "fgsm"          # none | fgsm | pgd
    eps: int = 8                  # L-inf budget k of eps = k/255
    steps: int = 1                # pgd: attack steps (fgsm takes one)
    step_size: float = 2.0        # pgd: step size k/255 (fgsm: 1.25 eps)
    epochs: int = 2
    lr: float = 0.02              # peak of the one-cycle schedule (linear warm-up, linear decay)
    warmup_fraction: float = 0.1
    val_n: int = 200              # validation images of the robust selection score (attack != none)
    val_steps: int = 10           # PGD steps of the robust selection score, step eps/4
    base: str | None = None       # the variant to start from ({arch}-{preset}-{base}.pt); default the standard one

    def __post_init__(self):
        if self.attack not in FINETUNE_ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(FINETUNE_ATTACKS)}, got {self.attack!r}")
        if not 0 < self.eps <= 255 or self.steps < 1 or self.epochs < 1 or self.lr <= 0 or self.val_n < 1:
            raise ValueError("eps must be in (0, 255], steps, epochs and val_n at least 1, lr positive")


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``configs/finetune/{name}.yaml``) or path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise ValueError(f"unknown recipe {name_or_path!r}; known recipes: {known} (in {RECIPE_DIR})")
    return load_yaml(Recipe, path)


def recipe_attack(recipe: Recipe, model: nn.Module, steps: int | None = None):
    """The recipe's training attack on ``model`` (with ``steps``: the validation PGD of ``steps`` steps)."""
    eps = recipe.eps / 255
    if steps is not None:
        return torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)
    if recipe.attack == "fgsm":
        return torchattacks.FFGSM(model, eps=eps, alpha=1.25 * eps)
    return torchattacks.PGD(model, eps=eps, alpha=recipe.step_size / 255, steps=recipe.steps, random_start=True)


def training_inputs(recipe: Recipe, defence: Defence, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    bf16: bool = False) -> torch.Tensor:
    """What the classifier is trained on for the batch ``x`` in [0, 1] with labels ``y``: with an attack,
    ``x`` is first perturbed by the recipe's attack on the defended classifier (the gradient flows through
    the defence, with fresh noise at every step); then the defence is applied with fresh noise."""
    if recipe.attack != "none":
        with autocast(x.device, bf16):
            x = recipe_attack(recipe, defence.wrap(model))(x, y).float()
    with torch.no_grad(), autocast(x.device, bf16):
        return defence(x).float()


def finetune(arch: str, recipe_name: str, preset: str = "small", *, bcm: str | None = None,
             checkpoint_dir=DEFAULT_CHECKPOINT_DIR, out_dir=DEFAULT_CHECKPOINT_DIR, device: str = "auto",
             bf16: bool | None = None, **train_options) -> dict:
    """Fine-tune ``{checkpoint_dir}/{arch}-{preset}.pt`` (the recipe's ``base``: ``{arch}-{preset}-{base}.pt``) by
    ``recipe_name``; returns ``train``'s summary.

    ``bcm`` is the BCM checkpoint of a BCM defence (default: the preset's shipped one); ``train_options`` go
    to ``classifiers.train.train`` (data_root, run_dir, results_dir, seed, threads, max_minutes, resume,
    train_subset, test_subset, progress)."""
    recipe = load_recipe(recipe_name)
    variant = Path(recipe_name).stem
    base_path, base = load_classifier_state(arch, preset, checkpoint_dir, recipe.base)
    # the base's own training config (its sizes and data protocol) with the fine-tuning schedule
    config = dataclasses.replace(from_dict(TrainConfig, base["config"], f"{base_path}:config"), lr=recipe.lr,
                                 schedule="onecycle", warmup_fraction=recipe.warmup_fraction)
    config.arch(arch).epochs = recipe.epochs
    run_device = pick_device(device)
    bf16 = config.use_bf16(run_device) if bf16 is None else bf16

    name, options = parse_defence(recipe.defence)
    uses_bcm = needs_bcm(name, options)
    bcm = str(bcm or shipped_bcm_path(f"cifar10-{preset}")) if uses_bcm else None
    defence = make_defence(name, checkpoint=bcm, device=run_device, **options)
    if recipe.attack != "none" and not defence.differentiable:
        raise ValueError(f"the defence {defence.spec()} is not differentiable; adversarial fine-tuning needs "
                         f"gradients through it (attack: none fine-tunes on its outputs)")

    def inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return training_inputs(recipe, defence, model, x, y, bf16)

    def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The selection score: accuracy after the defence; with an attack, accuracy under ``val_steps``-step
        PGD through the defence on a seeded subset of ``val_n`` images. The defence's noise and PGD's start
        are seeded, so every epoch is scored on the same draws."""
        defended = defence.wrap(model).eval()
        with torch.random.fork_rng(devices=[run_device] if run_device.type == "cuda" else []):
            torch.manual_seed(0)
            if recipe.attack == "none":
                return accuracy(defended, x, y, device=run_device, progress=False)
            keep = seeded_subset(len(x), recipe.val_n, seed=0)
            images, labels = as_float(x[keep]).to(run_device), y[keep].to(run_device)
            attack = recipe_attack(recipe, defended, steps=recipe.val_steps)
            with autocast(run_device, bf16):
                adversarial = torch.cat([attack(images[i:i + 100], labels[i:i + 100]).float()
                                         for i in range(0, len(images), 100)])
            return accuracy(defended, adversarial, labels, device=run_device, progress=False)

    metadata = {"finetune": {"recipe": to_dict(recipe), "variant": variant, "defence": defence.spec(),
                             "base": str(base_path), "bcm": bcm}}
    return train(arch, preset, config=config, out_dir=out_dir, device=device, bf16=bf16, variant=variant,
                 init_weights=base["model"], inputs=inputs, evaluate=evaluate, metadata=metadata,
                 **train_options)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m classifiers.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example (CPU, one core): python -m classifiers.finetune --arch preact "
                                            "--recipe bcm-fgsm --threads 1 --max-minutes 60 (then --resume)")
    parser.add_argument("--arch", required=True, choices=ARCHS,
                        help="architecture short name")
    parser.add_argument("--recipe", required=True,
                        help=f"a recipe name under configs/finetune/ "
                             f"({', '.join(sorted(p.stem for p in RECIPE_DIR.glob('*.yaml')))}) or a YAML path; "
                             f"the result is {{arch}}-{{preset}}-{{recipe}}.pt")
    parser.add_argument("--preset", default="small", choices=PRESETS, help="classifier preset (default: small)")
    parser.add_argument("--bcm", default=None,
                        help="BCM checkpoint of a BCM defence (default: checkpoints/bcm/cifar10-<preset>.pt)")
    parser.add_argument("--checkpoint-dir", default=str(DEFAULT_CHECKPOINT_DIR),
                        help="where the classifier to start from, {arch}-{preset}.pt, is read")
    parser.add_argument("--out-dir", default=str(DEFAULT_CHECKPOINT_DIR),
                        help="where {arch}-{preset}-{recipe}.pt (best-validation weights) is written")
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root (default: $BCM_DATA)")
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv)
    try:
        finetune(args.arch, args.recipe, args.preset, bcm=args.bcm, checkpoint_dir=args.checkpoint_dir,
                 out_dir=args.out_dir, device=args.device, bf16=args.bf16, data_root=args.data_root,
                 run_dir=args.run_dir, results_dir=args.results_dir, seed=args.seed, threads=args.threads,
                 max_minutes=args.max_minutes, resume=args.resume, train_subset=args.train_subset,
                 progress=not args.no_progress)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {checkpoint_path(args.arch, args.preset, args.out_dir, Path(args.recipe).stem)}", file=sys.stderr)


if __name__ == "__main__":
    main()
