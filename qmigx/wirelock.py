"""Locks shared by Python threads and compiled loops, and the channel writers built on them.

``WireLock`` comes from the selected backend (a pthread mutex normally,
a ``threading.Lock`` with the same fields with ``QMIGX_NO_EXTENSIONS=1``).
A :class:`LockedWriter` writes whole messages to a channel under one, and
hands the lock, with the channel's socket, to a compiled loop that writes
its own messages between them (postcopy's page requests on the return
path, requested pages on the preempt channel).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from qmigx._backend import load
from qmigx.errors import ChannelError

__all__ = ["WireLock", "LockedWriter"]

WireLock = load("wirelock").WireLock


class LockedWriter:
    """Writes to a channel under :attr:`lock`, a :class:`WireLock` carrying its socket.

    Args:
        write: the channel's ``write``.
        fds: ``(socket, wake)`` from ``Channel.socket_fds`` for a compiled
            writer, or None (a TLS session, a pipe: Python writes alone).
        failure: the channel's ``failure`` (the error of a compiled writer's outcome).
    """

    #: what a failure names when there is no channel to make the error
    what = "channel"

    def __init__(self, write: Callable[[bytes], object], fds: Optional[tuple] = None,
                 failure: Optional[Callable[..., Exception]] = None) -> None:
        self._write = write
        self._failure = failure
        fd, wake = fds if fds is not None else (-1, -1)
        self.lock = WireLock(fd, wake)

    @classmethod
    def for_channel(cls, channel):
        """The writer of ``channel`` (a :class:`~qmigx.transport.channel.Channel`)."""
        get = getattr(channel, "socket_fds", None)
        return cls(channel.write, get() if get is not None else None,
                   getattr(channel, "failure", None))

    def failure(self, err: int) -> Exception:
        """The error for a compiled writer's failed write (``err``: an errno; 0: shut down)."""
        if self._failure is not None:
            return self._failure("failed" if err else "stopped", writing=True, err=err)
        return ChannelError(f"{self.what}: write failed: {os.strerror(err)}", field=self.what)
