"""Plain-Python twin of ``qmigx/_core/fdwait.pxd``: waiting on a descriptor, consuming views."""

from __future__ import annotations

import select

__all__ = ["WAIT_READY", "WAIT_STOPPED", "WAIT_TIMEOUT", "WAIT_FAILED", "wait_fd", "consume"]

WAIT_READY, WAIT_STOPPED, WAIT_TIMEOUT, WAIT_FAILED = -1, 2, 3, 5


def wait_fd(fd: int, events: int, wake: int, timeout_ms: int) -> tuple:
    """Wait until ``fd`` has ``events``: ``(WAIT_READY, 0)``, or why not and the errno."""
    p = select.poll()
    p.register(fd, events)
    if wake >= 0:  # poll(2) ignores a negative descriptor (no wake: -1); select.poll refuses it
        p.register(wake, select.POLLIN)
    try:
        ready = dict(p.poll(timeout_ms))
    except OSError as e:
        return WAIT_FAILED, e.errno or 0
    if ready.get(wake):
        return WAIT_STOPPED, 0
    if not ready:
        return WAIT_TIMEOUT, 0
    return WAIT_READY, 0


def consume(views: list, k: int) -> None:
    """Drop ``k`` bytes moved from the front of ``views`` (a list of memoryviews), in place."""
    while k and views:
        if k >= len(views[0]):
            k -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][k:]
            k = 0
    while views and not len(views[0]):
        views.pop(0)
