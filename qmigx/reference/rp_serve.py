"""Plain-Python twin of ``qmigx._core.rp_serve``: the readable reference.

``serve_requests`` reads the postcopy source's return path and serves
each REQ_PAGES / REQ_PAGES_ID of a known block itself: it takes each
page's dirty bit under ``take_lock`` and writes each page taken as a bare
record (``be64 offset|PAGE[|CONTINUE]``, the block name unless CONTINUE,
4 KiB of guest memory) to the preempt channel under its lock. Anything
else (another message type, an unknown block, a range QEMU refuses, a
page whose chunk still has its dirty log to clear) it leaves at ``pos``
with DONE for the Python decoder. Same results as the compiled kernel.
"""

from __future__ import annotations

import errno
import operator
import os
import select
import socket
import struct
import time

import numpy as np

from qmigx.reference.fdwait import WAIT_FAILED, WAIT_READY, consume, wait_fd

__all__ = ["serve_requests", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED", "WRITE_FAILED",
           "PAGE_SIZE", "MIN_BUFFER", "STATE_SLOTS"]

#: a message for Python is at ``pos``
DONE = 0
#: the peer closed the return path
END = 1
#: the return path was shut down
STOPPED = 2
#: ``timeout_ms`` passed with nothing to read, or the loop ran that long: Python's turn
TIMEOUT = 3
#: reading the return path failed (``err``)
FAILED = 5
#: writing the preempt channel failed (``err``)
WRITE_FAILED = 6

PAGE_SIZE = 4096
_PAGE_SHIFT = 12
_REQ_PAGES_ID, _REQ_PAGES = 3, 4
_F_PAGE, _F_CONTINUE = 0x08, 0x20
#: the smallest ``buf`` the loop accepts (a whole message of the largest length)
MIN_BUFFER = 4 + 65535
#: ``state``: last request's block, last record's block, pages sent, requests served, bytes read
STATE_SLOTS = 5


def _words(x, codes: str, what: str, writable: bool) -> np.ndarray:
    """``x`` as a 1-D array of 8-byte integers sharing its memory, refused as the
    compiled kernel's typed memoryview refuses it."""
    m = memoryview(x)
    if m.ndim != 1:
        raise ValueError(f"Buffer has wrong number of dimensions (expected 1, got {m.ndim})")
    if m.itemsize != 8 or m.format.lstrip("@=<") not in codes:
        raise ValueError(f"Buffer dtype mismatch, expected '{what}' but got {m.format!r}")
    if not m.c_contiguous:
        raise ValueError("ndarray is not C-contiguous")
    if writable and m.readonly:
        raise ValueError("buffer source array is read-only")
    return np.asarray(m)


def _write_all(fd: int, wake: int, views: list) -> tuple[int, int]:
    """Every byte of ``views`` to ``fd``: ``(WAIT_READY, 0)``, or why not and the errno.

    As ``write_all`` of ``qmigx/_core/fdwait.pxd``: ``sendmsg`` with
    MSG_NOSIGNAL on a socket (a closed peer is EPIPE, not SIGPIPE),
    ``writev`` on anything else; a full socket waits for room or ``wake``.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        sock = None  # not a socket
    views = [memoryview(v).cast("B") for v in views]
    try:
        while views:
            try:
                if sock is not None:
                    k = sock.sendmsg(views, (), socket.MSG_NOSIGNAL)
                else:
                    k = os.writev(fd, views)
            except BlockingIOError:
                st, err = wait_fd(fd, select.POLLOUT, wake, -1)
                if st != WAIT_READY:
                    return st, err
                continue
            except InterruptedError:
                continue
            except OSError as e:
                return WAIT_FAILED, e.errno or errno.EIO
            consume(views, k)
    finally:
        if sock is not None:
            sock.detach()
    return WAIT_READY, 0


def _table(blocks: list) -> list:
    """``(name, words, armed, shift, ram, npages)`` per block, checked as the compiled loop does."""
    out = []
    for i, (name, words, armed, shift, ram) in enumerate(blocks):
        nm = bytes(memoryview(name).cast("B"))
        wd = _words(words, "LQ", "uint64_t", True)
        ar = _words(armed, "LQ", "const uint64_t", False)
        rm = memoryview(ram).cast("B")
        if not 0 < len(nm) < 256:
            raise ValueError(f"block {i}: a name of 1-255 bytes")
        npages = len(rm) // PAGE_SIZE
        if len(wd) * 64 < npages or not 0 <= shift < 63 or \
                len(ar) * 64 < (npages + (1 << shift) - 1) >> shift:  # its chunks
            raise ValueError(f"block {i}: its bitmaps do not cover it")
        out.append((nm, wd, ar, shift, rm, npages))
    return out


def _serve(blk: int, start: int, length: int, table: list, take_lock, out,
           state: np.ndarray) -> tuple[bool, int, int]:
    """One request of a known block: ``(served, status, err)``; not served: Python's."""
    name, words, armed, shift, ram, npages = table[blk]
    if start & (PAGE_SIZE - 1) or length == 0 or start + length > npages * PAGE_SIZE:
        return False, DONE, 0  # QEMU refuses it: Python raises
    first = start >> _PAGE_SHIFT
    last = (start + length - 1) >> _PAGE_SHIFT
    for chunk in range(first >> shift, (last >> shift) + 1):
        if (int(armed[chunk >> 6]) >> (chunk & 63)) & 1:
            return False, DONE, 0  # the dirty log is cleared by Python first
    for p in range(first, last + 1):
        bit = 1 << (p & 63)
        with take_lock:
            w = int(words[p >> 6])
            took = bool(w & bit)
            if took:
                words[p >> 6] = w & ~bit
        if not took:
            continue
        with out:
            if out.closed:
                continue  # dropped, as the Python writer drops it
            if state[1] == blk:
                head = struct.pack(">Q", (p << _PAGE_SHIFT) | _F_PAGE | _F_CONTINUE)
            else:
                head = struct.pack(">QB", (p << _PAGE_SHIFT) | _F_PAGE, len(name)) + name
            st, err = _write_all(out.fd, out.wake,
                                 [head, ram[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]])
            if st == WAIT_READY:
                state[1] = blk
                out.sent += 1
                state[2] += 1
        if st != WAIT_READY:
            return False, WRITE_FAILED, err
    state[0] = blk
    state[3] += 1
    return True, DONE, 0


