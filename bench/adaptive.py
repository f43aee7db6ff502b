"""White-box (adaptive) evaluation of a defence: the attacker knows the defence and attacks through it.

For each defence (``--defence``, default the BCM purifier; a majority vote such as ``bcm-robust`` is evaluated as
its base with N = its n), target classifier, purification strength t* (and eps_inv) and eps, the defended
classifier is evaluated under these threat models (column ``threat``; attacks in ``attacks.eot``):

  clean        no attack
  transfer     black box: the paper's PGD (round(5k/4) steps of 2/255) crafted on the undefended target itself,
               then purified (Table 3's threat model with source = target)
  pgd-margin   white box: L-inf PGD on the margin of the prediction averaged over the protocol's draws of the
               defence's noise (exact gradients through both BCM passes; BPDA, the identity backward, for
               defences that are not differentiable), step 2 -> 1 -> 0.5 x eps/8, restarts, best iterate
  pgd-ce       the same on the cross-entropy of the averaged prediction
  apgd-ce      AutoAttack's APGD (its own step-size schedule at this budget) on the same averaged prediction,
  apgd-dlr     CE and DLR losses, highest-loss iterate per image (randomized defences)
  square       AutoAttack's gradient-free Square on the same averaged prediction (randomized defences; gpu and
               paper protocols)
  aa-standard  white box, deterministic defences (none, jpeg, bits, median): AutoAttack's standard version
               (APGD-CE, APGD-T, FAB-T, Square) at its published budgets, beside margin- and CE-PGD with restarts
  worst        per image the worst of the white-box threats above
  pgd-fixed    ablation for randomized defences: the noise frozen per image while attacking and evaluating

Each threat's examples are evaluated N times with fresh noise, drawn per image from the evaluation seed
(independent of the attack's seed and of batching), in float32, and scored three ways (column ``scoring``):
``single`` = average of N evaluations, ``worst`` = all N correct, ``vote`` = the true label holds a strict
majority of the N (ties wrong). Each cell carries a 95% bootstrap interval; with the classifier alone in the same
run (``--defence none bcm-robust``), the paired difference defended minus alone, with its interval, ends the
report. Runs on ``--split test`` or ``sealed`` are appended to ``results/adaptive/test-ledger.csv``.

Protocols (steps x draws for every white-box threat): ``cpu`` 20 x 4, ``gpu`` 100 x 10 with Square 1,000
queries, ``paper`` 200 x 20 with Square 5,000; N = 10. The suite's version (``attacks.SUITE``) and protocol are
in every results key, so a resumed CSV never mixes suites.

Writes a tidy CSV (one row per setting, threat and scoring, with the attack's parameters, seeds, checkpoint
ids, wall time and seconds per image), per-image predictions next to it (``<out>-predictions/``), a
Markdown table and a PNG (accuracy against t*). Reruns resume: finished (setting, threat) units are skipped.

    python -m bench.adaptive --split val --t-stars 0.5 1 --n 200                 # choose settings here, not on test
    python -m bench.adaptive --defence none bcm-robust --target preact:adv-fgsm-long --split sealed --n 500 \
        --protocol gpu --device cuda                                             # a sealed headline, paired
    python -m bench.adaptive --defence diffusion:t_star=0.1 --threats clean pgd-margin --n 50 --batch-size 4
                                   # one threat alone: an upper bound on the robust accuracy of a slow defence
    python -m bench.adaptive --sanity --split val --n 50                        # Carlini et al.'s sanity checks
    python -m bench.adaptive --convergence 20x4 40x8 --split val --n 500       # does doubling the budget add?
    python -m bench.adaptive --retime --target preact --t-stars 0.5 1 --n 200  # re-measure the costs
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import classifiers
from attacks import (BPDA, PROTOCOLS, SCORINGS, SUITE, BestIteratePGD, BestLossAPGD, BestMarginSquare, autoattack_standard,
                     correct_by_scoring, craft, get_protocol, paper_pgd, pgd_steps, predict_draws,
                     run_autoattack)
from purify import Defence, image_noise, parse_defence
from purify.infra.checkpoint import atomic_write
from purify.infra.images import as_float
from purify.infra.paths import RESULTS_DIR
from purify.infra.runtime import autocast, cpu_capability, cpu_name, pick_device

from .common import (DEFENCE_HELP, Entry, ResultTable, add_common_arguments, add_split_argument,
                     attack_step_cost, build_defences, device_clock, check_defences, check_names, classifier_path, combine_ids,
                     file_id, load_classifiers, load_split, run_command, text, write_text)
from .intervals import bootstrap_interval
from .ledger import append_ledger

SANITY_BUDGETS = [(5, 1), (10, 2), (20, 4), (40, 8)]  # PGD steps x EOT draws; the last but one is the cpu protocol's
# white-box threats of a randomized defence, of a deterministic one; then the rest
RANDOMIZED_ATTACKS = ("pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "square")
DETERMINISTIC_ATTACKS = ("pgd-margin", "pgd-ce", "aa-standard")
THREATS = ("clean", "transfer", "pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "square", "aa-standard", "worst",
           "pgd-fixed")
KEY = ["suite", "preset", "defence", "t_star", "eps_inv", "target", "split", "n", "data_seed", "eps", "protocol",
       "threat", "scoring"]
COLUMNS = KEY + ["family", "nfe", "attack", "steps", "eot", "restarts", "evals", "attack_seed", "eval_seed", "bf16",
                 "accuracy", "ci_low", "ci_high", "wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image",
                 "checkpoints"]
DATASET = "CIFAR-10 (JPEG q75 copy)"


class Setting:
    """One (defence, target, eps) evaluation: the defended model, the model attacks differentiate (BPDA for a
    defence that is not differentiable), its noise control and its images."""

    def __init__(self, args, target: str, classifier, entry: Entry, eps: int, images, labels, ids,
                 checkpoint_id: str):
        self.args, self.target, self.classifier, self.eps = args, target, classifier, eps
        self.defence = entry.defence
        self.images, self.labels, self.ids = images, labels, ids
        self.defended = self.defence.wrap(classifier)
        self.attacked = nn.Sequential(self.defence if self.defence.differentiable else BPDA(self.defence),
                                      classifier).eval()
        self.protocol = get_protocol(args.protocol)
        randomized = self.defence.randomized
        self.eot = self.protocol.eot if randomized else 1
        self.restarts = self.protocol.restarts if randomized else self.protocol.restarts_deterministic
        self.checkpoint_id = checkpoint_id
        self.noise_shape = self.defence.noise_shape(tuple(images.shape[1:]))
        self.attacks = [t for t in (RANDOMIZED_ATTACKS if randomized else DETERMINISTIC_ATTACKS)
                        if t != "square" or self.protocol.square_queries]
        chosen = set(args.threats) | {"worst"} if getattr(args, "threats", None) else set(THREATS)
        applicable = {"clean", "transfer", "worst", *self.attacks} | ({"pgd-fixed"} if randomized else set())
        self.threats = [t for t in THREATS if t in applicable and t in chosen]
        self.worst_of = [t for t in self.attacks if t in self.threats]  # the white-box threats "worst" combines

    def eval_noise(self, ids: torch.Tensor, draw: int):
        """Fresh defence noise per image and evaluation, from the evaluation seed."""
        if not self.defence.randomized:
            return contextlib.nullcontext()
        return self.defence.fixed_noise(image_noise(ids, self.noise_shape, self.args.eval_seed, draw))

    def frozen_noise(self, ids: torch.Tensor, draw: int):
        """The fixed-randomness ablation: one noise per image (whatever the draw), for attack and evaluation."""
        return self.defence.fixed_noise(image_noise(ids, self.noise_shape, self.args.eval_seed, 0))

    def row(self, threat: str) -> dict:
        """The columns shared by every scoring of ``threat``."""
        protocol, steps = self.protocol, self.protocol.steps
        attack = {"clean": ("none", 0, 1, 1),
                  "transfer": (f"PGD on the undefended {self.target}", pgd_steps(self.eps), 1, 1),
                  "pgd-margin": ("margin-PGD, best iterate", steps, self.eot, self.restarts),
                  "pgd-ce": ("CE-PGD, best iterate", steps, self.eot, self.restarts),
                  "apgd-ce": ("APGD-CE, best-loss iterate", steps, self.eot, 1),
                  "apgd-dlr": ("APGD-DLR, best-loss iterate", steps, self.eot, 1),
                  "square": ("Square, best-margin query", protocol.square_queries, self.eot, 1),
                  "aa-standard": ("AutoAttack standard", 100, 1, 1),
                  "worst": (f"worst per image of {', '.join(self.worst_of)}", steps, self.eot, self.restarts),
                  "pgd-fixed": ("margin-PGD, noise frozen per image", steps, 1, 1)}
        name, steps, eot, restarts = attack[threat]
        if not self.defence.differentiable and threat not in ("clean", "transfer", "square"):
            name += " with BPDA (identity backward)"
        defence = self.defence
        return dict(suite=SUITE, preset=self.args.preset, defence=defence.spec(), family=defence.family(),
                    nfe=defence.nfe, t_star=getattr(defence, "t_star", None),
                    eps_inv=defence.eps_inv if defence.name == "bcm" else None, target=self.target,
                    split=self.args.split, n=len(self.images),
                    data_seed=self.args.seed, eps=0 if threat == "clean" else self.eps, protocol=protocol.name,
                    threat=threat, attack=name, steps=steps, eot=eot, restarts=restarts, evals=protocol.evals,
                    attack_seed=self.args.attack_seed, eval_seed=self.args.eval_seed, bf16=self.args.bf16_on,
                    checkpoints=self.checkpoint_id)

    # -- the threats: each returns adversarial images (float in [0, 1]) ------------------------------------
    def attack(self, threat: str):
        """The attack object of a white-box ``threat`` (``attacks.eot``)."""
        eps, steps, seed = self.eps / 255, self.protocol.steps, self.args.attack_seed
        if threat in ("pgd-margin", "pgd-ce"):
            return BestIteratePGD(self.attacked, eps, steps, self.eot, threat.split("-")[1], self.restarts)
        if threat == "pgd-fixed":
            return BestIteratePGD(self.attacked, eps, steps, 1, "margin")
        if threat in ("apgd-ce", "apgd-dlr"):
            return BestLossAPGD(self.attacked, eps, steps, self.eot, threat.split("-")[1], seed=seed)
        if threat == "square":
            return BestMarginSquare(self.attacked, eps, self.protocol.square_queries, self.eot, seed=seed)
        raise ValueError(f"unknown threat {threat!r}")

    def adversarial(self, threat: str) -> torch.Tensor:
        args = self.args
        common = dict(batch_size=args.batch_size, seed=args.attack_seed, bf16=args.bf16_on,
                      progress=not args.no_progress, ids=self.ids)
        if threat == "clean":
            return as_float(self.images)
        if threat == "transfer":
            return craft(paper_pgd(self.classifier, self.eps), self.images, self.labels, desc="transfer PGD",
                         **common)
        if threat == "aa-standard":
            device = next(self.classifier.parameters()).device
            adversary = autoattack_standard(self.attacked, self.eps / 255, args.attack_seed, device)
            return run_autoattack(adversary, self.images, self.labels, args.batch_size, args.bf16_on)
        noise = self.frozen_noise if threat == "pgd-fixed" else None
        return craft(self.attack(threat), self.images, self.labels, desc=threat, noise=noise, **common)

    def predictions(self, threat: str, images: torch.Tensor) -> torch.Tensor:
        noise = self.frozen_noise if threat == "pgd-fixed" else self.eval_noise
        return predict_draws(self.defended, images, self.ids, self.protocol.evals, noise, self.args.batch_size)


def unit_id(row: dict) -> str:
    """A file name for one (setting, threat) unit's per-image predictions."""
    key = json.dumps({k: str(row[k]) for k in KEY if k != "scoring"} | {"checkpoints": row["checkpoints"]},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_setting(setting: Setting, table: ResultTable, cache_dir: Path, costs: dict) -> dict:
    """Every threat of ``setting`` not yet in ``table``; each unit's rows are written as soon as it is done.
    Returns per threat the per-image correctness under each scoring, and whether any unit ran now."""
    correct: dict[str, dict[str, torch.Tensor]] = {}
    ran = False
    for threat in setting.threats:
        base = setting.row(threat)
        path = cache_dir / f"{unit_id(base)}.pt"
        rows = [dict(base, scoring=s) for s in SCORINGS]
        if threat == "worst":
            attacks = [t for t in setting.worst_of if t in correct]
            if not attacks:
                continue
            per_image = {s: functools.reduce(torch.minimum, (correct[t][s] for t in attacks)) for s in SCORINGS}
            wall = sum(float(table.rows[table.key(dict(setting.row(t), scoring="single"))]["wall_s"])
                       for t in attacks)
            if all(table.done(r) for r in rows) and not ran:
                correct[threat] = per_image
                continue
        elif path.is_file() and all(table.done(r) for r in rows):
            stored = torch.load(path, weights_only=True)
            correct[threat] = correct_by_scoring(stored["predictions"].long(), setting.labels)
            continue
        else:
            if threat == "clean" and setting.eps != setting.args.eps[0]:
                continue  # clean rows do not depend on eps: computed once, with the first eps
            started = time.monotonic()
            adversarial = setting.adversarial(threat)
            predictions = setting.predictions(threat, adversarial)
            wall = time.monotonic() - started
            if setting.args.export_adversarial and threat not in ("clean", "worst"):
                export_adversarial(setting, threat, adversarial, Path(setting.args.export_adversarial))
            atomic_write(path, lambda tmp: torch.save({"predictions": predictions.to(torch.int8),
                                                        "ids": setting.ids, "row": base}, tmp))
            per_image = correct_by_scoring(predictions.long(), setting.labels)
            ran = True
        correct[threat] = per_image
        n = len(setting.images)
        cells = []
        for r in rows:
            mean, low, high = bootstrap_interval(per_image[r["scoring"]])
            cells.append(dict(r, accuracy=mean, ci_low=low, ci_high=high, wall_s=wall, s_per_image=wall / n, **costs))
        table.add(cells)
    return {"correct": correct, "ran": ran}


def export_adversarial(setting: Setting, threat: str, adversarial: torch.Tensor, folder: Path) -> None:
    """One file per configuration and threat that a third party can re-score: the adversarial images (float32
    in [0, 1]) with their dataset ids, labels, split and the row describing the attack."""
    row = setting.row(threat)
    name = f"{setting.target}-{setting.defence.spec()}-eps{setting.eps}-{threat}".replace(":", "_")
    name = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)
    atomic_write(folder / f"{name}.pt", lambda tmp: torch.save(
        {"images": adversarial.float(), "ids": setting.ids, "labels": setting.labels, "row": row}, tmp))


