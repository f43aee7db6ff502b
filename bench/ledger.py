"""The sealed test subset and the ledger of every evaluation on test images (the library behind
``python -m bench.sealed`` and the test-split runs of ``python -m bench.adaptive``).

Headline robustness numbers come from a *sealed* subset of the CIFAR-10 test set: images that no committed
result has used (``used_test_ids``: every seeded subset a results CSV names, every per-image prediction cache,
and the README's demo subset), drawn once with a seed and written to ``results/adaptive/sealed-test.json``, then
evaluated once per configuration. Every evaluation on test images (``--split test`` or ``sealed``) appends a line
to ``results/adaptive/test-ledger.csv``, so a reader can count how many configurations have seen the test images.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import pandas as pd
import torch

from purify.infra.checkpoint import atomic_write
from purify.infra.data import seeded_subset
from purify.infra.paths import RESULTS_DIR

SEALED_PATH = RESULTS_DIR / "adaptive" / "sealed-test.json"
LEDGER_PATH = RESULTS_DIR / "adaptive" / "test-ledger.csv"
LEDGER_COLUMNS = ["date", "split", "n", "data_seed", "suite", "protocol", "defence", "target", "eps", "clean_vote",
                  "robust_vote", "robust_ci", "command"]
TEST_SPLITS = ("test", "sealed")  # the splits whose evaluations the ledger records
TEST_SIZE = 10_000
DEMO_SUBSET = (2000, 0)  # the README's main job (make demo): --n 2000, seed 0


def used_test_ids(results_dir: Path = RESULTS_DIR) -> set[int]:
    """Every test image id a committed result has evaluated: the seeded subsets (``n``, seed) that results CSVs
    name for the test split, the ids stored in per-image prediction caches of test runs, and the demo's."""
    used = set(seeded_subset(TEST_SIZE, *DEMO_SUBSET).tolist())
    for path in results_dir.rglob("*.csv"):
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        seed = "data_seed" if "data_seed" in frame else "seed" if "seed" in frame else None
        if "n" not in frame or seed is None:
            continue
        split = frame["split"] if "split" in frame else pd.Series(["test"] * len(frame))
        for s, n, k in set(zip(split, frame["n"], frame[seed])):
            if s == "test" and n.isdigit() and k.lstrip("-").isdigit():
                used.update(seeded_subset(TEST_SIZE, int(n), int(k)).tolist())
    for path in results_dir.rglob("*.pt"):
        if not path.parent.name.endswith("-predictions"):
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        if str(state.get("row", {}).get("split", "test")) == "test":
            used.update(int(i) for i in state["ids"])
    return used


def draw_sealed(n: int, seed: int, results_dir: Path = RESULTS_DIR, path: Path = SEALED_PATH) -> dict:
    """Draw ``n`` test ids that no result in ``results_dir`` has used and write them to ``path`` (once)."""
    if path.is_file():
        raise ValueError(f"{path} exists: the sealed subset is drawn once; delete it only to start a new one")
    used = used_test_ids(results_dir)
    pool = torch.tensor(sorted(set(range(TEST_SIZE)) - used))
    if n > len(pool):
        raise ValueError(f"only {len(pool)} test images are unused; cannot seal {n}")
    ids = pool[seeded_subset(len(pool), n, seed)].tolist()
    record = {"ids": ids, "n": n, "seed": seed, "excluded": len(used), "drawn": datetime.date.today().isoformat(),
              "rule": "test ids unused by every results CSV's seeded subset, every prediction cache and the demo"}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
    return record


def sealed_ids(path: Path = SEALED_PATH) -> torch.Tensor:
    """The sealed test ids, in the order drawn (sorted)."""
    if not path.is_file():
        raise FileNotFoundError(f"no sealed test subset at {path}; draw it with `python -m bench.sealed --n 500`")
    return torch.tensor(sorted(json.loads(path.read_text())["ids"]))


LEDGER_KEY = ["split", "n", "data_seed", "suite", "protocol", "defence", "target", "eps"]


def append_ledger(rows: list[dict], path: Path | None = None) -> None:
    """Record evaluations on test images in the ledger (default ``LEDGER_PATH``; rewritten atomically). A run
    resumed unit by unit is one evaluation: a row with the same configuration, images and suite replaces the
    earlier, partial one (keeping its date) instead of adding a line."""
    if not rows:
        return
    path = path or LEDGER_PATH
    old = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(columns=LEDGER_COLUMNS)
    new = pd.DataFrame([{c: str(row.get(c, "")) for c in LEDGER_COLUMNS} for row in rows])
    key = lambda frame: frame[LEDGER_KEY].astype(str).agg("|".join, axis=1)  # noqa: E731
    earlier = old[key(old).isin(set(key(new)))] if len(old) else old
    if len(earlier):
        dates = dict(zip(key(earlier), earlier.date))
        new["date"] = [dates.get(k, d) for k, d in zip(key(new), new.date)]
        old = old[~key(old).isin(set(key(new)))]
    frame = pd.concat([old, new], ignore_index=True)[LEDGER_COLUMNS]
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
