"""One (defence, target, eps) evaluation of the white-box grid (``Setting``): the defended model, the model
attacks differentiate, the noise of evaluation and each threat's adversarial images; and what a run loads
(``Workload``): classifiers, defences, images and checkpoint ids."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import classifiers
from attacks import (BPDA, SUITE, BestIteratePGD, BestLossAPGD, BestMarginSquare, autoattack_standard, craft,
                     get_protocol, paper_pgd, pgd_steps, predict_draws, run_autoattack)
from purify import image_noise, parse_defence
from purify.infra.images import as_float

from ..common import (Entry, build_defences, classifier_path, combine_ids, file_id, load_classifiers,
                      load_split)
from .config import Run
from .schema import ATTACK_NAMES, DETERMINISTIC_ATTACKS, RANDOMIZED_ATTACKS, THREATS


class Setting:
    """One (defence, target, eps) evaluation: the defended model, the model attacks differentiate (BPDA for a
    defence that is not differentiable), its noise control and its images."""

    def __init__(self, run: Run, target: str, classifier, entry: Entry, eps: int, images, labels, ids,
                 checkpoint_id: str):
        self.run, self.target, self.classifier, self.eps = run, target, classifier, eps
        self.defence = entry.defence
        self.images, self.labels, self.ids = images, labels, ids
        self.defended = self.defence.wrap(classifier)
        self.attacked = nn.Sequential(self.defence if self.defence.differentiable else BPDA(self.defence),
                                      classifier).eval()
        self.protocol = get_protocol(run.protocol)
        randomized = self.defence.randomized
        self.eot = self.protocol.eot if randomized else 1
        self.restarts = self.protocol.restarts if randomized else self.protocol.restarts_deterministic
        self.checkpoint_id = checkpoint_id
        self.noise_shape = self.defence.noise_shape(tuple(images.shape[1:]))
        self.attacks = [t for t in (RANDOMIZED_ATTACKS if randomized else DETERMINISTIC_ATTACKS)
                        if t != "square" or self.protocol.square_queries]
        chosen = set(run.threats) | {"worst"} if run.threats else set(THREATS)
        applicable = {"clean", "transfer", "worst", *self.attacks} | ({"pgd-fixed"} if randomized else set())
        self.threats = [t for t in THREATS if t in applicable and t in chosen]
        self.worst_of = [t for t in self.attacks if t in self.threats]  # the white-box threats "worst" combines

    def eval_noise(self, ids: torch.Tensor, draw: int):
        """Fresh defence noise per image and evaluation, from the evaluation seed."""
        if not self.defence.randomized:
            return contextlib.nullcontext()
        return self.defence.fixed_noise(image_noise(ids, self.noise_shape, self.run.eval_seed, draw))

    def attack_noise(self, ids: torch.Tensor, draw: int):
        """Fresh defence noise at every attack step, drawn per image from the attack seed (a noise stream), so
        an image's attack does not depend on its batch or on the process that runs it."""
        return self.defence.noise_stream(ids, self.run.attack_seed)

    def frozen_noise(self, ids: torch.Tensor, draw: int):
        """The fixed-randomness ablation: one noise per image (whatever the draw), for attack and evaluation."""
        return self.defence.fixed_noise(image_noise(ids, self.noise_shape, self.run.eval_seed, 0))

    def row(self, threat: str) -> dict:
        """The columns shared by every scoring of ``threat``."""
        protocol, steps, names = self.protocol, self.protocol.steps, ATTACK_NAMES
        attack = {"clean": ("none", 0, 1, 1),
                  "transfer": (f"PGD on the undefended {self.target}", pgd_steps(self.eps), 1, 1),
                  "pgd-margin": (f"{names['pgd-margin']}, best iterate", steps, self.eot, self.restarts),
                  "pgd-ce": (f"{names['pgd-ce']}, best iterate", steps, self.eot, self.restarts),
                  "apgd-ce": (f"{names['apgd-ce']}, best-loss iterate", steps, self.eot, 1),
                  "apgd-dlr": (f"{names['apgd-dlr']}, best-loss iterate", steps, self.eot, 1),
                  "square": (f"{names['square']}, best-margin query", protocol.square_queries, self.eot, 1),
                  "aa-standard": ("AutoAttack standard", 100, 1, 1),
                  "worst": (f"worst per image of {', '.join(self.worst_of)}", steps, self.eot, self.restarts),
                  "pgd-fixed": (f"{names['pgd-margin']}, noise frozen per image", steps, 1, 1)}
        name, steps, eot, restarts = attack[threat]
        if not self.defence.differentiable and threat not in ("clean", "transfer", "square"):
            name += " with BPDA (identity backward)"
        defence = self.defence
        return dict(suite=SUITE, preset=self.run.preset, defence=defence.spec(), family=defence.family(),
                    nfe=defence.nfe, t_star=getattr(defence, "t_star", None),
                    eps_inv=defence.settings()["eps_inv"] if defence.name == "bcm" else None, target=self.target,
                    split=self.run.split, n=len(self.images),
                    data_seed=self.run.seed, eps=0 if threat == "clean" else self.eps, protocol=protocol.name,
                    threat=threat, attack=name, steps=steps, eot=eot, restarts=restarts, evals=protocol.evals,
                    attack_seed=self.run.attack_seed, eval_seed=self.run.eval_seed, bf16=self.run.bf16,
                    checkpoints=self.checkpoint_id)

    # -- the threats: each returns adversarial images (float in [0, 1]) ------------------------------------
    def attack(self, threat: str, steps: int | None = None, eot: int | None = None):
        """The attack object of a white-box ``threat`` (``attacks.eot``), at the protocol's budget unless ``steps``
        (Square's queries) and ``eot`` (draws per step) say otherwise (a convergence study's budgets)."""
        eps, seed = self.eps / 255, self.run.attack_seed
        steps = steps or (self.protocol.square_queries if threat == "square" else self.protocol.steps)
        eot = eot or self.eot
        if threat in ("pgd-margin", "pgd-ce"):
            return BestIteratePGD(self.attacked, eps, steps, eot, threat.split("-")[1], self.restarts, seed=seed)
        if threat == "pgd-fixed":
            return BestIteratePGD(self.attacked, eps, steps, 1, "margin", seed=seed)
        if threat in ("apgd-ce", "apgd-dlr"):
            return BestLossAPGD(self.attacked, eps, steps, eot, threat.split("-")[1], seed=seed)
        if threat == "square":
            return BestMarginSquare(self.attacked, eps, steps, eot, seed=seed)
        raise ValueError(f"unknown threat {threat!r}")

    def adversarial(self, threat: str) -> torch.Tensor:
        run = self.run
        common = dict(batch_size=run.batch_size, seed=run.attack_seed, bf16=run.bf16, progress=run.progress,
                      ids=self.ids)
        if threat == "clean":
            return as_float(self.images)
        if threat == "transfer":
            return craft(paper_pgd(self.classifier, self.eps, seed=run.attack_seed), self.images, self.labels,
                         desc="transfer PGD", **common)
        if threat == "aa-standard":
            device = next(self.classifier.parameters()).device
            adversary = autoattack_standard(self.attacked, self.eps / 255, run.attack_seed, device)
            return run_autoattack(adversary, self.images, self.labels, run.batch_size, run.bf16)
        noise = self.frozen_noise if threat == "pgd-fixed" else self.attack_noise
        return craft(self.attack(threat), self.images, self.labels, desc=threat, noise=noise, **common)

    def part(self, start: int, stop: int) -> "Setting":
        """The same setting on the images at positions ``start .. stop-1`` (one block of a sharded run)."""
        part = self.subset(slice(start, stop))
        part.run = dataclasses.replace(self.run, progress=False)
        return part

    def subset(self, index) -> "Setting":
        """The same setting on the images at positions ``index`` (a slice, or a tensor of positions)."""
        part = copy.copy(self)
        part.images, part.labels, part.ids = self.images[index], self.labels[index], self.ids[index]
        return part

    def predictions(self, threat: str, images: torch.Tensor) -> torch.Tensor:
        noise = self.frozen_noise if threat == "pgd-fixed" else self.eval_noise
        return predict_draws(self.defended, images, self.ids, self.protocol.evals, noise, self.run.batch_size)



