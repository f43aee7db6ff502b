"""Quality of a trained BCM: ``python -m bench.quality --bcm checkpoints/bcm/cifar10-small.pt``.

Three measurements on a fixed seeded subset of the CIFAR-10 test set (``--n``, ``--seed``), each a part that
can be skipped and rerun on its own:

- reconstruction (Section 4.2, spec §5): per-dimension MSE on the [0, 1] scale (with PSNR, SSIM and seconds per
  image) of inverting a test image with the paper's schedules for NFE 1-4 (Algorithm 5) and generating it back
  in one step, next to the inversion baselines with the same network: ODE inversion (the probability-flow ODE
  with the BCM's u = 0 branch as denoiser, Euler and Heun on EDM's grid, as the paper's EDM baseline) decoded by
  one BCM step and by the ODE, and, given ``--ct-inversion``, a CT Inversion noiser (spec §8) decoded both ways;
  with the paper's and the CT Inversion report's numbers and the trivial baseline that predicts every image as
  the per-pixel mean image of the 50,000 training images -> ``reconstruction.csv`` / ``.md``, and a grid of
  originals (one per class) above their reconstructions at NFE 1 and 4 -> ``reconstruction.png``;
- samples (Section 3.3, spec §4): one-step (NFE 1), ancestral (2), zigzag (3) and combined (4) generation
  from the same seeded initial noise, with the Appendix A.2 settings -> ``samples_nfe{1,2,3,4}.png``;
- clean accuracy after each defence (Section 4.3.4, spec §7): each classifier's accuracy on clean test images
  after every ``--defence`` (default: the BCM purifier, invert to t* then denoise, and the add-noise-then-denoise
  baseline ``x + t* z`` then ``f(., t*, 0)``; any of the registry's, e.g. ``diffusion jpeg median``), at every
  t* for the defences that have a strength, next to the unpurified accuracy -> ``purified_clean.csv`` / ``.md``
  / ``.png``. Each defence purifies the images once (a vote: n times) and the same images go to every classifier.

All noise is seeded (a randomized defence's noise per image from ``--seed`` and the image's index), so a rerun
with the same options gives the same numbers.

``torchrun --standalone --nproc-per-node N -m bench.quality -- <options>`` splits the images across the ranks by
blocks (resumable, in ``<out>/.blocks/``); rank 0 writes every file, with the numbers of one process.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import kornia
import pandas as pd
import torch
from torch import nn

import classifiers
from purify import BCM, BCMPurifier
from purify.infra.checkpoint import atomic_write, load_checkpoint
from purify.infra.data import load_cifar10
from purify.infra.images import as_float, write_png
from purify.infra.paths import RESULTS_DIR
from purify.infra.runtime import leave_distributed
from purify.infra.shards import Shard, blocks, map_blocks, remove_blocks
from purify.noiser import Noiser, load_noiser
from purify.sampling import (
    ANCESTRAL_2,
    COMBINED_4,
    INVERSION_SCHEDULES,
    ZIGZAG_3,
    initial_noise,
    invert,
    invert_ode,
    ode_times,
    pf_ode_nfe,
    reconstruct,
    sample_ancestral,
    sample_combined,
    sample_ode,
    sample_onestep,
    sample_zigzag,
)

from .batches import decisions_accuracy, draws_predictions, map_batches, purify_draws
from .common import (
    DATASET,
    DEFENCE_HELP,
    T_STARS,
    Entry,
    RunOptions,
    add_common_arguments,
    add_split_argument,
    bcm_path,
    build_defences,
    check_defences,
    classifier_path,
    command_line,
    file_id,
    from_args,
    load_classifiers,
    load_split,
    missing_bcm_message,
    positive_int,
    resolve_bf16,
    run_command,
    start_runtime,
    write_text,
)

# Section 4.2 / spec §5: per-dimension MSE on the [0, 1] scale, CIFAR-10 test, inversion NFE 1-4.
PAPER_MSE = {1: 0.00526, 2: 0.00451, 3: 0.00377, 4: 0.00362}
# The paper's EDM baseline (Figure 4): EDM's network, ODE inversion and ODE generation with EDM's Algorithm 1
# (Heun), 9 and 19 NFE: EDM's Heun count 2N - 1 of N = 5 and 10 steps, which our Heun rows of 5 and 10 steps
# (2N NFE upwards, where no step ends at t = 0) and our Euler rows of 9 and 19 steps stand next to.
PAPER_ODE_MSE = {("euler", 9): (9, 0.01326), ("euler", 19): (19, 0.00421),
                 ("heun", 5): (9, 0.01326), ("heun", 10): (19, 0.00421)}
ODE_STEPS = tuple(PAPER_ODE_MSE)
# The ODE inversion starts deterministically from the image as the trajectory's point at the BCM inversion's
# first time, 0.07: at eps the first slope is exactly 0 (the BCM's boundary f(x, eps, eps) = x), and on 32
# training images eps gave the same or larger errors (Heun, 10 steps, ODE decoding: 0.00032 against 0.00015).
ODE_T_MIN = INVERSION_SCHEDULES[1][0]
CT_INVERSION_DECODER = ("heun", 10)  # the ODE decoder of the CT Inversion rows: that of the ode-heun row, 10 steps
# CT Inversion report (Hsu), Table 1, CIFAR-10: its noiser with an off-the-shelf CM (1 NFE) or DM (30 steps).
CT_INVERSION_REFERENCE = {"bcm": "CT Inversion + CM (report): PSNR 18.07, SSIM 0.7911, 1 NFE",
                          "ode-heun": "CT Inversion + DM (report): PSNR 18.20, SSIM 0.8024, 30 DM steps"}


# --------------------------------------------------------------------------------------------- measurements

def pixel_mean(images: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    """The per-pixel mean image in [0, 1] of uint8 ``images``, summed in chunks to keep memory small."""
    total = sum(images[i:i + chunk].sum(0, dtype=torch.float64) for i in range(0, len(images), chunk))
    return (total / (255.0 * len(images))).float()


class Decoder(NamedTuple):
    name: str
    nfe: int
    decode: Callable[[torch.Tensor], torch.Tensor]    # x_T -> image, on a batch


class Inversion(NamedTuple):
    method: str
    times: str                                        # the inversion's times, as the table shows them
    nfe: int
    invert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image, its stream noise) -> x_T, on a batch
    decoders: list[Decoder]
    references: dict[str, tuple[float, str]]          # decoder name -> (paper_mse, reference)


def image_metrics(reconstructed: torch.Tensor, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, on the [0, 1] scale (inputs on [-1, 1]; the reconstruction clamped to it): MSE per dimension,
    PSNR in dB and SSIM with an 11x11 Gaussian window (kornia.metrics)."""
    a, b = (reconstructed.clamp(-1, 1) + 1) / 2, (x0 + 1) / 2
    return {"mse": (a - b).pow(2).flatten(1).mean(1),
            "psnr": torch.stack([kornia.metrics.psnr(p[None], q[None], 1.0) for p, q in zip(a, b)]),
            "ssim": kornia.metrics.ssim(a, b, 11).flatten(1).mean(1)}