def measure_costs(setting: Setting, batch_size: int, bf16: bool) -> dict:
    """Seconds per image of one defend+classify forward pass (on a batch of ``batch_size``) and of one attack
    step (forward + backward, BPDA where needed, on 8 images) through the setting's defence and classifier."""
    device = next(setting.classifier.parameters()).device
    x = (setting.images[:batch_size].float() / 255).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), setting.eval_noise(setting.ids[:batch_size], 0), autocast(device, bf16):
        setting.defended(x)  # warm-up at the timed batch
        started = device_clock(device)
        setting.defended(x)
        forward = (device_clock(device) - started) / len(x)
    step = attack_step_cost(setting.defence, setting.classifier, setting.images, device, bf16)
    return {"purify_s_per_image": forward, "step_s_per_image": step}


# -- views --------------------------------------------------------------------------------------------------
def markdown(frame: pd.DataFrame) -> str:
    """One table per (target, eps, protocol, split): rows t* (eps_inv), columns threats, cells
    "single / worst-of-N / vote" accuracy in %."""
    if frame.empty:
        return "(no results)\n"
    parts = []
    settings = ["preset", "family", "target", "split", "n", "data_seed", "protocol", "bf16"]
    for keys, group in frame.groupby(settings, sort=False):
        preset, family, target, split, n, data_seed, protocol, bf16 = keys
        clean = group[group.threat == "clean"]
        for eps, eps_group in group[group.threat != "clean"].groupby("eps"):
            rows = pd.concat([clean, eps_group])
            first = eps_group.iloc[0]
            proto = PROTOCOLS[protocol]
            attacks = proto.describe(eps / 255, randomized="aa-standard" not in set(eps_group.threat))
            images = {"test": "test images", "sealed": "sealed test images (bench.sealed)"}.get(
                split, "validation images (held-out training images)")
            parts.append(
                f"**{preset} preset, defence `{family}` ({first.nfe} network evaluations per image) before the "
                f"{target} classifier; {n:,} {images} "
                f"(seed {data_seed}) of {DATASET}; L-inf eps = {eps}/255; suite {first.suite}, `{protocol}` "
                f"protocol: {attacks}; attack seed {first.attack_seed}, evaluation seed {first.eval_seed}; attack "
                f"gradients in {'bf16 autocast' if bf16 else 'float32'}, scoring in float32.** Accuracy (%) as "
                f"average of {proto.evals} / all {proto.evals} correct / strict majority of {proto.evals} (ties "
                f"wrong). `transfer` = PGD crafted on the undefended {target}; `worst` = per image the worst of "
                f"the white-box threats; `pgd-fixed` = the defence's noise frozen per image. The last column is "
                f"`worst` under the majority scoring with its 95% bootstrap interval.\n")
            threats = [t for t in THREATS if t in set(rows.threat)]
            lines = ["| t* | eps_inv | " + " | ".join(threats) + " | worst, majority (95% CI) | attack s/image |",
                     "|---|---|" + "---|" * len(threats) + "---|---|"]
            for (t_star, eps_inv), cells in rows.groupby(["t_star", "eps_inv"], dropna=False):
                values = []
                for threat in threats:
                    acc = {r.scoring: 100 * r.accuracy for r in cells[cells.threat == threat].itertuples()}
                    values.append(" / ".join(f"{acc[s]:.1f}" for s in ("single", "worst", "vote"))
                                  if len(acc) == 3 else "-")
                worst = cells[(cells.threat == "worst") & (cells.scoring == "vote")]
                values.append(f"{100 * worst.accuracy.iloc[0]:.1f} ({100 * worst.ci_low.iloc[0]:.1f}-"
                              f"{100 * worst.ci_high.iloc[0]:.1f})" if len(worst) else "-")
                attacked = cells.threat.isin([*RANDOMIZED_ATTACKS, *DETERMINISTIC_ATTACKS])
                wall = cells[attacked & (cells.scoring == "single")].s_per_image
                values.append(f"{wall.sum():.2f}" if len(wall) else "-")
                lines.append(f"| {_number(t_star)} | {_number(eps_inv)} | " + " | ".join(values) + " |")
            costs = eps_group.iloc[0]
            lines.append(f"\nCost on the machine that ran it: defend + classify {1000 * costs.purify_s_per_image:.1f} "
                         f"ms/image; one attack step (forward + backward through defence and classifier) "
                         f"{1000 * costs.step_s_per_image:.1f} ms/image per EOT draw.\n")
            parts.append("\n".join(lines))
    return "\n".join(parts)


