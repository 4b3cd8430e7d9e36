"""Reading a stream from a path, bytes or a file object (no numpy needed).

:class:`StreamReader` drives the sans-IO :class:`~qmigx.stream.StreamParser`
over real input: it finds the vmdesc trailer first when the input can
seek (as QEMU's analysis script does), then feeds the parser chunk by
chunk through ``readinto`` into the parser's own buffer, or maps a file
window by window when most of the data need not be looked at.
"""

from __future__ import annotations

import io
import mmap
import os
from typing import BinaryIO, Callable, Iterator, Optional, Union

from qmigx.stream.events import Event
from qmigx.stream.parser import StreamParser, find_vmdesc, parse_vmdesc

__all__ = ["Source", "StreamReader"]

_CHUNK = 8 << 20
_WINDOW = 64 << 20
_START_SCAN = 64 << 20
_MAGIC = b"QEVM"

#: What a stream can be read from: a path, bytes, or a binary file object.
Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class StreamReader:
    """Iterates the events of a stream read from a path, bytes or a file.

    For a seekable source the vmdesc trailer is located first (as QEMU's
    analysis script does), so device sections are delimited by their
    description; otherwise by their footers.

    Args:
        source: a path, a bytes-like object, or a binary file object.
        vmdesc: ``"auto"`` (look for it), ``None`` (don't), or a parsed dict.
        progress: called with the number of bytes consumed so far.
        ordered: parse the vmdesc into OrderedDicts (what analyze-migration
            shows); plain dicts otherwise.
        use_mmap: read a regular file through mmap windows instead of
            copying it in: much faster when most page data is never looked
            at (analysis); when every page is copied out anyway (loading),
            reading is as fast and keeps the page cache out of RSS.
        offset: where the stream starts in the input (QEMU 10's
            ``file:PATH,offset=N`` writes N zero bytes first); None finds
            it: 0, or for a seekable input that begins with zero bytes the
            first ``QEVM`` after them (within 64 MiB). Offsets in events and
            errors are offsets in the input, as mapped-ram's are.
        chunk: bytes read at a time (the buffer's size): smaller for a
            reader that runs beside another user of memory and CPU (the feed
            of ``qmigx send``, which also shows its progress sooner).
    """

    def __init__(self, source: Source, *, vmdesc="auto", registry=None,
                 progress: Optional[Callable[[int], None]] = None, ordered: bool = False,
                 use_mmap: bool = False, offset: Optional[int] = None,
                 chunk: int = _CHUNK) -> None:
        self._source = source
        self._chunk = chunk
        self._progress = progress
        self._use_mmap = use_mmap
        self.vmdesc_text: Optional[bytes] = None
        self.size: Optional[int] = None
        self.offset = self._find_start() if offset is None else offset
        if vmdesc == "auto":
            found = self._locate_vmdesc()
            self.vmdesc_text = found[1] if found else None
            self.vmdesc = parse_vmdesc(found[1], ordered=ordered) if found else None
        else:
            self.vmdesc = vmdesc
        self.parser = StreamParser(vmdesc=self.vmdesc, registry=registry)
        self.parser.rx.base = self.offset

    def _find_start(self) -> int:
        """0, or the end of the zero bytes a ``file:...,offset=N`` stream starts with."""
        src = self._source
        if isinstance(src, (bytes, bytearray, memoryview)):
            head = bytes(memoryview(src)[: _START_SCAN])
        elif isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                if f.read(1) != b"\0":
                    return 0
                f.seek(0)
                head = f.read(_START_SCAN)
        else:
            return 0
        if not head or head[0] != 0:
            return 0
        n = len(head) - len(head.lstrip(b"\0"))
        return n if head[n : n + 4] == _MAGIC else 0

    def _locate_vmdesc(self):
        src = self._source
        if isinstance(src, (bytes, bytearray, memoryview)):
            self.size = len(src)
            return find_vmdesc(src)
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                return self._tail_vmdesc(f)
        if hasattr(src, "seek") and getattr(src, "seekable", lambda: False)():
            pos = src.tell()
            try:
                return self._tail_vmdesc(src)
            finally:
                src.seek(pos)
        return None

    def _tail_vmdesc(self, f):
        f.seek(0, io.SEEK_END)
        size = f.tell()
        self.size = size
        for tail in (1 << 20, 16 << 20):  # a vmdesc is ~100 KiB; read more only if needed
            n = min(size, tail)
            f.seek(size - n)
            found = find_vmdesc(f.read(n))
            if found is not None:
                return size - n + found[0], found[1]
            if n == size:
                break
        return None

    def events(self) -> Iterator[Event]:
        """Yield every event of the stream, then :class:`EndOfStream`."""
        src = self._source
        p = self.parser
        if isinstance(src, (bytes, bytearray, memoryview)):
            p.feed(memoryview(src)[self.offset :])
            p.feed_eof()
            yield from p.events()
            return
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(self.offset)
                if self._use_mmap and size and os.path.isfile(src):
                    yield from self._pump_mmap(f.fileno(), size)
                else:
                    yield from self._pump(f)
            return
        yield from self._pump(src)

    def _pump_mmap(self, fd: int, size: int) -> Iterator[Event]:
        """Parse a regular file through read-only mmap windows, copying nothing.

        Each window starts at the first unparsed byte (rounded down to the
        mapping granularity), so a record cut by one window's end is whole
        in the next; a record longer than a window doubles it. One window
        is mapped at a time.
        """
        p = self.parser
        gran = mmap.ALLOCATIONGRANULARITY
        window = _WINDOW
        while True:
            start = p.offset - p.offset % gran
            length = min(window, size - start)
            if length <= 0:
                p.feed_eof()
                yield from p.events()
                return
            last = start + length >= size
            before = p.offset
            m = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start)
            view = memoryview(m)
            try:
                p.set_window(view, start, last=last)
                yield from p.events()
            finally:
                p.set_window(memoryview(bytes(view[p.offset - start:])), p.offset)
                view.release()
                try:
                    m.close()
                except BufferError:
                    # the caller still holds the last event's view of this
                    # window (a RamMappedPages chunk): unmapped when it goes
                    pass
            if self._progress is not None:
                self._progress(p.offset)
            if last:
                return
            window = window * 2 if p.offset == before else _WINDOW

    def _pump(self, f) -> Iterator[Event]:
        p = self.parser
        readinto = getattr(f, "readinto", None)
        if readinto is None:
            def readinto(view, _read=f.read):
                data = _read(len(view))
                view[: len(data)] = data
                return len(data)
        while True:
            n = p.fill(readinto, self._chunk)
            yield from p.events()
            if self._progress is not None:
                self._progress(p.offset)
            if n == 0:
                return
