"""Plain-Python twin of ``qmigx._core.pagesend``: the readable reference.

``send_pages`` writes pages of one block as CONTINUE records (a zero page
as ``be64(offset | ZERO | CONTINUE) + 0x00``, any other as ``be64(offset
| PAGE | CONTINUE)`` and the page) with gathering writes whose buffers are
the headers and the pages themselves, ``CHUNK`` records at a time. Same
bytes, results and errors as the compiled kernel.
"""

from __future__ import annotations

import errno
import os
import select

import numpy as np

from qmigx.errors import RamStreamError

__all__ = ["send_pages", "CHUNK", "DONE", "STOPPED", "TIMEOUT", "FAILED"]

DONE, STOPPED, TIMEOUT, FAILED = 0, 2, 3, 5
CHUNK = 512
_F_ZERO, _F_PAGE, _F_CONTINUE = 0x02, 0x08, 0x20


def _write_all(fd: int, wake: int, timeout_ms: int, bufs: list) -> tuple[int, int | None, int]:
    """Write every buffer; ``(bytes written, status or None when done, errno)``."""
    done = 0
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        try:
            k = os.writev(fd, views)
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.register(wake, select.POLLIN)
            ready = dict(poller.poll(None if timeout_ms < 0 else timeout_ms))
            if ready.get(wake):
                return done, STOPPED, 0
            if not ready:
                return done, TIMEOUT, 0
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
