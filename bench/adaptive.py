"""White-box (adaptive) evaluation of a defence: the attacker knows the defence and attacks through it.

For each defence (``--defence``, default the BCM purifier; any of the registry's except ``vote``, whose decision
is the ``vote`` scoring below), target classifier, purification strength t* (and eps_inv) and eps, the
defended classifier is evaluated under these threat models (column ``threat``):

  clean      no attack
  transfer   black box: the paper's PGD (round(5k/4) steps of 2/255) crafted on the undefended target itself,
             then purified (Table 3's threat model with source = target)
  pgd-eot    white box: L-inf PGD through defence + classifier, exact gradients through both BCM passes
             (BPDA, the identity in the backward pass, for defences that are not differentiable: jpeg, bits),
             each step averaging the gradient over the protocol's EOT draws of the defence's noise (one draw
             for a deterministic defence)
  aa-rand    white box, randomized defences: AutoAttack's randomized version (APGD-CE + APGD-DLR with EOT;
             pyautoattack) with the protocol's iterations and draws
  aa-standard  white box, deterministic defences (none, jpeg, bits, median): AutoAttack's standard version
             (APGD-CE, APGD-T, FAB-T, Square) at its published budgets, whatever the protocol
  worst      per image the worse of pgd-eot and the AutoAttack threat (aa-rand or aa-standard)
  pgd-fixed  ablation for randomized defences: the noise frozen per image while attacking and evaluating (PGD
             against a deterministic purifier; the protocol's PGD steps, no EOT needed)

Each threat's examples are evaluated N times with fresh purifier noise, drawn per image from the evaluation
seed (independent of the attack's seed and of batching), and scored three ways (column ``scoring``):
``single`` = mean accuracy of one evaluation, ``worst`` = an image counts only if all N evaluations are
correct, ``vote`` = majority vote of the N predicted labels.

Protocols: ``cpu`` (PGD-EOT 20 steps of eps/4 x 4 draws, AutoAttack-rand 20 iterations x 4 draws, N = 10;
about 30 minutes per setting of 200 images on 2 CPU cores with the small preset) and ``paper`` (200 steps of
0.007 x 20 draws, AutoAttack-rand 100 iterations x 20 draws, N = 10; for GPUs).

Writes a tidy CSV (one row per setting, threat and scoring, with the attack's parameters, seeds, checkpoint
ids, wall time and seconds per image), per-image predictions next to it (``<out>-predictions/``), a
Markdown table and a PNG (accuracy against t*). Reruns resume: finished (setting, threat) units are skipped.

    python -m bench.adaptive --target preact --t-stars 0.5 1 2 5 --n 200 --protocol cpu
    python -m bench.adaptive --defence diffusion:steps=20 jpeg median --n 100
    python -m bench.adaptive --defence diffusion:t_star=0.1 --threats clean pgd-eot --n 50 --batch-size 4
                                   # PGD-EOT alone: an upper bound on the robust accuracy of a slow defence
    python -m bench.adaptive --split val --t-stars 0.5 1 2 5 --n 200          # choose settings here, not on test
    python -m bench.adaptive --sanity --n 50                                   # Carlini et al.'s sanity checks
    python -m bench.adaptive --convergence 20x4 50x4 20x16 100x8 --n 32        # how far the cpu protocol is
                                                                               # from converged
    python -m bench.adaptive --retime --target preact preact:bcm-fgsm --t-stars 0.5 1 2 5 --n 200
                                   # re-measure the costs of finished settings in one run, on one machine
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import classifiers
from attacks import (BPDA, PROTOCOLS, autoattack_rand, autoattack_standard, autocast, correct_by_scoring, craft,
                     eot_pgd, get_protocol, paper_pgd, pgd_steps, predict_draws, run_autoattack)
from attacks.pgd import PGD_STEP_SIZE
from purify import Defence, image_noise, parse_defence
from purify.checkpoint import atomic_write
from purify.runtime import cpu_capability, cpu_name, pick_device

from .common import (DEFENCE_HELP, RESULTS_DIR, Entry, ResultTable, add_common_arguments, add_split_argument,
                     attack_step_cost, build_defences, check_defences, check_names, classifier_path, combine_ids,
                     file_id, load_classifiers, load_split, resolve_bf16, run_command, text, write_text)

SANITY_BUDGETS = [(5, 1), (10, 2), (20, 4), (40, 8)]  # PGD steps x EOT draws; the last but one is the cpu protocol's
THREATS = ("clean", "transfer", "pgd-eot", "aa-rand", "aa-standard", "worst", "pgd-fixed")
AUTOATTACK_NAMES = {"aa-rand": "AutoAttack-rand", "aa-standard": "AutoAttack standard"}
KEY = ["preset", "defence", "t_star", "eps_inv", "target", "split", "n", "data_seed", "eps", "protocol", "threat",
       "scoring"]
COLUMNS = KEY + ["family", "nfe", "attack", "steps", "step_size", "eot", "evals", "attack_seed", "eval_seed", "bf16",
                 "accuracy", "wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image", "checkpoints"]
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
        self.eot = self.protocol.eot if self.defence.randomized else 1
        self.checkpoint_id = checkpoint_id
        self.noise_shape = self.defence.noise_shape(tuple(images.shape[1:]))
        # AutoAttack's version for the kind of defence; the fixed-noise ablation only where there is noise
        self.autoattack = "aa-rand" if self.defence.randomized else "aa-standard"
        skip = {"aa-standard"} if self.defence.randomized else {"aa-rand", "pgd-fixed"}
        chosen = set(args.threats) | {"worst"} if getattr(args, "threats", None) else set(THREATS)
        self.threats = [t for t in THREATS if t not in skip and t in chosen]

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
        eps, protocol = self.eps / 255, self.protocol
        attack = {"clean": ("none", 0, 0.0, 0),
                  "transfer": (f"PGD on the undefended {self.target}", pgd_steps(self.eps), PGD_STEP_SIZE, 1),
                  "pgd-eot": ("EOTPGD", protocol.pgd_steps, protocol.step_size(eps), self.eot),
                  "aa-rand": ("AutoAttack-rand", protocol.apgd_iters, 0.0, self.eot),
                  "aa-standard": ("AutoAttack standard", 100, 0.0, 1),
                  "worst": (f"worst of EOTPGD and {AUTOATTACK_NAMES[self.autoattack]}", protocol.pgd_steps,
                            protocol.step_size(eps), self.eot),
                  "pgd-fixed": ("PGD, noise frozen per image", protocol.pgd_steps, protocol.step_size(eps), 1)}
        name, steps, step_size, eot = attack[threat]
        if not self.defence.differentiable and threat not in ("clean", "transfer"):
            name += " with BPDA (identity backward)"
        defence = self.defence
        return dict(preset=self.args.preset, defence=defence.spec(), family=defence.family(), nfe=defence.nfe,
                    t_star=getattr(defence, "t_star", None),
                    eps_inv=defence.eps_inv if defence.name == "bcm" else None, target=self.target,
                    split=self.args.split, n=len(self.images),
                    data_seed=self.args.seed, eps=0 if threat == "clean" else self.eps, protocol=protocol.name,
                    threat=threat, attack=name, steps=steps, step_size=step_size, eot=eot, evals=protocol.evals,
                    attack_seed=self.args.attack_seed, eval_seed=self.args.eval_seed, bf16=self.args.bf16_on,
                    checkpoints=self.checkpoint_id)

    # -- the threats: each returns adversarial images (float in [0, 1]) ------------------------------------
    def adversarial(self, threat: str) -> torch.Tensor:
        args, eps, protocol = self.args, self.eps / 255, self.protocol
        common = dict(batch_size=args.batch_size, seed=args.attack_seed, bf16=args.bf16_on,
                      progress=not args.no_progress, ids=self.ids)
        if threat == "clean":
            return self.images.float() / 255
        if threat == "transfer":
            return craft(paper_pgd(self.classifier, self.eps), self.images, self.labels, desc="transfer PGD",
                         **common)
        if threat == "pgd-eot":
            attack = eot_pgd(self.attacked, eps, protocol.pgd_steps, protocol.step_size(eps), self.eot)
            return craft(attack, self.images, self.labels, desc="PGD-EOT", **common)
        if threat == "pgd-fixed":
            attack = eot_pgd(self.attacked, eps, protocol.pgd_steps, protocol.step_size(eps), eot=1)
            return craft(attack, self.images, self.labels, desc="PGD, frozen noise", noise=self.frozen_noise,
                         **common)
        if threat == "aa-rand":
            device = next(self.classifier.parameters()).device
            adversary = autoattack_rand(self.attacked, eps, protocol.apgd_iters, self.eot, args.attack_seed,
                                        device)
            return run_autoattack(adversary, self.images, self.labels, args.batch_size, args.bf16_on)
        if threat == "aa-standard":
            device = next(self.classifier.parameters()).device
            adversary = autoattack_standard(self.attacked, eps, args.attack_seed, device)
            return run_autoattack(adversary, self.images, self.labels, args.batch_size, args.bf16_on)
        raise ValueError(f"unknown threat {threat!r}")

    def predictions(self, threat: str, images: torch.Tensor) -> torch.Tensor:
        noise = self.frozen_noise if threat == "pgd-fixed" else self.eval_noise
        return predict_draws(self.defended, images, self.ids, self.protocol.evals, noise, self.args.batch_size,
                             self.args.bf16_on)


def unit_id(row: dict) -> str:
    """A file name for one (setting, threat) unit's per-image predictions."""
    key = json.dumps({k: str(row[k]) for k in KEY if k != "scoring"} | {"checkpoints": row["checkpoints"]},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_setting(setting: Setting, table: ResultTable, cache_dir: Path, costs: dict) -> None:
    """Every threat of ``setting`` not yet in ``table``; each unit's rows are written as soon as it is done."""
    correct: dict[str, dict[str, torch.Tensor]] = {}
    for threat in setting.threats:
        base = setting.row(threat)
        path = cache_dir / f"{unit_id(base)}.pt"
        rows = [dict(base, scoring=s) for s in ("single", "worst", "vote")]
        if threat == "worst":
            attacks = ("pgd-eot", setting.autoattack)
            if any(t not in correct for t in attacks):
                continue
            per_image = {s: torch.minimum(*(correct[t][s] for t in attacks)) for s in correct["pgd-eot"]}
            wall = sum(float(table.rows[table.key(dict(setting.row(t), scoring="single"))]["wall_s"])
                       for t in attacks)
        elif path.is_file() and all(table.done(r) for r in rows):
            stored = torch.load(path, weights_only=True)
            correct[threat] = correct_by_scoring(stored["predictions"].long(), setting.labels)
            continue
        else:
            if threat == "clean" and setting.eps != setting.args.eps[0]:
                continue  # clean rows do not depend on eps: computed once, with the first eps
            started = time.monotonic()
            predictions = setting.predictions(threat, setting.adversarial(threat))
            wall = time.monotonic() - started
            atomic_write(path, lambda tmp: torch.save({"predictions": predictions.to(torch.int8),
                                                        "ids": setting.ids, "row": base}, tmp))
            per_image = correct_by_scoring(predictions.long(), setting.labels)
        correct[threat] = per_image
        n = len(setting.images)
        table.add([dict(r, accuracy=per_image[r["scoring"]].mean().item(), wall_s=wall, s_per_image=wall / n,
                        **costs) for r in rows])


def measure_costs(setting: Setting, batch_size: int, bf16: bool) -> dict:
    """Seconds per image of one defend+classify forward pass (on a batch of ``batch_size``) and of one attack
    step (forward + backward, BPDA where needed, on 8 images) through the setting's defence and classifier."""
    device = next(setting.classifier.parameters()).device
    x = (setting.images[:batch_size].float() / 255).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), setting.eval_noise(setting.ids[:2], 0), autocast(device, bf16):
        setting.defended(x[:2])  # warm-up
    with torch.no_grad(), setting.eval_noise(setting.ids[:batch_size], 0), autocast(device, bf16):
        started = time.perf_counter()
        setting.defended(x)
        forward = (time.perf_counter() - started) / len(x)
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
            images = "test images" if split == "test" else "validation images (held-out training images)"
            parts.append(
                f"**{preset} preset, defence `{family}` ({first.nfe} network evaluations per image) before the "
                f"{target} classifier; {n:,} {images} "
                f"(seed {data_seed}) of {DATASET}; L-inf eps = {eps}/255; `{protocol}` protocol: "
                f"{attacks}; attack seed {first.attack_seed}, evaluation seed {first.eval_seed}; "
                f"{'bf16 autocast' if bf16 else 'float32'}.** Accuracy (%) as single / worst-of-{proto.evals} / "
                f"majority-vote-of-{proto.evals}. `transfer` = PGD crafted on the undefended {target}; `worst` = per "
                f"image the worse of PGD-EOT and AutoAttack (`aa-rand` for a randomized defence, `aa-standard`, "
                f"at its own budgets, for a deterministic one); `pgd-fixed` = the defence's noise frozen per "
                f"image.\n")
            threats = [t for t in THREATS if t in set(rows.threat)]
            lines = ["| t* | eps_inv | " + " | ".join(threats) + " | attack s/image |",
                     "|---|---|" + "---|" * len(threats) + "---|"]
            for (t_star, eps_inv), cells in rows.groupby(["t_star", "eps_inv"], dropna=False):
                values = []
                for threat in threats:
                    acc = {r.scoring: 100 * r.accuracy for r in cells[cells.threat == threat].itertuples()}
                    values.append(" / ".join(f"{acc[s]:.1f}" for s in ("single", "worst", "vote"))
                                  if len(acc) == 3 else "-")
                attacked = cells.threat.isin(["pgd-eot", *AUTOATTACK_NAMES])
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
    styles = {"clean": "k-", "transfer": "C0--", "pgd-eot": "C3-", "aa-rand": "C1-", "aa-standard": "C1-",
              "worst": "C4:", "pgd-fixed": "C2-."}
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
                        help=f"{DEFENCE_HELP}. Not vote: the vote scoring of every row is the vote of N evaluations "
                             f"(default: bcm)")
    parser.add_argument("--t-stars", nargs="+", type=float, default=None, metavar="T",
                        help="purification strengths t* of every defence that has one (default: the value its spec "
                             "gives, else the BCM checkpoint's preset value)")
    parser.add_argument("--eps-inv", nargs="+", type=float, default=None, metavar="E",
                        help="initial inversion noise(s) of the bcm defence (default: the checkpoint's preset value; "
                             "capped at t*/2)")
    parser.add_argument("--eps", nargs="+", type=int, default=[8], metavar="K",
                        help="L-inf budgets k of eps = k/255, e.g. 4 8 16 (default: 8)")
    parser.add_argument("--protocol", default="cpu", choices=tuple(PROTOCOLS),
                        help="'cpu': PGD-EOT 20x4, AutoAttack-rand 20x4, N = 10 (about 30 min per 200-image setting on "
                             "2 CPU cores); 'paper': PGD-EOT 200x20, AutoAttack-rand 100x20, N = 10 (GPUs) (default: cpu)")
    add_split_argument(parser)
    parser.add_argument("--threats", nargs="+", default=None, choices=[t for t in THREATS if t != "worst"],
                        metavar="THREAT",
                        help="run only these threats (e.g. clean pgd-eot: an upper bound for a defence too slow for "
                             "AutoAttack); 'worst' is added where pgd-eot and the defence's AutoAttack both ran "
                             "(default: every threat that applies to the defence)")
    parser.add_argument("--attack-seed", type=int, default=0, help="seed of the attacks' randomness (default: 0)")
    parser.add_argument("--eval-seed", type=int, default=1,
                        help="seed of the defence's noise at evaluation, drawn per image and evaluation (default: 1)")
    parser.add_argument("--sanity", action="store_true",
                        help="run the sanity checks of Carlini et al. on the first target, t* and eps instead of the grid "
                             "and write sanity.md next to --out; exit status 1 if a check fails")
    parser.add_argument("--convergence", nargs="+", default=None, metavar="STEPSxEOT",
                        help="instead of the grid: PGD-EOT with each budget (e.g. 20x4 50x4 20x16 100x8) on the first "
                             "target, t* and eps, scored like the grid, written to convergence.csv/.md next to --out")
    parser.add_argument("--retime", action="store_true",
                        help="instead of the grid: re-measure the costs (defend + classify, one attack step) of every "
                             "selected setting already in --out, in this one process, and write them into its rows, so "
                             "that costs first measured on different machines or under different load compare")
    parser.add_argument("--out", default=None,
                        help="results CSV, resumed if it exists (default: results/adaptive/<preset>-<split>.csv); "
                             "Markdown, PNG and per-image predictions go next to it")
    add_common_arguments(parser, n=200, batch_size=100, seed_help="seed of the image subset")
    args = parser.parse_args(argv)
    try:
        args.target = check_names(args.target, "target")
        args.defence = check_defences(args.defence)
        if any(parse_defence(spec)[0] == "vote" for spec in args.defence):
            raise ValueError("--defence vote: every row's 'vote' scoring is the majority of N evaluations; "
                             "give the defence it repeats instead (e.g. bcm)")
        for k in args.eps:
            if not 0 < k <= 255:
                raise ValueError(f"--eps values are k in eps = k/255 with 0 < k <= 255, got {k}")
        args.convergence = [budget(b) for b in args.convergence] if args.convergence else None
    except ValueError as err:
        parser.error(str(err))
    command = sanity if args.sanity else convergence if args.convergence else retime if args.retime else adaptive
    run_command(parser, command, args)


