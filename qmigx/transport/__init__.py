"""Migration transports: URIs, byte channels and listeners (control.md §7).

* :mod:`.uri`: :func:`parse_uri` -> :class:`MigrationURI`;
* :mod:`.channel`: :class:`Channel`, one duplex byte pipe for every
  transport, with typed timeout and closed errors, and
  :class:`ConnectionOptions`, how connections are opened;
* :mod:`.socket`, :mod:`.exec`, :mod:`.fd`, :mod:`.file`: the transports;
* :mod:`.listener`: :class:`Listener`, the destination's end.

:func:`connect` opens the source's main channel, :func:`connect_extra`
further multifd/preempt connections (socket URIs only), :func:`listen`
the destination's listener.
"""

from __future__ import annotations

from typing import Optional

from qmigx.errors import CapabilityError
from qmigx.transport.channel import Channel, ConnectionOptions
from qmigx.transport.exec import spawn
from qmigx.transport.fd import fd_channel, register_fd, take_fd, unregister_fd
from qmigx.transport.file import open_read, open_write
from qmigx.transport.listener import Listener
from qmigx.transport.socket import connect_socket, listen_tcp, listen_unix, listen_vsock
from qmigx.transport.uri import MULTI_ERROR, MigrationURI, parse_uri

__all__ = [
    "MigrationURI",
    "Channel",
    "ConnectionOptions",
    "Listener",
    "parse_uri",
    "connect",
    "connect_extra",
    "listen",
    "register_fd",
    "unregister_fd",
]


def connect(uri: str, *, timeout: Optional[float] = None) -> Channel:
    """Open the main outgoing channel for ``uri`` (the source side).

    ``timeout`` bounds establishing a socket connection (None: the OS's
    own); use :meth:`Channel.set_timeout` for reads and writes. ``fd:``
    takes ownership of the fd (a registered name is removed from the
    registry, as QEMU does); ``file:`` creates or truncates the file.
    """
    u = parse_uri(uri)
    if u.multi_channel:
        return connect_socket(u, timeout)
    if u.scheme == "exec":
        return spawn(u.command, producer=False)
    if u.scheme == "fd":
        return fd_channel(take_fd(u.fd_name), f"fd:{u.fd_name}")
    return open_write(u.path, u.offset)


def connect_extra(uri: str, *, timeout: Optional[float] = None) -> Channel:
    """Open one more connection to the same destination (multifd, postcopy preempt).

    Raises:
        CapabilityError: "multifd is not supported by current protocol" for
            anything but socket URIs, as QEMU 7.2 refuses.
    """
    u = parse_uri(uri)
    if not u.multi_channel:
        raise CapabilityError(MULTI_ERROR, field="uri")
    return connect_socket(u, timeout)


def listen(uri: str, *, channels: int = 1) -> Listener:
    """Start listening on ``uri`` (the destination side).

    ``channels`` is the number of connections the destination expects (1 +
    multifd-channels); it becomes the socket backlog. ``exec:`` starts the
    command now (the stream is its stdout); ``fd:`` wraps the fd (number or
    registered name; the channel takes ownership); ``file:`` opens the file
    for reading.

    Raises:
        ParameterError: "unknown migration protocol: URI".
        ChannelError: the address cannot be bound, the command not run, ...
    """
    u = parse_uri(uri, incoming=True)
    backlog = max(1, int(channels))
    if u.scheme == "tcp":
        return Listener(u, sockets=listen_tcp(u, backlog))
    if u.scheme == "unix":
        return Listener(u, sockets=[listen_unix(u, backlog)], unix_path=u.path)
    if u.scheme == "vsock":
        return Listener(u, sockets=[listen_vsock(u, backlog)])
    if u.scheme == "exec":
        return Listener(u, channel=spawn(u.command, producer=True))
    if u.scheme == "fd":
        return Listener(u, channel=fd_channel(take_fd(u.fd_name), f"fd:{u.fd_name}"))
    return Listener(u, channel=open_read(u.path, u.offset))
