"""Export a training checkpoint as a small release file for ``BCMPurifier.from_checkpoint``.

    python -m purify.export runs/bcm-small/checkpoint.pt checkpoints/bcm/cifar10-small.pt --t-star 0.3

Keeps one set of weights (by default the EMA, the one used for sampling, inversion and purification), the
config and the step; drops the other weights, the optimizer and the RNG state. ``--weights online`` ships the
online weights instead: after a short run whose curriculum has just doubled N, the EMA still averages over the
previous discretisation and can be the worse model (measure both with ``bench.quality``). The release stores
the shipped weights under ``weights`` and their origin (``ema`` or ``online``) under ``weights_from``; files
written before held them under ``ema`` and still load. A release file can be re-exported (e.g. to record
another t*): it keeps its weights and their origin. ``--t-star``/``--eps-inv`` record the purifier defaults
of the preset (e.g. the best value of its trade-off curve). A CT Inversion noiser's training checkpoint (kind
``noiser``) exports the same way, to a release file that ``purify.noiser.load_noiser`` reads (it has no purifier
defaults to record). ``--half`` stores the weights in float16, half the file (they load into a float32 network,
rounded to float16's 11 significant bits): the size in which trained models ship.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .bcm import BCM
from .infra.checkpoint import bcm_weights, load_checkpoint, load_state_dict_strict, save_checkpoint
from .infra.config import to_dict
from .noiser import KIND as NOISER_KIND, Noiser
from .presets import preset_from_dict
from .purifier import BCMPurifier


# the training-checkpoint entry each ``--weights`` choice ships
WEIGHT_ENTRIES = {"ema": "ema", "online": "model"}


def export(source: str, target: str, t_star: float | None = None, eps_inv: float | None = None,
           weights: str | None = None, half: bool = False) -> dict:
    """Write the release file ``target`` from the training checkpoint or release file ``source``; ``weights``
    (``"ema"``, the default, or ``"online"``) picks a training checkpoint's weights; ``half`` stores the floating
    weights in float16."""
    if weights is not None and weights not in WEIGHT_ENTRIES:
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    state = load_checkpoint(source, ("kind", "config", "step"))
    kind = state["kind"]
    if kind not in ("bcm", NOISER_KIND):
        raise ValueError(f"{source} is a {kind!r} checkpoint, not a BCM or a CT Inversion noiser")
    if kind == NOISER_KIND and (t_star, eps_inv) != (None, None):
        raise ValueError(f"{source} is a CT Inversion noiser: it has no purifier t* or eps_inv to record")
    if "model" in state:  # a training checkpoint: online weights under ``model``, their EMA under ``ema``
        origin = weights or "ema"
        if WEIGHT_ENTRIES[origin] not in state:
            raise ValueError(f"checkpoint {source} lacks the entry {WEIGHT_ENTRIES[origin]!r} ({origin} weights)")
        shipped = state[WEIGHT_ENTRIES[origin]]
    else:  # a release file ships the weights it holds, keeping the origin it names
        shipped, origin = bcm_weights(state, source)
        if weights not in (None, origin):
            raise ValueError(f"{source} is a release file holding {origin} weights only; --weights {weights} "
                             f"needs the training checkpoint")
    if Path(target).is_dir():
        raise ValueError(f"target {target} is a directory; give the release file's path, e.g. {Path(target) / 'bcm.pt'}")
    preset = preset_from_dict(state["config"], f"{source} config")
    if t_star is not None:
        preset.purifier.t_star = float(t_star)
    if eps_inv is not None:
        preset.purifier.eps_inv = float(eps_inv)
    # validate everything before writing anything: the weights fit the preset's network, the purifier defaults
    # give a valid schedule
    model = Noiser(preset.model) if kind == NOISER_KIND else BCM(preset.model)
    load_state_dict_strict(model, shipped, str(source))
    if half:
        shipped = {name: value.half() if value.is_floating_point() else value for name, value in shipped.items()}
    if kind == "bcm":
        BCMPurifier(model, preset.purifier.t_star, preset.purifier.eps_inv)
    release = {"kind": kind, "config": to_dict(preset), "weights": shipped, "weights_from": origin,
               "step": state["step"]}
    save_checkpoint(release, target)
    return release


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m purify.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a training checkpoint (RUN/checkpoint.pt) or a release file")
    parser.add_argument("target", help="where to write the release file")
    parser.add_argument("--t-star", type=float, help="record this purification strength as the preset default")
    parser.add_argument("--eps-inv", type=float, help="record this initial inversion noise as the preset default")
    parser.add_argument("--weights", choices=tuple(WEIGHT_ENTRIES), default=None,
                        help="ship a training checkpoint's EMA (default) or online weights; a release file keeps "
                             "the weights it holds")
    parser.add_argument("--half", action="store_true",
                        help="store the weights in float16: half the file, loaded into float32 networks")
    args = parser.parse_args(argv)
    try:
        release = export(args.source, args.target, args.t_star, args.eps_inv, args.weights, args.half)
    except (OSError, ValueError) as err:  # missing, corrupt or mismatched checkpoint, unwritable target: one line
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    what = (f"purifier {release['config']['purifier']}" if release["kind"] == "bcm"
            else "a CT Inversion noiser")
    precision = "float16 " if args.half else ""
    print(f"wrote {args.target}: {release['weights_from']} {precision}weights of step {release['step']}, {what}")


if __name__ == "__main__":
    main()
