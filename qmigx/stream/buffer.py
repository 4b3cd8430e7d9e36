"""The receive buffer a channel's readers share (QEMU's QEMUFile read buffer).

A migration channel carries more than one grammar in turn: the stream
(parsed by :class:`~qmigx.stream.StreamParser`), then COLO's be32
messages, or a raw received-page bitmap after RECV_BITMAP. Whoever reads
next must see the bytes the previous reader fetched but did not use, so
they all read through one :class:`ReceiveBuffer`: the parser parses from
it, :meth:`ReceiveBuffer.read_exact` hands raw bytes to the others, and
nothing read ahead is lost.
"""

from __future__ import annotations

from typing import Callable, Optional

from qmigx.errors import StreamError, TruncatedStreamError

__all__ = ["ReceiveBuffer"]

Readinto = Callable[[memoryview], Optional[int]]


class ReceiveBuffer:
    """Bytes received and not yet consumed, with their absolute stream offset.

    ``view[pos:]`` is unconsumed input, ``base`` the absolute offset of
    ``view[0]``; ``eof`` says the input is complete.
    """

    def __init__(self) -> None:
        self.view = memoryview(b"")
        self.pos = 0
        self.base = 0
        self.eof = False
        self._own: Optional[bytearray] = None

    @property
    def offset(self) -> int:
        """Absolute offset of the next unconsumed byte."""
        return self.base + self.pos

    @property
    def pending(self) -> int:
        return len(self.view) - self.pos

    def feed(self, data) -> None:
        """Add input. With nothing pending, ``data`` is not copied."""
        if self.eof:
            raise StreamError("data fed after end of input", offset=self.offset)
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        pending = self.pending
        if pending == 0:
            self.base += len(self.view)
            self.view = mv
        else:
            merged = bytearray(pending + len(mv))
            merged[:pending] = self.view[self.pos :]
            merged[pending:] = mv
            self.base += self.pos
            self.view = memoryview(merged)
        self.pos = 0

    def fill(self, readinto: Readinto, size: int = 8 << 20) -> int:
        """Read more input straight into the buffer's own memory.

        ``readinto`` is e.g. ``file.readinto`` or ``Channel.readinto_available``;
        it fills the view it is given and returns the byte count, 0 at end
        of input (which also declares the input complete). Pending bytes
        move to the front first, so each input byte is copied once.
        """
        pending = self.pending
        cap = max(size, 4 * pending, 1 << 16)
        own = self._own
        if own is None or len(own) < cap:
            own = bytearray(cap)
        if pending:
            src = self.view[self.pos :]
            if getattr(self.view, "obj", None) is own and self.pos < pending:
                src = bytes(src)  # an overlapping move within the buffer: copy out first
            own[:pending] = src
        self._own = own
        # the pending bytes now sit at the front: say so before reading, so
        # that a read that raises (a timeout the caller retries) loses nothing
        self.base += self.pos
        self.view = memoryview(own)[:pending]
        self.pos = 0
        n = readinto(memoryview(own)[pending:]) or 0
        self.view = memoryview(own)[: pending + n]
        if n == 0:
            self.eof = True
        return n

    def set_window(self, view, base: int, *, last: bool = False) -> None:
        """Read from ``view``, whose first byte is at absolute offset ``base`` (no copy)."""
        mv = view if isinstance(view, memoryview) else memoryview(view)
        if mv.format != "B":
            mv = mv.cast("B")
        cur = self.offset
        if not base <= cur <= base + len(mv):
            raise ValueError(f"window 0x{base:x}+0x{len(mv):x} misses offset 0x{cur:x}")
        self.view = mv
        self.base = base
        self.pos = cur - base
        if last:
            self.eof = True

    def resume(self, view, consumed: int) -> None:
        """Go on after a reader that took the pending bytes and more straight from the input.

        ``consumed`` bytes from :attr:`offset` on were used by that reader
        (a COLO secondary's pages, read into its cache); ``view`` holds the
        input it read past them, the next bytes to parse.
        """
        mv = view if isinstance(view, memoryview) else memoryview(view)
        self.base = self.offset + consumed
        self.view = mv.cast("B") if mv.format != "B" else mv
        self.pos = 0

    def read_exact(self, n: int, readinto: Optional[Readinto] = None, *,
                   what: str = "data") -> bytes:
        """Consume exactly ``n`` bytes, buffered ones first, then from ``readinto``.

        Raises :class:`~qmigx.errors.TruncatedStreamError` if the input ends
        first (or ``readinto`` is None and too few bytes are buffered).
        """
        while self.pending < n:
            if readinto is None or self.eof or self.fill(readinto, max(n, 1 << 16)) == 0:
                raise TruncatedStreamError(f"the input ends inside {what} ({self.pending} of "
                                           f"{n} bytes)", offset=self.offset, field=what)
        out = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        return out