def _number(value) -> str:
    return "-" if pd.isna(value) else f"{value:g}"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy against t*, one panel per scoring: clean, transfer and white-box lines (the white-box
    counterpart of the trade-off figure)."""
    import matplotlib  # noqa: PLC0415 (plotting only when writing figures)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    scorings = ("single", "worst", "vote")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    styles = {"clean": "k-", "transfer": "C0--", "pgd-margin": "C3-", "pgd-ce": "C3--", "apgd-ce": "C1-",
              "apgd-dlr": "C1--", "square": "C5-", "aa-standard": "C1-", "worst": "C4:", "pgd-fixed": "C2-."}
    for ax, scoring in zip(axes, scorings):
        sub = frame[frame.scoring == scoring]
        for (family, target, eps), group in sub[sub.t_star.notna()].groupby(["family", "target", "eps"]):
            for threat, line in group.groupby("threat"):
                line = line.groupby("t_star").accuracy.mean()
                label = (f"{family}, {target}: clean" if threat == "clean"
                         else f"{family}, {target}: {threat}, eps {eps}/255")
                ax.plot(line.index, 100 * line.values, styles.get(threat, "-"), marker="o", ms=3, label=label)
        ax.set_xscale("log")
        strengths = sorted(frame.t_star.dropna().unique())
        ax.set_xticks(strengths, [f"{t:g}" for t in strengths])
        ax.minorticks_off()
        ax.set_xlabel("t* (purification strength)")
        ax.set_title(f"scoring: {scoring}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if axes[-1].get_legend_handles_labels()[0]:  # a CSV of strengthless defences only (none, jpeg) draws no line
        axes[-1].legend(fontsize=7, loc="best")
    first = frame.iloc[0]
    fig.suptitle(f"Defences with a strength t*, {first.preset} preset, {first.split} split, n = {first.n}, `{first.protocol}` "
                 f"protocol ({DATASET})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", nargs="+", default=["preact"], metavar="NAME",
                        help=f"classifier(s) behind the defence: ARCH from {', '.join(classifiers.ARCHS)}, or "
                             f"ARCH:VARIANT for one fine-tuned by `python -m classifiers.finetune --recipe VARIANT`, "
                             f"e.g. preact:bcm-fgsm (default: preact)")
    parser.add_argument("--defence", nargs="+", default=["bcm"], metavar="SPEC",
                        help=f"{DEFENCE_HELP}. A majority vote of n purifications (e.g. bcm-robust) is evaluated "
                             f"as its base with N = n evaluations: its decision is the 'vote' scoring of every row, "
                             f"and the attacks aim at the prediction averaged over n draws (default: bcm)")
    parser.add_argument("--t-stars", nargs="+", type=float, default=None, metavar="T",
                        help="purification strengths t* of every defence that has one (default: the value its spec "
                             "gives, else the BCM checkpoint's preset value)")
    parser.add_argument("--eps-inv", nargs="+", type=float, default=None, metavar="E",
                        help="initial inversion noise(s) of the bcm defence (default: the checkpoint's preset value; "
                             "capped at t*/2)")
    parser.add_argument("--eps", nargs="+", type=int, default=[8], metavar="K",
                        help="L-inf budgets k of eps = k/255, e.g. 4 8 16 (default: 8)")
    parser.add_argument("--protocol", default="cpu", choices=tuple(PROTOCOLS),
                        help="budget of every white-box threat, STEPS x DRAWS: 'cpu' 20x4 (2 CPU cores); 'gpu' 100x10 "
                             "and Square 1,000 queries (the sealed headline's); 'paper' 200x20 and Square 5,000; "
                             "N = 10 evaluations each (default: cpu)")
    add_split_argument(parser)
    parser.add_argument("--threats", nargs="+", default=None, choices=[t for t in THREATS if t != "worst"],
                        metavar="THREAT",
                        help="run only these threats (e.g. clean pgd-margin: an upper bound for a defence too slow for "
                             "the whole suite); 'worst' combines the white-box threats that ran (default: every threat "
                             "that applies to the defence)")
    parser.add_argument("--attack-seed", type=int, default=0, help="seed of the attacks' randomness (default: 0)")
    parser.add_argument("--eval-seed", type=int, default=1,
                        help="seed of the defence's noise at evaluation, drawn per image and evaluation (default: 1)")
    parser.add_argument("--sanity", action="store_true",
                        help="run the sanity checks of Carlini et al. on the first target, t* and eps instead of the grid "
                             "and write sanity.md next to --out; exit status 1 if a check fails")
    parser.add_argument("--convergence", nargs="+", default=None, metavar="STEPSxEOT",
                        help="instead of the grid: margin-PGD with each budget (e.g. 20x4 40x8) on the first target, "
                             "t* and eps, scored like the grid, and per image the worst of each budget and the next "
                             "(paired: how much the larger budget adds), written to convergence.csv/.md next to --out")
    parser.add_argument("--retime", action="store_true",
                        help="instead of the grid: re-measure the costs (defend + classify, one attack step) of every "
                             "selected setting already in --out, in this one process, and write them into its rows, so "
                             "that costs first measured on different machines or under different load compare")
    parser.add_argument("--export-adversarial", metavar="DIR", default=None,
                        help="also write each newly attacked (configuration, threat)'s adversarial images, with ids "
                             "and labels, to DIR/<target>-<defence>-eps<k>-<threat>.pt, for re-scoring elsewhere")
    parser.add_argument("--out", default=None,
                        help=f"results CSV, resumed if it exists (default: results/adaptive/{SUITE}/<preset>-<split>.csv); "
                             "Markdown, PNG and per-image predictions go next to it")
    add_common_arguments(parser, n=200, batch_size=100, seed_help="seed of the image subset")
    for action in parser._actions:  # this command's own default: float32 attacks
        if "--bf16" in action.option_strings:
            action.help = ("bfloat16 autocast for the attacks' network passes (default: off, float32: bf16 is for "
                           "a budget where it was shown to agree with float32); scoring is always float32")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.adaptive", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.target = check_names(args.target, "target")
        args.defence = check_defences(args.defence)
        args.defence = [vote_base(spec, get_protocol(args.protocol).evals) for spec in args.defence]
        for k in args.eps:
            if not 0 < k <= 255:
                raise ValueError(f"--eps values are k in eps = k/255 with 0 < k <= 255, got {k}")
        args.convergence = [budget(b) for b in args.convergence] if args.convergence else None
    except ValueError as err:
        parser.error(str(err))
    command = sanity if args.sanity else convergence if args.convergence else retime if args.retime else adaptive
    run_command(parser, command, args)


def vote_base(spec: str, evals: int) -> str:
    """A majority vote of ``evals`` purifications is evaluated as its base with N = ``evals`` evaluations (its
    decision is the ``vote`` scoring, with ties counted wrong); other specs are returned unchanged."""
    name, options = parse_defence(spec)
    if name != "vote":
        return spec
    base, n, how = options.pop("base", "bcm"), options.pop("n", 10), options.pop("how", "majority")
    if how != "majority" or n != evals:
        raise ValueError(f"--defence {spec}: a vote is evaluated as the majority of the protocol's N = {evals} "
                         f"evaluations of its base; this one is how={how}, n={n}")
    return base + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def budget(text: str) -> tuple[int, int]:
    """``"STEPSxEOT"`` -> (steps, eot), both positive."""
    try:
        steps, eot = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a budget is STEPSxEOT, e.g. 50x4; got {text!r}") from None
    if steps < 1 or eot < 1:
        raise ValueError(f"a budget needs at least 1 step and 1 EOT draw; got {text!r}")
    return steps, eot


def default_out(args) -> Path:
    """The results CSV of this suite, preset and split (``--out`` overrides)."""
    return Path(args.out) if args.out else RESULTS_DIR / "adaptive" / SUITE / f"{args.preset}-{args.split}.csv"


def build(args, device):
    """Classifiers, defences (per spec, t* and eps_inv), images, and checkpoint ids from the arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # attack gradients in float32 unless asked: bf16 is used only where it has been shown to agree with float32
    args.bf16_on = bool(args.bf16)
    models = load_classifiers(args.target, args.preset, args.classifier_dir, device)
    specs = []
    for spec in args.defence:  # --eps-inv multiplies the bcm specs
        name, _ = parse_defence(spec)
        specs += ([f"{spec}{',' if ':' in spec else ':'}eps_inv={e}" for e in args.eps_inv]
                  if name == "bcm" and args.eps_inv else [spec])
    entries = build_defences(args, specs, device, t_stars=args.t_stars)
    images, labels, ids = load_split(args.split, args.data_root, args.n, args.seed,
                                     classifiers.load_preset(args.preset).n_val)
    ids_of = {(name, id(entry)): combine_ids(entry.checkpoint_id,
                                             file_id(str(classifier_path(name, args.preset, args.classifier_dir))))
              for name in args.target for entry in entries}
    return models, entries, images, labels, ids, ids_of


