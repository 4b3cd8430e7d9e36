"""Plain-Python twin of ``qmigx._core.colo_recv``: the readable reference.

``receive_pages`` reads a predicted run of page records (each an 8-byte
``be64(offset | PAGE | CONTINUE)`` header and the page) with scattering
reads straight into the cache pages, checks each header once it has
arrived and stops the run at the first that differs. The bytes read past
the run are gathered, every cache page they passed through gets its
``ram`` content back, the whole ``ZERO | CONTINUE`` and ``PAGE |
CONTINUE`` records of the block among them are applied, and a new run is
predicted after the last; any other record ends the call with the bytes
from there on in ``spill``. Same results and errors as the compiled kernel.
"""

from __future__ import annotations

import errno
import os
import select

from qmigx.errors import RamStreamError

__all__ = ["receive_pages", "MAX_RUN", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED"]

DONE, END, STOPPED, TIMEOUT, FAILED = 0, 1, 2, 3, 5
MAX_RUN = 512
_READ_RUN = 32  # records per scattering read: a bad guess costs what was read past it
_F_ZERO, _F_PAGE, _F_CONTINUE = 0x02, 0x08, 0x20
_MAX_PREFIX = 1 << 16
_IOV_MAX = 1024


def _wait(fd: int, wake: int, timeout_ms: int) -> int | None:
    """None when ``fd`` is readable, else STOPPED or TIMEOUT."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake, select.POLLIN)
    ready = dict(poller.poll(None if timeout_ms < 0 else timeout_ms))
    if ready.get(wake):
        return STOPPED
    return None if ready else TIMEOUT


class _Loop:
    def __init__(self, fd, wake, timeout_ms, page_size, dest, ram, dirty, received) -> None:
        self.fd, self.wake, self.timeout_ms = fd, wake, timeout_ms
        self.ps = page_size
        self.dest, self.ram, self.dirty, self.received = dest, ram, dirty, received
        self.err = 0

    def window(self, page: int) -> int:
        n = 0
        while n < _READ_RUN and page + n < len(self.dirty) and not self.dirty[page + n]:
            n += 1
        return n

    def run(self, first: int, count: int, pre: bytes) -> tuple[int, bytes, int]:
        """Records of pages ``first ..`` into place: ``(good, bytes after them, status)``."""
        ps, rec = self.ps, self.ps + 8
        total = count * rec
        hdrs = [bytearray(8) for _ in range(count)]
        bufs: list = []
        for j in range(count):
            at = (first + j) * ps
            bufs += [memoryview(hdrs[j]), self.dest[at : at + ps]]

        def view_at(pos: int) -> tuple[int, memoryview]:
            r, within = divmod(pos, rec)
            if within < 8:
                return 2 * r, bufs[2 * r][within:]
            return 2 * r + 1, bufs[2 * r + 1][within - 8 :]

        def move(pos: int, n: int, out: bytearray | None, src: bytes | None) -> None:
            done = 0
            while done < n:
                _, v = view_at(pos + done)
                k = min(len(v), n - done)
                if out is not None:
                    out += v[:k]
                else:
                    v[:k] = src[done : done + k]
                done += k

        placed = min(len(pre), total)
        move(0, placed, None, pre)
        got, good, status = placed, 0, DONE
        mismatch = False
        while True:
            while good < count and got >= good * rec + 8:
                want = (((first + good) * ps) | _F_PAGE | _F_CONTINUE).to_bytes(8, "big")
                if bytes(hdrs[good]) != want:
                    mismatch = True
                    break
                if got >= (good + 1) * rec:
                    good += 1
                else:
                    break
            if mismatch or good == count:
                break
            j, head = view_at(got)
            try:
                k = os.readv(self.fd, [head] + bufs[j + 1 : j + _IOV_MAX])
            except BlockingIOError:
                st = _wait(self.fd, self.wake, self.timeout_ms)
                if st is not None:
                    status = st
                    break
                continue
            except InterruptedError:
                continue
            except OSError as e:
                self.err = e.errno or errno.EIO
                status = FAILED
                break
            if k == 0:
                status = END
                break
            got += k
        for j in range(good):
            self.mark(first + j)
        after = bytearray()
        move(good * rec, got - good * rec, after, None)
        after += pre[placed:]
        for j in range(good, count):
            if got > j * rec + 8:
                at = (first + j) * ps
                self.dest[at : at + ps] = self.ram[at : at + ps]
        return good, bytes(after), status

    def mark(self, page: int) -> None:
        self.dirty[page] = 1
        self.received[page] = 1


def receive_pages(fd: int, wake: int, dest, ram, dirty, received, first_page: int, prefix,
                  spill, page_size: int = 4096,
                  timeout: float | None = None) -> tuple[int, int, int, int, int]:
    """See the compiled kernel: ``(pages, used, spilled, status, err)``."""
    d = memoryview(dest).cast("B")
    r = memoryview(ram).cast("B")
    dm = memoryview(dirty).cast("B")
    rm = memoryview(received).cast("B")
    pre = bytes(memoryview(prefix).cast("B"))
    s = memoryview(spill).cast("B")
    if page_size <= 0 or page_size % 8 or page_size & (page_size - 1):
        raise RamStreamError(f"page size {page_size} is not a power of 2 of at least 8",
                             field="page_size")
    npages = len(dm)
    rec = page_size + 8
    if len(d) < npages * page_size or len(r) < npages * page_size or len(rm) < npages:
        raise RamStreamError(f"a block of {npages} pages does not fit its cache ({len(d)} "
                             f"bytes), RAM ({len(r)}) or received bitmap ({len(rm)})",
                             field="block")
    if not 0 <= first_page <= npages:
        raise RamStreamError(f"page {first_page} lies outside the block ({npages} pages)",
                             field="offset")
    if len(pre) > _MAX_PREFIX or len(s) < (MAX_RUN + 1) * rec + len(pre):
        raise RamStreamError(f"spill of {len(s)} bytes for a prefix of {len(pre)}: "
                             f"{(MAX_RUN + 1) * rec + len(pre)} needed", field="spill")
    loop = _Loop(fd, wake, -1 if timeout is None else max(0, int(timeout * 1000)), page_size,
                 d, r, dm, rm)
    mask = page_size - 1
    stored, used, page, status = 0, 0, first_page, DONE
    rest = pre
    while True:
        count = loop.window(page)
        if count == 0:
            break
        good, rest, status = loop.run(page, count, rest)
        stored += good
        used += good * rec
        page += good
        if status != DONE:
            break
        pos, stop = 0, False
        while len(rest) - pos >= 8:
            h = int.from_bytes(rest[pos : pos + 8], "big")
            flags, pg = h & mask, (h & ~mask) // page_size
            if pg >= npages or flags not in (_F_ZERO | _F_CONTINUE, _F_PAGE | _F_CONTINUE):
                stop = True
                break
            at = pg * page_size
            if flags & _F_ZERO:
                if len(rest) - pos < 9:
                    break
                if rest[pos + 8]:
                    stop = True  # the parser applies the fill rule of the stream's version
                    break
                d[at : at + page_size] = bytes(page_size)
                pos += 9
            else:
                if len(rest) - pos < rec:
                    break
                d[at : at + page_size] = rest[pos + 8 : pos + rec]
                pos += rec
            loop.mark(pg)
            stored += 1
            page = pg + 1
        rest = rest[pos:]
        used += pos
        if stop:
            break
        progress = good > 0 or pos > 0
        if len(rest) >= 8:
            h = int.from_bytes(rest[:8], "big")
            pg = (h & ~mask) // page_size
            if h & mask == _F_PAGE | _F_CONTINUE and pg < npages and not dm[pg]:
                page = pg
                progress = True
        if not progress:
            break
    s[: len(rest)] = rest
    return stored, used, len(rest), status, loop.err
