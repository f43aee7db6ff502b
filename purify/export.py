"""Export a training checkpoint as a small release file for ``BCMPurifier.from_checkpoint``.

    python -m purify.export runs/bcm-small/checkpoint.pt checkpoints/bcm/cifar10-small.pt --t-star 0.3

Keeps the EMA weights (the ones used for sampling, inversion and purification), the config and the step;
drops the online weights, the optimizer and the RNG state. ``--weights online`` ships the online weights
instead: after a short run whose curriculum has just doubled N, the EMA still averages over the previous
discretisation and can be the worse model (measure both with ``bench.quality``). The release always stores
the shipped weights under ``ema``, the key ``BCMPurifier.from_checkpoint`` reads, and names their origin under
``weights``. ``--t-star``/``--eps-inv`` record the purifier defaults of the preset (e.g. the best value of its
trade-off curve).
"""
from __future__ import annotations

import argparse

from .checkpoint import load_checkpoint, save_checkpoint
from .presets import preset_from_dict


# the checkpoint entry each ``--weights`` choice ships (a release file holds only ``ema``)
WEIGHT_ENTRIES = {"ema": "ema", "online": "model"}


def export(source: str, target: str, t_star: float | None = None, eps_inv: float | None = None,
           weights: str = "ema") -> dict:
    if weights not in WEIGHT_ENTRIES:
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    entry = WEIGHT_ENTRIES[weights]
    state = load_checkpoint(source, ("kind", "config", entry, "step"))
    if state["kind"] != "bcm":
        raise ValueError(f"{source} is a {state['kind']!r} checkpoint, not a BCM")
    config = state["config"]
    preset_from_dict(config, f"{source} config")  # validate before writing anything
    if t_star is not None:
        config["purifier"]["t_star"] = float(t_star)
    if eps_inv is not None:
        config["purifier"]["eps_inv"] = float(eps_inv)
    # re-exporting a release (e.g. to record another t*) keeps the origin it names
    release = {"kind": "bcm", "config": config, "ema": state[entry], "weights": state.get("weights", weights),
               "step": state["step"]}
    save_checkpoint(release, target)
    return release


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m purify.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a training checkpoint (RUN/checkpoint.pt)")
    parser.add_argument("target", help="where to write the release file")
    parser.add_argument("--t-star", type=float, help="record this purification strength as the preset default")
    parser.add_argument("--eps-inv", type=float, help="record this initial inversion noise as the preset default")
    parser.add_argument("--weights", choices=tuple(WEIGHT_ENTRIES), default="ema",
                        help="ship the EMA (default) or the online weights")
    args = parser.parse_args(argv)
    try:
        release = export(args.source, args.target, args.t_star, args.eps_inv, args.weights)
    except (FileNotFoundError, ValueError) as err:  # missing, corrupt or mismatched checkpoint: no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {args.target}: {release['weights']} weights of step {release['step']}, "
          f"purifier {release['config']['purifier']}")


if __name__ == "__main__":
    main()
