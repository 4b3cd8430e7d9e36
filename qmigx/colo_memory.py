"""Fault-tolerant memory for Python programs: COLO checkpoints of numpy arrays and mmaps.

A program keeps working on its arrays; a second process holds a copy
that is, at every moment, exactly the arrays as they were at the last
complete checkpoint, and takes over when the first one is gone::

    # standby process
    standby = qmigx.ColoSecondaryMemory("unix:/tmp/ft.sock", heartbeat_timeout=5)
    standby.start()
    arrays = standby.wait()            # returns after failover: the last checkpoint

    # working process
    with qmigx.ColoPrimaryMemory({"state": state}, "unix:/tmp/ft.sock", interval=0.5) as ft:
        for step in work:
            with ft.writing():         # writes never overlap a checkpoint
                state[...] = step(state)
                ft.mark_dirty("state", 0, state.nbytes)
            ft.checkpoint()            # or let the interval take them

It is QEMU's COLO (:mod:`qmigx.migration.colo`) with the arrays as guest
RAM: a precopy migration first, then checkpoints, each applied on the
standby only once it arrived whole. Writes are found by explicit
``mark_dirty`` calls, or by userfaultfd write-protection (``track="auto"``)
where the kernel and the memory allow it. The standby fails over on
:meth:`ColoSecondaryMemory.failover`, when the connection ends, or when
no checkpoint arrives within ``heartbeat_timeout`` (QEMU has no such
timeout: its failover is always asked for).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.errors import CapabilityError, MigrationError, StateError

__all__ = ["ColoPrimaryMemory", "ColoSecondaryMemory"]

#: x-checkpoint-delay when checkpoints are only taken on demand (uint32 ms: ~49 days)
_ON_DEMAND_MS = 0xFFFFFFFF


class _WriterLock:
    """The "guest" of a COLO primary: stopping it waits for writers, starting lets them go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._lock.acquire()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._lock:
            yield

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        pass


def _settings(capabilities: Iterable[str], parameters: Mapping | None) -> tuple:
    caps = Capabilities()
    names = list(capabilities)
    if names:
        caps.set_many([(n, True) for n in names])
    params = Parameters(capabilities=caps)
    if parameters:
        params.set(dict(parameters))
    return caps, params


class ColoPrimaryMemory:
    """The working side: checkpoints ``arrays`` (name → writable buffer) to a standby.

    Args:
        arrays: the memory to protect; each size a multiple of 4 KiB.
        uri: where the standby listens (``unix:PATH``, ``tcp:HOST:PORT``).
        interval: seconds between checkpoints; None: only :meth:`checkpoint`.
        track: ``"explicit"`` (call :meth:`mark_dirty`) or ``"auto"``
            (userfaultfd write-protection; refused where unavailable).
        capabilities, parameters: QEMU's (``xbzrle``, ``max-bandwidth``…).
        io_timeout: seconds a stalled standby may take before it is given up.
    """

    def __init__(self, arrays: Mapping[str, object], uri: str, *,
                 interval: float | None = None, track: str = "explicit",
                 capabilities: Iterable[str] = (), parameters: Mapping | None = None,
                 io_timeout: float | None = 60.0) -> None:
        from qmigx.dirtylog import ExplicitDirtyLog, best_dirty_log
        from qmigx.migration import MigrationSource
        from qmigx.ram import RAMBlock, RAMBlockList

        self.uri = uri
        self.blocks = RAMBlockList(RAMBlock(name, buf) for name, buf in arrays.items())
        if track == "auto":
            self.logs = {b.idstr: best_dirty_log(b) for b in self.blocks}
            refused = [log for log in self.logs.values() if log.kind != "uffd-wp"]
            if refused:
                raise CapabilityError(f"{refused[0].reason}; or pass track='explicit' and call "
                                      "mark_dirty for every write", field="track")
        elif track == "explicit":
            self.logs = {b.idstr: ExplicitDirtyLog(b) for b in self.blocks}
        else:
            raise ValueError(f"track must be auto or explicit, not {track!r}")
        caps, params = _settings(list(capabilities) + ["x-colo"], parameters)
        params.set({"x-checkpoint-delay": _ON_DEMAND_MS if interval is None
                    else max(0, int(interval * 1000))})
        self._guest = _WriterLock()
        self.source = MigrationSource(self.blocks, guest=self._guest, dirty_logs=self.logs,
                                      capabilities=caps, parameters=params, globalstate=False,
                                      io_timeout=io_timeout)

    # -- lifetime ---------------------------------------------------------------------------
    def start(self, timeout: float | None = 60.0) -> None:
        """Copy the arrays to the standby (a live migration) and enter COLO."""
        for log in self.logs.values():
            log.start()
        self.source.migrate(self.uri)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._in_colo():
            if self.source.c.done.is_set():
                self._raise_ended()
            if deadline is not None and time.monotonic() > deadline:
                raise MigrationError(f"COLO did not start within {timeout} s", field="colo")
            time.sleep(0.002)

    def _in_colo(self) -> bool:
        colo = self.source.colo
        return colo is not None and self.source.colo_status.mode.value != 0 and colo.ready

    def _raise_ended(self) -> None:
        err = self.source.error or (self.source.colo.error if self.source.colo else None)
        if isinstance(err, MigrationError):
            raise err
        raise MigrationError(f"COLO ended ({self.source.state.state.value}): {err}", field="colo")

    def close(self) -> None:
        """Stop checkpointing (the standby fails over on the closed connection)."""
        if self.source.colo is not None and self.source.colo_status.mode.value:
            try:
                self.source.colo.lost_heartbeat()
            except StateError:
                pass
        self.source.wait(30)
        for log in self.logs.values():
            log.close()

    def __enter__(self) -> ColoPrimaryMemory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- working ------------------------------------------------------------------------------
    def writing(self):
        """A context in which the arrays may be written: a checkpoint waits for it to end."""
        return self._guest.writing()

    def mark_dirty(self, name: str, offset: int, length: int) -> None:
        """Record a write to ``arrays[name][offset:offset+length]`` (``track="explicit"``)."""
        self.logs[name].mark_dirty(offset, length)

    def checkpoint(self, timeout: float | None = 60.0) -> dict:
        """Take a checkpoint now and wait until the standby applied it; its figures."""
        colo = self.source.colo
        if colo is None or not self.source.colo_status.mode.value:
            raise StateError("not in COLO: call start() first, or COLO ended", field="colo")
        n = colo.log.count
        colo.checkpoint_now()
        deadline = None if timeout is None else time.monotonic() + timeout
        while colo.log.count <= n:
            if not self.source.colo_status.mode.value:
                self._raise_ended()
            if deadline is not None and time.monotonic() > deadline:
                raise MigrationError(f"no checkpoint within {timeout} s", field="colo")
            time.sleep(0.0005)
        return colo.log.rows[n]

    def failover(self) -> None:
        """Give the standby up and go on alone (QEMU's x-colo-lost-heartbeat on the primary)."""
        colo = self.source.colo
        if colo is None:
            raise StateError("The feature 'colo' is not enabled", field="colo")
        colo.lost_heartbeat()
        self.source.wait(30)

    @property
    def checkpoints(self) -> int:
        colo = self.source.colo
        return colo.log.count if colo is not None else 0

    @property
    def status(self) -> dict:
        """``query-colo-status``."""
        return self.source.colo_status.query()