def budget(text: str) -> tuple[int, int]:
    """``"STEPSxEOT"`` -> (steps, eot), both positive."""
    try:
        steps, eot = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a budget is STEPSxEOT, e.g. 50x4; got {text!r}") from None
    if steps < 1 or eot < 1:
        raise ValueError(f"a budget needs at least 1 step and 1 EOT draw; got {text!r}")
    return steps, eot


def build(args, device):
    """Classifiers, defences (per spec, t* and eps_inv), images, and checkpoint ids from the arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.bf16_on = resolve_bf16(args)
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
    out = Path(args.out) if args.out else RESULTS_DIR / "adaptive" / f"{args.preset}-{args.split}.csv"
    table = ResultTable(out, KEY, COLUMNS)
    cache_dir = out.with_name(out.stem + "-predictions")
    for target in args.target:
        for entry in entries:
            costs = None
            for eps in args.eps:
                setting = Setting(args, target, models[target], entry, eps, images, labels, ids,
                                  ids_of[target, id(entry)])
                costs = costs or measure_costs(setting, args.batch_size, args.bf16_on)
                print(f"{target}, {entry.defence.spec()}, eps = {eps}/255", file=sys.stderr)
                run_setting(setting, table, cache_dir, costs)
    frame = numeric_adaptive(table.frame())
    write_text(out.with_suffix(".md"), markdown(frame))
    plot(frame, out.with_suffix(".png"))
    print(markdown(frame[frame.checkpoints.isin(set(ids_of.values()))
                         & frame.defence.isin([e.defence.spec() for e in entries])]))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr)


SETTING_COLUMNS = ("preset", "defence", "target", "split", "n", "data_seed", "protocol", "bf16", "checkpoints")


def retime(args: argparse.Namespace) -> None:
    """``--retime``: the costs of every selected setting measured again, one after another in this process, and
    written into all of that setting's rows in ``--out`` (its accuracies untouched)."""
    device = pick_device(args.device)
    out = Path(args.out) if args.out else RESULTS_DIR / "adaptive" / f"{args.preset}-{args.split}.csv"
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
    for column in ("t_star", "eps_inv", "step_size", "accuracy", "wall_s", "s_per_image", "purify_s_per_image",
                   "step_s_per_image"):
        frame[column] = pd.to_numeric(frame[column])
    for column in ("n", "data_seed", "eps", "steps", "eot", "evals", "attack_seed", "eval_seed"):
        frame[column] = frame[column].astype(int)
    frame["bf16"] = frame["bf16"] == "true"
    return frame


