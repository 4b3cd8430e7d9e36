"""Plain-Python twin of :mod:`qmigx._core.multifd_recv` (a test oracle).

The same loop, statuses and results, with the GIL: read packets from a
non-blocking socket, place uncompressed pages straight into the blocks,
and stop at the first header the Python path must see.
"""

from __future__ import annotations

import errno as _errno
import os
import select
import socket

from qmigx.reference.fdwait import WAIT_READY, consume, wait_fd
from qmigx.reference.multifd_packet import HEADER_FIXED_SIZE, _NAME_LEN, _NAME_OFF
from qmigx.wire import MULTIFD_MAGIC as _MAGIC
from qmigx.wire import MULTIFD_VERSION as _VERSION
from qmigx.wire import MultifdFlag

__all__ = ["receive_packets", "HEADER", "END", "STOPPED", "TIMEOUT", "TRUNCATED", "FAILED"]

HEADER, END, STOPPED, TIMEOUT, TRUNCATED, FAILED = range(6)

_FIXED = HEADER_FIXED_SIZE
_ZERO_OFF = 32  # QEMU 10's zero_pages
_MASK_10 = 0x3E  # every version's compression bits
_LOWAT_MAX = 256 * 1024


class _Stop(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Loop:
    def __init__(self, fd: int, wake: int, timeout) -> None:
        self.fd = fd
        self.wake = wake
        self.timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
        self.lowat = 1
        self.nbytes = 0
        self.err = 0
        self.got = 0
        self.want = 0
        self.sock = socket.socket(fileno=os.dup(fd))

    def set_lowat(self, n: int) -> None:
        n = max(1, min(n, _LOWAT_MAX))
        if n != self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
                self.lowat = n
            except OSError:
                pass

    def wait(self, want: int) -> None:
        self.set_lowat(want)
        status, err = wait_fd(self.fd, select.POLLIN, self.wake, self.timeout_ms)
        if status != WAIT_READY:
            self.err = err
            raise _Stop(status)

    def read_exact(self, views: list, first: bool) -> None:
        views = [v for v in views if len(v)]
        left = sum(len(v) for v in views)
        self.want = left
        done = 0
        while views:
            try:
                k = os.readv(self.fd, views)
            except BlockingIOError:
                try:
                    self.wait(left)
                except _Stop:
                    self.got = done
                    raise
                continue
            except InterruptedError:
                continue
            except OSError as e:
                self.err, self.got = e.errno or 0, done
                raise _Stop(FAILED) from None
            if k == 0:
                self.got = done
                raise _Stop(END if first and done == 0 else TRUNCATED)
            self.nbytes += k
            done += k
            left -= k
            consume(views, k)

    def close(self) -> None:
        if self.lowat != 1:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
        self.sock.close()


def _be32(h, off: int) -> int:
    return int.from_bytes(h[off : off + 4], "big")


def _packet(s: _Loop, h: memoryview, table: dict, page: int, max_pages: int, counts: list) -> bool:
    """One packet; True when it was placed, False when ``h`` holds one for Python."""
    s.read_exact([h], True)
    if _be32(h, 0) != _MAGIC or _be32(h, 4) != _VERSION:
        return False
    flags, alloc, npages = _be32(h, 8), _be32(h, 12), _be32(h, 16)
    nzero = _be32(h, _ZERO_OFF)
    if flags & int(MultifdFlag.SYNC) or alloc > max_pages or npages > alloc or nzero > alloc - npages:
        return False
    if _FIXED + 8 * alloc > len(h):
        return False
    listed = npages + nzero
    if listed == 0:
        return True
    if flags & _MASK_10:
        return False
    raw = bytes(h[_NAME_OFF : _NAME_OFF + _NAME_LEN])
    if b"\0" not in raw:
        return False
    blk = table.get(raw[: raw.index(b"\0")])
    if blk is None or blk[1] < page:
        return False
    buf, used = blk
    offs = [int.from_bytes(h[_FIXED + 8 * i : _FIXED + 8 * i + 8], "big") for i in range(listed)]
    if any(o & (page - 1) or o > used - page for o in offs):
        return False
    runs: list = []
    for o in offs[:npages]:
        if runs and runs[-1][1] == o:
            runs[-1][1] = o + page
        else:
            runs.append([o, o + page])
    if runs:
        try:
            s.read_exact([buf[a:b] for a, b in runs], False)
        except _Stop as stop:
            raise _Stop(TRUNCATED if stop.status == END else stop.status) from None
    for o in offs[npages:]:
        buf[o : o + page] = bytes(page)
    counts[1] += npages
    counts[2] += nzero
    return True


def receive_packets(fd: int, wake: int, header, blocks, page_size: int, max_pages: int, timeout):
    """See :func:`qmigx._core.multifd_recv.receive_packets`."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    if max_pages < 0 or max_pages > 1024:
        raise ValueError(f"max_pages {max_pages} out of range")
    h = memoryview(header).cast("B")
    if h.readonly:
        raise BufferError("header buffer is read-only")
    if len(h) < _FIXED + 8 * max_pages:
        raise ValueError(f"header buffer of {len(h)} bytes, {_FIXED + 8 * max_pages} needed")
    table = {}
    for name, buf, used in blocks:
        mv = memoryview(buf).cast("B")
        if used < 0 or used > len(mv):
            raise ValueError(f"block {bytes(name)!r}: used length {used} beyond its buffer")
        table[bytes(name)] = (mv, int(used))
    s = _Loop(fd, wake, timeout)
    counts = [0, 0, 0]
    status = HEADER
    try:
        while True:
            if not _packet(s, h, table, page_size, max_pages, counts):
                status = HEADER
                break
            counts[0] += 1
    except _Stop as stop:
        status = stop.status
    finally:
        s.close()
    if status == FAILED and not s.err:
        s.err = _errno.EIO
    return (status, counts[0], counts[1], counts[2], s.nbytes, s.got, s.want, s.err)
