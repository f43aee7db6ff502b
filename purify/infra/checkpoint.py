"""Atomic checkpoint files: write to a temporary file in the same folder, then rename."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint with ``weights_only=True`` onto the CPU; clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt or not a bcm-purify checkpoint: {_reason(err)}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks the entries {missing}")
    return state


def bcm_weights(state: dict, path: str | os.PathLike) -> tuple[dict, str]:
    """The weights a BCM checkpoint is used with, and where they come from (``"ema"`` or ``"online"``).

    A release file (``purify.export``) holds them under ``weights`` and their origin under ``weights_from``;
    release files written before that held them under ``ema`` (with the origin under ``weights``); a training
    checkpoint holds the online weights under ``model`` and their EMA, the ones used after training, under ``ema``.
    """
    if isinstance(state.get("weights"), dict):
        return state["weights"], state.get("weights_from", "ema")
    if isinstance(state.get("ema"), dict):
        origin = state.get("weights")
        return state["ema"], origin if isinstance(origin, str) else "ema"
    raise ValueError(f"checkpoint {path} holds no BCM weights (no 'weights' or 'ema' entry); "
                     f"give a release file (purify.export) or a training checkpoint (purify.train)")


def _reason(err: Exception) -> str:
    """One line of torch.load's error: for a file holding more than tensors and plain data (e.g. a pickle that
    would run code), the line that says what the safe loader refused; otherwise the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):
        details = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
        return "refused by the safe loader (weights_only=True), nothing was unpickled: " + (
            details[0] if details else (lines[0] if lines else type(err).__name__))
    return lines[0] if lines else type(err).__name__


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the checkpoint and the mismatch."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not match the {type(module).__name__} it is loaded into: "
                         f"{str(err).splitlines()[0]} ...") from err
