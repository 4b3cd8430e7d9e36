"""Migration transports: URIs, byte channels and listeners (control.md §7).

The migration engine speaks to the peer through a :class:`Channel`, a
duplex byte pipe, whatever carries it: QEMU's ``tcp:``, ``unix:``,
``vsock:``, ``exec:`` and ``fd:`` URIs, plus ``file:PATH``, which is a
**qmigx extension** (QEMU 4.1 and 7.2 have no ``file:``; with them use
``exec:cat > FILE`` / ``exec:cat FILE``). This module moves bytes and
nothing else: no migration logic.

* :func:`parse_uri` -> :class:`MigrationURI`; bad URIs raise
  :class:`~qmigx.errors.ParameterError` with QEMU's texts.
* :func:`connect` (source side) and :func:`connect_extra` (further
  multifd/preempt connections, socket URIs only).
* :func:`listen` -> :class:`Listener` (destination side); sockets report
  their bound addresses as QEMU's ``socket-address`` list.
* :func:`register_fd` is the ``getfd`` registry behind ``fd:NAME``.

The return path (stream.md §8) is the same Channel read in the other
direction: the same socket or fd; for ``exec:`` the command's stdout on
the source (the stream goes to its stdin) and its stdin on the
destination (the stream comes from its stdout). ``file:`` has none.

Threads, not asyncio: one thread may read (the return path) while another
writes. Every blocking wait polls the descriptor together with a wake-up
eventfd, so :meth:`Channel.shutdown` from any thread unblocks readers and
writers at once (that is how cancel works) and :meth:`Channel.set_timeout`
turns a stalled peer into :class:`~qmigx.errors.ChannelError`.
"""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional

from qmigx.errors import CapabilityError, ChannelError, ParameterError

__all__ = [
    "MigrationURI",
    "Channel",
    "Listener",
    "parse_uri",
    "connect",
    "connect_extra",
    "listen",
    "register_fd",
    "unregister_fd",
]

_OUT_ERROR = "Parameter 'uri' expects a valid migration protocol"
_MULTI_ERROR = "multifd is not supported by current protocol"


# -- URIs ----------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationURI:
    """A parsed migration URI.

    ``scheme`` is ``tcp``, ``unix``, ``vsock``, ``exec``, ``fd`` or ``file``;
    the other fields are set as the scheme needs: ``host``/``port`` (tcp;
    IPv6 without brackets; ``cid``/``port`` for vsock), ``path`` (unix,
    file), ``command`` (exec), ``fd_name`` (fd: a number or a registered name).
    """

    uri: str
    scheme: str
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    command: Optional[str] = None
    fd_name: Optional[str] = None
    cid: Optional[int] = None

    @property
    def multi_channel(self) -> bool:
        """Whether the transport can open further connections (multifd, preempt)."""
        return self.scheme in ("tcp", "unix", "vsock")

    @property
    def fd_number(self) -> Optional[int]:
        """The fd number of ``fd:N``, None for ``fd:NAME`` and other schemes."""
        if self.fd_name is not None and self.fd_name.isdigit():
            return int(self.fd_name)
        return None


_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]+)$")


def parse_uri(uri: str, *, incoming: bool = False) -> MigrationURI:
    """Parse a migration URI; ``incoming`` selects QEMU's destination error text.

    Raises:
        ParameterError: an unknown scheme, with QEMU's texts: "Parameter
            'uri' expects a valid migration protocol" (outgoing) or "unknown
            migration protocol: URI" (incoming); or a known scheme with a
            malformed address ("error parsing address 'h' in migration URI
            'tcp:h'").

    ``fd:`` accepts a number or a registered name in both directions (QEMU's
    outgoing ``fd:`` takes names only). ``tcp:`` takes numeric ports only and
    no ``,ipv4``/``,to=`` options. ``defer`` is not a transport: the caller
    handles ``-incoming defer`` before it gets here.
    """
    if not isinstance(uri, str):
        raise ParameterError(_OUT_ERROR, field="uri")
    scheme, sep, rest = uri.partition(":")

    def bad(reason: Optional[str] = None) -> ParameterError:
        if reason:  # a known scheme with a malformed address
            return ParameterError(f"{reason} in migration URI '{uri}'", field="uri")
        text = f"unknown migration protocol: {uri}" if incoming else _OUT_ERROR
        return ParameterError(text, field="uri")

    if not sep:
        raise bad()
    if scheme == "tcp":
        m = _HOSTPORT.match(rest)
        if not m:
            raise bad(f"error parsing address '{rest}'")
        host = m.group("v6") if m.group("v6") is not None else m.group("host")
        port = _parse_port(m.group("port"))
        if port is None:
            raise bad(f"invalid port '{m.group('port')}'")
        return MigrationURI(uri, "tcp", host=host, port=port)
    if scheme == "vsock":
        cid, _, port = rest.partition(":")
        if not cid.isdigit() or _parse_port(port, limit=0xFFFFFFFF) is None:
            raise bad(f"error parsing vsock address '{rest}'")
        return MigrationURI(uri, "vsock", cid=int(cid), port=int(port))
    if scheme == "unix":
        if not rest:
            raise bad("empty socket path")
        return MigrationURI(uri, "unix", path=rest)
    if scheme == "exec":
        if not rest.strip():
            raise bad("empty command")
        return MigrationURI(uri, "exec", command=rest)
    if scheme == "fd":
        if not rest:
            raise bad("empty fd name")
        return MigrationURI(uri, "fd", fd_name=rest)
    if scheme == "file":
        if not rest:
            raise bad("empty file name")
        return MigrationURI(uri, "file", path=rest)
    raise bad()