class ColoSecondaryMemory:
    """The standby: holds the last complete checkpoint and takes over on failover.

    Args:
        uri: where to listen.
        into: buffers to hold the copy (checked against the primary's names
            and sizes); default: created as the primary announces them.
        heartbeat_timeout: fail over when no checkpoint arrives for this
            many seconds (beyond QEMU); None: only on request or a lost
            connection.
    """

    def __init__(self, uri: str, *, into: Mapping[str, object] | None = None,
                 heartbeat_timeout: float | None = None,
                 io_timeout: float | None = 60.0) -> None:
        from qmigx.migration import MigrationDestination
        from qmigx.ram import RAMBlock, RAMBlockList

        blocks = None
        if into is not None:
            blocks = RAMBlockList(RAMBlock(name, buf) for name, buf in into.items())
        self.uri = uri
        self.destination = MigrationDestination(blocks, io_timeout=io_timeout)
        self.destination.colo_heartbeat_timeout = heartbeat_timeout

    def start(self) -> None:
        """Listen; the primary's migration and checkpoints are received in the background."""
        self.destination.incoming(self.uri)

    @property
    def connect_uri(self) -> str:
        return self.destination.connect_uri

    def failover(self) -> None:
        """Take over now with the last complete checkpoint (x-colo-lost-heartbeat)."""
        colo = self.destination.colo
        if colo is None:
            raise StateError("The feature 'colo' is not enabled", field="colo")
        colo.lost_heartbeat()

    def wait(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Wait for the failover; return the arrays as of the last complete checkpoint."""
        state = self.destination.wait(timeout)
        if state is not MigrationStatus.COMPLETED:
            if not self.destination.c.done.is_set():
                raise MigrationError(f"no failover within {timeout} s", field="colo")
            err = self.destination.error
            raise err if isinstance(err, MigrationError) else MigrationError(
                f"incoming migration {state.value}: {err}")
        if self.destination.colo is None:
            raise MigrationError("the primary did not enable COLO (x-colo)", field="x-colo")
        return self.arrays

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Each array by name: in COLO and after failover, the last complete checkpoint."""
        colo = self.destination.colo
        if colo is not None:
            colo.settle()
        return {b.idstr: b.memory for b in self.destination.blocks}

    @property
    def checkpoints(self) -> int:
        colo = self.destination.colo
        return colo.checkpoints if colo is not None else 0

    @property
    def error(self) -> BaseException | None:
        """Why COLO ended, when it was not asked to (a lost primary, a spoiled checkpoint)."""
        colo = self.destination.colo
        return colo.error if colo is not None else self.destination.error

    @property
    def status(self) -> dict:
        """``query-colo-status``."""
        return self.destination.colo_status.query()
