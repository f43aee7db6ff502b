"""Import RobustBench and AutoAttack despite its packaging trap; the only place that knows about it.

robustbench 1.1.1 imports the module ``autoattack``, but its dependency ``pyautoattack`` installs the same
code as ``pyautoattack``; alias it before robustbench is imported. robustbench also imports ``pkg_resources``
(pinned through ``setuptools<81`` in pyproject.toml) and old timm module paths, whose deprecation warnings
we silence here.
"""
from __future__ import annotations

import importlib
import sys
import warnings


def import_autoattack():
    """Return the AutoAttack module (installed by pyautoattack), also importable as ``autoattack``."""
    if "autoattack" not in sys.modules:
        pyautoattack = importlib.import_module("pyautoattack")
        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")
    return sys.modules["autoattack"]


def import_autoattack_part(module: str):
    """One of AutoAttack's attack modules (``autopgd_base`` for APGD, ``square`` for Square)."""
    import_autoattack()
    return importlib.import_module(f"pyautoattack.{module}")


def import_robustbench():
    """Return the ``robustbench`` module, with ``autoattack`` resolving to ``pyautoattack``."""
    import_autoattack()
    with warnings.catch_warnings():
        # Deprecation notices of robustbench's own imports (pkg_resources; timm's old module paths, which use
        # torch.jit.interface); nothing a user of this toolkit can act on.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="timm")
        warnings.filterwarnings("ignore", message=".*torch.jit.interface", category=FutureWarning)
        return importlib.import_module("robustbench")
