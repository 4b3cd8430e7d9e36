"""Migration transports: URIs, byte channels and listeners (control.md §7).

* :mod:`.uri`: :func:`parse_uri` -> :class:`MigrationURI`;
* :mod:`.channel`: :class:`Channel`, one duplex byte pipe for every
  transport, with typed timeout and closed errors, and
  :class:`ConnectionOptions`, how connections are opened;
* :mod:`.socket`, :mod:`.exec`, :mod:`.fd`, :mod:`.file`: the transports;
* :mod:`.listener`: :class:`Listener`, the destination's end;
* :mod:`.tls`: :class:`TLSChannel`, any of them inside a TLS session.

:func:`connect` opens the source's main channel, :func:`connect_extra`
further multifd/preempt connections (socket URIs only), :func:`listen`
the destination's listener. With :attr:`ConnectionOptions.tls` set every
one of them is a TLS client (source) or server (destination) channel,
each connection with its own handshake, completed before the next
connection is made (a QEMU 7.2 destination takes whichever connection
finishes its handshake first as the main channel).
"""

from __future__ import annotations

from typing import Callable, Optional

from qmigx.errors import CapabilityError, ParameterError
from qmigx.transport.channel import Channel, ConnectionOptions
from qmigx.transport.exec import spawn
from qmigx.transport.fd import fd_channel, register_fd, take_fd, unregister_fd
from qmigx.transport.file import open_read, open_write
from qmigx.transport.listener import Listener
from qmigx.transport.socket import connect_socket, listen_tcp, listen_unix, listen_vsock
from qmigx.transport.tls import TLSChannel, tls_handshake
from qmigx.transport.uri import MULTI_ERROR, MigrationURI, parse_uri

__all__ = [
    "MigrationURI",
    "Channel",
    "ConnectionOptions",
    "Listener",
    "TLSChannel",
    "parse_uri",
    "connect",
    "connect_extra",
    "listen",
    "register_fd",
    "unregister_fd",
]


def _options(options: Optional[ConnectionOptions], timeout: Optional[float]) -> ConnectionOptions:
    if options is None:
        return ConnectionOptions(connect_timeout=timeout)
    return options


def _check_tls(u: MigrationURI, options: ConnectionOptions) -> None:
    if options.tls is not None and u.scheme == "file":
        raise ParameterError("TLS cannot protect a file: migration (it has no peer); "
                             "unset tls-creds", field="tls-creds")


def _secure_client(ch: Channel, u: MigrationURI, options: ConnectionOptions) -> Channel:
    """Wrap ``ch`` in a TLS client session; ``ch`` is closed if that fails."""
    if options.tls is None:
        return ch
    try:
        session = options.tls.client_session(u.host if u.scheme == "tcp" else None)
        return tls_handshake(ch, session, timeout=options.handshake_timeout)
    except BaseException:
        ch.close(timeout=1.0)
        raise


def connect(uri: str, *, timeout: Optional[float] = None,
            options: Optional[ConnectionOptions] = None) -> Channel:
    """Open the main outgoing channel for ``uri`` (the source side).

    ``options`` (or just ``timeout``, which bounds establishing a socket
    connection) says how; use :meth:`Channel.set_timeout` for reads and
    writes. ``fd:`` takes ownership of the fd (a registered name is
    removed from the registry, as QEMU does); ``file:`` creates or
    truncates the file.
    """
    u = parse_uri(uri)
    opts = _options(options, timeout)
    _check_tls(u, opts)
    if u.multi_channel:
        ch = connect_socket(u, opts.connect_timeout)
    elif u.scheme == "exec":
        ch = spawn(u.command, producer=False)
    elif u.scheme == "fd":
        ch = fd_channel(take_fd(u.fd_name), f"fd:{u.fd_name}")
    else:
        return open_write(u.path, u.offset)
    return _secure_client(ch, u, opts)


def connect_extra(uri: str, *, timeout: Optional[float] = None,
                  options: Optional[ConnectionOptions] = None) -> Channel:
    """Open one more connection to the same destination (multifd, postcopy preempt).

    With TLS the new connection's handshake is complete when this returns.

    Raises:
        CapabilityError: "multifd is not supported by current protocol" for
            anything but socket URIs, as QEMU 7.2 refuses.
    """
    u = parse_uri(uri)
    if not u.multi_channel:
        raise CapabilityError(MULTI_ERROR, field="uri")
    opts = _options(options, timeout)
    return _secure_client(connect_socket(u, opts.connect_timeout), u, opts)


def listen(uri: str, *, channels: int = 1, options: Optional[ConnectionOptions] = None,
           on_refused: Optional[Callable[[str, BaseException], None]] = None) -> Listener:
    """Start listening on ``uri`` (the destination side).

    ``channels`` is the number of connections the destination expects (1 +
    multifd-channels); it becomes the socket backlog. ``exec:`` starts the
    command now (the stream is its stdout); ``fd:`` wraps the fd (number or
    registered name; the channel takes ownership); ``file:`` opens the file
    for reading. With ``options.tls`` each accepted connection is a TLS
    server session; a peer refused in its handshake is reported to
    ``on_refused(peer, error)`` and the listener waits for the next one
    (see :meth:`Listener.accept`).

    Raises:
        ParameterError: "unknown migration protocol: URI".
        ChannelError: the address cannot be bound, the command not run, ...
    """
    u = parse_uri(uri, incoming=True)
    opts = options or ConnectionOptions()
    _check_tls(u, opts)
    backlog = max(1, int(channels))
    kw = {"options": opts, "on_refused": on_refused}
    if u.scheme == "tcp":
        return Listener(u, sockets=listen_tcp(u, backlog), **kw)
    if u.scheme == "unix":
        return Listener(u, sockets=[listen_unix(u, backlog)], unix_path=u.path, **kw)
    if u.scheme == "vsock":
        return Listener(u, sockets=[listen_vsock(u, backlog)], **kw)
    if u.scheme == "exec":
        return Listener(u, channel=spawn(u.command, producer=True), **kw)
    if u.scheme == "fd":
        return Listener(u, channel=fd_channel(take_fd(u.fd_name), f"fd:{u.fd_name}"), **kw)
    return Listener(u, channel=open_read(u.path, u.offset), **kw)
