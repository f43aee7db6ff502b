"""The white-box evaluation's threats and results table: its key and columns, and a results CSV read back."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

from purify.defences import BCM_DEFENCES

# white-box threats of a randomized defence, of a deterministic one; then the rest
RANDOMIZED_ATTACKS = ("pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "square")
# how rows, reports and progress bars name the attacks of a randomized defence
ATTACK_NAMES = {"pgd-margin": "margin-PGD", "pgd-ce": "CE-PGD", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR",
                "square": "Square"}
DETERMINISTIC_ATTACKS = ("pgd-margin", "pgd-ce", "aa-standard")
THREATS = ("clean", "transfer", "pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "square", "aa-standard", "worst",
           "pgd-fixed")
KEY = ["suite", "preset", "defence", "t_star", "eps_inv", "target", "split", "n", "data_seed", "eps", "protocol",
       "threat", "scoring"]
COST_COLUMNS = ("purify_s_per_image", "step_s_per_image")  # seconds per image: defend + classify, an attack step
COLUMNS = KEY + ["family", "nfe", "attack", "steps", "eot", "restarts", "evals", "attack_seed", "eval_seed", "bf16",
                 "accuracy", "ci_low", "ci_high", "wall_s", "s_per_image", *COST_COLUMNS, "checkpoints"]
# settings outside the key that change a unit's results: one results file holds one value of each
RUN_COLUMNS = ("bf16", "attack_seed", "eval_seed")
# the columns every row of one setting (defence before target, on the same images and suite) shares
SETTING_COLUMNS = ("suite", "preset", "defence", "target", "split", "n", "data_seed", "protocol", "bf16", "checkpoints")


def unit_id(row: dict, run_columns: bool = False) -> str:
    """A file name for one (setting, threat) unit's per-image predictions; with ``run_columns``, for its
    unfinished blocks, which a run with another precision or seed must not pick up."""
    columns = [k for k in KEY if k != "scoring"] + ["checkpoints"] + (list(RUN_COLUMNS) if run_columns else [])
    key = json.dumps({k: str(row[k]) for k in columns}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def predictions_dir(out: Path) -> Path:
    """Where the per-image predictions of the results file ``out`` are cached, one file per unit."""
    return out.with_name(out.stem + "-predictions")


def worst_per_image(correct: dict, attacks: list[str], scorings) -> dict[str, torch.Tensor]:
    """Per scoring, each image's worst correctness over the threats ``attacks`` of ``correct[threat][scoring]``."""
    return {s: functools.reduce(torch.minimum, (correct[t][s] for t in attacks)) for s in scorings}


def randomized(spec: str) -> bool:
    """Whether a results row's defence spec (or family) is one of the randomized (BCM-noise) defences, attacked
    with draws averaged per step and decided by a vote of N."""
    return spec.split("(", 1)[0] in BCM_DEFENCES


def numeric_adaptive(frame: pd.DataFrame) -> pd.DataFrame:
    """A results table read as strings (``ResultTable.frame``, ``pd.read_csv(dtype=str)``) with numbers as numbers."""
    frame = frame.copy()
    for column in ("t_star", "eps_inv", "accuracy", "ci_low", "ci_high", "wall_s", "s_per_image", *COST_COLUMNS):
        frame[column] = pd.to_numeric(frame[column])
    for column in ("n", "data_seed", "eps", "steps", "eot", "restarts", "evals", "attack_seed", "eval_seed"):
        frame[column] = frame[column].astype(int)
    frame["bf16"] = frame["bf16"] == "true"
    return frame

