# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The postcopy destination's preempt channel read and placed without the GIL.

Requested pages are what a faulting thread waits for. Read by a Python
thread, each one first waits for the GIL, which the loader, the fault
thread and anything else in the process hold in turn: measured, that
wait was most of a request's latency. This loop reads the channel's bare
records (``be64 offset|flags``, the block name unless CONTINUE, then a
4 KiB page or a fill byte) and places each page with ``UFFDIO_COPY``
straight from its receive buffer, marking it received and stamping
``placed_at`` (``CLOCK_MONOTONIC``, the clock of ``time.monotonic``) so
the Python side can work out the request's latency later.

Only the common case is handled here: PAGE and ZERO records of blocks in
``blocks`` (4 KiB host pages), inside the block, not placed yet. At any
other record (EOS, a compressed page, an unknown or huge-page block, a
page out of range or placed twice, a failed ``UFFDIO_COPY``) it returns
``DONE`` with ``pos`` at that record, untouched, and the Python decoder
takes over from there, errors and all. ``qmigx.reference.preempt_recv``
is the plain-Python twin.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memmove, memset
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from qmigx._core.byteorder cimport load_be64
from qmigx._core.fdwait cimport POLLIN, monotonic_now, recv_nowait, wait_fd

__all__ = ["place_records", "DONE", "END", "STOPPED", "FAILED", "PAGE_SIZE", "MIN_BUFFER"]

cdef extern from *:
    """
    #include <errno.h>
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <sys/socket.h>
    #include <time.h>

    #define QPR_UFFDIO_COPY 0xC028AA03UL  /* _IOWR(0xAA, 0x03, 40) */

    /* One UFFDIO_COPY of len bytes; 0 or an errno. */
    static int qpr_copy(int uffd, uint64_t dst, const void *src, uint64_t len) {
        uint64_t arg[5];
        for (;;) {
            arg[0] = dst; arg[1] = (uint64_t)(uintptr_t)src; arg[2] = len; arg[3] = 0; arg[4] = 0;
            if (ioctl(uffd, QPR_UFFDIO_COPY, arg) == 0) return 0;
            if (errno == EAGAIN || errno == EINTR) continue;  /* mm changing under us */
            return errno;
        }
    }
    """
    int qpr_copy(int uffd, uint64_t dst, const void* src, uint64_t length) nogil

cdef enum Status:
    S_DONE = 0
    S_END = 1
    S_STOPPED = 2
    S_FAILED = 5

#: a record for the Python decoder is at ``pos``
DONE = S_DONE
#: the peer closed the channel (``buf[pos:have]`` is what was left of a record)
END = S_END
#: the channel was shut down (its wake descriptor fired)
STOPPED = S_STOPPED
#: a read failed (``err`` is its errno)
FAILED = S_FAILED

cdef enum:
    _PAGE = 4096
    _F_ZERO = 0x02
    _F_PAGE = 0x08
    _F_CONTINUE = 0x20
    _F_MASK = 0xFFF
    _MAX_RECORD = 8 + 1 + 255 + _PAGE

PAGE_SIZE = _PAGE
#: the smallest ``buf`` the loop accepts (room for two whole records)
MIN_BUFFER = 2 * _MAX_RECORD

cdef struct Block:
    const uint8_t* name
    Py_ssize_t name_len
    uint64_t addr
    uint64_t length
    uint8_t* received
    double* placed_at
    Py_ssize_t npages