def adaptive(args: argparse.Namespace) -> None:
    started = time.monotonic()
    device = pick_device(args.device)
    models, entries, images, labels, ids, ids_of = build(args, device)
    out = default_out(args)
    table = ResultTable(out, KEY, COLUMNS)
    cache_dir = out.with_name(out.stem + "-predictions")
    results, ledger = {}, []
    for target in args.target:
        for entry in entries:
            costs = None
            for eps in args.eps:
                setting = Setting(args, target, models[target], entry, eps, images, labels, ids,
                                  ids_of[target, id(entry)])
                costs = costs or measure_costs(setting, args.batch_size, args.bf16_on)
                print(f"{target}, {entry.defence.spec()}, eps = {eps}/255", file=sys.stderr)
                result = run_setting(setting, table, cache_dir, costs)
                results[target, entry.defence.spec(), eps] = result["correct"]
                if result["ran"] and args.split in ("test", "sealed") and "worst" in result["correct"]:
                    ledger.append(ledger_row(setting, result["correct"], args))
    append_ledger(ledger)
    paired = paired_differences(results, args)
    frame = numeric_adaptive(table.frame())
    write_text(out.with_suffix(".md"), markdown(frame) + paired)
    plot(frame, out.with_suffix(".png"))
    print(markdown(frame[frame.checkpoints.isin(set(ids_of.values()))
                         & frame.defence.isin([e.defence.spec() for e in entries])]) + paired)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr)


