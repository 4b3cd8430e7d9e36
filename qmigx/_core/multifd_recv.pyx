# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A multifd channel's receive loop for uncompressed packets, without the GIL.

Each multifd channel has its own thread. Written in Python, every packet
costs that thread several system calls, each of which gives up the GIL
and takes it back: with four channels, a main channel and the engine's
threads on two cores, the threads spend more time handing the GIL to each
other than copying pages. This loop reads packet after packet from the
socket, checks each header and reads its pages straight to their places
in guest RAM (one scattering read per packet, the zero pages of a QEMU 10
packet zeroed), and returns to Python only for what it does not handle:
a SYNC packet, a packet with compressed data, a header it would reject,
the end of the stream, a stop request, a timeout or an error.

It accepts a packet only if ``qmigx.multifd.packet.unpack_packet_header``
(the 10.0 layout, which reads every version's packets) would accept it
and place its pages to the same bytes; any other header is left in the
caller's buffer, unread further, for the Python path to unpack, which
raises the typed error with its field and offset. ``qmigx.reference.
multifd_recv`` is the plain-Python twin.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memset
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from qmigx._core.byteorder cimport load_be32, load_be64
from qmigx._core.fdwait cimport POLLIN, consume_iov, iovec, readv, wait_fd

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)

cdef extern from "<sys/socket.h>" nogil:
    int setsockopt(int fd, int level, int name, const void* value, unsigned int length)
    enum:
        SOL_SOCKET
        SO_RCVLOWAT

__all__ = ["receive_packets", "HEADER", "END", "STOPPED", "TIMEOUT", "TRUNCATED", "FAILED"]

cdef enum Status:
    S_HEADER = 0
    S_END = 1
    S_STOPPED = 2
    S_TIMEOUT = 3
    S_TRUNCATED = 4
    S_FAILED = 5

#: a header the loop does not handle is in the caller's buffer
HEADER = S_HEADER
#: the peer closed the channel between two packets
END = S_END
#: the channel was shut down (its wake descriptor fired)
STOPPED = S_STOPPED
#: no progress for ``timeout`` seconds
TIMEOUT = S_TIMEOUT
#: the peer closed the channel inside a packet (``got`` of ``want`` bytes read)
TRUNCATED = S_TRUNCATED
#: a read failed (``errno`` returned)
FAILED = S_FAILED

cdef enum:
    _FIXED = 320
    _NAME_OFF = 64
    _NAME_LEN = 256
    _ZERO_OFF = 32
    _MASK_10 = 0x3E
    _FLAG_SYNC = 0x1
    _MAGIC = 0x11223344
    _VERSION = 1
    _LOWAT_MAX = 256 * 1024
    _MAX_RUNS = 1024

cdef struct Block:
    const char* name
    Py_ssize_t name_len
    unsigned char* base
    uint64_t used

cdef struct Loop:
    int fd
    int wake
    int timeout_ms
    int lowat
    uint64_t nbytes
    int err
    uint64_t got
    uint64_t want


cdef int _wait(Loop* s, Py_ssize_t want) noexcept nogil:
    """Wait until ``want`` bytes can be read; a status, or -1 to read again."""
    cdef int lowat = <int>(want if want < _LOWAT_MAX else _LOWAT_MAX)
    if lowat < 1:
        lowat = 1
    if lowat != s.lowat:
        if setsockopt(s.fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(int)) == 0:
            s.lowat = lowat
    return wait_fd(s.fd, POLLIN, s.wake, s.timeout_ms, &s.err)


cdef int _read_exact(Loop* s, iovec* iov, int cnt, bint first) noexcept nogil:
    """Fill ``iov`` (consumed as it fills); ``first``: an end before any byte is END."""
    cdef ssize_t k
    cdef size_t left = 0
    cdef int i, st
    cdef uint64_t done = 0
    for i in range(cnt):
        left += iov[i].iov_len
    s.want = left
    while left:
        k = readv(s.fd, iov, cnt)
        if k < 0:
            if errno == EAGAIN:  # EWOULDBLOCK on Linux
                st = _wait(s, <Py_ssize_t>left)
                if st >= 0:
                    s.got = done
                    return st
                continue
            if errno == EINTR:
                continue
            s.err = errno
            s.got = done
            return S_FAILED
        if k == 0:
            s.got = done
            return S_END if first and done == 0 else S_TRUNCATED
        s.nbytes += <uint64_t>k
        done += <uint64_t>k
        left -= <size_t>k
        cnt = consume_iov(&iov, cnt, <size_t>k)
    return -1


