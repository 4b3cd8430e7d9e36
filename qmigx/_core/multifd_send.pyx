# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A multifd channel's send loop for uncompressed pages, without the GIL.

The sending twin of :mod:`qmigx._core.multifd_recv`: a channel thread
hands it a batch of pages (rows of a buffer, most often guest memory
itself) and it writes them as packets of at most ``pages_alloc`` pages,
each header followed by its pages in one gathering write, waiting in
poll(2) when the socket is full, all without taking the GIL back between
packets. The header bytes are those of ``pack_packet_header`` for a
packet without zero pages (7.2 and 10.0 layouts are the same then).
``qmigx.reference.multifd_send`` is the plain-Python twin.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer

from qmigx._core.byteorder cimport store_be32, store_be64
from qmigx._core.fdwait cimport iovec, write_all

__all__ = ["send_packets", "DONE", "STOPPED", "TIMEOUT", "FAILED"]

cdef enum Status:
    S_DONE = 0
    S_STOPPED = 2
    S_TIMEOUT = 3
    S_FAILED = 5

#: every page was written
DONE = S_DONE
#: the channel was shut down (its wake descriptor fired)
STOPPED = S_STOPPED
#: no progress for ``timeout`` seconds
TIMEOUT = S_TIMEOUT
#: a write failed (``errno`` returned)
FAILED = S_FAILED

cdef enum:
    _FIXED = 320
    _NAME_OFF = 64
    _NAME_LEN = 256
    _MAGIC = 0x11223344
    _VERSION = 1
    _MAX_ALLOC = 1024


def send_packets(int fd, int wake, header, name, rows, index, offsets, Py_ssize_t page_size,
                 Py_ssize_t pages_alloc, uint64_t packet_num, uint32_t flags, timeout,
                 bint is_socket=True):
    """Write rows ``index`` of ``rows`` as packets for the pages at ``offsets``.

    Args:
        fd: the channel's descriptor, non-blocking.
        wake: a descriptor that becomes readable when the channel is shut down.
        header: a writable buffer of at least ``header_size(pages_alloc)`` bytes.
        name: the RAM block's name, bytes shorter than 256 without NUL.
        rows: a C-contiguous buffer of whole pages (guest memory or a copy).
        index: int64 row numbers, one per page sent; ``offsets`` the uint64
            offset of each in the block (what the header lists).
        packet_num: the first packet's number; the others follow it.
        flags: the packets' flags (no compression, no SYNC here).
        timeout: seconds without progress before TIMEOUT, or None.
        is_socket: False for a pipe or file (written with writev).

    Returns ``(status, packets, nbytes, errno)``.
    """
    cdef Py_buffer hbuf, rbuf
    cdef const int64_t[::1] idx = index
    cdef const uint64_t[::1] offs = offsets
    cdef const unsigned char[::1] nm = name
    cdef Py_ssize_t n = idx.shape[0], nrows, i, lo, hi, j
    cdef Py_ssize_t hsize = _FIXED + 8 * pages_alloc
    cdef iovec iov[_MAX_ALLOC + 1]
    cdef int cnt, st = S_DONE, err = 0
    cdef int timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    cdef uint64_t nbytes = 0, packets = 0, page = <uint64_t>page_size
    cdef unsigned char* h
    cdef const unsigned char* base
    cdef const unsigned char* p
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    if pages_alloc <= 0 or pages_alloc > _MAX_ALLOC:
        raise ValueError(f"pages_alloc {pages_alloc} out of range")
    if offs.shape[0] != n:
        raise ValueError(f"{n} rows but {offs.shape[0]} offsets")
    if nm.shape[0] >= _NAME_LEN or b"\0" in bytes(name):
        raise ValueError("ramblock name must be shorter than 256 bytes, without NUL")
    PyObject_GetBuffer(header, &hbuf, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(rows, &rbuf, 0)
    except BaseException:
        PyBuffer_Release(&hbuf)
        raise
    try:
        if hbuf.len < hsize:
            raise ValueError(f"header buffer of {hbuf.len} bytes, {hsize} needed")
        nrows = rbuf.len // page_size
        for i in range(n):
            if idx[i] < 0 or idx[i] >= nrows:
                raise IndexError(f"row {idx[i]} outside the {nrows} rows given")
        h = <unsigned char*>hbuf.buf
        base = <const unsigned char*>rbuf.buf
        with nogil:
            memset(h, 0, hsize)
            store_be32(h, _MAGIC)
            store_be32(h + 4, _VERSION)
            store_be32(h + 8, flags)
            store_be32(h + 12, <uint32_t>pages_alloc)
            if nm.shape[0]:
                memcpy(h + _NAME_OFF, &nm[0], nm.shape[0])
            lo = 0
            while lo < n:
                hi = lo + pages_alloc if lo + pages_alloc < n else n
                store_be32(h + 16, <uint32_t>(hi - lo))
                store_be32(h + 20, <uint32_t>((hi - lo) * page))
                store_be64(h + 24, packet_num + packets)
                for j in range(hi - lo):
                    store_be64(h + _FIXED + 8 * j, offs[lo + j])
                for j in range(hi - lo, pages_alloc):
                    store_be64(h + _FIXED + 8 * j, 0)
                iov[0].iov_base = h
                iov[0].iov_len = <size_t>hsize
                cnt = 1
                for j in range(lo, hi):
                    p = base + idx[j] * page_size
                    if cnt > 1 and <const unsigned char*>iov[cnt - 1].iov_base + iov[cnt - 1].iov_len == p:
                        iov[cnt - 1].iov_len += page
                    else:
                        iov[cnt].iov_base = <void*>p
                        iov[cnt].iov_len = page
                        cnt += 1
                st = write_all(fd, wake, timeout_ms, &is_socket, iov, cnt, &nbytes, &err)
                if st >= 0:
                    break
                st = S_DONE
                packets += 1
                lo = hi
    finally:
        PyBuffer_Release(&rbuf)
        PyBuffer_Release(&hbuf)
    return (st, packets, nbytes, err)