def ledger_row(setting: Setting, correct: dict, args) -> dict:
    """The test ledger's line for a setting evaluated on test images in this run."""
    clean = correct.get("clean", {}).get("vote")
    mean, low, high = bootstrap_interval(correct["worst"]["vote"])
    return dict(date=datetime.date.today().isoformat(), split=args.split, n=len(setting.images),
                data_seed=args.seed, suite=SUITE, protocol=setting.protocol.name, defence=setting.defence.spec(),
                target=setting.target, eps=setting.eps,
                clean_vote="" if clean is None else f"{100 * clean.mean().item():.1f}",
                robust_vote=f"{100 * mean:.1f}", robust_ci=f"{100 * low:.1f}-{100 * high:.1f}", command=args.command)


def paired_differences(results: dict, args) -> str:
    """Markdown: each defended setting's worst-case accuracy minus that of its classifier alone (defence
    ``none``) on the same images, per scoring, with a 95% paired bootstrap interval; empty without a reference."""
    lines = []
    for (target, defence, eps), correct in results.items():
        reference = results.get((target, "none", eps))
        if defence == "none" or reference is None or "worst" not in correct or "worst" not in reference:
            continue
        for scoring in SCORINGS:
            diff, low, high = bootstrap_interval(correct["worst"][scoring] - reference["worst"][scoring])
            lines.append(f"| {target} | `{defence}` | {eps} | {scoring} | "
                         f"{100 * correct['worst'][scoring].mean():.1f} | {100 * reference['worst'][scoring].mean():.1f} | "
                         f"{100 * diff:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) |")
    if not lines:
        return ""
    return ("\n**Paired comparison with the classifier alone** (same images, same suite; `worst` threat; "
            "difference in points with its 95% paired bootstrap interval, 10,000 resamples of the images).\n\n"
            "| target | defence | eps | scoring | defended | alone | difference |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")


