"""Plain-Python twin of ``qmigx._core.pagesend``: the readable reference.

``send_pages`` writes pages of one block as CONTINUE records (a zero page
as ``be64(offset | ZERO | CONTINUE) + 0x00``, any other as ``be64(offset
| PAGE | CONTINUE)`` and the page) with gathering writes whose buffers are
the headers and the pages themselves, ``CHUNK`` records at a time. Same
bytes, results and errors as the compiled kernel. ``send_file`` writes a
header, then a range of a file with ``os.sendfile``.
"""

from __future__ import annotations

import errno
import os
import select

import numpy as np

from qmigx.errors import RamStreamError

__all__ = ["send_pages", "send_file", "CHUNK", "DONE", "STOPPED", "TIMEOUT", "FAILED", "SHORT"]

DONE, STOPPED, TIMEOUT, FAILED, SHORT = 0, 2, 3, 5, 6
CHUNK = 512
_F_ZERO, _F_PAGE, _F_CONTINUE = 0x02, 0x08, 0x20


def _wait_writable(fd: int, wake: int, timeout_ms: int) -> int | None:
    """None once ``fd`` is writable, else STOPPED or TIMEOUT."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.register(wake, select.POLLIN)
    ready = dict(poller.poll(None if timeout_ms < 0 else timeout_ms))
    if ready.get(wake):
        return STOPPED
    if not ready:
        return TIMEOUT
    return None


def _write_all(fd: int, wake: int, timeout_ms: int, bufs: list) -> tuple[int, int | None, int]:
    """Write every buffer; ``(bytes written, status or None when done, errno)``."""
    done = 0
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        try:
            k = os.writev(fd, views)
        except BlockingIOError:
            status = _wait_writable(fd, wake, timeout_ms)
            if status is not None:
                return done, status, 0
            continue
        except InterruptedError:
            continue
        except OSError as e:
            return done, FAILED, e.errno or errno.EIO
        done += k
        while views and k >= len(views[0]):
            k -= len(views[0])
            views.pop(0)
        if k:
            views[0] = views[0][k:]
    return done, None, 0


def send_pages(fd: int, wake: int, mem, pages, page_size: int = 4096,
               timeout: float | None = None) -> tuple[int, int, int, int, int]:
    """See the compiled kernel: ``(nbytes, zero_pages, normal_pages, status, err)``."""
    m = memoryview(mem).cast("B")
    pg = [int(p) for p in np.asarray(pages, np.int64)]
    timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    if page_size <= 0 or page_size % 8:
        raise RamStreamError(f"page size {page_size} is not a positive multiple of 8",
                             field="page_size")
    npages_mem = len(m) // page_size
    for p in pg:
        if not 0 <= p < npages_mem:
            raise RamStreamError(f"page {p} lies outside the block ({npages_mem} pages)",
                                 field="offset")
    nbytes = zeros = normal = 0
    for lo in range(0, len(pg), CHUNK):
        bufs: list = []
        czeros = cnormal = 0
        for p in pg[lo : lo + CHUNK]:
            page = m[p * page_size : (p + 1) * page_size]
            if not any(page.cast("Q") if page_size % 8 == 0 else page):
                head = ((p * page_size) | _F_ZERO | _F_CONTINUE).to_bytes(8, "big") + b"\0"
                czeros += 1
                tail = None
            else:
                head = ((p * page_size) | _F_PAGE | _F_CONTINUE).to_bytes(8, "big")
                cnormal += 1
                tail = page
            if bufs and isinstance(bufs[-1], bytearray):
                bufs[-1] += head  # headers one after another: one buffer
            else:
                bufs.append(bytearray(head))
            if tail is not None:
                bufs.append(tail)
        k, status, err = _write_all(fd, wake, timeout_ms, bufs)
        nbytes += k
        if status is not None:
            return nbytes, zeros, normal, status, err
        zeros += czeros
        normal += cnormal
    return nbytes, zeros, normal, DONE, 0


def send_file(fd: int, wake: int, head, src_fd: int, offset: int, count: int,
              timeout: float | None = None) -> tuple[int, int, int]:
    """See the compiled kernel: ``(nbytes, status, err)``."""
    timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    if offset < 0 or count < 0:
        raise RamStreamError(f"file range {offset}+{count} is negative", field="offset")
    nbytes = 0
    if len(head):
        nbytes, status, err = _write_all(fd, wake, timeout_ms, [head])
        if status is not None:
            return nbytes, status, err
    while count > 0:
        try:
            k = os.sendfile(fd, src_fd, offset, min(count, 1 << 30))
        except BlockingIOError:
            status = _wait_writable(fd, wake, timeout_ms)
            if status is not None:
                return nbytes, status, 0
            continue
        except InterruptedError:
            continue
        except OSError as e:
            return nbytes, FAILED, e.errno or errno.EIO
        if k == 0:
            return nbytes, SHORT, 0
        nbytes += k
        offset += k
        count -= k
    return nbytes, DONE, 0