def serve_requests(fd: int, wake: int, buf, have: int, blocks: list, take_lock, out, state,
                   timeout_ms: int) -> tuple[int, int, int, int]:
    """Serve page requests until a message needs Python, the path ends, or ``timeout_ms``.

    Arguments and result as the compiled kernel's: ``blocks`` holds
    ``(name, words, armed, clear_shift, ram)`` per RAM block, ``buf[:have]``
    bytes read and not decoded, ``out.fd`` the preempt channel, ``state``
    the :data:`STATE_SLOTS` counters. Returns ``(status, pos, have, err)``.
    """
    if not isinstance(blocks, list):
        raise TypeError(f"Argument 'blocks' has incorrect type (expected list, got "
                        f"{type(blocks).__name__})")
    for arg, lock in (("take_lock", take_lock), ("out", out)):
        if lock is None:  # the compiled kernel's typed ``WireLock ... not None``
            raise TypeError(f"Argument '{arg}' must be a WireLock, not None")
    state = _words(state, "lq", "int64_t", True)
    have = operator.index(have)
    b = memoryview(buf).cast("B")
    if b.readonly:
        raise BufferError("memoryview: underlying buffer is not writable")
    cap = len(b)
    if cap < MIN_BUFFER:
        raise ValueError(f"buf must hold at least {MIN_BUFFER} bytes")
    if not 0 <= have <= cap:
        raise ValueError("have is outside buf")
    if len(state) < STATE_SLOTS:
        raise ValueError(f"state needs {STATE_SLOTS} slots")
    if out.fd < 0:
        raise ValueError("the preempt channel has no socket for a compiled writer")
    n = len(blocks)
    if not -1 <= state[0] < n or not -1 <= state[1] < n:
        raise ValueError("state names no block of blocks")
    table = _table(blocks)
    names = [e[0] for e in table]
    pos, status, err = 0, DONE, 0
    t_end = time.monotonic() + timeout_ms * 1e-3
    sock = None
    try:
        while True:
            need = 4
            if have - pos >= 4:
                typ, ln = struct.unpack_from(">HH", b, pos)
                need = 4 + ln
                if have - pos >= need:
                    if typ == _REQ_PAGES and ln == 12:
                        blk = int(state[0])
                    elif typ == _REQ_PAGES_ID and ln >= 13 and ln == 13 + b[pos + 16]:
                        name = bytes(b[pos + 17 : pos + 17 + b[pos + 16]])
                        blk = names.index(name) if name in names else -1
                    else:
                        break  # another message: Python's
                    if blk < 0:
                        break  # no block, or an unknown one: Python says so
                    start, length = struct.unpack_from(">QI", b, pos + 4)
                    served, status, err = _serve(blk, start, length, table, take_lock, out, state)
                    if not served:
                        break
                    pos += need
                    if timeout_ms >= 0 and time.monotonic() > t_end:
                        status = TIMEOUT
                        break
                    continue
            # short of `need` bytes: make room and read
            if pos == have:
                pos = have = 0
            elif cap - pos < need:
                b[: have - pos] = b[pos:have]
                have -= pos
                pos = 0
            try:
                if sock is None:
                    if fd < 0:
                        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                    sock = socket.socket(fileno=fd)
                got = sock.recv_into(b[have:], cap - have, socket.MSG_DONTWAIT)
            except InterruptedError:
                continue
            except BlockingIOError:
                w, err = wait_fd(fd, select.POLLIN, wake, timeout_ms)
                if w == WAIT_READY:
                    continue
                status = w  # STOPPED, TIMEOUT or FAILED: the same codes
                break
            except OSError as e:
                status, err = FAILED, e.errno or errno.EIO
                break
            if got == 0:
                status = END
                break
            have += got
            state[4] += got
    finally:
        if sock is not None:
            sock.detach()
    return status, pos, have, err
