"""The BCM paper's applications (Section 4.3, Appendix A.3, spec §6) on CIFAR-10 test images:
``python -m bench.applications --n 100``.

On a seeded subset of the test set (``--n``, ``--seed``), with the shipped (or ``--bcm``) BCM:

- interpolation between two real images: invert both to T = 80 (0.07 -> 1.5 -> 6.0 -> 80) from different
  initial noises, slerp the latents, map back in one step -> ``interpolation.png`` (one pair per row: the two
  originals at the ends, the path for evenly spaced alpha in [0, 1] between them); the path's ends (alpha 0
  and 1) are one-step reconstructions of the originals, measured against them;
- inpainting (Algorithm 6, 0.07 -> 0.4 -> 1.0 -> 2.0, hole filled with 0.5 z, re-noised after every step)
  for each ``--masks`` shape -> ``inpainting.png`` (per mask: originals, masked inputs, inpainted rows), with
  PSNR / SSIM on the hole only against the original (known pixels are copied from the input, so a full-image
  score would flatter the method); the masked input, its hole grey, is the baseline;
- blind restoration of JPEG-compressed images (torchvision's codec at each ``--qualities``; invert
  0.07 -> 0.7 -> 2.0, then denoise in one step) -> ``jpeg_restoration.png`` (originals, then per quality the
  compressed and the restored rows), with PSNR / SSIM of the compressed and of the restored image against the
  original.

The metrics go to ``metrics.csv`` (tidy: one row per application, setting and image kind) and ``metrics.md``.
PSNR and SSIM are kornia.metrics' (computed per image on the [0, 1] scale, then averaged); FID and LPIPS are
not measured, since they need Inception / AlexNet weights that cannot be downloaded here. Masks and all noise
are seeded by ``--seed``; the noise is drawn batch by batch from one generator per application, so results
depend on ``--batch-size`` too (the CSV records it).
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from kornia.metrics import psnr, ssim

from purify.applications import (
    HALVES,
    INPAINTING_TIMES,
    INTERPOLATION_TIMES,
    RESTORATION_TIMES,
    box_mask,
    compress_jpeg,
    half_mask,
    inpaint,
    interpolate,
    random_pixel_mask,
    restore,
)
from purify.infra.checkpoint import atomic_write, load_checkpoint
from purify.infra.images import as_float, write_png
from purify.infra.paths import RESULTS_DIR, display_path
from purify.purifier import load_bcm

from .batches import map_batches
from .common import (
    DATASET,
    RunOptions,
    add_common_arguments,
    bcm_path,
    command_line,
    file_id,
    from_args,
    load_split,
    missing_bcm_message,
    positive_int,
    resolve_bf16,
    run_command,
    start_runtime,
    write_text,
)

MASKS = ("box", *HALVES, "pixels")
SSIM_WINDOW = 11  # Wang et al.'s Gaussian window (sigma 1.5), 11 x 11
COLUMNS = ["application", "setting", "images", "region", "times", "nfe", "psnr", "psnr_sem", "ssim", "ssim_sem",
           "s_per_image", "n", "seed", "batch_size", "bf16", "checkpoint_step", "checkpoint"]


# --------------------------------------------------------------------------------------------- measurements

def region_psnr(output: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(1 / MSE)`` over the pixels where ``region`` is true, images on [0, 1]."""
    region = region.expand_as(target)
    return torch.stack([psnr(o[r], t[r], 1.0) for o, t, r in zip(output, target, region)])