SETTING_COLUMNS = ("suite", "preset", "defence", "target", "split", "n", "data_seed", "protocol", "bf16", "checkpoints")


def retime(args: argparse.Namespace) -> None:
    """``--retime``: the costs of every selected setting measured again, one after another in this process, and
    written into all of that setting's rows in ``--out`` (its accuracies untouched)."""
    device = pick_device(args.device)
    out = default_out(args)
    if not out.is_file():
        raise FileNotFoundError(f"--retime: no results at {out}; run the grid first")
    models, entries, images, labels, ids, ids_of = build(args, device)
    table = ResultTable(out, KEY, COLUMNS)
    machine = f"{cpu_name()} ({cpu_capability()}, {torch.get_num_threads()} thread(s))"
    for target in args.target:
        for entry in entries:
            setting = Setting(args, target, models[target], entry, args.eps[0], images, labels, ids,
                              ids_of[target, id(entry)])
            wanted = {c: text(setting.row("clean")[c]) for c in SETTING_COLUMNS}
            rows = [row for row in table.rows.values() if all(row[c] == v for c, v in wanted.items())]
            if not rows:
                print(f"{target}, {entry.defence.spec()}: no rows in {out} to retime; skipped", file=sys.stderr)
                continue
            costs = measure_costs(setting, args.batch_size, args.bf16_on)
            table.add([dict(row, **costs) for row in rows])
            print(f"{target}, {entry.defence.spec()}: defend + classify {1000 * costs['purify_s_per_image']:.1f} "
                  f"ms/image, attack step {1000 * costs['step_s_per_image']:.1f} ms/image ({len(rows)} rows)",
                  file=sys.stderr)
    write_text(out.with_suffix(".md"), markdown(numeric_adaptive(table.frame())))
    print(f"retimed on {machine}; wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def numeric_adaptive(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in ("t_star", "eps_inv", "accuracy", "ci_low", "ci_high", "wall_s", "s_per_image",
                   "purify_s_per_image", "step_s_per_image"):
        frame[column] = pd.to_numeric(frame[column])
    for column in ("n", "data_seed", "eps", "steps", "eot", "restarts", "evals", "attack_seed", "eval_seed"):
        frame[column] = frame[column].astype(int)
    frame["bf16"] = frame["bf16"] == "true"
    return frame


