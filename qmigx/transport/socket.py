"""Socket transports: ``tcp:``, ``unix:`` and ``vsock:`` (QEMU's socket.c)."""

from __future__ import annotations

import os
import socket
import stat
from typing import Optional

from qmigx.errors import ChannelError
from qmigx.transport.channel import Channel
from qmigx.transport.uri import MigrationURI

__all__ = ["socket_channel", "connect_socket", "listen_tcp", "listen_unix", "listen_vsock", "peer_name"]


def socket_channel(sock: socket.socket, name: str) -> Channel:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(name, sock=sock)


def connect_socket(u: MigrationURI, timeout: Optional[float]) -> Channel:
    if u.scheme == "tcp":
        target = f"{u.host}:{u.port}"
        try:
            sock = socket.create_connection((u.host or "localhost", u.port), timeout=timeout)
        except socket.gaierror as e:
            raise ChannelError(f"address resolution failed for {target}: {e.strerror}",
                               field="uri") from None
        except OSError as e:
            raise ChannelError(f"Failed to connect to '{target}': {e.strerror or e}",
                               field="uri") from None
        return socket_channel(sock, f"tcp:{target}")
    if u.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(u.path)
        except (OSError, ValueError) as e:
            sock.close()
            why = getattr(e, "strerror", None) or str(e)
            raise ChannelError(f"Failed to connect to '{u.path}': {why}", field="uri") from None
        return socket_channel(sock, f"unix:{u.path}")
    # vsock
    if not hasattr(socket, "AF_VSOCK"):
        raise ChannelError("vsock is not supported on this host", field="uri")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((u.cid, u.port))
    except OSError as e:
        sock.close()
        raise ChannelError(f"Failed to connect to '{u.cid}:{u.port}': {e.strerror}",
                           field="uri") from None
    return Channel(f"vsock:{u.cid}:{u.port}", sock=sock)


def peer_name(addr) -> str:
    if isinstance(addr, tuple):
        host, port = addr[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) or "unix"


def listen_tcp(u: MigrationURI, backlog: int) -> list[socket.socket]:
    host = u.host or None
    try:
        infos = socket.getaddrinfo(host, u.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ChannelError(f"address resolution failed for {u.host}:{u.port}: {e.strerror}",
                           field="uri") from None
    socks: list[socket.socket] = []
    seen = set()
    port = u.port
    err: Optional[OSError] = None
    for family, kind, proto, _, addr in infos:
        key = (family, addr[0])
        if key in seen:
            continue
        seen.add(key)
        s = socket.socket(family, kind, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(infos) > 1:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr[0], port) + tuple(addr[2:]))
            s.listen(backlog)
        except OSError as e:
            s.close()
            err = e
            continue
        socks.append(s)
        port = s.getsockname()[1]  # the same ephemeral port on every address
    if not socks:
        why = err.strerror if err is not None else "no address"
        for s in socks:
            s.close()
        raise ChannelError(f"Failed to bind socket {u.host}:{u.port}: {why}", field="uri")
    return socks


def listen_unix(u: MigrationURI, backlog: int) -> socket.socket:
    try:
        st = os.lstat(u.path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ChannelError(f"cannot use {u.path!r}: {e.strerror}", field="uri") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ChannelError(f"{u.path!r} exists and is not a socket", field="uri")
        os.unlink(u.path)  # a stale socket from an earlier run, as QEMU replaces it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(u.path)
        s.listen(backlog)
    except (OSError, ValueError) as e:
        s.close()
        why = getattr(e, "strerror", None) or str(e)
        raise ChannelError(f"Failed to bind socket to {u.path}: {why}", field="uri") from None
    return s


def listen_vsock(u: MigrationURI, backlog: int) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise ChannelError("vsock is not supported on this host", field="uri")
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((u.cid, u.port))
        s.listen(backlog)
    except OSError as e:
        s.close()
        raise ChannelError(f"Failed to bind vsock {u.cid}:{u.port}: {e.strerror}",
                           field="uri") from None
    return s
