"""qmigx: QEMU's live-migration subsystem, wire-compatible, in Python.

The public API, importable from here (loaded on first use, so the
command line starts fast):

* streams: :class:`StreamReader`, :func:`load_stream`, :func:`save_stream`,
  :func:`convert_stream`, :func:`verify_stream`, :class:`StreamParser`,
  :class:`StreamWriter`, :class:`QEMUFile`;
* memory: :class:`RAMBlock`, :class:`RAMBlockList`, :class:`DirtyBitmap`,
  :class:`PageCache`, dirty logs (:class:`ExplicitDirtyLog`,
  :class:`UffdWriteProtectLog`, :func:`best_dirty_log`);
* devices: :mod:`qmigx.vmstate` (:class:`VMStateDescription` and the
  ``vmstate_*`` field helpers), :class:`DeviceState`, :func:`vmstate_device`;
* live migration of plain memory: :func:`migrate_memory`, :func:`receive_memory`;
* fault-tolerant memory (COLO checkpoints): :class:`ColoPrimaryMemory`,
  :class:`ColoSecondaryMemory`;
* live migration: :class:`MigrationSource`, :class:`MigrationDestination`,
  :class:`Capabilities`, :class:`Parameters`, :class:`MigrationStatus`;
* errors: everything in :mod:`qmigx.errors`.

``backend`` is ``"cython"`` (the compiled kernels) unless
``QMIGX_NO_EXTENSIONS=1`` selected the plain-Python twins.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qmigx._backend import backend
from qmigx.errors import *  # noqa: F401,F403
from qmigx.errors import __all__ as _errors_all

from qmigx._version import __version__

_LAZY = {
    "StreamReader": "qmigx.tools.streams",
    "LoadedStream": "qmigx.tools.streams",
    "load_stream": "qmigx.tools.streams",
    "save_stream": "qmigx.tools.streams",
    "convert_stream": "qmigx.tools.streams",
    "verify_stream": "qmigx.tools.streams",
    "DeviceState": "qmigx.savevm",
    "vmstate_device": "qmigx.savevm",
    "SaveVMHandler": "qmigx.savevm",
    "SaveVMRegistry": "qmigx.savevm",
    "StreamParser": "qmigx.stream",
    "StreamWriter": "qmigx.stream",
    "Section": "qmigx.stream",
    "QEMUFile": "qmigx.qemufile",
    "RAMBlock": "qmigx.ram",
    "RAMBlockList": "qmigx.ram",
    "aligned_array": "qmigx.ram",
    "DirtyBitmap": "qmigx.bitmap",
    "DirtyLogSource": "qmigx.bitmap",
    "PageCache": "qmigx.page_cache",
    "ExplicitDirtyLog": "qmigx.dirtylog",
    "UffdWriteProtectLog": "qmigx.dirtylog",
    "best_dirty_log": "qmigx.dirtylog",
    "VMStateDescription": "qmigx.vmstate",
    "MigrationSource": "qmigx.migration",
    "MigrationDestination": "qmigx.migration",
    "SimpleGuest": "qmigx.migration",
    "Capabilities": "qmigx.control",
    "Parameters": "qmigx.control",
    "MigrationStatus": "qmigx.control",
    "analyze_state": "qmigx.tools.analyze",
    "extract_elf": "qmigx.tools.memdump",
    "physical_memory": "qmigx.tools.memdump",
    "PhysicalMemory": "qmigx.tools.memdump",
    "migrate_memory": "qmigx.memory",
    "receive_memory": "qmigx.memory",
    "PostcopyMemory": "qmigx.memory_postcopy",
    "ColoPrimaryMemory": "qmigx.colo_memory",
    "ColoSecondaryMemory": "qmigx.colo_memory",
}

__all__ = ["backend", "__version__", *_errors_all, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qmigx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from qmigx.tools.analyze import analyze_state
    from qmigx.bitmap import DirtyBitmap, DirtyLogSource
    from qmigx.control import Capabilities, MigrationStatus, Parameters
    from qmigx.dirtylog import ExplicitDirtyLog, UffdWriteProtectLog, best_dirty_log
    from qmigx.colo_memory import ColoPrimaryMemory, ColoSecondaryMemory
    from qmigx.memory import migrate_memory, receive_memory
    from qmigx.memory_postcopy import PostcopyMemory
    from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
    from qmigx.page_cache import PageCache
    from qmigx.qemufile import QEMUFile
    from qmigx.ram import RAMBlock, RAMBlockList, aligned_array
    from qmigx.savevm import DeviceState, SaveVMHandler, SaveVMRegistry, vmstate_device
    from qmigx.tools.streams import (
        LoadedStream,
        StreamReader,
        convert_stream,
        load_stream,
        save_stream,
        verify_stream,
    )
    from qmigx.stream import Section, StreamParser, StreamWriter
    from qmigx.vmstate import VMStateDescription
