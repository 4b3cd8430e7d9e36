"""qmigx: QEMU's live-migration subsystem, wire-compatible, in Python."""

from __future__ import annotations

from qmigx._backend import backend

__version__ = "0.1.0"

__all__ = ["backend", "__version__"]
