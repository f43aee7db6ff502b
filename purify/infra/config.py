"""YAML presets loaded into typed dataclasses; an unknown or mistyped key is an error."""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclass fields.

    Raises ``ValueError`` naming ``where`` and the key for unknown keys or values of the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, kind, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value, kind, where: str):
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = set(typing.get_args(kind)) - {Ellipsis}
        return origin(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(kind):
            try:
                return _check_type(value, option, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is none of {typing.get_args(kind)}")
    if kind is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected null, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def load_yaml(cls, path: str | os.PathLike):
    """Load a YAML preset file into dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return from_dict(cls, data, str(path))


def read_yaml(path: str | os.PathLike):
    """``yaml.safe_load`` of a file, a syntax error becoming a ``ValueError`` that names the file, line and
    problem in one line (every command turns it into a one-line error, no traceback)."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem})") from None


def to_dict(config) -> dict:
    """A dataclass config as plain Python data (safe for ``torch.load(weights_only=True)`` and YAML)."""
    return dataclasses.asdict(config)
