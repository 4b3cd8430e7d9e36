"""The destination's end of a migration URI (QEMU's ``-incoming``)."""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Optional

from qmigx.errors import ChannelClosed, ChannelError, ChannelTimeout, ObjectError, TLSError
from qmigx.transport.channel import Channel, ConnectionOptions
from qmigx.transport.socket import peer_name, socket_channel
from qmigx.transport.tls import tls_handshake
from qmigx.transport.uri import MigrationURI

_log = logging.getLogger("qmigx.transport")


def _log_refusal(peer: str, exc: BaseException) -> None:
    _log.error("%s", exc)

__all__ = ["Listener"]


class Listener:
    """The destination's end of a migration URI, handing out channels with :meth:`accept`.

    Sockets (tcp/unix/vsock) accept as many connections as asked for (the
    main channel first, then multifd channels); ``exec:``, ``fd:`` and
    ``file:`` have exactly one channel, created at :func:`listen` time.

    With TLS (``options.tls``) a connection is handed out only once its
    handshake completed and the peer was accepted. A socket listener, as
    QEMU's, refuses a peer that fails (no TLS, a bad or unauthorized
    certificate, a wrong key, a stalled handshake), reports it to
    ``on_refused(peer, error)`` (default: logged on ``qmigx.transport``),
    and waits for the next connection.
    """

    def __init__(self, uri: MigrationURI, *, sockets=(), channel: Optional[Channel] = None,
                 unix_path: Optional[str] = None, options: Optional[ConnectionOptions] = None,
                 on_refused: Optional[Callable[[str, BaseException], None]] = None) -> None:
        self.uri = uri
        self.options = options or ConnectionOptions()
        self.on_refused = on_refused or _log_refusal
        self._handshaking: Optional[Channel] = None
        #: peers refused so far: (peer, error)
        self.refused: list[tuple[str, BaseException]] = []
        self._sockets: list[socket.socket] = list(sockets)
        self._channel = channel
        self._unix_path = unix_path
        self._unix_id: Optional[tuple[int, int]] = None
        if unix_path is not None:
            st = os.stat(unix_path)
            self._unix_id = (st.st_dev, st.st_ino)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._shut = False
        self._closed = False
        self._lock = threading.Lock()
        self._poll = select.poll()
        for s in self._sockets:
            s.setblocking(False)
            self._poll.register(s.fileno(), select.POLLIN)
        self._poll.register(self._wake, select.POLLIN)
        self.accepted = 0

    @property
    def multi_channel(self) -> bool:
        return self.uri.multi_channel

    @property
    def socket_address(self) -> list[dict]:
        """The bound addresses as QEMU's query-migrate ``socket-address`` list."""
        out = []
        for s in self._sockets:
            if s.family == socket.AF_UNIX:
                out.append({"type": "unix", "path": s.getsockname()})
            elif s.family in (socket.AF_INET, socket.AF_INET6):
                host, port = s.getsockname()[:2]
                out.append({"type": "inet", "host": host, "port": str(port)})
            else:
                cid, port = s.getsockname()
                out.append({"type": "vsock", "cid": str(cid), "port": str(port)})
        return out

    @property
    def connect_uri(self) -> str:
        """A URI a source can connect to (the real port for ``tcp:…:0``)."""
        if self.uri.scheme == "tcp" and self._sockets:
            host, port = self._sockets[0].getsockname()[:2]
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        return self.uri.uri

    @property
    def port(self) -> Optional[int]:
        """The bound TCP port (useful with port 0)."""
        if self.uri.scheme == "tcp" and self._sockets:
            return self._sockets[0].getsockname()[1]
        return None

    def accept(self, timeout: Optional[float] = None) -> Channel:
        """The next incoming channel; ChannelError on timeout, shutdown or a used-up listener.

        With TLS: the next accepted peer (see the class docstring); a
        single-channel listener (``exec:``, ``fd:``) raises the refusal.
        """
        if self._shut:
            raise ChannelClosed(f"listener {self.uri.uri} was shut down", field="listener")
        if not self._sockets:
            with self._lock:
                ch, self._channel = self._channel, None
            if ch is None:
                raise ChannelError(f"{self.uri.scheme}: has only one channel and it was taken",
                                   field="listener")
            self.accepted += 1
            if self.options.tls is not None:
                try:
                    return self._secure(ch, None)
                except BaseException:
                    ch.close(timeout=1.0)
                    raise
            return ch
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ch = self._accept_socket(timeout, deadline)
            if self.options.tls is None:
                return ch
            try:
                return self._secure(ch, deadline)
            except (TLSError, ObjectError, ChannelTimeout, ChannelError) as exc:
                ch.close(timeout=1.0)
                if self._shut:
                    raise ChannelClosed(f"listener {self.uri.uri} was shut down",
                                        field="listener") from None
                if isinstance(exc, ChannelTimeout) and deadline is not None \
                        and time.monotonic() >= deadline:
                    raise ChannelTimeout(f"timed out after {timeout:g} s waiting for a "
                                         f"connection on {self.uri.uri}", field="listener") from None
                self.refused.append((ch.name, exc))
                self.on_refused(ch.name, exc)

    def _secure(self, ch: Channel, deadline: Optional[float]) -> Channel:
        """The TLS server side of ``ch`` (each connection resolves the credentials anew)."""
        limit = self.options.handshake_timeout
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            limit = left if limit is None else min(limit, left)
        with self._lock:
            if self._shut:
                raise ChannelClosed(f"listener {self.uri.uri} was shut down", field="listener")
            self._handshaking = ch
        try:
            return tls_handshake(ch, self.options.tls.server_session(), timeout=limit)
        finally:
            with self._lock:
                self._handshaking = None

    def _accept_socket(self, timeout: Optional[float], deadline: Optional[float]) -> Channel:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._poll.poll(None if remaining is None else int(remaining * 1000))
            if self._shut:
                raise ChannelClosed(f"listener {self.uri.uri} was shut down", field="listener")
            for fd, _ in ready:
                for s in self._sockets:
                    if s.fileno() == fd:
                        try:
                            conn, peer = s.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as e:
                            raise ChannelError(f"accept failed: {e.strerror}", field="listener") from None
                        self.accepted += 1
                        return socket_channel(conn, f"{self.uri.uri} <- {peer_name(peer)}")
            if deadline is not None and time.monotonic() >= deadline:
                raise ChannelTimeout(
                    f"timed out after {timeout:g} s waiting for a connection on {self.uri.uri}",
                    field="listener")

    def shutdown(self) -> None:
        """Unblock a pending :meth:`accept` from another thread; no more channels."""
        self._shut = True
        with self._lock:
            if not self._closed:
                os.eventfd_write(self._wake, 1)
            if self._handshaking is not None:
                self._handshaking.shutdown()

    def close(self) -> None:
        """Stop listening; remove the unix socket file this listener created."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shut = True
            os.eventfd_write(self._wake, 1)
            ch, self._channel = self._channel, None
        for s in self._sockets:
            s.close()
        if self._unix_path is not None:
            try:
                st = os.lstat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_id:
                    os.unlink(self._unix_path)
            except OSError:
                pass
        if ch is not None:
            ch.close()
        os.close(self._wake)

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.uri.uri}{' closed' if self._closed else ''}>"
