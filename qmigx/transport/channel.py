"""One duplex byte channel, whatever carries it (QEMU's QIOChannel, qemu-file-channel.c).

The migration engine speaks to the peer through a :class:`Channel`: a
socket, a pipe pair (``exec:``), an fd or a file. It moves bytes and
nothing else: no migration logic.

The return path (stream.md §8) is the same Channel read in the other
direction: the same socket or fd; for ``exec:`` the command's stdout on
the source (the stream goes to its stdin) and its stdin on the
destination (the stream comes from its stdout). ``file:`` has none.

Threads, not asyncio: one thread may read (the return path) while another
writes. Every blocking wait polls the descriptor together with a wake-up
eventfd, so :meth:`Channel.shutdown` from any thread unblocks readers and
writers at once (that is how cancel works: :class:`~qmigx.errors.ChannelClosed`)
and :meth:`Channel.set_timeout` turns a stalled peer into
:class:`~qmigx.errors.ChannelTimeout`. Callers decide by those types, never
by an error's text.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from qmigx.errors import ChannelClosed, ChannelError, ChannelTimeout, ParameterError

if TYPE_CHECKING:
    from qmigx.crypto import TLSSettings

__all__ = ["Channel", "ConnectionOptions"]


@dataclass(frozen=True)
class ConnectionOptions:
    """How to open connections: one object for every transport and channel.

    ``connect_timeout`` bounds establishing a connection (None: the OS's
    own); ``io_timeout`` is set on every channel opened with these options
    (see :meth:`Channel.set_timeout`). ``tls`` wraps every connection
    (main, multifd, preempt; socket, ``exec:`` and ``fd:`` alike) in a TLS
    session (:class:`~qmigx.crypto.TLSSettings`: the source is the client,
    the destination the server), and ``handshake_timeout`` bounds each
    handshake.
    """

    connect_timeout: Optional[float] = 30.0
    io_timeout: Optional[float] = 60.0
    tls: Optional["TLSSettings"] = None
    handshake_timeout: Optional[float] = 30.0


#: iovecs per gathering write (Linux's IOV_MAX)
_IOV_MAX = 1024
#: the most a reader asks the kernel to gather before waking it (see Channel._recv_into)
_LOWAT_MAX = 256 << 10


def _byteview(buf, *, writable: bool) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format != "B" or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise ValueError("channel buffers must be contiguous")
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise ValueError("readinto needs a writable buffer")
    return mv


def _consume(views: list, i: int, k: int) -> int:
    """Drop ``k`` bytes done from ``views[i:]``, keeping a partial view; the next view's index.

    Empty views after them are skipped too, so the index points at work left.
    """
    while k and i < len(views):
        n = len(views[i])
        if k >= n:
            k -= n
            i += 1
        else:
            views[i] = views[i][k:]
            k = 0
    while i < len(views) and not len(views[i]):
        i += 1
    return i


class Channel:
    """A duplex byte channel (socket, pipe pair, fd or file).

    ``readinto``/``read_exact`` read the incoming direction (on the source
    that is the return path), ``write`` writes the outgoing one. One thread
    may read while another writes. ``bytes_read``/``bytes_written`` count
    what passed. Errors are :class:`~qmigx.errors.ChannelError`.

    Not built directly: use :func:`connect`, :func:`connect_extra` or
    :meth:`Listener.accept`.
    """

    #: the socket, when the channel is one (subclasses that wrap another channel have none)
    _sock: Optional[socket.socket] = None

    def __init__(self, name: str, *, sock: Optional[socket.socket] = None, rfd: int = -1,
                 wfd: int = -1, process: Optional[subprocess.Popen] = None,
                 producer: bool = False) -> None:
        self.name = name
        self._sock = sock
        if sock is not None:
            sock.setblocking(False)
            rfd = wfd = sock.fileno()
        self._rfd = rfd
        self._wfd = wfd
        for fd in {rfd, wfd} - {-1}:
            if sock is None:
                os.set_blocking(fd, False)
        self._process = process
        self._producer = producer  # exec: the command produces the stream we read
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._rpoll = self._poller(rfd, select.POLLIN)
        self._wpoll = self._poller(wfd, select.POLLOUT)
        self._timeout: Optional[float] = None
        self._shut = False
        self._closed = False
        self._close_lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self._lowat = 1
        #: ``file:``: the file offset the stream starts at
        self.file_offset = 0

    def _poller(self, fd: int, events: int):
        if fd < 0:
            return None
        p = select.poll()
        p.register(fd, events | select.POLLERR | select.POLLHUP)
        p.register(self._wake, select.POLLIN)
        return p

    # -- properties ------------------------------------------------------------

    def fileno(self) -> int:
        """The descriptor the stream goes over (for exec: our end of the stream pipe)."""
        if self._sock is not None:
            return self._sock.fileno()
        return self._rfd if self._producer or self._wfd < 0 else self._wfd

    def set_buffer_sizes(self, send: Optional[int] = None, recv: Optional[int] = None) -> None:
        """Ask the kernel for larger socket buffers (a COLO checkpoint's burst); no-op otherwise.

        With the default ~200 KiB a sender and a receiver on two cores take
        turns instead of working at the same time.
        """
        if self._sock is None:
            return
        for opt, size in ((socket.SO_SNDBUF, send), (socket.SO_RCVBUF, recv)):
            if size:
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except OSError:
                    pass  # the kernel's cap applies

    @property
    def has_return_path(self) -> bool:
        """Whether both directions exist (false for ``file:``)."""
        return self._rfd >= 0 and self._wfd >= 0

    @property
    def process(self) -> Optional[subprocess.Popen]:
        """The ``exec:`` command, else None."""
        return self._process

    @property
    def exit_status(self) -> Optional[int]:
        """The ``exec:`` command's exit status once it ended (negative: signal)."""
        return None if self._process is None else self._process.poll()

    @property
    def timeout(self) -> Optional[float]:
        return self._timeout

    def set_timeout(self, seconds: Optional[float]) -> None:
        """Fail a read or write that makes no progress for ``seconds`` (None: wait forever)."""
        if seconds is not None and seconds < 0:
            raise ParameterError(f"timeout {seconds} is negative", field="timeout")
        self._timeout = seconds

    # -- I/O ---------------------------------------------------------------------

    def _shut_error(self) -> ChannelError:
        return ChannelClosed(f"{self.name}: channel was shut down", field="channel")

    def _wait(self, poller, what: str) -> None:
        t = self._timeout
        ready = poller.poll(None if t is None else max(0, int(t * 1000)))
        if self._shut:
            raise self._shut_error()
        if not ready:
            raise ChannelTimeout(f"{self.name}: timed out after {t:g} s waiting to {what}",
                               field="channel")

    def readinto(self, buf) -> int:
        """Read up to ``len(buf)`` bytes into ``buf``; 0 means end of stream."""
        mv = _byteview(buf, writable=True)
        if self._shut:
            raise self._shut_error()
        if self._rfd < 0:
            raise ChannelError(f"{self.name}: this channel cannot be read (no return path)",
                               field="channel")
        if not len(mv):
            return 0
        return self._recv_into(mv, 1)

    def _recv_into(self, mv: memoryview, want: int) -> int:
        """One read of up to ``len(mv)`` bytes, waiting until ``want`` of them can be read.

        A reader that needs ``want`` bytes whatever happens (the rest of a
        packet) lets the kernel wake it only when they are there, or when
        the stream ends, instead of at every segment (``SO_RCVLOWAT``): the
        multifd channels' threads would otherwise wake, read a few KiB and
        sleep again hundreds of thousands of times per GiB.
        """
        while True:
            try:
                n = self._sock.recv_into(mv) if self._sock is not None else os.readv(self._rfd, [mv])
            except BlockingIOError:
                self._set_lowat(want)
                self._wait(self._rpoll, "read")
                continue
            except OSError as e:
                if self._shut:
                    raise self._shut_error() from None
                raise ChannelError(f"{self.name}: read failed: {e.strerror}", field="channel") from None
            if n == 0 and self._shut:
                raise self._shut_error()
            self.bytes_read += n
            return n

    def _set_lowat(self, want: int) -> None:
        lowat = max(1, min(want, _LOWAT_MAX))
        if lowat != self._lowat and self._sock is not None:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            except OSError:  # not a stream socket: waking early only costs time
                return
            self._lowat = lowat

    def readinto_available(self, buf) -> int:
        """Block for the first bytes, then take whatever else has arrived.

        A socket hands over a few hundred KiB per read; a bulk reader (the
        destination's stream parser) wants its buffer as full as it can be
        without waiting, so this keeps reading while data is ready. 0 means
        end of stream.
        """
        mv = _byteview(buf, writable=True)
        got = self.readinto(mv)
        if got == 0 or self._sock is None:
            return got
        total = len(mv)
        while got < total:
            try:
                k = self._sock.recv_into(mv[got:], total - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the next blocking read reports it
            if k == 0:
                break
            self.bytes_read += k
            got += k
        return got

    def readinto_exact(self, buf) -> None:
        """Fill ``buf`` completely; ChannelError if the stream ends first."""
        mv = _byteview(buf, writable=True)
        got, n = 0, len(mv)
        while got < n:
            k = (self.readinto(mv[got:]) if self._sock is None or self._shut
                 else self._recv_into(mv[got:], n - got))
            if k == 0:
                raise self.failure("truncated", got=got, want=n)
            got += k

    def socket_fds(self) -> Optional[tuple]:
        """``(socket, wake)`` descriptors for a compiled reader, or None.

        Only a channel that is a plain socket has them (not a TLS session,
        a pipe or a file). ``wake`` becomes readable when the channel is
        shut down, so a reader that polls both stops as this class's own
        reads do. A reader that uses them must also leave ``SO_RCVLOWAT``
        at 1 when it returns.
        """
        if self._sock is None or self._shut:
            return None
        return self._sock.fileno(), self._wake

    def failure(self, what: str, *, writing: bool = False, got: int = 0, want: int = 0,
                err: int = 0) -> ChannelError:
        """The error this channel raises for a compiled reader's or writer's outcome ``what``.

        ``what``: ``stopped``, ``timeout``, ``truncated`` (``got`` of
        ``want`` bytes) or ``failed`` (``err`` an errno value).
        """
        if what == "stopped" or self._shut:
            return self._shut_error()
        verb = "write" if writing else "read"
        if what == "timeout":
            return ChannelTimeout(f"{self.name}: timed out after {self._timeout:g} s waiting to "
                                  f"{verb}", field="channel")
        if what == "truncated":
            return ChannelError(f"{self.name}: end of stream after {got} of {want} bytes",
                                offset=self.bytes_read, field="channel")
        return ChannelError(f"{self.name}: {verb} failed: {os.strerror(err)}",
                            offset=self.bytes_written if writing else None, field="channel")

    def readv_exact(self, buffers) -> None:
        """Fill every buffer of ``buffers`` completely, in order (a scattering read).

        A multifd packet's pages go straight from the socket to their
        places in guest memory, which are seldom one run: one ``recvmsg``
        fills several of them, with no copy through a bounce buffer.
        ChannelError if the stream ends first.
        """
        views = [_byteview(b, writable=True) for b in buffers]
        if self._sock is None:
            for v in views:
                self.readinto_exact(v)
            return
        want = sum(len(v) for v in views)
        got = 0
        i = 0
        while i < len(views):
            if self._shut:
                raise self._shut_error()
            try:
                k = self._sock.recvmsg_into(views[i : i + _IOV_MAX])[0]
            except BlockingIOError:
                self._set_lowat(want - got)
                self._wait(self._rpoll, "read")
                continue
            except OSError as e:
                raise self.failure("failed", err=e.errno or 0) from None
            if k == 0:
                raise self.failure("truncated", got=got, want=want)
            self.bytes_read += k
            got += k
            i = _consume(views, i, k)

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ChannelError if the stream ends first."""
        buf = bytearray(n)
        self.readinto_exact(buf)
        return bytes(buf)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at end of stream)."""
        buf = bytearray(n)
        k = self.readinto(buf)
        del buf[k:]
        return bytes(buf)

    @property
    def can_peek(self) -> bool:
        """Whether :meth:`peek` works (sockets only, as QEMU's channel feature)."""
        return self._sock is not None

    def peek_nowait(self, n: int) -> Optional[bytes]:
        """The first ``n`` bytes if they are here (fewer at end of stream), else None."""
        if self._sock is None:
            raise ChannelError(f"{self.name}: this channel cannot peek", field="channel")
        try:
            data = self._sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            raise ChannelError(f"{self.name}: peek failed: {e.strerror}", field="channel") from None
        return data if len(data) >= n or not data else None

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes, left unread (QEMU 10 tells channels apart this way).

        Waits until ``n`` bytes arrived; fewer only if the peer closed (or
        shut its side down) first. The channel's timeout applies.
        """
        if self._sock is None:
            raise ChannelError(f"{self.name}: this channel cannot peek", field="channel")
        hup = select.poll()
        hup.register(self._sock.fileno(), getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP)
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            if self._shut:
                raise self._shut_error()
            try:
                data = self._sock.recv(n, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError as e:
                raise ChannelError(f"{self.name}: peek failed: {e.strerror}",
                                   field="channel") from None
            if data is not None and (len(data) >= n or not data):
                return data
            if data:  # part of it: more to come, unless the peer is gone
                if hup.poll(10):
                    return data
            else:
                self._set_lowat(1)
                self._wait(self._rpoll, "read")
            if deadline is not None and time.monotonic() > deadline:
                raise ChannelTimeout(f"{self.name}: timed out after {self._timeout:g} s "
                                     f"waiting for the first bytes", field="channel")

    def write(self, data) -> int:
        """Write all of ``data`` (any buffer); returns its length."""
        mv = _byteview(data, writable=False)
        if self._shut:
            raise self._shut_error()
        if self._wfd < 0:
            raise ChannelError(f"{self.name}: this channel cannot be written", field="channel")
        off, total = 0, len(mv)
        while off < total:
            try:
                k = self._sock.send(mv[off:]) if self._sock is not None else os.write(self._wfd, mv[off:])
            except BlockingIOError:
                self._wait(self._wpoll, "write")
                continue
            except OSError as e:
                if self._shut:
                    raise self._shut_error() from None
                raise ChannelError(f"{self.name}: write failed: {e.strerror}",
                                   offset=self.bytes_written, field="channel") from None
            off += k
            self.bytes_written += k
        return total

    sendall = write

    def writev(self, buffers) -> int:
        """Write every buffer of ``buffers``, in order, with gathering writes.

        Page records go out as (header, page) pairs straight from where the
        pages are, with no copy into one buffer first. Returns the total.
        """
        views = [_byteview(b, writable=False) for b in buffers]
        if self._shut:
            raise self._shut_error()
        if self._wfd < 0:
            raise ChannelError(f"{self.name}: this channel cannot be written", field="channel")
        total = sum(len(v) for v in views)
        i = 0
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            try:
                k = (self._sock.sendmsg(batch) if self._sock is not None
                     else os.writev(self._wfd, batch))
            except BlockingIOError:
                self._wait(self._wpoll, "write")
                continue
            except OSError as e:
                if self._shut:
                    raise self._shut_error() from None
                raise ChannelError(f"{self.name}: write failed: {e.strerror}",
                                   offset=self.bytes_written, field="channel") from None
            self.bytes_written += k
            i = _consume(views, i, k)
        return total

    # -- ending ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop all I/O now, from any thread: blocked reads/writes raise ChannelError.

        Sockets are also shut down both ways, so the peer sees the end of
        the stream (QEMU's cancel). Safe to call more than once.
        """
        with self._close_lock:
            if self._closed:
                return
            self._shut = True
            os.eventfd_write(self._wake, 1)
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self, timeout: float = 10.0) -> None:
        """Release the channel. Call once no other thread uses it (shutdown() first if one might).

        For ``exec:``: on the source the command's stdin is closed and the
        command is given ``timeout`` seconds to finish (so ``exec:cat > FILE``
        has written the whole file when close returns); on the destination
        it is told to stop (its pipes are closed). It is terminated, then
        killed, if it does not exit.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._shut = True
            os.eventfd_write(self._wake, 1)
        if self._sock is not None:
            self._sock.close()
        else:
            if self._process is not None and not self._producer:
                self._close_fd("_wfd")
                self._reap(timeout, drain=True)
            self._close_fd("_wfd")
            self._close_fd("_rfd")
            if self._process is not None:
                self._reap(min(timeout, 1.0), drain=False)
        os.close(self._wake)

    def _close_fd(self, attr: str) -> None:
        fd = getattr(self, attr)
        if fd >= 0:
            if attr == "_wfd" and fd == self._rfd:
                self._rfd = -1
            setattr(self, attr, -1)
            os.close(fd)

    def _reap(self, timeout: float, *, drain: bool) -> None:
        p = self._process
        deadline = time.monotonic() + timeout
        buf = bytearray(65536)
        while p.poll() is None and time.monotonic() < deadline:
            if drain and self._rfd >= 0:
                try:  # keep the command from blocking on a full stdout pipe
                    while os.readv(self._rfd, [buf]) > 0:
                        pass
                except OSError:
                    pass
            time.sleep(0.005)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(1.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("shut down" if self._shut else "open")
        return f"<Channel {self.name} {state}>"
