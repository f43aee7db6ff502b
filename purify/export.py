"""Export a training checkpoint as a small release file for ``BCMPurifier.from_checkpoint``.

    python -m purify.export runs/bcm-small/checkpoint.pt checkpoints/bcm/cifar10-small.pt --t-star 0.3

Keeps the EMA weights (the ones used for sampling, inversion and purification), the config and the step;
drops the online weights, the optimizer and the RNG state. ``--t-star``/``--eps-inv`` record the purifier
defaults of the preset (e.g. the best value of its trade-off curve).
"""
from __future__ import annotations

import argparse

from .checkpoint import load_checkpoint, save_checkpoint
from .presets import preset_from_dict


def export(source: str, target: str, t_star: float | None = None, eps_inv: float | None = None) -> dict:
    state = load_checkpoint(source, ("kind", "config", "ema", "step"))
    if state["kind"] != "bcm":
        raise ValueError(f"{source} is a {state['kind']!r} checkpoint, not a BCM")
    config = state["config"]
    preset_from_dict(config, f"{source} config")  # validate before writing anything
    if t_star is not None:
        config["purifier"]["t_star"] = float(t_star)
    if eps_inv is not None:
        config["purifier"]["eps_inv"] = float(eps_inv)
    release = {"kind": "bcm", "config": config, "ema": state["ema"], "step": state["step"]}
    save_checkpoint(release, target)
    return release


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m purify.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a training checkpoint (RUN/checkpoint.pt)")
    parser.add_argument("target", help="where to write the release file")
    parser.add_argument("--t-star", type=float, help="record this purification strength as the preset default")
    parser.add_argument("--eps-inv", type=float, help="record this initial inversion noise as the preset default")
    args = parser.parse_args(argv)
    release = export(args.source, args.target, args.t_star, args.eps_inv)
    print(f"wrote {args.target}: step {release['step']}, purifier {release['config']['purifier']}")


if __name__ == "__main__":
    main()