@dataclass(frozen=True, eq=False)
class Workload:
    """What a run evaluates: the classifiers by target, the defences (per spec, t* and eps_inv), the images with
    their labels and dataset ids, and the id of the checkpoints behind each (target, defence)."""
    run: Run
    models: dict
    entries: list[Entry]
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    checkpoint_ids: dict  # (target, id(entry)) -> combined checkpoint id

    @classmethod
    def load(cls, run: Run, device: torch.device) -> "Workload":
        """Classifiers, defences, images and checkpoint ids of ``run`` on ``device``."""
        if run.threads:
            torch.set_num_threads(run.threads)
        models = load_classifiers(run.targets, run.preset, run.classifier_dir, device)
        specs = []
        for spec in run.defences:  # --eps-inv multiplies the bcm specs
            name, _ = parse_defence(spec)
            specs += ([f"{spec}{',' if ':' in spec else ':'}eps_inv={e}" for e in run.eps_inv]
                      if name == "bcm" and run.eps_inv else [spec])
        entries = build_defences(run, specs, device, t_stars=run.t_stars)
        images, labels, ids = load_split(run.split, run.data_root, run.n, run.seed,
                                         classifiers.load_preset(run.preset).n_val)
        checkpoint_ids = {(name, id(entry)): combine_ids(
            entry.checkpoint_id, file_id(str(classifier_path(name, run.preset, run.classifier_dir))))
            for name in run.targets for entry in entries}
        return cls(run, models, entries, images, labels, ids, checkpoint_ids)

    def setting(self, target: str, entry: Entry, eps: int) -> Setting:
        return Setting(self.run, target, self.models[target], entry, eps, self.images, self.labels, self.ids,
                       self.checkpoint_ids[target, id(entry)])

    def settings(self):
        """Every selected (target, defence, eps) setting, in the run's order."""
        for target in self.run.targets:
            for entry in self.entries:
                for eps in self.run.eps:
                    yield self.setting(target, entry, eps)
