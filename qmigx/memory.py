"""Live migration of plain memory — numpy arrays, mmap — between processes.

Two calls wrap the engine for programs that are not virtual machines::

    # receiving process
    arrays = qmigx.receive_memory("unix:/tmp/m.sock")      # {"weights": ndarray}

    # sending process, while other threads keep writing into `weights`
    qmigx.migrate_memory({"weights": weights}, "unix:/tmp/m.sock",
                         capabilities=["xbzrle"], pause=stop_writers)

The sender tracks writes with userfaultfd write-protection when the
kernel allows it (writes by any thread are seen), else it falls back to
explicit marking: call ``mark_dirty`` on the log it hands to
``on_start``. At completion ``pause`` is called so that no write lands
after the final pass; if the migration fails or is cancelled, ``resume``
is called and the memory is untouched.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.errors import CapabilityError, MigrationError

__all__ = ["migrate_memory", "receive_memory"]


class _CallbackGuest:
    def __init__(self, pause: Optional[Callable[[], None]],
                 resume: Optional[Callable[[], None]]) -> None:
        self.running = True
        self._pause = pause
        self._resume = resume

    def stop(self) -> None:
        if self._pause is not None:
            self._pause()
        self.running = False

    def start(self) -> None:
        if self._resume is not None:
            self._resume()
        self.running = True

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        pass


def _settings(capabilities: Iterable[str], parameters: Optional[Mapping], incoming: bool):
    caps = Capabilities()
    names = list(capabilities)
    if names:
        caps.set_many([(n, True) for n in names], incoming=incoming)
    params = Parameters(capabilities=caps)
    if parameters:
        params.set(dict(parameters))
    return caps, params


def migrate_memory(arrays: Mapping[str, object], uri: str, *, capabilities: Iterable[str] = (),
                   parameters: Optional[Mapping] = None, track: str = "auto",
                   pause: Optional[Callable[[], None]] = None,
                   resume: Optional[Callable[[], None]] = None,
                   on_start: Optional[Callable[[dict], None]] = None,
                   timeout: Optional[float] = None, postcopy: bool = False,
                   on_migration: Optional[Callable[[object], None]] = None) -> dict:
    """Send ``arrays`` (name -> writable buffer) live to ``uri``; return query-migrate.

    ``track``: ``"auto"`` (userfaultfd write-protection, which needs
    page-aligned memory such as :func:`qmigx.ram.aligned_array` or an
    mmap; a clear :class:`~qmigx.errors.CapabilityError` where the kernel
    or the memory refuses it), ``"explicit"`` (you call ``mark_dirty`` on
    the logs ``on_start`` receives) or ``"none"`` (memory does not change).
    Each array's size must be a multiple of 4 KiB. Raises the migration's
    error if it did not complete.

    ``postcopy``: capability ``postcopy-ram``, and the switch to postcopy
    at the first opportunity: ``pause`` is called then, and the receiver
    runs while the rest of the memory follows (on both sides the
    capability must be on: ``receive_memory(..., postcopy=True)``). With
    ``on_migration`` you get the :class:`~qmigx.migration.MigrationSource`
    once it started: enable the capability yourself and call its
    ``start_postcopy()`` when you choose.
    """
    from qmigx.dirtylog import ExplicitDirtyLog, best_dirty_log
    from qmigx.migration import MigrationSource
    from qmigx.ram import RAMBlock, RAMBlockList

    blocks = RAMBlockList(RAMBlock(name, buf) for name, buf in arrays.items())
    logs: dict = {}
    if track == "auto":
        logs = {b.idstr: best_dirty_log(b) for b in blocks}
        refused = [log for log in logs.values() if log.kind != "uffd-wp"]
        if refused:  # nobody would mark the writes: refuse rather than lose them
            raise CapabilityError(f"{refused[0].reason}; or pass track='explicit' and call "
                                  f"mark_dirty for every write", field="track")
    elif track == "explicit":
        logs = {b.idstr: ExplicitDirtyLog(b) for b in blocks}
    elif track != "none":
        raise ValueError(f"track must be auto, explicit or none, not {track!r}")
    names = list(capabilities) + (["postcopy-ram"] if postcopy else [])
    caps, params = _settings(names, parameters, incoming=False)
    src = MigrationSource(blocks, guest=_CallbackGuest(pause, resume), dirty_logs=logs,
                          capabilities=caps, parameters=params, globalstate=False)
    for log in logs.values():
        log.start()
    try:
        if on_start is not None:
            on_start(logs)
        src.migrate(uri, start_postcopy=postcopy)
        if on_migration is not None:
            on_migration(src)
        state = src.wait(timeout)
        if state != MigrationStatus.COMPLETED:
            if state in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                raise src.error if isinstance(src.error, MigrationError) else MigrationError(
                    f"migration {state.value}: {src.error}")
            src.cancel()
            src.wait(10)
            raise MigrationError(f"migration did not complete within {timeout} s")
        return src.query()
    finally:
        for log in logs.values():
            log.close()


def receive_memory(uri: str, *, capabilities: Iterable[str] = (),
                   parameters: Optional[Mapping] = None,
                   into: Optional[Mapping[str, object]] = None,
                   timeout: Optional[float] = None,
                   postcopy: bool = False) -> dict[str, np.ndarray]:
    """Accept one migration on ``uri``; return each block's memory by name.

    ``into`` gives buffers to load into (checked against the sender's
    names and sizes); otherwise the blocks are created as announced.

    ``postcopy``: capability ``postcopy-ram``; the arrays come back as soon
    as the source switches to postcopy, usable at once from any thread:
    a page that has not arrived yet is fetched when touched (the reading
    thread waits in the kernel meanwhile). The result is a
    :class:`~qmigx.memory_postcopy.PostcopyMemory`: call its ``wait()`` to
    know every page arrived. Needs userfaultfd (Linux).
    """
    if postcopy:
        from qmigx.memory_postcopy import receive_postcopy

        if into is not None:
            raise ValueError("postcopy makes its own memory (shared, registered for faults): "
                             "into= is not supported with it")
        return receive_postcopy(uri, list(capabilities) + ["postcopy-ram"], parameters, timeout)
    from qmigx.migration import MigrationDestination
    from qmigx.ram import RAMBlock, RAMBlockList

    blocks = None
    if into is not None:
        blocks = RAMBlockList(RAMBlock(name, buf) for name, buf in into.items())
    caps, params = _settings(capabilities, parameters, incoming=True)
    dst = MigrationDestination(blocks, capabilities=caps, parameters=params)
    dst.incoming(uri)
    state = dst.wait(timeout)
    if state != MigrationStatus.COMPLETED:
        if state != MigrationStatus.FAILED:
            dst.cancel()
            dst.wait(10)
        raise dst.error if isinstance(dst.error, MigrationError) else MigrationError(
            f"incoming migration {state.value}: {dst.error}")
    return {b.idstr: b.memory for b in dst.blocks}