cdef int _packet(Loop* s, unsigned char* h, Py_ssize_t hsize, Block* blocks, int nblocks,
                 uint64_t page, uint32_t max_pages, iovec* runs,
                 uint64_t* pages, uint64_t* zeros) noexcept nogil:
    """One packet: -1 when placed, else a status (HEADER: ``h`` holds what Python must see)."""
    cdef iovec hv
    cdef int st, b, nruns
    cdef uint32_t flags, alloc, npages, nzero, listed, i
    cdef uint64_t off, mask = page - 1, limit, prev = 0
    cdef const void* nul
    cdef Py_ssize_t name_len
    cdef Block* blk = NULL
    hv.iov_base = h
    hv.iov_len = <size_t>hsize
    st = _read_exact(s, &hv, 1, True)
    if st >= 0:
        return st
    if load_be32(h) != _MAGIC or load_be32(h + 4) != _VERSION:
        return S_HEADER
    flags = load_be32(h + 8)
    alloc = load_be32(h + 12)
    npages = load_be32(h + 16)
    nzero = load_be32(h + _ZERO_OFF)
    if flags & _FLAG_SYNC or alloc > max_pages or npages > alloc or nzero > alloc - npages:
        return S_HEADER
    if <Py_ssize_t>(_FIXED + 8 * <Py_ssize_t>alloc) > hsize:
        return S_HEADER
    listed = npages + nzero
    if listed == 0:
        return -1
    if flags & _MASK_10:
        return S_HEADER
    nul = memchr(h + _NAME_OFF, 0, _NAME_LEN)
    if nul == NULL:
        return S_HEADER
    name_len = <const unsigned char*>nul - (h + _NAME_OFF)
    for b in range(nblocks):
        if blocks[b].name_len == name_len and memcmp(blocks[b].name, h + _NAME_OFF, name_len) == 0:
            blk = &blocks[b]
            break
    if blk == NULL or blk.used < page:
        return S_HEADER
    limit = blk.used - page
    for i in range(listed):
        off = load_be64(h + _FIXED + 8 * i)
        if off & mask or off > limit:
            return S_HEADER
    nruns = 0
    for i in range(npages):
        off = load_be64(h + _FIXED + 8 * i)
        if nruns and off == prev + page and runs[nruns - 1].iov_len < 0x40000000:
            runs[nruns - 1].iov_len += page
        else:
            runs[nruns].iov_base = blk.base + off
            runs[nruns].iov_len = page
            nruns += 1
        prev = off
    if nruns:
        st = _read_exact(s, runs, nruns, False)
        if st >= 0:
            return S_TRUNCATED if st == S_END else st
    for i in range(npages, listed):
        memset(blk.base + load_be64(h + _FIXED + 8 * i), 0, page)
    pages[0] += npages
    zeros[0] += nzero
    return -1


def receive_packets(int fd, int wake, header, blocks, Py_ssize_t page_size,
                    Py_ssize_t max_pages, timeout):
    """Read and place uncompressed packets from ``fd`` until one needs Python.

    Args:
        fd: the channel's socket, non-blocking.
        wake: a descriptor that becomes readable when the channel is shut down.
        header: a writable buffer of the receiver's header size
            (``header_size(max_pages)``); every header is read at that size.
        blocks: ``(name, buffer, used_length)`` of each RAM block, ``name``
            as bytes, ``buffer`` writable and at least ``used_length`` long.
        page_size, max_pages: as for ``unpack_packet_header``.
        timeout: seconds without progress before TIMEOUT, or None.

    Returns ``(status, packets, pages, zero_pages, nbytes, got, want, errno)``:
    the packets placed, their normal and zero pages, the bytes read, and for
    TRUNCATED the bytes ``got`` of the ``want`` that the read was waiting for.
    """
    cdef Py_buffer hbuf
    cdef Py_buffer* views = NULL
    cdef Block* table = NULL
    cdef int nb = len(blocks), got_views = 0, i, st = S_HEADER
    cdef iovec runs[_MAX_RUNS]
    cdef Loop s
    cdef uint64_t packets = 0, pages = 0, zeros = 0
    cdef uint64_t page = <uint64_t>page_size
    cdef uint32_t maxp = <uint32_t>max_pages
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    if max_pages < 0 or max_pages > _MAX_RUNS:
        raise ValueError(f"max_pages {max_pages} out of range")
    names = [bytes(b[0]) for b in blocks]
    PyObject_GetBuffer(header, &hbuf, PyBUF_WRITABLE)
    try:
        if hbuf.len < _FIXED + 8 * max_pages:
            raise ValueError(f"header buffer of {hbuf.len} bytes, {_FIXED + 8 * max_pages} needed")
        views = <Py_buffer*>PyMem_Malloc(sizeof(Py_buffer) * max(nb, 1))
        table = <Block*>PyMem_Malloc(sizeof(Block) * max(nb, 1))
        if views == NULL or table == NULL:
            raise MemoryError()
        for i in range(nb):
            PyObject_GetBuffer(blocks[i][1], &views[i], PyBUF_WRITABLE)
            got_views += 1
            used = int(blocks[i][2])
            if used < 0 or used > views[i].len:
                raise ValueError(f"block {names[i]!r}: used length {used} beyond its buffer")
            table[i].name = <const char*>(<bytes>names[i])
            table[i].name_len = len(names[i])
            table[i].base = <unsigned char*>views[i].buf
            table[i].used = <uint64_t>used
        s.fd = fd
        s.wake = wake
        s.timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
        s.lowat = 1
        s.nbytes = 0
        s.err = 0
        s.got = 0
        s.want = 0
        with nogil:
            while True:
                st = _packet(&s, <unsigned char*>hbuf.buf, hbuf.len, table, nb, page, maxp,
                             runs, &pages, &zeros)
                if st >= 0:
                    break
                packets += 1
            if s.lowat != 1:  # the Python path reads with the default mark
                s.lowat = 1
                setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &s.lowat, sizeof(int))
    finally:
        for i in range(got_views):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
        PyMem_Free(table)
        PyBuffer_Release(&hbuf)
    return (st, packets, pages, zeros, s.nbytes, s.got, s.want, s.err)
