"""The repository's folders: the one place that knows where configs, checkpoints, runs and results live."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
RUNS_DIR = REPO_ROOT / "runs"
RESULTS_DIR = REPO_ROOT / "results"


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (for tables and logs), else as given."""
    path = Path(path)
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else path)