def stream_states(seed: int, n: int, batch_size: int, shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The state of the noise stream seeded by ``seed`` at the first image of every block of ``batch_size``
    (keyed by the block's start): image ``i``'s noise is the ``i``-th image-sized stretch of one stream over the
    images in order, what one pass in batches draws, so a block restores its state and draws its images'."""
    generator, states = torch.Generator().manual_seed(seed), {}
    for start, stop in blocks(n, batch_size):
        states[start] = generator.get_state()
        torch.randn((stop - start, *shape), generator=generator)
    return states


def reconstruction_table(bcm: BCM, images: torch.Tensor, mean_image: torch.Tensor | None, seed: int,
                         batch_size: int, device: torch.device, progress: bool = True,
                         noiser: Noiser | None = None, *, folder: Path, shard: Shard = Shard()) -> pd.DataFrame:
    """One row per (inversion method, decoder): MSE (mean and standard error over images), PSNR, SSIM and
    seconds per image (inversion + decoding), next to the paper's / the report's numbers and the mean-image
    baseline (NaN without ``mean_image``); ``latent_std``, the standard deviation of ``x_T / T`` over every image
    and dimension, says how close the inversion comes to the Gaussian N(0, I) it should reach (1).

    - ``bcm``: Algorithm 5 with the paper's schedules for NFE 1-4, decoded in one step ``f(x_T, T, 0)``; the
      inversion noise restarts from ``seed`` for every NFE, so each image starts from the same noise (its
      stretch of the stream ``stream_states`` describes);
    - ``ode-euler`` / ``ode-heun``: ODE inversion on EDM's grid from ``ODE_T_MIN`` to T (``ODE_STEPS``), decoded in
      one BCM step and by the same solver on the same grid back down (the inversion's mirror);
    - ``ct-inversion`` (with ``noiser``): ``x_T = g(x0, eps)`` in one evaluation (the image as the trajectory's
      point at eps, as the report assumes), decoded in one BCM step and by the ODE decoder of the ``ode-heun``
      row with ``CT_INVERSION_DECODER``'s steps.

    The images are measured in blocks of ``batch_size`` (``map_blocks``: saved under ``folder``, split across
    the ranks of ``shard``, every rank gets the table); a block returns per-image values only, so the merged
    table is one process's.
    """
    x_all = as_float(images) * 2 - 1
    baseline = (math.nan if mean_image is None
                else ((as_float(images) - mean_image) ** 2).flatten(1).mean(1).mean().item())
    eps, T = bcm.config.eps, bcm.config.T
    one_step = Decoder("bcm", 1, lambda x_T: sample_onestep(bcm, x_T, T, eps))

    def ode_decoder(solver: str, times: list[float]) -> Decoder:
        return Decoder(f"ode-{solver}", pf_ode_nfe(times, solver), lambda x_T: sample_ode(bcm, x_T, times, solver, eps))

    inversions = []
    for nfe, times in INVERSION_SCHEDULES.items():
        inversions.append(Inversion(
            "bcm", " -> ".join(f"{t:g}" for t in times), nfe,
            lambda x, z, times=times: invert(bcm, x, times, noise=z), [one_step],
            {"bcm": (PAPER_MSE[nfe], f"BCM paper: MSE {PAPER_MSE[nfe]}, {nfe} NFE")}))
    for solver, steps in ODE_STEPS:
        times = ode_times(steps, ODE_T_MIN, T)
        paper_nfe, paper_mse = PAPER_ODE_MSE[(solver, steps)]
        inversions.append(Inversion(
            f"ode-{solver}", f"{ODE_T_MIN:g} -> {T:g}, {steps} steps", pf_ode_nfe(times, solver),
            lambda x, z, times=times, solver=solver: invert_ode(bcm, x, times, solver, eps),
            [one_step, ode_decoder(solver, times)],
            {f"ode-{solver}": (paper_mse, f"EDM ODE inversion + ODE (BCM paper): MSE {paper_mse}, {paper_nfe} NFE")}))
    if noiser is not None:
        solver, steps = CT_INVERSION_DECODER
        inversions.append(Inversion(
            "ct-inversion", f"g(x0, {eps:g}) -> {T:g}", 1, lambda x, z: noiser(x, eps),
            [one_step, ode_decoder(solver, ode_times(steps, ODE_T_MIN, T))],
            {name: (math.nan, reference) for name, reference in CT_INVERSION_REFERENCE.items()}))

    states = stream_states(seed, len(x_all), batch_size, tuple(x_all.shape[1:]))

    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        """Per image of ``start .. stop-1``: every row's metrics and seconds (the block's wall time spread over
        its images), and per inversion the sum and sum of squares of the latent (float64, for ``latent_std``)."""
        x = x_all[start:stop]
        generator = torch.Generator()
        generator.set_state(states[start])
        z = torch.randn(x.shape, generator=generator)
        out = {}
        for k, inversion in enumerate(inversions):
            inverted = map_batches(inversion.invert, [x, z], len(x), device, progress=False)
            latents = inverted.output.double().flatten(1)
            out[f"{k}/latent_sum"], out[f"{k}/latent_sumsq"] = latents.sum(1), latents.pow(2).sum(1)
            for j, decoder in enumerate(inversion.decoders):
                decoded = map_batches(decoder.decode, [inverted.output], len(x), device, progress=False)
                for name, values in image_metrics(decoded.output, x).items():
                    out[f"{k}/{j}/{name}"] = values
                out[f"{k}/{j}/seconds"] = torch.full((len(x),), (inverted.seconds + decoded.seconds) / len(x),
                                                     dtype=torch.float64)
        return out

    merged = map_blocks(block, len(x_all), batch_size, folder, shard, progress, "reconstruction")
    rows = []
    for k, inversion in enumerate(inversions):
        count = x_all.numel()  # the latents' values: images x dimensions
        mean = merged[f"{k}/latent_sum"].sum() / count
        variance = (merged[f"{k}/latent_sumsq"].sum() - count * mean * mean) / (count - 1)
        latent_std = (torch.tensor(variance.sqrt().item(), dtype=torch.float32) / T).item()
        for j, decoder in enumerate(inversion.decoders):
            metrics = {name: merged[f"{k}/{j}/{name}"] for name in ("mse", "psnr", "ssim")}
            paper_mse, reference = inversion.references.get(decoder.name, (math.nan, ""))
            rows.append({"method": inversion.method, "decoder": decoder.name, "nfe": inversion.nfe,
                         "decoder_nfe": decoder.nfe, "total_nfe": inversion.nfe + decoder.nfe,
                         "inversion_times": inversion.times, "latent_std": latent_std,
                         "mse": metrics["mse"].mean().item(),
                         "mse_sem": (metrics["mse"].std() / math.sqrt(len(x_all))).item(),
                         "psnr": metrics["psnr"].mean().item(), "ssim": metrics["ssim"].mean().item(),
                         "s_per_image": merged[f"{k}/{j}/seconds"].sum().item() / len(x_all),
                         "paper_mse": paper_mse, "reference": reference, "mean_image_mse": baseline})
    return pd.DataFrame(rows)


def reconstruction_grid(bcm: BCM, images: torch.Tensor, seed: int, device: torch.device) -> torch.Tensor:
    """Rows: originals, their reconstructions at inversion NFE 1, at NFE 4 (in [0, 1])."""
    x0 = (as_float(images) * 2 - 1).to(device)
    rows = [x0] + [reconstruct(bcm, x0, INVERSION_SCHEDULES[nfe], bcm.config.eps,
                               torch.Generator().manual_seed(seed)) for nfe in (1, 4)]
    return (torch.cat(rows).cpu() + 1) / 2


def sample_grids(bcm: BCM, count: int, seed: int, device: torch.device) -> dict[int, torch.Tensor]:
    """Samples in [0, 1] by NFE: one-step, ancestral, zigzag, combined, all from the same initial noise."""
    eps, T = bcm.config.eps, bcm.config.T
    net = bcm.config.network
    x_T = initial_noise((count, net.image_channels, net.resolution, net.resolution), T,
                        torch.Generator().manual_seed(seed), device)
    # The zigzag steps draw fresh noise: each sampler gets the same separate seeded stream for it.
    def fresh() -> torch.Generator:
        return torch.Generator().manual_seed(seed + 1)

    samples = {1: sample_onestep(bcm, x_T, T, eps),
               2: sample_ancestral(bcm, x_T, **ANCESTRAL_2, eps=eps),
               3: sample_zigzag(bcm, x_T, **ZIGZAG_3, eps=eps, generator=fresh()),
               4: sample_combined(bcm, x_T, **COMBINED_4, eps=eps, generator=fresh())}
    return {nfe: (x.clamp(-1, 1).cpu() + 1) / 2 for nfe, x in samples.items()}


def purified_clean_table(entries: list[Entry], models: dict[str, nn.Module], images: torch.Tensor,
                         labels: torch.Tensor, ids: torch.Tensor, seed: int, batch_size: int,
                         device: torch.device, bf16: bool = False, progress: bool = True, *, folder: Path,
                         shard: Shard = Shard()) -> pd.DataFrame:
    """Accuracy of every classifier on the unpurified images and after every defence (purified under bf16
    autocast with ``bf16``, classified in float32).

    Each defence purifies the images once (a vote: once per draw) and the purified images are shared by all
    classifiers; a randomized defence's noise is drawn per image from ``seed`` and ``ids``. The images go in
    blocks of ``batch_size`` (``map_blocks``: saved under ``folder``, split across the ranks of ``shard``), each
    returning every classifier's decision per image, so the merged accuracies are one process's."""
    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        x, block_ids = as_float(images[start:stop]), ids[start:stop]
        out = {f"none/{arch}": draws_predictions(model, [x], None, batch_size) for arch, model in models.items()}
        for k, entry in enumerate(entries):
            purified = purify_draws(entry.defence, x, block_ids, seed, device, batch_size, bf16, progress=False)
            for arch, model in models.items():
                out[f"{k}/{arch}"] = draws_predictions(model, purified, entry.defence, batch_size)
        return out

    decisions = map_blocks(block, len(images), batch_size, folder, shard, progress,
                           "clean accuracy after each defence")
    rows = [{"arch": arch, "defence": "none", "family": "none", "t_star": math.nan, "nfe": 0,
             "accuracy": decisions_accuracy(decisions[f"none/{arch}"], labels)} for arch in models]
    for k, entry in enumerate(entries):
        defence = entry.defence
        for arch in models:
            rows.append({"arch": arch, "defence": defence.spec(), "family": defence.family(),
                         "t_star": math.nan if entry.t_star is None else entry.t_star, "nfe": defence.nfe,
                         "accuracy": decisions_accuracy(decisions[f"{k}/{arch}"], labels)})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------- views

def reconstruction_markdown(table: pd.DataFrame) -> str:
    """The reconstruction rows with each number at a precision that fits it."""
    view = table[["method", "decoder", "inversion_times", "nfe", "total_nfe", "latent_std", "mse", "mse_sem", "psnr",
                  "ssim", "s_per_image", "paper_mse", "reference"]]
    return view.to_markdown(index=False,
                            floatfmt=("", "", "", ".0f", ".0f", ".3f", ".5f", ".5f", ".2f", ".4f", ".4f", ".5f", ""))


def purified_clean_markdown(table: pd.DataFrame) -> str:
    """Accuracy in % with one row per (defence family, t*) and one column per classifier, plus their mean."""
    view = table.assign(t_star=table["t_star"].map(lambda t: "-" if math.isnan(t) else f"{t:g}"),
                        accuracy=table["accuracy"] * 100, family=table["family"].map(lambda f: f"`{f}`"))
    # sort=False keeps the table's order: unpurified first, then each defence by t*
    wide = view.pivot_table(index=["family", "t_star", "nfe"], columns="arch", values="accuracy", sort=False)
    wide = wide[list(table["arch"].unique())]
    wide["mean"] = wide.mean(axis=1)
    return wide.reset_index().to_markdown(index=False, floatfmt=".1f")


def plot_purified_clean(table: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per classifier: accuracy against t* (log scale) per defence family (a horizontal line for a
    defence without a strength), unpurified as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(table["arch"].unique())
    # at least 8 inches wide, so that the title and the legend fit above and below a single panel
    fig, axes = plt.subplots(1, len(archs), figsize=(max(8.0, 3.2 * len(archs)), 3.6), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = table[table["arch"] == arch]
        for i, family in enumerate(f for f in dict.fromkeys(rows["family"]) if f != "none"):
            curve = rows[rows["family"] == family].sort_values("t_star")
            style = ("-o", "--s", "-.^", ":v")[i % 4]
            if curve["t_star"].notna().any():
                ax.plot(curve["t_star"], curve["accuracy"], style, ms=3.5, color=f"C{i}", label=family)
            else:
                ax.axhline(curve["accuracy"].mean(), ls=style[:-1], color=f"C{i}", lw=1.2, label=family)
        for acc in rows.loc[rows["family"] == "none", "accuracy"]:
            ax.axhline(acc, color="k", ls=":", lw=1, label="unpurified")
        ax.axhline(0.1, color="grey", lw=0.6, alpha=0.6)  # chance level, 10 classes
        ax.set_xscale("log")
        ax.set_title(arch)
        ax.set_xlabel("t* (purification strength)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("clean accuracy")
    axes[0][0].set_ylim(0, 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t-stars", type=float, nargs="+", default=list(T_STARS),
                        help="purification strengths t* of the clean-accuracy part, for every defence with one")
    parser.add_argument("--defence", nargs="+", default=["bcm", "denoise"], metavar="SPEC",
                        help=f"{DEFENCE_HELP}; built on --bcm (default: bcm denoise)")
    parser.add_argument("--grid", type=positive_int, default=64,
                        help="samples per sample grid (a square number reads best)")
    parser.add_argument("--allow-missing-classifiers", action="store_true",
                        help="skip classifiers whose checkpoint is missing, with a warning, instead of failing")
    parser.add_argument("--skip-samples", action="store_true", help="do not write the sample grids")
    parser.add_argument("--skip-reconstruction", action="store_true", help="do not measure reconstruction")
    parser.add_argument("--skip-classifiers", action="store_true", help="do not measure purified clean accuracy")
    parser.add_argument("--ct-inversion", metavar="PATH",
                        help="a CT Inversion noiser: a training checkpoint (python -m purify.train --config "
                             "cifar10-small-ctinv) or its release file (e.g. the shipped "
                             "checkpoints/noiser/cifar10-small-ctinv.pt): adds its reconstruction rows, decoded by the BCM and by the ODE "
                             "(without it those rows are skipped)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality"), help="output folder")
    add_common_arguments(parser, n=1000, seed_help="seed of the test subset and of all noise")
    add_split_argument(parser)
    args = parser.parse_args(argv)
    bcm = bcm_path(args.bcm, args.preset)
    if not bcm.is_file():
        parser.error(missing_bcm_message(bcm, args.preset))
    if args.ct_inversion and args.skip_reconstruction:
        parser.error("--ct-inversion adds reconstruction rows: drop --skip-reconstruction")
    try:
        defences = check_defences(args.defence)
    except ValueError as err:
        parser.error(str(err))
    run_command(parser, quality, from_args(QualityRequest, args, bcm=bcm, defences=defences, out=Path(args.out),
                                           command=command_line("bench.quality", argv)))


@dataclass(frozen=True)
class QualityRequest(RunOptions):
    """The command's validated arguments (``main``'s options; ``command``: the command line, for the reports)."""
    bcm: Path
    command: str
    defences: list[str]
    t_stars: list[float]
    grid: int
    allow_missing_classifiers: bool
    skip_samples: bool
    skip_reconstruction: bool
    skip_classifiers: bool
    ct_inversion: str | None
    out: Path
    classifier_dir: str
    split: str


@dataclass(frozen=True)
class Models:
    """The networks the command measures: the BCM (``step``: its training step), the CT Inversion noiser (None
    without ``--ct-inversion``; ``ct_note`` says which) and the classifiers that have checkpoints."""
    bcm: BCM
    step: int | None
    noiser: Noiser | None
    ct_note: str
    classifiers: dict[str, nn.Module]


@dataclass(frozen=True)
class Context:
    """What every part shares: the images, where and what it writes (``about``: the reports' opening, ``meta``:
    the columns every CSV row gets), and this process's shard of the job (rank 0 writes)."""
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    out: Path
    about: str
    meta: dict
    device: torch.device
    shard: Shard

    def blocks_folder(self, part: str, request: QualityRequest, **inputs) -> Path:
        """Where ``part``'s blocks are saved until its table is written: one folder per part and everything its
        numbers depend on (the images, seed, device and ``inputs``, e.g. checkpoint ids), so a rerun of the same
        measurement resumes from the finished blocks and any other starts afresh."""
        key = dict(part=part, ids=hashlib.sha256(self.ids.numpy().tobytes()).hexdigest(), split=request.split,
                   data_root=str(request.data_root), seed=request.seed, device=self.device.type, **inputs)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.out / ".blocks" / f"{part}-{digest}"


def load_models(request: QualityRequest, device: torch.device) -> Models:
    """The BCM, the noiser and the classifiers of ``request``; ValueError for a t* or noiser that does not fit
    the BCM."""
    bcm = BCMPurifier.from_checkpoint(request.bcm, device=device).bcm.to(memory_format=torch.channels_last)
    eps, T = bcm.config.eps, bcm.config.T
    bad = [t for t in request.t_stars if not eps < t <= T]
    if bad:
        raise ValueError(f"--t-stars must lie in ({eps}, {T}], got {bad}")
    noiser, ct_note = None, "CT Inversion rows skipped: no `--ct-inversion` checkpoint given."
    if request.ct_inversion:
        noiser, noiser_preset = load_noiser(request.ct_inversion, device)
        if (noiser_preset.model.eps, noiser_preset.model.T) != (eps, T):
            raise ValueError(f"the noiser {request.ct_inversion} is trained on times [{noiser_preset.model.eps}, "
                             f"{noiser_preset.model.T}], the BCM on [{eps}, {T}]")
        noiser = noiser.eval().to(memory_format=torch.channels_last)
        ct_note = (f"CT Inversion rows: noiser `{request.ct_inversion}` "
                   f"(step {load_checkpoint(request.ct_inversion).get('step')}).")
    models = {}
    if not request.skip_classifiers:
        models = load_classifiers(classifiers.ARCHS, request.preset, request.classifier_dir, device,
                                  allow_missing=request.allow_missing_classifiers)
        if not models:
            print("warning: no classifier checkpoint found; skipping purified clean accuracy", file=sys.stderr)
    return Models(bcm, load_checkpoint(request.bcm).get("step"), noiser, ct_note, models)


def quality(request: QualityRequest) -> None:
    """Run the command on validated arguments; a bad checkpoint, data root or value raises OSError/ValueError."""
    shard, device = Shard.join(request.device)
    device = start_runtime(request.threads, device)
    models = load_models(request, device)
    images, labels, ids = load_split(request.split, request.data_root, request.n, request.seed)
    about = (f"{DATASET}, {len(images)} {request.split} images (seeded subset, seed {request.seed}); BCM checkpoint "
             f"`{request.bcm}` (step {models.step}). Command: `{request.command}`.")
    meta = {"n": len(images), "seed": request.seed, "split": request.split, "checkpoint_step": models.step}
    context = Context(images, labels, ids, request.out, about, meta, device, shard)
    parts = {"samples": (not request.skip_samples, write_samples),
             "reconstruction": (not request.skip_reconstruction, write_reconstruction),
             "classifiers": (bool(models.classifiers), write_purified_clean)}
    timings = {}
    with torch.inference_mode():
        for part, (wanted, write) in parts.items():
            if wanted:
                started = time.perf_counter()
                write(request, models, context)
                timings[part] = time.perf_counter() - started
    leave_distributed()
    if not shard.main:
        return
    print("wall time: " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in timings.items())
          + f"; results in {request.out}")


def write_samples(request: QualityRequest, models: Models, context: Context) -> None:
    if not context.shard.main:  # a few seeded grids: rank 0 alone
        return
    nrow = max(1, round(math.sqrt(request.grid)))
    for nfe, grid in sample_grids(models.bcm, request.grid, request.seed, context.device).items():
        write_png(grid, context.out / f"samples_nfe{nfe}.png", nrow)


def write_table(table: pd.DataFrame, context: Context, name: str, markdown: str) -> pd.DataFrame:
    """``table`` with the shared columns, written to ``name``.csv, and ``markdown`` to ``name``.md."""
    table = table.assign(**context.meta)
    write_csv(table, context.out / f"{name}.csv")
    write_text(context.out / f"{name}.md", markdown)
    return table


def write_reconstruction(request: QualityRequest, models: Models, context: Context) -> None:
    bcm, eps, shard = models.bcm, models.bcm.config.eps, context.shard
    folder = context.blocks_folder("reconstruction", request, bcm=file_id(str(request.bcm)),
                                   noiser=file_id(request.ct_inversion) if request.ct_inversion else "")
    train_images = load_cifar10("train", request.data_root)[0] if shard.main else None  # rank 0's baseline
    mean_image = None if train_images is None else pixel_mean(train_images)
    table = reconstruction_table(bcm, context.images, mean_image, request.seed, request.batch_size, context.device,
                                 not request.no_progress and shard.main, models.noiser, folder=folder, shard=shard)
    remove_blocks(folder, shard)
    if not shard.main:
        return
    ct_note = models.ct_note
    table = write_table(table, context, "reconstruction", (
            f"# Reconstruction (inversion, then generation)\n\n{context.about}\n\n"
            f"Per-dimension MSE on the [0, 1] scale, mean over images (`mse_sem`: its standard error), "
            f"PSNR (dB, mean over images) and SSIM (11x11 Gaussian window) from kornia.metrics; "
            f"`nfe`: network evaluations of the inversion, `total_nfe` with the decoder's; `latent_std`: "
            f"the standard deviation of the inverted `x_T / T` (1 for the Gaussian an inversion should "
            f"reach; the ODE decoder undoes the ODE inversion step by step whatever its latent, so "
            f"ODE-ODE rows measure the solver's reversibility, the `bcm` decoder whether the latent is one "
            f"the BCM generates from); `s_per_image`: measured wall time of inversion and decoding "
            f"(float32, shared machine). "
            f"Methods: `bcm`, Algorithm 5 with the paper's schedules; `ode-euler` / `ode-heun`, the "
            f"probability-flow ODE `dx/dt = (x - f(x, t, 0)) / t` with the same BCM as denoiser on "
            f"EDM's grid (rho = 7), starting from the image itself at t = {ODE_T_MIN:g}; `ct-inversion`, "
            f"the CT Inversion noiser `g(x0, {eps:g})`. Decoders: `bcm`, one step `f(x_T, T, 0)`; "
            f"`ode-*`, the ODE back down. `paper_mse` / `reference`: the BCM paper's CIFAR-10 test "
            f"numbers (official binary release; its ODE baseline is EDM's own network) and the CT "
            f"Inversion report's, for comparison only. Predicting every image as the per-pixel mean "
            f"image of the {len(train_images):,} training images scores MSE "
            f"{table['mean_image_mse'].iloc[0]:.5f}. {ct_note}\n\n"
            f"{reconstruction_markdown(table)}\n"))
    # one column per class (the first image of each), since the subset is sorted by class
    labels = context.labels
    columns = torch.tensor([(labels == c).nonzero()[0].item() for c in labels.unique().tolist()])
    write_png(reconstruction_grid(bcm, context.images[columns], request.seed, context.device),
              context.out / "reconstruction.png", len(columns))
    print(table[["method", "decoder", "total_nfe", "mse", "psnr", "ssim", "s_per_image", "paper_mse"]]
          .to_string(index=False))
    if models.noiser is None:
        print(f"note: {ct_note}", file=sys.stderr)


def write_purified_clean(request: QualityRequest, models: Models, context: Context) -> None:
    entries = build_defences(request, request.defences, context.device, t_stars=request.t_stars)
    bf16 = resolve_bf16(request, context.device)
    shard = context.shard
    folder = context.blocks_folder(
        "purified_clean", request, bf16=bf16,
        defences=[[entry.defence.spec(), entry.checkpoint_id] for entry in entries],
        classifiers={arch: file_id(str(classifier_path(arch, request.preset, request.classifier_dir)))
                     for arch in models.classifiers})
    table = purified_clean_table(entries, models.classifiers, context.images, context.labels, context.ids,
                                 request.seed, request.batch_size, context.device, bf16,
                                 not request.no_progress and shard.main, folder=folder, shard=shard)
    remove_blocks(folder, shard)
    if not shard.main:
        return
    table = write_table(table, context, "purified_clean", (
            f"# Clean accuracy after each defence (%)\n\n{context.about}\n\n"
            f"`bcm`: invert from eps_inv (capped at t*/2) to t* in one step, then denoise in one step; "
            f"`denoise`: add noise `t* z`, then denoise in one step; `none`: unpurified; `nfe`: "
            f"network evaluations per image. Classifiers: `{request.preset}` preset; purified "
            f"{'under bf16 autocast' if bf16 else 'in float32'}, classified in float32.\n\n"
            f"{purified_clean_markdown(table)}\n"))
    plot_purified_clean(table, context.out / "purified_clean.png",
                        f"Clean accuracy after purification, {DATASET}, n={len(context.images)}, BCM step "
                        f"{models.step}")
    print(purified_clean_markdown(table))


if __name__ == "__main__":
    main()
