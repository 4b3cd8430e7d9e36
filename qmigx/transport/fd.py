"""``fd:`` URIs and the ``getfd`` registry behind ``fd:NAME`` (QEMU's fd.c)."""

from __future__ import annotations

import os
import socket
import stat
import threading

from qmigx.errors import ChannelError, ParameterError
from qmigx.transport.channel import Channel

__all__ = ["register_fd", "unregister_fd", "take_fd", "fd_channel"]

_fd_lock = threading.Lock()


_fds: dict[str, int] = {}


def register_fd(name: str, fd: int) -> None:
    """Register ``fd`` under ``name`` for ``fd:NAME`` URIs (QMP ``getfd``).

    The registry owns the fd until a channel takes it (the channel then
    closes it) or :func:`unregister_fd` gives it back; re-registering a name
    closes the fd it held. Names may not start with a digit (those are fd
    numbers).
    """
    if not name or name[0].isdigit():
        raise ParameterError("Parameter 'fdname' expects a name not starting with a digit",
                             field="fdname")
    os.fstat(fd)  # EBADF early, as getfd receives a live fd
    with _fd_lock:
        old = _fds.get(name)
        _fds[name] = fd
    if old is not None and old != fd:
        os.close(old)


def unregister_fd(name: str) -> int:
    """Remove ``name`` from the registry and return its fd (not closed)."""
    with _fd_lock:
        fd = _fds.pop(name, None)
    if fd is None:
        raise ChannelError(f"File descriptor named '{name}' not found", field="fdname")
    return fd


def take_fd(name: str) -> int:
    if name.isdigit():
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            raise ChannelError(f"Invalid file descriptor number '{name}'", field="uri") from None
        return fd
    with _fd_lock:
        fd = _fds.pop(name, None)  # the caller takes ownership, as with getfd
    if fd is None:
        raise ChannelError(f"File descriptor named '{name}' has not been found", field="uri")
    return fd


def fd_channel(fd: int, name: str) -> Channel:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ChannelError(f"{name}: {e.strerror}", field="uri") from None
    if stat.S_ISSOCK(mode):
        return Channel(name, sock=socket.socket(fileno=fd))
    return Channel(name, rfd=fd, wfd=fd)
