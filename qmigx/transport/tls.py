"""TLS over any channel (QEMU's io/channel-tls.c as migration/tls.c uses it).

:func:`tls_handshake` runs a :class:`~qmigx.crypto.TLSSession` over a
plain :class:`Channel` (socket, ``exec:`` pipes, fd) and returns a
:class:`TLSChannel`: the same Channel interface, encrypted. Everything
above (stream writer and parser, return path, multifd) is unchanged; the
return path is the same TLS session read in the other direction, as in
QEMU.

Threads: one thread may read (the return path) while another writes. The
session is not thread-safe, so every call on it happens under one lock,
held only while it encrypts or decrypts, never while waiting on the peer.
Ciphertext the reader produces (alerts, post-handshake messages) stays in
the session's output and goes out with the next write, behind a second
lock that keeps writers' ciphertext in the order it was made.

The handshake is bounded by ``timeout``: a peer that stalls in it, sends
no TLS at all, or breaks off raises :class:`~qmigx.errors.ChannelTimeout`
or :class:`~qmigx.errors.TLSError` (a refused certificate:
:class:`~qmigx.errors.TLSPeerRejected`).
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from qmigx.errors import ChannelError, ChannelTimeout, TLSError, TLSPeerRejected
from qmigx.transport.channel import Channel, _byteview

__all__ = ["TLSChannel", "tls_handshake"]

#: plaintext encrypted per lock hold: bounds the ciphertext kept in memory
_CHUNK = 256 << 10
#: a gathering write up to this size is joined into one buffer at once
_GATHER = 4 << 20
#: ciphertext read from the peer at a time (at most: what the socket holds)
_CIPHER_READ = 1 << 20


class TLSChannel(Channel):
    """A :class:`Channel` whose bytes travel inside a TLS session over ``inner``."""

    #: the bytes on the socket are TLS records: channels are told apart by their order
    can_peek = False

    def __init__(self, inner: Channel, session) -> None:  # noqa: D107 - see class
        self.name = inner.name
        self.inner = inner
        self.session = session
        self._slock = threading.Lock()  # the session
        self._wlock = threading.Lock()  # writers, in order
        self._rlock = threading.Lock()  # readers of the inner channel
        self._cbuf = bytearray(_CIPHER_READ)
        self._peer_ended = False
        self.bytes_read = 0
        self.bytes_written = 0

    # -- what Channel reports ---------------------------------------------------------------
    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def has_return_path(self) -> bool:
        return self.inner.has_return_path

    @property
    def process(self):
        return self.inner.process

    @property
    def exit_status(self):
        return self.inner.exit_status

    @property
    def timeout(self) -> Optional[float]:
        return self.inner.timeout

    def set_timeout(self, seconds: Optional[float]) -> None:
        self.inner.set_timeout(seconds)

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def peer_name(self) -> Optional[str]:
        """The peer's certificate DN (x509) or PSK username, when the session knows it."""
        return self.session.peer_name

    @property
    def description(self) -> str:
        """Protocol and cipher, e.g. ``TLSv1.3 TLS_AES_256_GCM_SHA384``."""
        with self._slock:
            return self.session.description

    # -- reading ------------------------------------------------------------------------------
    def _decrypt(self, mv: memoryview) -> Optional[int]:
        with self._slock:
            return self.session.recv_into(mv)

    def _pull(self) -> None:
        """Bring in more ciphertext (blocks, with the inner channel's timeout)."""
        with self._rlock:
            k = self.inner.readinto_available(self._cbuf)
            with self._slock:
                if k == 0:
                    self._peer_ended = True
                    self.session.feed_eof()
                else:
                    self.session.feed(memoryview(self._cbuf)[:k])

    def readinto(self, buf) -> int:
        mv = _byteview(buf, writable=True)
        if not len(mv):
            return 0
        while True:
            n = self._decrypt(mv)
            if n is not None:
                self.bytes_read += n
                return n
            if self._peer_ended:  # pragma: no cover - a session reports the end itself
                return 0
            self._pull()

    def readinto_available(self, buf) -> int:
        """Block for the first bytes, then take whatever else is already decryptable."""
        mv = _byteview(buf, writable=True)
        first = got = self.readinto(mv)
        if got and got < len(mv):
            recv_into = self.session.recv_into
            with self._slock:  # one record per call: drain them under one hold
                while got < len(mv):
                    n = recv_into(mv[got:])
                    if not n:
                        break
                    got += n
            self.bytes_read += got - first
        return got

    # -- writing ------------------------------------------------------------------------------
    def _flush_locked(self, data) -> None:
        """Encrypt ``data`` (may be empty) and send it with any pending ciphertext (wlock held)."""
        with self._slock:
            if len(data):
                self.session.send(data)
            out = self.session.take_output()
        if out:
            self.inner.write(out)

    def _write_locked(self, mv: memoryview) -> None:
        for off in range(0, len(mv), _CHUNK):
            self._flush_locked(mv[off : off + _CHUNK])

    def write(self, data) -> int:
        mv = _byteview(data, writable=False)
        with self._wlock:
            self._write_locked(mv)
            self.bytes_written += len(mv)
        return len(mv)

    sendall = write

    def writev(self, buffers) -> int:
        """Write the buffers in order; small ones are gathered so records stay full.

        Up to :data:`_GATHER` bytes are joined in one go (a multifd packet:
        its header and its pages); the records are encrypted from that copy.
        """
        views = [_byteview(b, writable=False) for b in buffers]
        total = sum(map(len, views))
        with self._wlock:
            if len(views) <= 1:
                for v in views:
                    self._write_locked(v)
            elif total <= _GATHER:
                self._write_locked(memoryview(b"".join(views)))
            else:
                group: list = []
                size = 0
                for v in views:
                    if len(v) >= _CHUNK:
                        if group:
                            self._write_locked(memoryview(b"".join(group)))
                            group, size = [], 0
                        self._write_locked(v)
                        continue
                    group.append(v)
                    size += len(v)
                    if size >= _CHUNK:
                        self._write_locked(memoryview(b"".join(group)))
                        group, size = [], 0
                if group:
                    self._write_locked(memoryview(b"".join(group)))
            self.bytes_written += total
        return total

    # -- ending -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.inner.shutdown()

    def close(self, timeout: float = 10.0) -> None:
        # No close_notify: QEMU 7.2 sends none either, and its peer reads the
        # end of the migration stream, not the end of the TLS session.
        self.inner.close(timeout)

    def __repr__(self) -> str:
        return f"<TLSChannel {self.name} over {self.inner!r}>"


