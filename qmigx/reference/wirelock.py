"""Plain-Python twin of ``qmigx._core.wirelock``: a ``threading.Lock`` with the same fields."""

from __future__ import annotations

import threading

__all__ = ["WireLock"]


class WireLock:
    """Mutual exclusion with the guarded channel's descriptors (see the compiled one)."""

    def __init__(self, fd: int = -1, wake: int = -1) -> None:
        self._lock = threading.Lock()
        self.fd = fd
        self.wake = wake
        self.closed = False
        self.sent = 0

    def acquire(self, blocking: bool = True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> WireLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> bool:
        self._lock.release()
        return False
