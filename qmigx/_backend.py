"""Choose between the compiled kernels and their plain-Python twins.

The compiled kernels (``qmigx._core``) are what qmigx runs. Their twins
(``qmigx.reference``) exist as test oracles and for debugging; they are
selected only when ``QMIGX_NO_EXTENSIONS=1`` is set in the environment.
A missing or broken extension is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["backend", "load", "load_compiled", "load_reference"]

#: ``"cython"`` normally, ``"python"`` when QMIGX_NO_EXTENSIONS=1.
backend = "python" if os.environ.get("QMIGX_NO_EXTENSIONS") == "1" else "cython"


def load_compiled(name: str) -> ModuleType:
    """Import the compiled kernel ``qmigx._core.<name>``."""
    return importlib.import_module(f"qmigx._core.{name}")


def load_reference(name: str) -> ModuleType:
    """Import the plain-Python twin ``qmigx.reference.<name>``."""
    return importlib.import_module(f"qmigx.reference.{name}")


def load(name: str) -> ModuleType:
    """Import the kernel ``name`` from the selected backend."""
    return load_reference(name) if backend == "python" else load_compiled(name)