def tls_handshake(inner: Channel, session, *, timeout: Optional[float]) -> TLSChannel:
    """Run ``session``'s handshake over ``inner``; the channel it protects, or an error.

    The peer's credentials are checked (``session.check_credentials``)
    once the handshake completes. On any failure ``inner`` is left open
    for the caller to close.

    Raises:
        ChannelTimeout: the handshake did not complete within ``timeout``.
        TLSError: the peer is no TLS peer, broke off, or sent garbage;
            TLSPeerRejected: its credentials were refused.
        ChannelError: the channel failed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    saved = inner.timeout
    buf = bytearray(64 << 10)
    try:
        while True:
            failure: Optional[TLSError] = None
            try:
                done = session.handshake()
            except TLSError as exc:
                failure, done = exc, False
            out = session.take_output()
            if out:  # our next flight, or the alert that explains a failure
                try:
                    inner.write(out)
                except ChannelError:
                    if failure is None:
                        raise
            if failure is not None:
                raise failure
            if done:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _stalled(inner, timeout)
                inner.set_timeout(left if saved is None else min(left, saved))
            try:
                k = inner.readinto(buf)
            except ChannelTimeout:
                raise _stalled(inner, timeout) from None
            if k == 0:
                session.feed_eof()
            else:
                session.feed(memoryview(buf)[:k])
        session.check_credentials()
    except TLSPeerRejected as exc:
        raise TLSPeerRejected(f"{inner.name}: {exc.message}", peer=exc.peer,
                              field=exc.field) from None
    except TLSError as exc:
        raise TLSError(f"{inner.name}: {exc.message}", field=exc.field) from None
    finally:
        inner.set_timeout(saved)
    return TLSChannel(inner, session)


def _stalled(inner: Channel, timeout: Optional[float]) -> ChannelTimeout:
    return ChannelTimeout(f"{inner.name}: TLS handshake not complete after {timeout:g} s",
                          field="tls")
