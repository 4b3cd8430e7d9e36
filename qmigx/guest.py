"""The guest whose memory migrates, as the source sees it.

The source stops the guest for completion and starts it again when a
migration fails or is cancelled; auto-converge throttles it; globalstate
records its runstate. :class:`SimpleGuest` is a guest with nothing to stop
but a flag; :class:`DirtyingGuest` is a stand-in vCPU that keeps writing
into guest RAM (``qmigx demo``, ``qmigx serve --dirty-rate``).
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["Guest", "SimpleGuest", "DirtyingGuest"]


class Guest(Protocol):
    """What the source needs from the guest whose memory migrates.

    ``stop``/``start`` pause and resume it (completion stops it; a failed
    or cancelled migration starts it again), ``running`` says whether it
    runs, ``runstate`` names its state for ``globalstate``, and
    ``throttle(percent)`` slows it down (auto-converge).
    """

    running: bool

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def runstate(self) -> str: ...

    def throttle(self, percent: int) -> None: ...


class SimpleGuest:
    """A guest with nothing to stop but a flag (memory written by others)."""

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.throttle_percent = 0

    def stop(self) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        self.throttle_percent = percent


class DirtyingGuest:
    """A stand-in vCPU: a thread writing into random pages of a block.

    Writes go through ``log.mark_dirty`` when the dirty log is explicit; a
    userfaultfd log sees them by itself. ``stop()`` waits for the thread,
    so no write lands after the migration's final sync.
    """

    def __init__(self, memory: np.ndarray, log, pages_per_second: int = 4000,
                 seed: int = 3) -> None:
        self.memory = memory.reshape(-1, TARGET_PAGE_SIZE)
        self.log = log
        self.rate = pages_per_second
        self.running = False
        self.writes = 0
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.throttle_percent = 0

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self.running = True
        self._thread = threading.Thread(target=self._run, name="vcpu", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.running = False

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        self.throttle_percent = percent

    def _run(self) -> None:
        explicit = getattr(self.log, "kind", "explicit") == "explicit"
        batch = max(1, self.rate // 100)
        npages = len(self.memory)
        while not self._stop.wait(0.01 * (1 + self.throttle_percent / 100)):
            for p in self._rng.integers(0, npages, batch):
                off = int(self._rng.integers(0, TARGET_PAGE_SIZE - 16))
                self.memory[p, off : off + 16] = self._rng.integers(0, 256, 16, dtype=np.uint8)
                if explicit:
                    self.log.mark_dirty(int(p) * TARGET_PAGE_SIZE + off, 16)
            self.writes += batch