def convergence(args: argparse.Namespace) -> None:
    """Robust accuracy under PGD-EOT as steps and EOT draws grow, on the first target, t* and eps: how far the
    cheap protocol's numbers are from converged (resumable: one row group per budget)."""
    device = pick_device(args.device)
    models, entries, images, labels, ids, ids_of = build(args, device)
    target, entry, eps = args.target[0], entries[0], args.eps[0]
    setting = Setting(args, target, models[target], entry, eps, images, labels, ids, ids_of[target, id(entry)])
    out = Path(args.out) if args.out else RESULTS_DIR / "adaptive" / f"{args.preset}-{args.split}.csv"
    path = out.with_name("convergence.csv")
    table = ResultTable(path, KEY + ["steps", "eot"], COLUMNS)
    costs = measure_costs(setting, args.batch_size, args.bf16_on)
    for steps, eot in args.convergence:
        base = dict(setting.row("pgd-eot"), steps=steps, eot=eot)
        rows = [dict(base, scoring=s) for s in ("single", "worst", "vote")]
        if all(table.done(r) for r in rows):
            continue
        started = time.monotonic()
        attack = eot_pgd(setting.attacked, eps / 255, steps, setting.protocol.step_size(eps / 255), eot)
        adversarial = craft(attack, images, labels, args.batch_size, seed=args.attack_seed, bf16=args.bf16_on,
                            progress=not args.no_progress, desc=f"PGD-EOT {steps}x{eot}")
        per_image = correct_by_scoring(setting.predictions("pgd-eot", adversarial), labels)
        wall = time.monotonic() - started
        table.add([dict(r, accuracy=per_image[r["scoring"]].mean().item(), wall_s=wall,
                        s_per_image=wall / len(images), **costs) for r in rows])
    frame = numeric_adaptive(table.frame())
    lines = [f"**PGD-EOT budgets on {len(images)} {args.split} images** ({args.preset} preset, defence "
             f"`{entry.defence.spec()}` before {target}; eps = {eps}/255; "
             f"step size eps/4; scored over N = {setting.protocol.evals} evaluations; {DATASET}). Accuracy (%).\n",
             "| steps x EOT | gradients per image | single | worst-of-N | vote | s/image |", "|---|---|---|---|---|---|"]
    for (steps, eot), group in frame.groupby(["steps", "eot"]):
        acc = {r.scoring: 100 * r.accuracy for r in group.itertuples()}
        lines.append(f"| {steps} x {eot} | {steps * eot} | {acc['single']:.1f} | {acc['worst']:.1f} | "
                     f"{acc['vote']:.1f} | {group.s_per_image.iloc[0]:.1f} |")
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
    out = Path(args.out) if args.out else RESULTS_DIR / "adaptive" / f"{args.preset}-{args.split}.csv"
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
        predictions = predict_draws(model, x, ids, args.sanity_evals if noisy else 1, noise, args.batch_size,
                                    args.bf16_on)
        return (predictions == labels[None]).float().mean().item()

    def pgd_eot(k: int, steps: int, eot: int) -> torch.Tensor:
        e = k / 255
        return craft(eot_pgd(defended, e, steps, e / 4, eot), images, labels, **common)

    checks = []
    # the attack itself must break an undefended model: PGD with many small steps (the paper's 10 steps of 2/255
    # are a transfer attack, not a test of the attack's strength)
    strong = eot_pgd(classifier, eps / 255, 50, eps / 255 / 8, eot=1)
    undefended = accuracy(classifier, craft(strong, images, labels, **common), noisy=False)
    checks.append(("undefended classifier under PGD goes to ~0", undefended <= 0.05,
                   f"{100 * undefended:.1f}% (PGD 50 steps of eps/8)"))
    budgets = SANITY_BUDGETS
    curve = [accuracy(defended, pgd_eot(eps, s, m)) for s, m in budgets]
    cpu = curve[-2]
    slack = 0.03  # sampling noise of a few evaluations on a small subset
    monotone = all(b <= a + slack for a, b in zip(curve, curve[1:]))
    checks.append(("accuracy falls as PGD steps and EOT draws grow", monotone,
                   ", ".join(f"{s}x{m}: {100 * a:.1f}%" for (s, m), a in zip(budgets, curve))))
    checks.append(("... and saturates (20x4 -> 40x8 within 5 points)", abs(curve[-1] - curve[-2]) <= 0.05,
                   f"{100 * abs(curve[-1] - curve[-2]):.1f} points"))
    huge = accuracy(defended, pgd_eot(128, 20, 1))
    checks.append(("a huge eps (128/255) drives accuracy to ~0", huge <= 0.10, f"{100 * huge:.1f}%"))
    transfer = accuracy(defended, craft(paper_pgd(classifier, eps), images, labels, **common))
    checks.append(("white-box is not above transfer from the same model", cpu <= transfer + slack,
                   f"white-box (20x4) {100 * cpu:.1f}% vs transfer {100 * transfer:.1f}%"))
    x = (images[: args.batch_size].float() / 255).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(defended(x), labels[: args.batch_size])
    grad, = torch.autograd.grad(loss, x)
    nonzero = (grad.flatten(1).abs().sum(1) > 0).float().mean().item()
    checks.append(("gradients through the purifier are finite and non-zero",
                   bool(torch.isfinite(grad).all()) and nonzero == 1.0,
                   f"finite: {bool(torch.isfinite(grad).all())}, non-zero for {100 * nonzero:.0f}% of images"))
    frozen = lambda i, d: purifier.fixed_noise(image_noise(i, shape, args.eval_seed, 0))  # noqa: E731
    fixed_adv = craft(eot_pgd(defended, eps / 255, 20, eps / 255 / 4, 1), images, labels, ids=ids, noise=frozen,
                      **common)
    fixed = (predict_draws(defended, fixed_adv, ids, 1, frozen, args.batch_size, args.bf16_on)
             == labels[None]).float().mean().item()
    checks.append(("fixed-randomness result reported beside the randomized one", True,
                   f"frozen noise {100 * fixed:.1f}% vs fresh noise {100 * cpu:.1f}% (20 steps)"))
    return checks


if __name__ == "__main__":
    main()