def _parse_port(text: str, limit: int = 65535) -> Optional[int]:
    if not text.isdigit():
        return None
    port = int(text)
    return port if port <= limit else None


# -- fd registry (QMP getfd) ---------------------------------------------------

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


def _take_fd(name: str) -> int:
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


# -- channels --------------------------------------------------------------------


#: iovecs per gathering write (Linux's IOV_MAX)
_IOV_MAX = 1024


def _byteview(buf, *, writable: bool) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format != "B" or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise ValueError("channel buffers must be contiguous")
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise ValueError("readinto needs a writable buffer")
    return mv


class Channel:
    """A duplex byte channel (socket, pipe pair, fd or file).

    ``readinto``/``read_exact`` read the incoming direction (on the source
    that is the return path), ``write`` writes the outgoing one. One thread
    may read while another writes. ``bytes_read``/``bytes_written`` count
    what passed. Errors are :class:`~qmigx.errors.ChannelError`.

    Not built directly: use :func:`connect`, :func:`connect_extra` or
    :meth:`Listener.accept`.
    """

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
        return ChannelError(f"{self.name}: channel was shut down", field="channel")

    def _wait(self, poller, what: str) -> None:
        t = self._timeout
        ready = poller.poll(None if t is None else max(0, int(t * 1000)))
        if self._shut:
            raise self._shut_error()
        if not ready:
            raise ChannelError(f"{self.name}: timed out after {t:g} s waiting to {what}",
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
        while True:
            try:
                n = self._sock.recv_into(mv) if self._sock is not None else os.readv(self._rfd, [mv])
            except BlockingIOError:
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
            k = self.readinto(mv[got:])
            if k == 0:
                raise ChannelError(f"{self.name}: end of stream after {got} of {n} bytes",
                                   offset=self.bytes_read, field="channel")
            got += k

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
            while k and i < len(views):  # drop what was sent, keep a partial view
                n = len(views[i])
                if k >= n:
                    k -= n
                    i += 1
                else:
                    views[i] = views[i][k:]
                    k = 0
            while i < len(views) and not len(views[i]):
                i += 1
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


# -- outgoing ------------------------------------------------------------------


def _socket_channel(sock: socket.socket, name: str) -> Channel:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(name, sock=sock)


def _connect_socket(u: MigrationURI, timeout: Optional[float]) -> Channel:
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
        return _socket_channel(sock, f"tcp:{target}")
    if u.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(u.path)
        except (OSError, ValueError) as e:
            sock.close()
            why = getattr(e, "strerror", None) or str(e)
            raise ChannelError(f"Failed to connect to '{u.path}': {why}", field="uri") from None
        return _socket_channel(sock, f"unix:{u.path}")
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


def _spawn(command: str, producer: bool) -> Channel:
    """Run ``/bin/sh -c command`` with a pipe on its stdin and one on its stdout."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=in_r, stdout=out_w,
                                close_fds=True)
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise ChannelError(f"cannot run /bin/sh -c {command!r}: {e.strerror}", field="uri") from None
    os.close(in_r)
    os.close(out_w)
    return Channel(f"exec:{command}", rfd=out_r, wfd=in_w, process=proc, producer=producer)


def _fd_channel(fd: int, name: str) -> Channel:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ChannelError(f"{name}: {e.strerror}", field="uri") from None
    if stat.S_ISSOCK(mode):
        return Channel(name, sock=socket.socket(fileno=fd))
    return Channel(name, rfd=fd, wfd=fd)


def connect(uri: str, *, timeout: Optional[float] = None) -> Channel:
    """Open the main outgoing channel for ``uri`` (the source side).

    ``timeout`` bounds establishing a socket connection (None: the OS's
    own); use :meth:`Channel.set_timeout` for reads and writes. ``fd:``
    takes ownership of the fd (a registered name is removed from the
    registry, as QEMU does); ``file:`` creates or truncates the file.
    """
    u = parse_uri(uri)
    if u.multi_channel:
        return _connect_socket(u, timeout)
    if u.scheme == "exec":
        return _spawn(u.command, producer=False)
    if u.scheme == "fd":
        return _fd_channel(_take_fd(u.fd_name), f"fd:{u.fd_name}")
    try:
        fd = os.open(u.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ChannelError(f"cannot open {u.path!r} for writing: {e.strerror}", field="uri") from None
    return Channel(f"file:{u.path}", wfd=fd)


def connect_extra(uri: str, *, timeout: Optional[float] = None) -> Channel:
    """Open one more connection to the same destination (multifd, postcopy preempt).

    Raises:
        CapabilityError: "multifd is not supported by current protocol" for
            anything but socket URIs, as QEMU 7.2 refuses.
    """
    u = parse_uri(uri)
    if not u.multi_channel:
        raise CapabilityError(_MULTI_ERROR, field="uri")
    return _connect_socket(u, timeout)


# -- incoming ------------------------------------------------------------------


class Listener:
    """The destination's end of a migration URI, handing out channels with :meth:`accept`.

    Sockets (tcp/unix/vsock) accept as many connections as asked for (the
    main channel first, then multifd channels); ``exec:``, ``fd:`` and
    ``file:`` have exactly one channel, created at :func:`listen` time.
    """

    def __init__(self, uri: MigrationURI, *, sockets=(), channel: Optional[Channel] = None,
                 unix_path: Optional[str] = None) -> None:
        self.uri = uri
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
        """The next incoming channel; ChannelError on timeout, shutdown or a used-up listener."""
        if self._shut:
            raise ChannelError(f"listener {self.uri.uri} was shut down", field="listener")
        if not self._sockets:
            with self._lock:
                ch, self._channel = self._channel, None
            if ch is None:
                raise ChannelError(f"{self.uri.scheme}: has only one channel and it was taken",
                                   field="listener")
            self.accepted += 1
            return ch
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._poll.poll(None if remaining is None else int(remaining * 1000))
            if self._shut:
                raise ChannelError(f"listener {self.uri.uri} was shut down", field="listener")
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
                        return _socket_channel(conn, f"{self.uri.uri} <- {_peer(peer)}")
            if deadline is not None and time.monotonic() >= deadline:
                raise ChannelError(
                    f"timed out after {timeout:g} s waiting for a connection on {self.uri.uri}",
                    field="listener")

    def shutdown(self) -> None:
        """Unblock a pending :meth:`accept` from another thread; no more channels."""
        self._shut = True
        with self._lock:
            if not self._closed:
                os.eventfd_write(self._wake, 1)

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


def _peer(addr) -> str:
    if isinstance(addr, tuple):
        host, port = addr[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) or "unix"


def _listen_tcp(u: MigrationURI, backlog: int) -> list[socket.socket]:
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


def _listen_unix(u: MigrationURI, backlog: int) -> socket.socket:
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
        return Listener(u, sockets=_listen_tcp(u, backlog))
    if u.scheme == "unix":
        return Listener(u, sockets=[_listen_unix(u, backlog)], unix_path=u.path)
    if u.scheme == "vsock":
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
        return Listener(u, sockets=[s])
    if u.scheme == "exec":
        return Listener(u, channel=_spawn(u.command, producer=True))
    if u.scheme == "fd":
        return Listener(u, channel=_fd_channel(_take_fd(u.fd_name), f"fd:{u.fd_name}"))
    try:
        fd = os.open(u.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ChannelError(f"cannot open {u.path!r}: {e.strerror}", field="uri") from None
    return Listener(u, channel=Channel(f"file:{u.path}", rfd=fd))
