"""Plain-Python twin of ``qmigx._core.preempt_recv``: the readable reference.

``place_records`` reads the preempt channel's bare page records and places
each PAGE or ZERO record of a known 4 KiB-page block with ``UFFDIO_COPY``,
marking it received and stamping ``placed_at`` with ``time.monotonic()``.
It stops, leaving the record untouched at ``pos``, at anything else (EOS,
a compressed page, an unknown block, a page out of range or placed twice,
a failed copy) for the Python decoder. Same results as the compiled kernel.
"""

from __future__ import annotations

import errno
import socket
import fcntl
import struct
import time

import numpy as np

from qmigx.reference.fdwait import WAIT_READY, WAIT_STOPPED, wait_fd

__all__ = ["place_records", "DONE", "END", "STOPPED", "FAILED", "PAGE_SIZE", "MIN_BUFFER"]

DONE, END, STOPPED, FAILED = 0, 1, 2, 5
PAGE_SIZE = 4096
_F_ZERO, _F_PAGE, _F_CONTINUE = 0x02, 0x08, 0x20
MIN_BUFFER = 2 * (8 + 1 + 255 + PAGE_SIZE)
#: UFFDIO_COPY, _IOWR(0xAA, 0x03, struct uffdio_copy of 40 bytes), and that struct
_UFFDIO_COPY = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03
_COPY_ARG = struct.Struct("=QQQQq")


def _uffd_copy(ufd: int, dst: int, src: int) -> None:
    """One page by ``UFFDIO_COPY`` (as the kernel loop does; OSError on failure)."""
    fcntl.ioctl(ufd, _UFFDIO_COPY, bytearray(_COPY_ARG.pack(dst, src, PAGE_SIZE, 0, 0)), True)


def _decode(b, pos: int, have: int, blocks: list, cur: int):
    """``(need, None)`` if more bytes are needed, ``(0, None)`` if Python's, else ``(need, (blk, off, payload))``."""
    if have - pos < 8:
        return 8, None
    h = struct.unpack_from(">Q", b, pos)[0]
    flags, off = h & 0xFFF, h & ~0xFFF
    kind = flags & (_F_ZERO | _F_PAGE)
    if flags & ~(_F_ZERO | _F_PAGE | _F_CONTINUE) or kind not in (_F_ZERO, _F_PAGE):
        return 0, None
    p = pos + 8
    if flags & _F_CONTINUE:
        if cur < 0:
            return 0, None
        blk = cur
    else:
        if have - pos < 9:
            return 9, None
        k = b[p]
        if have - pos < 9 + k:
            return 9 + k, None
        name = bytes(b[p + 1 : p + 1 + k])
        blk = next((i for i, e in enumerate(blocks) if bytes(e[0]) == name), -1)
        if blk < 0:
            return 0, None
        p += 1 + k
    need = p - pos + (PAGE_SIZE if kind == _F_PAGE else 1)
    if have - pos < need:
        return need, None
    payload = bytes(b[p : p + PAGE_SIZE]) if kind == _F_PAGE else bytes([b[p]]) * PAGE_SIZE
    return need, (blk, off, payload)


def place_records(fd: int, wake: int, ufd: int, blocks: list, cur: int, buf, have: int) -> tuple:
    """Read and place records until one needs Python, the channel ends, stops or fails."""
    b = memoryview(buf).cast("B")
    cap = len(b)
    if cap < MIN_BUFFER:
        raise ValueError(f"buf must hold at least {MIN_BUFFER} bytes")
    if not 0 <= have <= cap:
        raise ValueError("have is outside buf")
    if not -1 <= cur < len(blocks):
        raise ValueError("cur is not an index of blocks")
    for i, (name, _addr, length, received, placed_at) in enumerate(blocks):
        if not len(name):
            raise ValueError(f"block {i} has no name")
        if len(received) != len(placed_at) or len(received) * PAGE_SIZE < length:
            raise ValueError(f"received/placed_at of block {i} do not cover it")
    pos = pages = nread = 0
    status, err = DONE, 0
    sock = socket.socket(fileno=fd)
    try:
        while True:
            need, rec = _decode(b, pos, have, blocks, cur)
            if need == 0:
                break
            if rec is not None:
                blk, off, payload = rec
                _name, addr, length, received, placed_at = blocks[blk]
                idx = off // PAGE_SIZE
                if off + PAGE_SIZE > length or received[idx]:
                    break
                try:
                    src = np.frombuffer(payload, np.uint8)
                    _uffd_copy(ufd, addr + off, int(src.ctypes.data))
                except OSError:
                    break
                received[idx] = True
                placed_at[idx] = time.monotonic()
                pages += 1
                cur = blk
                pos += need
                continue
            if pos == have:
                pos = have = 0
            elif cap - pos < need or cap - have < 4096:
                b[: have - pos] = b[pos:have]
                have -= pos
                pos = 0
            try:
                got = sock.recv_into(b[have:], cap - have, socket.MSG_DONTWAIT)
            except InterruptedError:
                continue
            except BlockingIOError:
                w, err = wait_fd(fd, 1, wake, -1)  # POLLIN
                if w == WAIT_READY:
                    continue
                status = STOPPED if w == WAIT_STOPPED else FAILED
                break
            except OSError as e:
                status, err = FAILED, e.errno or errno.EIO
                break
            if got == 0:
                status = END
                break
            have += got
            nread += got
    finally:
        sock.detach()
    return status, pos, have, cur, pages, nread, err