def convergence(args: argparse.Namespace) -> None:
    """Margin-PGD as steps and draws grow, on the first target, t* and eps, and per image the worst of each
    budget and the next: the paired drop the larger budget adds, the criterion for a converged default
    (resumable: each budget's per-image predictions are cached)."""
    device = pick_device(args.device)
    models, entries, images, labels, ids, ids_of = build(args, device)
    target, entry, eps = args.target[0], entries[0], args.eps[0]
    setting = Setting(args, target, models[target], entry, eps, images, labels, ids, ids_of[target, id(entry)])
    out = default_out(args)
    path = out.with_name("convergence.csv")
    cache_dir = out.with_name("convergence-predictions")
    table = ResultTable(path, KEY + ["steps", "eot"], COLUMNS)
    costs = measure_costs(setting, args.batch_size, args.bf16_on)
    correct = {}
    for steps, eot in args.convergence:
        base = dict(setting.row("pgd-margin"), steps=steps, eot=eot)
        cache = cache_dir / f"{unit_id(base)}-{steps}x{eot}.pt"
        if cache.is_file():
            predictions = torch.load(cache, weights_only=True)["predictions"].long()
            wall = float(table.rows[table.key(dict(base, scoring="single"))]["wall_s"])
        else:
            started = time.monotonic()
            attack = BestIteratePGD(setting.attacked, eps / 255, steps, eot, "margin", setting.restarts)
            adversarial = craft(attack, images, labels, args.batch_size, seed=args.attack_seed, bf16=args.bf16_on,
                                progress=not args.no_progress, desc=f"margin-PGD {steps}x{eot}", ids=ids)
            predictions = setting.predictions("pgd-margin", adversarial)
            wall = time.monotonic() - started
            atomic_write(cache, lambda tmp: torch.save({"predictions": predictions.to(torch.int8), "ids": ids,
                                                         "row": base}, tmp))
        correct[steps, eot] = correct_by_scoring(predictions, labels)
        cells = []
        for scoring in SCORINGS:
            mean, low, high = bootstrap_interval(correct[steps, eot][scoring])
            cells.append(dict(base, scoring=scoring, accuracy=mean, ci_low=low, ci_high=high, wall_s=wall,
                              s_per_image=wall / len(images), **costs))
        table.add(cells)
    lines = [f"**Margin-PGD budgets on {len(images)} {args.split} images** ({args.preset} preset, defence "
             f"`{entry.defence.spec()}` before {target}; eps = {eps}/255; suite {SUITE}, step eps/4 -> "
             f"eps/8 -> eps/16, best iterate, prediction averaged over the draws; scored over N = "
             f"{setting.protocol.evals} fresh evaluations; {DATASET}). Accuracy (%) under the strict majority "
             f"of N; `with next` = per image the worst of this budget and the next one; `drop` = their paired "
             f"difference with its 95% bootstrap interval (converged when at most 1 point).\n",
             "| steps x draws | gradients per image | average of N | all N | majority | with next | drop | s/image |",
             "|---|---|---|---|---|---|---|---|"]
    budgets = list(args.convergence)
    for i, (steps, eot) in enumerate(budgets):
        acc = {s: 100 * correct[steps, eot][s].mean().item() for s in SCORINGS}
        both, drop = "-", "-"
        if i + 1 < len(budgets):
            vote = correct[steps, eot]["vote"]
            joint = torch.minimum(vote, correct[budgets[i + 1]]["vote"])
            d, low, high = bootstrap_interval(vote - joint)
            both, drop = f"{100 * joint.mean():.1f}", f"{100 * d:.1f} ({100 * low:.1f}-{100 * high:.1f})"
        wall = float(table.rows[table.key(dict(setting.row("pgd-margin"), steps=steps, eot=eot, scoring="single"))]
                     ["s_per_image"])
        lines.append(f"| {steps} x {eot} | {steps * eot} | {acc['single']:.1f} | {acc['worst']:.1f} | "
                     f"{acc['vote']:.1f} | {both} | {drop} | {wall:.1f} |")
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