cdef Py_ssize_t _find(Block* t, Py_ssize_t n, const uint8_t* name, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if t[i].name_len == k and memcmp(t[i].name, name, k) == 0:
            return i
    return -1


def place_records(int fd, int wake, int uffd, list blocks, Py_ssize_t cur, buf, Py_ssize_t have):
    """Read and place records until one needs Python, the channel ends, stops or fails.

    ``blocks``: ``(name, address, length, received, placed_at)`` per block
    this loop may place into (``received``: one bool per 4 KiB page,
    ``placed_at``: one float64 per page). ``cur``: index of the block a
    CONTINUE record means (-1: none). ``buf[:have]`` holds bytes already
    read and not yet decoded. Returns ``(status, pos, have, cur, pages,
    nread, err)``: ``buf[pos:have]`` is what is left undecoded, ``pages``
    how many were placed, ``nread`` the bytes read from ``fd``.
    """
    cdef uint8_t[::1] b = memoryview(buf).cast("B")
    cdef Py_ssize_t cap = b.shape[0]
    if cap < MIN_BUFFER:
        raise ValueError(f"buf must hold at least {MIN_BUFFER} bytes")
    if not 0 <= have <= cap:
        raise ValueError("have is outside buf")
    cdef Py_ssize_t n = len(blocks), i
    if not -1 <= cur < n:
        raise ValueError("cur is not an index of blocks")
    cdef Block* t = <Block*>PyMem_Malloc(sizeof(Block) * (n if n else 1))
    if t == NULL:
        raise MemoryError()
    cdef const uint8_t[::1] nm
    cdef uint8_t[::1] rv
    cdef double[::1] pa
    keep = []
    try:
        for i in range(n):
            name, addr, length, received, placed_at = blocks[i]
            nm = memoryview(name).cast("B")
            rv = memoryview(received).cast("B")
            pa = placed_at
            if rv.shape[0] != pa.shape[0] or <uint64_t>rv.shape[0] * _PAGE < <uint64_t>length:
                raise ValueError(f"received/placed_at of block {i} do not cover it")
            keep.append((nm, rv, pa))
            if nm.shape[0] == 0:
                raise ValueError(f"block {i} has no name")
            t[i].name = &nm[0]
            t[i].name_len = nm.shape[0]
            t[i].addr = addr
            t[i].length = length
            t[i].received = &rv[0] if rv.shape[0] else NULL
            t[i].placed_at = &pa[0] if pa.shape[0] else NULL
            t[i].npages = rv.shape[0]
        return _loop(fd, wake, uffd, t, n, cur, &b[0], cap, have)
    finally:
        PyMem_Free(t)


cdef tuple _loop(int fd, int wake, int uffd, Block* t, Py_ssize_t n, Py_ssize_t cur,
                 uint8_t* b, Py_ssize_t cap, Py_ssize_t have):
    cdef Py_ssize_t pos = 0, p, k, need, blk, idx, pages = 0
    cdef uint64_t h, flags, off
    cdef ssize_t got
    cdef int status = S_DONE, err = 0, w
    cdef uint64_t nread = 0
    cdef const uint8_t* src
    cdef uint64_t kind
    cdef bint known
    cdef uint8_t fill[_PAGE]
    with nogil:
        while True:
            # decode the record at pos, or find how many bytes it still needs
            need = 8
            if have - pos >= 8:
                h = load_be64(b + pos)
                flags = h & _F_MASK
                off = h - flags
                kind = flags & (_F_ZERO | _F_PAGE)
                if flags & ~<uint64_t>(_F_ZERO | _F_PAGE | _F_CONTINUE) or \
                        (kind != _F_ZERO and kind != _F_PAGE):
                    break  # EOS, compressed, unknown: Python's
                p = pos + 8
                known = False
                if flags & _F_CONTINUE:
                    if cur < 0:
                        break  # CONTINUE without a block known here
                    blk = cur
                    known = True
                else:
                    need = 9
                    if have - pos >= 9:
                        k = b[p]
                        need = 9 + k
                        if have - pos >= need:
                            blk = _find(t, n, b + p + 1, k)
                            if blk < 0:
                                break  # unknown, or not ours to place
                            p += 1 + k
                            known = True
                if known:
                    need = (p - pos) + (_PAGE if kind == _F_PAGE else 1)
                    if have - pos >= need:
                        if off + _PAGE > t[blk].length:
                            break
                        idx = <Py_ssize_t>(off // _PAGE)
                        if t[blk].received[idx]:
                            break  # placed twice: Python says so
                        if kind == _F_PAGE:
                            src = b + p
                        else:
                            memset(fill, b[p], _PAGE)
                            src = fill
                        if qpr_copy(uffd, t[blk].addr + off, src, _PAGE) != 0:
                            break  # Python retries it and reports the failure
                        t[blk].received[idx] = 1
                        t[blk].placed_at[idx] = monotonic_now()
                        pages += 1
                        cur = blk
                        pos += need
                        continue
            # short of `need` bytes: make room and read
            if pos == have:
                pos = have = 0
            elif cap - pos < need or cap - have < 4096:
                memmove(b, b + pos, have - pos)
                have -= pos
                pos = 0
            got = recv_nowait(fd, b + have, cap - have)
            if got > 0:
                have += got
                nread += got
                continue
            if got == 0:
                status = S_END
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                w = wait_fd(fd, POLLIN, wake, -1, &err)
                if w == -1:  # WAIT_READY
                    continue
                status = S_STOPPED if w == S_STOPPED else S_FAILED
                break
            err = errno
            status = S_FAILED
            break
    return status, pos, have, cur, pages, nread, err
