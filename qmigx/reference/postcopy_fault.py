"""Plain-Python twin of ``qmigx._core.postcopy_fault``: the readable reference.

``serve_faults`` reads the userfaultfd's page-fault events and, for each
host page neither received nor asked for yet, stamps ``asked_at`` and
writes REQ_PAGES (same block as the previous request) or REQ_PAGES_ID to
the return path under its lock. Same results as the compiled loop.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import time

from qmigx.reference.fdwait import WAIT_READY, WAIT_STOPPED, wait_fd

__all__ = ["serve_faults", "STOPPED", "CLOSED", "READ_FAILED", "WRITE_FAILED", "PAGE_SIZE",
           "REQ_PAGES", "REQ_PAGES_ID"]

STOPPED, CLOSED, READ_FAILED, WRITE_FAILED = 2, 3, 5, 6
PAGE_SIZE = 4096
REQ_PAGES_ID, REQ_PAGES = 3, 4
_MSG = struct.Struct("=BBHIQQI")  # struct uffd_msg, pagefault arm (32 bytes with padding)
_MSG_SIZE = 32
_EVENT_PAGEFAULT = 0x12


def _request(block: int, last: int, name: bytes, host: int, host_page: int) -> bytes:
    if block == last:
        return struct.pack(">HHQI", REQ_PAGES, 12, host, host_page)
    return struct.pack(">HHQIB", REQ_PAGES_ID, 13 + len(name), host, host_page,
                       len(name)) + name


def _write_all(fd: int, wake: int, data: bytes) -> tuple[bool, int]:
    """``(True, 0)`` when all went out, else ``(False, errno)``: 0 when ``wake`` fired
    while the socket was full (the channel was shut down), as the compiled loop says."""
    view = memoryview(data)
    while view:
        try:
            k = os.write(fd, view)
        except BlockingIOError:
            st, err = wait_fd(fd, select.POLLOUT, wake, -1)
            if st != WAIT_READY:
                return False, err
            continue
        except InterruptedError:
            continue
        except OSError as e:
            return False, e.errno or errno.EIO
        view = view[k:]
    return True, 0


def serve_faults(uffd: int, stop: int, blocks: list, lock, state) -> tuple[int, int]:
    """Ask for every faulting page until stopped, the return path closes, or I/O fails."""
    if len(state) < 3:
        raise ValueError("state needs 3 slots")
    if lock.fd < 0:
        raise ValueError("the return path has no socket for a compiled writer")
    for i, (name, _addr, length, host_page, received, asked_at) in enumerate(blocks):
        if not 0 < len(name) < 256:
            raise ValueError(f"block {i}: a name of 1-255 bytes")
        if host_page < PAGE_SIZE or host_page % PAGE_SIZE:
            raise ValueError(f"block {i}: host page size {host_page}")
        if len(received) != len(asked_at) or len(received) * PAGE_SIZE < length:
            raise ValueError(f"block {i}: received/asked_at do not cover it")
    while True:
        st, err = wait_fd(uffd, select.POLLIN, stop, -1)
        if st == WAIT_STOPPED:
            return STOPPED, 0
        if st != WAIT_READY:
            return READ_FAILED, err
        try:
            data = os.read(uffd, _MSG_SIZE * 64)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as e:
            return READ_FAILED, e.errno or errno.EIO
        closed = False
        for k in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            event, _, _, _, _flags, addr, _ptid = _MSG.unpack_from(data, k)
            if event != _EVENT_PAGEFAULT:
                continue
            for i, (name, base, length, host_page, received, asked_at) in enumerate(blocks):
                if base <= addr < base + length:
                    break
            else:
                continue
            host = (addr - base) // host_page * host_page
            idx = host // PAGE_SIZE
            state[0] += 1
            if received[idx] or asked_at[idx] > 0:
                continue
            asked_at[idx] = time.monotonic()
            state[1] += 1
            with lock:
                if lock.closed:
                    closed = True
                    continue
                ok, err = _write_all(lock.fd, lock.wake, _request(i, int(state[2]), bytes(name),
                                                                  host, host_page))
                if ok:
                    lock.sent += 1
                    state[2] = i
            if not ok:
                return WRITE_FAILED, err
        if closed:
            return CLOSED, 0