def region_ssim(output: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-image mean of the SSIM map (Gaussian window ``SSIM_WINDOW``) over the pixels where ``region`` is true,
    images on [0, 1]; the windows of pixels near the region's border also see pixels outside it."""
    ssim_map = ssim(output, target, SSIM_WINDOW)
    region = region.expand_as(ssim_map).float()
    return (ssim_map * region).flatten(1).sum(1) / region.flatten(1).sum(1)


def scores(output: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> dict:
    """Mean and standard error over images of PSNR and SSIM on ``region`` (images on [-1, 1])."""
    output, target = (output.float() + 1) / 2, (target.float() + 1) / 2
    row = {}
    for name, values in (("psnr", region_psnr(output, target, region)), ("ssim", region_ssim(output, target, region))):
        row[name] = values.mean().item()
        row[f"{name}_sem"] = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
    return row


def make_mask(name: str, n: int, height: int, width: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The ``--masks`` shape ``name`` for ``n`` images: a centred box of half the side, a half, random pixels."""
    if name == "box":
        return box_mask(height, width)
    if name == "pixels":
        return random_pixel_mask(n, height, width, fraction, generator)
    return half_mask(height, width, name)


# -------------------------------------------------------------------------------------------------- views

def metrics_markdown(table: pd.DataFrame) -> str:
    """One row per application and setting: PSNR and SSIM of the degraded input -> the output, and the cost."""
    rows = []
    for (application, setting), group in table.groupby(["application", "setting"], sort=False):
        kinds = group.set_index("images")
        output = kinds.loc["output"]

        def change(metric: str, digits: int) -> str:
            after = f"{output[metric]:.{digits}f}"
            return f"{kinds.loc['degraded', metric]:.{digits}f} -> {after}" if "degraded" in kinds.index else after

        rows.append({"application": application, "setting": setting, "region": output["region"],
                     "times": output["times"], "NFE": output["nfe"], "PSNR (dB)": change("psnr", 2),
                     "SSIM": change("ssim", 3), "s / image": f"{output['s_per_image']:.4f}"})
    return pd.DataFrame(rows).to_markdown(index=False)


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.applications", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=positive_int, default=6,
                        help="image pairs to interpolate, drawn from the subset (needs 2 x pairs <= --n; default: 6)")
    parser.add_argument("--alphas", type=positive_int, default=9,
                        help="points on each interpolation path, alpha evenly spaced in [0, 1], at least 2 "
                             "(default: 9)")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=["box", "right", "pixels"],
                        help="inpainting holes: box (centred, half the side), left/right/top/bottom (that half), "
                             "pixels (a --pixel-fraction of random pixels per image) (default: box right pixels)")
    parser.add_argument("--pixel-fraction", type=float, default=0.5,
                        help="fraction of pixels missing in the 'pixels' mask, in (0, 1) (default: 0.5)")
    parser.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 40],
                        help="JPEG qualities (1-100) of the restoration part (default: 10 20 40)")
    parser.add_argument("--show", type=positive_int, default=8,
                        help="images per row of the inpainting and restoration figures, a seeded choice from the "
                             "subset (at most --n; default: 8)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "applications"), help="output folder")
    add_common_arguments(parser, n=100, seed_help="seed of the test subset, of the random-pixel masks, of the "
                                                  "choice of shown images and pairs, and of all noise",
                         classifier_dir=False)
    args = parser.parse_args(argv)
    request = from_args(ApplicationsRequest, args, masks=list(dict.fromkeys(args.masks)),
                        qualities=list(dict.fromkeys(args.qualities)), command=command_line("bench.applications", argv))
    run_command(parser, applications, request)


@dataclass(frozen=True)
class ApplicationsRequest(RunOptions):
    """The command's arguments (``main``'s options, ``masks`` and ``qualities`` without repeats; ``command``: the
    command line, for the report)."""
    pairs: int
    alphas: int
    masks: list[str]
    pixel_fraction: float
    qualities: list[int]
    show: int
    out: str
    command: str


def check_arguments(args: ApplicationsRequest) -> None:
    """ValueError naming the first option out of range (before any model or data is loaded)."""
    if args.alphas < 2:
        raise ValueError(f"--alphas must be at least 2 (the path's two ends), got {args.alphas}")
    if not 0 < args.pixel_fraction < 1:
        raise ValueError(f"--pixel-fraction must lie in (0, 1), got {args.pixel_fraction}")
    bad = [q for q in args.qualities if not 1 <= q <= 100]
    if bad:
        raise ValueError(f"--qualities must lie in [1, 100], got {bad}")
    if 2 * args.pairs > args.n:
        raise ValueError(f"--pairs {args.pairs} needs at least {2 * args.pairs} images, but --n is {args.n}")
    if args.show > args.n:
        raise ValueError(f"--show {args.show} is more than the {args.n} images of --n")


def applications(args: ApplicationsRequest) -> None:
    """Run the command on parsed arguments; a bad checkpoint, data root or value raises OSError/ValueError."""
    started = time.perf_counter()
    check_arguments(args)
    path = bcm_path(args.bcm, args.preset)
    if not path.is_file():
        raise FileNotFoundError(missing_bcm_message(path, args.preset))
    device = start_runtime(args.threads, args.device)
    bcm, _ = load_bcm(path, device)
    bcm = bcm.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    eps, step, bf16 = bcm.config.eps, load_checkpoint(path).get("step"), resolve_bf16(args, device)
    images, _, _ = load_split("test", args.data_root, args.n, args.seed)
    x = as_float(images) * 2 - 1
    n, height, width = len(x), x.shape[2], x.shape[3]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    shown, whole = order[:args.show], torch.ones(1, 1, height, width, dtype=torch.bool)
    progress = not args.no_progress
    rows = []

    def run(function, inputs, desc):
        batched = map_batches(function, inputs, args.batch_size, device, bf16=bf16, desc=desc, progress=progress)
        return batched.output, batched.seconds

    def record(application, setting, times, kind, region_name, output, target, region, s_per_image=math.nan):
        rows.append({"application": application, "setting": setting, "images": kind, "region": region_name,
                     "times": " -> ".join(f"{t:g}" for t in times), "nfe": len(times),
                     **scores(output, target, region), "s_per_image": s_per_image})

    with torch.inference_mode():
        # interpolation: one generator for the part, so the two images of a pair get different initial noise
        alphas = torch.linspace(0, 1, args.alphas).tolist()
        first, second = order[:2 * args.pairs].view(args.pairs, 2).T
        generator = torch.Generator().manual_seed(args.seed)
        paths, seconds = run(functools.partial(interpolate, bcm, alphas=alphas, times=INTERPOLATION_TIMES, eps=eps,
                                               generator=generator), [x[first], x[second]], "interpolation")
        record("interpolation", "path ends (alpha 0 and 1)", INTERPOLATION_TIMES, "output", "image",
               torch.cat([paths[:, 0], paths[:, -1]]), torch.cat([x[first], x[second]]),
               whole, seconds / (args.pairs * args.alphas))
        write_png(torch.cat([x[first, None], paths, x[second, None]], dim=1).flatten(0, 1),
                  Path(args.out) / "interpolation.png", args.alphas + 2, value_range=(-1, 1))

        # inpainting: every mask's noise from the same seed; the random-pixel masks from their own generator
        figure, mask_generator = [], torch.Generator().manual_seed(args.seed)
        for name in args.masks:
            mask = make_mask(name, n, height, width, args.pixel_fraction, mask_generator)
            hole = mask.bool()
            masked = torch.where(hole, 0.0, x)  # Algorithm 6's x (1 - M): the hole is grey
            generator = torch.Generator().manual_seed(args.seed)
            inpainted, seconds = run(functools.partial(inpaint, bcm, times=INPAINTING_TIMES, eps=eps,
                                                       generator=generator), [x, mask], f"inpainting {name}")
            setting = f"{name} ({hole.float().mean().item():.0%} missing)"
            record("inpainting", setting, INPAINTING_TIMES, "degraded", "hole", masked, x, hole)
            record("inpainting", setting, INPAINTING_TIMES, "output", "hole", inpainted, x, hole, seconds / n)
            figure += [x[shown], masked[shown], inpainted[shown]]
        write_png(torch.cat(figure), Path(args.out) / "inpainting.png", len(shown), value_range=(-1, 1))

        # JPEG restoration: every quality's noise from the same seed
        figure = [x[shown]]
        for quality in args.qualities:
            compressed = compress_jpeg(x, quality)
            generator = torch.Generator().manual_seed(args.seed)
            restored, seconds = run(functools.partial(restore, bcm, times=RESTORATION_TIMES, eps=eps,
                                                      generator=generator), [compressed], f"restoration q{quality}")
            setting = f"JPEG quality {quality}"
            record("restoration", setting, RESTORATION_TIMES, "degraded", "image", compressed, x, whole)
            record("restoration", setting, RESTORATION_TIMES, "output", "image", restored, x, whole, seconds / n)
            figure += [compressed[shown], restored[shown]]
        write_png(torch.cat(figure), Path(args.out) / "jpeg_restoration.png", len(shown), value_range=(-1, 1))

    table = pd.DataFrame(rows).assign(n=n, seed=args.seed, batch_size=args.batch_size, bf16=bf16,
                                      checkpoint_step=step, checkpoint=file_id(str(path)))[COLUMNS]
    out = Path(args.out)
    atomic_write(out / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
    wall = time.perf_counter() - started
    write_text(out / "metrics.md", metrics_text(table, args, path, step, bf16, wall))
    print(metrics_markdown(table))
    print(f"wall time {wall:.0f} s; results in {out}")


def metrics_text(table: pd.DataFrame, args: ApplicationsRequest, path: Path, step: int | None, bf16: bool,
                 wall: float) -> str:
    """``metrics.md``: what was measured, on what, how, and the table."""
    n, masks = table["n"].iloc[0], ", ".join(args.masks)
    path = display_path(path)
    return (f"# BCM applications: interpolation, inpainting, JPEG restoration\n\n"
            f"{DATASET}, {n} test images (seeded subset, seed {args.seed}); BCM checkpoint `{path}` (step {step}, "
            f"file id {table['checkpoint'].iloc[0]}); {'bf16 autocast' if bf16 else 'float32'}, batch size "
            f"{args.batch_size}, {torch.get_num_threads()} thread(s). Command: `{args.command}` ({wall:.0f} s of "
            f"wall time, data and model loading included).\n\n"
            f"PSNR (dB) and SSIM (Gaussian window {SSIM_WINDOW}, sigma 1.5) are kornia.metrics', per image on the "
            f"[0, 1] scale against the original test image, then averaged over images (standard errors: "
            f"`psnr_sem`, `ssim_sem` in `metrics.csv`); `degraded -> output` compares the input the method gets with "
            f"what it returns. These metrics need no downloaded weights; the paper's FID (and LPIPS) would need "
            f"Inception / AlexNet weights, which cannot be downloaded here, so they are not measured.\n\n"
            f"- **interpolation** ({args.pairs} pairs, {args.alphas} values of alpha): no ground truth for the path; "
            f"the row scores its ends (alpha 0 and 1), one-step reconstructions of the two originals from their "
            f"latents;\n"
            f"- **inpainting** (masks: {masks}): scored on the hole only, since the known pixels are copied from the "
            f"input; `degraded` is the masked input with a grey hole (0.5 on [0, 1]). The SSIM windows of hole "
            f"pixels near the border also see known pixels;\n"
            f"- **restoration**: the whole image, compressed by torchvision's JPEG codec (`degraded`) and restored "
            f"(`output`).\n\n"
            f"`NFE`: network evaluations per image (interpolation: to reconstruct one end; each further point of a "
            f"path costs one more); `s / image`: wall seconds per output image (interpolation: per path image, "
            f"inversions included).\n\n"
            f"{metrics_markdown(table)}\n\n"
            f"Figures: `interpolation.png` (a pair per row: original, path for alpha = 0 ... 1, original), "
            f"`inpainting.png` (per mask, in the order above: originals, masked, inpainted), "
            f"`jpeg_restoration.png` (originals, then per quality {', '.join(map(str, args.qualities))}: "
            f"compressed, restored).\n")


if __name__ == "__main__":
    main()
