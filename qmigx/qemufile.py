"""Byte-level reading and writing of migration streams (QEMU's qemu-file.c).

Two halves, both free of policy about where bytes come from:

* :class:`Cursor` reads big-endian primitives from a buffer that is
  already in memory (a whole file, or the part of a socket stream that
  has arrived). Running off its end raises :class:`NeedData`, which a
  sans-IO parser turns into "feed me more" — or, once the input is known
  to be complete, into :class:`~qmigx.errors.TruncatedStreamError` with
  the offset where the record started.
* :class:`QEMUFile` is the buffered writer: it collects output, hands it to
  a sink (any ``write``-like callable) in large chunks, counts bytes,
  supports QEMU's rate-limit accounting, and latches the first error so
  that a failed write stops the migration rather than being retried.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from qmigx.errors import ChannelError, StreamError

__all__ = ["Cursor", "NeedData", "QEMUFile", "BytesSink"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


class NeedData(Exception):
    """Internal signal: the record continues past the bytes available.

    ``offset`` is the absolute stream offset at which bytes ran out.
    """

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class Cursor:
    """Reads primitives from ``buf`` starting at ``pos``.

    ``base`` is the absolute stream offset of ``buf[0]``; every offset this
    class reports (``tell()``, errors) is absolute, so errors name the place
    in the file or connection, not in some internal buffer.
    """

    __slots__ = ("buf", "pos", "end", "base")

    def __init__(self, buf, pos: int = 0, end: Optional[int] = None, base: int = 0) -> None:
        self.buf = buf if isinstance(buf, memoryview) else memoryview(buf)
        if self.buf.format != "B" or self.buf.ndim != 1:
            self.buf = self.buf.cast("B")
        self.pos = pos
        self.end = len(self.buf) if end is None else end
        self.base = base

    def tell(self) -> int:
        """Absolute offset of the next byte to read."""
        return self.base + self.pos

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int) -> int:
        p = self.pos
        if p + n > self.end:
            raise NeedData(self.base + self.end)
        self.pos = p + n
        return p

    def peek_u8(self, ahead: int = 0) -> int:
        p = self.pos + ahead
        if p >= self.end:
            raise NeedData(self.base + self.end)
        return self.buf[p]

    def read_u8(self) -> int:
        return self.buf[self._need(1)]

    def read_be16(self) -> int:
        return _U16.unpack_from(self.buf, self._need(2))[0]

    def read_be32(self) -> int:
        return _U32.unpack_from(self.buf, self._need(4))[0]

    def read_be64(self) -> int:
        return _U64.unpack_from(self.buf, self._need(8))[0]

    def read_sbe16(self) -> int:
        return _I16.unpack_from(self.buf, self._need(2))[0]

    def read_sbe32(self) -> int:
        return _I32.unpack_from(self.buf, self._need(4))[0]

    def read_sbe64(self) -> int:
        return _I64.unpack_from(self.buf, self._need(8))[0]

    def read_bytes(self, n: int) -> memoryview:
        """``n`` bytes as a view into the buffer (valid while it is)."""
        p = self._need(n)
        return self.buf[p : p + n]

    def skip(self, n: int) -> None:
        self._need(n)

    def read_str8_bytes(self) -> bytes:
        n = self.read_u8()
        return bytes(self.read_bytes(n))

    def read_str8(self, *, what: str = "string", allow_empty: bool = True) -> str:
        """A counted string (u8 length + bytes).

        QEMU's reader treats an empty idstr or block name as a failed read,
        so callers reading those pass ``allow_empty=False``.
        """
        start = self.tell()
        raw = self.read_str8_bytes()
        if not raw and not allow_empty:
            raise StreamError(f"empty {what}", offset=start, field=what)
        return raw.decode("utf-8", "surrogateescape")


class BytesSink:
    """A sink collecting everything written, for tests and in-memory streams."""

    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, chunk) -> None:
        self.data += chunk


class QEMUFile:
    """Buffered stream writer with byte counters, rate limit and latched error.

    Args:
        sink: called with each chunk to send (``file.write``,
            ``socket.sendall``, :class:`BytesSink`, ...). It must consume the
            whole chunk or raise.
        buffer_size: bytes collected before the sink is called (QEMU uses
            32 KiB; larger chunks cost fewer system calls).
        sink_v: optionally, a gathering writer taking a list of buffers
            (``Channel.writev``); :meth:`writev` then copies nothing.

    The rate limit follows QEMU: ``rate_limit_max`` bytes may be written per
    window; ``rate_limit_exceeded()`` tells the sender to stop for now and
    ``rate_limit_reset()`` starts the next window. ``0`` means unlimited.
    """

    #: writes at least this large skip the buffer (page batches, packets)
    _PASS_THROUGH = 64 << 10

    def __init__(self, sink: Callable[[memoryview], object], buffer_size: int = 1 << 20,
                 *, sink_v: Optional[Callable[[list], object]] = None) -> None:
        self._sink = sink
        self._sink_v = sink_v
        self._buf = bytearray()
        self._buffer_size = buffer_size
        self.total_transferred = 0
        self.rate_limit_max = 0
        self.rate_limit_used = 0
        self.error: Optional[BaseException] = None

    # -- error latch ------------------------------------------------------
    def set_error(self, err: BaseException) -> None:
        """Record the first error; later errors are ignored."""
        if self.error is None:
            self.error = err

    def check(self) -> None:
        """Raise the latched error, if any."""
        if self.error is not None:
            if isinstance(self.error, ChannelError):
                raise self.error
            raise ChannelError(f"write failed: {self.error}") from self.error

    # -- writing ----------------------------------------------------------
    def write(self, data) -> None:
        """Append raw bytes (any buffer)."""
        if self.error is not None:
            return
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        n = len(data)
        self.total_transferred += n
        self.rate_limit_used += n
        if n >= self._PASS_THROUGH:  # big writes go straight out: no extra copy
            self.flush()
            self._emit(data)
            return
        self._buf += data
        if len(self._buf) >= self._buffer_size:
            self.flush()

    def writev(self, buffers: list) -> None:
        """Append several buffers; with a gathering sink, without copying them."""
        if self.error is not None:
            return
        views = [b if isinstance(b, (bytes, bytearray)) else memoryview(b).cast("B")
                 for b in buffers]
        n = sum(len(v) for v in views)
        self.total_transferred += n
        self.rate_limit_used += n
        if self._sink_v is None:
            for v in views:
                self._buf += v
            if len(self._buf) >= self._buffer_size:
                self.flush()
            return
        self.flush()
        try:
            self._sink_v(views)
        except Exception as exc:
            self.set_error(exc)

    def wrote_directly(self, n: int) -> None:
        """Count ``n`` bytes a compiled writer put on the channel itself (after :meth:`flush`)."""
        self.total_transferred += n
        self.rate_limit_used += n

    def put_u8(self, v: int) -> None:
        self.write(bytes((v,)))

    def put_be16(self, v: int) -> None:
        self.write(_U16.pack(v))

    def put_be32(self, v: int) -> None:
        self.write(_U32.pack(v))

    def put_be64(self, v: int) -> None:
        self.write(_U64.pack(v))

    def put_str8(self, s: str | bytes) -> None:
        raw = s.encode() if isinstance(s, str) else s
        if len(raw) > 255:
            raise ValueError(f"name longer than 255 bytes: {raw[:40]!r}...")
        self.write(bytes((len(raw),)) + raw)

    def flush(self) -> None:
        """Hand everything buffered to the sink."""
        if self._buf and self.error is None:
            buf, self._buf = self._buf, bytearray()
            self._emit(buf)

    def _emit(self, data) -> None:
        try:
            self._sink(data)
        except Exception as exc:  # latched: the caller checks and fails
            self.set_error(exc)

    # -- rate limiting ----------------------------------------------------
    def rate_limit_exceeded(self) -> bool:
        if self.error is not None:
            return True
        return bool(self.rate_limit_max) and self.rate_limit_used >= self.rate_limit_max

    def rate_limit_reset(self) -> None:
        self.rate_limit_used = 0

    def close(self) -> None:
        self.flush()
