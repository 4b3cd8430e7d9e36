"""Plain-Python twin of :mod:`qmigx._core.multifd_send` (a test oracle)."""

from __future__ import annotations

import os
import select

import numpy as np

from qmigx.reference.fdwait import WAIT_READY, consume, wait_fd
from qmigx.reference.multifd_packet import header_size, pack_packet_header

__all__ = ["send_packets", "DONE", "STOPPED", "TIMEOUT", "FAILED"]

DONE, STOPPED, TIMEOUT, FAILED = 0, 2, 3, 5


class _Stop(Exception):
    def __init__(self, status: int, done: int, err: int = 0) -> None:
        self.status = status
        self.done = done
        self.err = err


def _write_all(fd: int, wake: int, timeout_ms: int, views: list) -> int:
    done = 0
    while views:
        try:
            k = os.writev(fd, views)
        except BlockingIOError:
            status, err = wait_fd(fd, select.POLLOUT, wake, timeout_ms)
            if status != WAIT_READY:
                raise _Stop(status, done, err) from None
            continue
        except InterruptedError:
            continue
        except OSError as e:
            raise _Stop(FAILED, done, e.errno or 0) from None
        done += k
        consume(views, k)
    return done


def send_packets(fd: int, wake: int, header, name, rows, index, offsets, page_size: int,
                 pages_alloc: int, packet_num: int, flags: int, timeout, is_socket: bool = True):
    """See :func:`qmigx._core.multifd_send.send_packets`."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    if pages_alloc <= 0 or pages_alloc > 1024:
        raise ValueError(f"pages_alloc {pages_alloc} out of range")
    idx = np.asarray(index, np.int64)
    offs = np.asarray(offsets, np.uint64)
    if len(offs) != len(idx):
        raise ValueError(f"{len(idx)} rows but {len(offs)} offsets")
    name = bytes(name)
    if len(name) >= 256 or b"\0" in name:
        raise ValueError("ramblock name must be shorter than 256 bytes, without NUL")
    h = memoryview(header).cast("B")
    hsize = header_size(pages_alloc)
    if len(h) < hsize:
        raise ValueError(f"header buffer of {len(h)} bytes, {hsize} needed")
    data = memoryview(rows).cast("B")
    nrows = len(data) // page_size
    if len(idx) and (idx.min() < 0 or idx.max() >= nrows):
        raise IndexError(f"row outside the {nrows} rows given")
    timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    packets = nbytes = 0
    try:
        for lo in range(0, len(idx), pages_alloc):
            sel = idx[lo : lo + pages_alloc]
            pack_packet_header(h, flags=flags, pages_alloc=pages_alloc,
                               next_packet_size=len(sel) * page_size, packet_num=packet_num + packets,
                               ramblock=name, normal_pages=len(sel),
                               offsets=offs[lo : lo + pages_alloc])
            views = [h[:hsize]] + [data[int(r) * page_size : (int(r) + 1) * page_size] for r in sel]
            nbytes += _write_all(fd, wake, timeout_ms, views)
            packets += 1
    except _Stop as stop:
        return (stop.status, packets, nbytes + stop.done, stop.err)
    return (DONE, packets, nbytes, 0)