# -- sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness") ------------------------------
def sanity(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    models, entries, images, labels, ids, _ = build(args, device)
    target, purifier, eps = args.target[0], entries[0].defence, args.eps[0]
    if not (purifier.randomized and purifier.differentiable):
        raise ValueError(f"--sanity checks a randomized, differentiable defence; {purifier.spec()} is not")
    checks = sanity_checks(models[target], purifier, images, labels, ids, eps, args)
    lines = ["# Sanity checks of the adaptive evaluation\n",
             f"{args.preset} preset, defence `{purifier.spec()}` before {target}; {len(images)} {args.split} "
             f"images of {DATASET}; "
             f"eps = {eps}/255; accuracies are single-evaluation means over {args.sanity_evals} evaluations "
             f"(evaluation seed {args.eval_seed}, attack seed {args.attack_seed}).\n",
             "| check | result | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
    out = default_out(args)
    write_text(out.with_name("sanity.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(ok for _, ok, _ in checks):
        sys.exit(1)


def sanity_checks(classifier, purifier: Defence, images, labels, ids, eps: int, args) -> list[tuple]:
    """(name, passed, measured) for each check on a randomized, differentiable defence; accuracies are
    single-evaluation means."""
    args.sanity_evals = 4
    defended = purifier.wrap(classifier)
    shape = purifier.noise_shape(tuple(images.shape[1:]))
    common = dict(batch_size=args.batch_size, seed=args.attack_seed, bf16=args.bf16_on, progress=False)

    def accuracy(model, x, noisy=True) -> float:
        noise = ((lambda i, d: purifier.fixed_noise(image_noise(i, shape, args.eval_seed, d))) if noisy
                 else (lambda i, d: contextlib.nullcontext()))
        predictions = predict_draws(model, x, ids, args.sanity_evals if noisy else 1, noise, args.batch_size)
        return (predictions == labels[None]).float().mean().item()

    def pgd(model, k: int, steps: int, draws: int, **kwargs) -> torch.Tensor:
        return craft(BestIteratePGD(model, k / 255, steps, draws, "margin"), images, labels, **common, **kwargs)

    checks = []
    # the attack itself must break the undefended classifier once eps is large enough (at the evaluated eps an
    # adversarially trained classifier keeps its robustness; 4 x eps breaks it)
    undefended = accuracy(classifier, pgd(classifier, 4 * eps, 50, 1), noisy=False)
    checks.append(("undefended classifier under margin-PGD goes to ~0 at 4 x eps", undefended <= 0.05,
                   f"{100 * undefended:.1f}% (50 steps at {4 * eps}/255)"))
    budgets = SANITY_BUDGETS
    curve = [accuracy(defended, pgd(defended, eps, s, m)) for s, m in budgets]
    cpu = curve[-2]
    slack = 0.03  # sampling noise of a few evaluations on a small subset
    monotone = all(b <= a + slack for a, b in zip(curve, curve[1:]))
    checks.append(("accuracy falls as PGD steps and draws grow", monotone,
                   ", ".join(f"{s}x{m}: {100 * a:.1f}%" for (s, m), a in zip(budgets, curve))))
    checks.append(("... and saturates (20x4 -> 40x8 within 5 points)", abs(curve[-1] - curve[-2]) <= 0.05,
                   f"{100 * abs(curve[-1] - curve[-2]):.1f} points"))
    growing = BestIteratePGD(defended, eps / 255, 20, 4, "margin", random_start=False)
    with torch.random.fork_rng():
        torch.manual_seed(args.attack_seed)
        growing(as_float(images[: args.batch_size]), labels[: args.batch_size])
    first, last = growing.history[0].item(), growing.history[-1].item()
    checks.append(("the attack's loss rises over the iterations", last > first,
                   f"mean margin loss {first:.3f} at the start, {last:.3f} after 20 steps"))
    huge = accuracy(defended, pgd(defended, 128, 20, 1))
    checks.append(("a huge eps (128/255) drives accuracy to ~0", huge <= 0.10, f"{100 * huge:.1f}%"))
    transfer = accuracy(defended, craft(paper_pgd(classifier, eps), images, labels, **common))
    checks.append(("white-box is not above transfer from the same model", cpu <= transfer + slack,
                   f"white-box (20x4) {100 * cpu:.1f}% vs transfer {100 * transfer:.1f}%"))
    checks.append(finite_difference_check(defended, purifier, images[:4], labels[:4], ids[:4], shape, args))
    x = (images[: args.batch_size].float() / 255).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(defended(x), labels[: args.batch_size])
    grad, = torch.autograd.grad(loss, x)
    nonzero = (grad.flatten(1).abs().sum(1) > 0).float().mean().item()
    checks.append(("gradients through the purifier are finite and non-zero",
                   bool(torch.isfinite(grad).all()) and nonzero == 1.0,
                   f"finite: {bool(torch.isfinite(grad).all())}, non-zero for {100 * nonzero:.0f}% of images"))
    frozen = lambda i, d: purifier.fixed_noise(image_noise(i, shape, args.eval_seed, 0))  # noqa: E731
    fixed_adv = pgd(defended, eps, 20, 1, ids=ids, noise=frozen)
    fixed = (predict_draws(defended, fixed_adv, ids, 1, frozen, args.batch_size)
             == labels[None]).float().mean().item()
    checks.append(("fixed-randomness result reported beside the randomized one", True,
                   f"frozen noise {100 * fixed:.1f}% vs fresh noise {100 * cpu:.1f}% (20 steps)"))
    return checks


def finite_difference_check(defended, purifier, images, labels, ids, shape, args, h: float = 1e-3) -> tuple:
    """Autograd through the purifier (its noise frozen) against a central finite difference of the loss along
    a random direction, per image, in float32: agreement within 5% of the larger magnitude. Images whose purified
    output saturates at the probes are left out: the output clamp passes gradients straight through by design
    (``purify.clamp_straight_through``), so there the two differ on purpose."""
    x = (images.float() / 255).clamp(h, 1 - h)  # x +- h * direction stays a valid image
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.attack_seed))
    direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    purify = defended[0]
    with purifier.fixed_noise(image_noise(ids, shape, args.eval_seed, 0)):
        def loss(z):
            return torch.nn.functional.cross_entropy(defended(z).float(), labels, reduction="none")
        point = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(loss(point).sum(), point)
        with torch.no_grad():
            numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
            probes = torch.stack([purify(x + s * h * direction) for s in (-1, 0, 1)])
    inside = ((probes > 0) & (probes < 1)).flatten(2).all(2).all(0)
    if not inside.any():
        return ("autograd through the purifier agrees with finite differences", False,
                f"every one of {len(x)} images saturates the purified output: nothing to compare")
    analytic = (grad * direction).flatten(1).sum(1)[inside]
    numeric = numeric[inside]
    error = ((analytic - numeric).abs() / analytic.abs().clamp_min(numeric.abs()).clamp_min(1e-3)).max().item()
    return ("autograd through the purifier agrees with finite differences", error <= 0.05,
            f"largest relative difference {100 * error:.1f}% on {int(inside.sum())} of {len(x)} images whose "
            f"purified output does not saturate (step {h})")


if __name__ == "__main__":
    main()
