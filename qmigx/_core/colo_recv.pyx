# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A COLO secondary's receive of one block's pages straight into its RAM cache, without the GIL.

A checkpoint's pages arrive as ``be64(offset | PAGE | CONTINUE)`` and
4 KiB of data, mostly for consecutive pages. Read into a receive buffer
and copied into the cache from there, every byte is copied twice on the
secondary before the flush copies it a third time; this loop reads a
predicted run of records with one scattering read whose buffers are the
8-byte headers and the cache pages themselves, so the data is copied
once, by the kernel.

The prediction is checked, not trusted: each header is compared with the
record the run expects as soon as it has arrived. At the first one that
differs (a zero page, a jump) the bytes read past the last matching
record are gathered, every cache page they passed through gets back its
previous content, copied from ``ram`` (only pages not yet received in
this checkpoint are predicted, and for those the cache and RAM agree),
and the loop applies the whole ``ZERO | CONTINUE`` and ``PAGE |
CONTINUE`` records of the block among them itself, then predicts again
after the last. It returns at any other record (another block, the end
of the RAM part, a zero page filled with another byte) with the bytes
from there on in ``spill``, in stream order, for the stream parser. No
byte is written outside the block's pages and ``spill``.
``qmigx.reference.colo_recv`` is the plain-Python twin.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memmove, memset
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from qmigx._core.byteorder cimport load_be64
from qmigx._core.fdwait cimport POLLIN, iovec, readv, wait_fd

from qmigx.errors import RamStreamError

__all__ = ["receive_pages", "MAX_RUN", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED"]

cdef enum Status:
    S_DONE = 0
    S_END = 1
    S_STOPPED = 2
    S_TIMEOUT = 3
    S_FAILED = 5

#: a record this loop leaves to the parser (another block, the end of the RAM part...)
DONE = S_DONE
#: the peer closed the channel (what was read is in ``spill``)
END = S_END
#: the channel was shut down (its wake descriptor fired)
STOPPED = S_STOPPED
#: no progress for ``timeout`` seconds
TIMEOUT = S_TIMEOUT
#: a read failed (``errno`` returned)
FAILED = S_FAILED

cdef enum:
    _MAX_RUN = 512      # two iovecs a record: one readv covers a whole run (IOV_MAX 1024)
    _F_ZERO = 0x02
    _F_PAGE = 0x08
    _F_CONTINUE = 0x20
    _MAX_PREFIX = 1 << 16
    _READ_RUN = 32      # records per scattering read: a bad guess costs what was read past it

#: the most records one call predicts in a row (what ``spill`` must hold)
MAX_RUN = _MAX_RUN


cdef Py_ssize_t _copy_stream(iovec* iov, Py_ssize_t pos, uint8_t* out, Py_ssize_t n,
                             Py_ssize_t rec, bint into) noexcept nogil:
    """Copy ``n`` bytes at stream position ``pos`` of the run to (``into``: from) ``out``."""
    cdef Py_ssize_t done = 0, r, within, k
    cdef uint8_t* at
    while done < n:
        r = pos // rec
        within = pos % rec
        if within < 8:
            at = <uint8_t*>iov[2 * r].iov_base + within
            k = 8 - within
        else:
            at = <uint8_t*>iov[2 * r + 1].iov_base + (within - 8)
            k = rec - within
        if k > n - done:
            k = n - done
        if into:
            memcpy(at, out + done, k)
        else:
            memcpy(out + done, at, k)
        done += k
        pos += k
    return done



cdef struct Ctx:
    int fd
    int wake
    int timeout_ms
    int err
    Py_ssize_t page_size
    Py_ssize_t npages
    uint8_t* dest
    const uint8_t* ram
    uint8_t* dirty
    uint8_t* received
    uint8_t* spill
    uint8_t* hdr
    iovec* iov


cdef inline void _mark(Ctx* c, Py_ssize_t page) noexcept nogil:
    c.dirty[page] = 1
    c.received[page] = 1


cdef int _run(Ctx* c, Py_ssize_t first, Py_ssize_t count, const uint8_t* pre, Py_ssize_t plen,
              Py_ssize_t* good_out, Py_ssize_t* spilled_out) noexcept nogil:
    """Read records of pages ``first ..`` (at most ``count``) into place; a status.

    The stream goes on with ``pre`` (``plen`` bytes), then the socket.
    ``good_out``: the matching records stored; ``spilled_out``: the bytes
    after them, gathered at the start of ``c.spill``.
    """
    cdef Py_ssize_t rec = c.page_size + 8, total = count * rec
    cdef Py_ssize_t got = 0, good = 0, placed, idx, within, j, cnt, spilled
    cdef uint64_t ps = <uint64_t>c.page_size
    cdef ssize_t k
    cdef int status = S_DONE, st
    cdef bint mismatch = False
    cdef iovec saved
    cdef iovec* iov = c.iov
    for j in range(count):
        iov[2 * j].iov_base = c.hdr + 8 * j
        iov[2 * j].iov_len = 8
        iov[2 * j + 1].iov_base = c.dest + (first + j) * c.page_size
        iov[2 * j + 1].iov_len = c.page_size
    placed = plen if plen < total else total
    if placed:
        _copy_stream(iov, 0, <uint8_t*>pre, placed, rec, True)
    got = placed
    while True:
        # check every header that has arrived; take every record that is whole
        while good < count and got >= good * rec + 8:
            if load_be64(c.hdr + 8 * good) != (<uint64_t>(first + good) * ps) | _F_PAGE | _F_CONTINUE:
                mismatch = True
                break
            if got >= (good + 1) * rec:
                good += 1
            else:
                break
        if mismatch or good == count:
            break
        idx = got // rec
        within = got % rec
        j = 2 * idx + (0 if within < 8 else 1)
        saved = iov[j]
        if within < 8:
            iov[j].iov_base = <uint8_t*>saved.iov_base + within
            iov[j].iov_len = 8 - within
        else:
            iov[j].iov_base = <uint8_t*>saved.iov_base + (within - 8)
            iov[j].iov_len = rec - within
        cnt = 2 * count - j
        if cnt > 1024:
            cnt = 1024
        k = readv(c.fd, &iov[j], <int>cnt)
        iov[j] = saved
        if k < 0:
            if errno == EAGAIN:
                st = wait_fd(c.fd, POLLIN, c.wake, c.timeout_ms, &c.err)
                if st >= 0:
                    status = st
                    break
                continue
            if errno == EINTR:
                continue
            c.err = errno
            status = S_FAILED
            break
        if k == 0:
            status = S_END
            break
        got += k
    for j in range(good):
        _mark(c, first + j)
    spilled = got - good * rec
    if spilled:
        _copy_stream(iov, good * rec, c.spill, spilled, rec, False)
    if plen > placed:
        memcpy(c.spill + spilled, pre + placed, plen - placed)
        spilled += plen - placed
    for j in range(good, count):
        if got > j * rec + 8:
            memcpy(c.dest + (first + j) * c.page_size, c.ram + (first + j) * c.page_size,
                   c.page_size)
    good_out[0] = good
    spilled_out[0] = spilled
    return status


cdef Py_ssize_t _window(Ctx* c, Py_ssize_t page) noexcept nogil:
    """How many pages from ``page`` on may be predicted: in the block, none received yet."""
    cdef Py_ssize_t n = 0
    while n < _READ_RUN and page + n < c.npages and not c.dirty[page + n]:
        n += 1
    return n


def receive_pages(int fd, int wake, dest, ram, dirty, received, Py_ssize_t first_page,
                  prefix, spill, Py_ssize_t page_size=4096, timeout=None):
    """Receive the block's page records, from one for ``first_page`` on, into ``dest``.

    The stream goes on with ``prefix`` (bytes already received, at most
    64 KiB), then ``fd`` (a non-blocking socket; ``wake`` becomes readable
    when the channel is shut down). ``dest`` is the block's cache, ``ram``
    its RAM, ``dirty`` and ``received`` one byte per page (bool arrays),
    set for each page stored; ``spill`` must hold ``(MAX_RUN + 1) *
    (page_size + 8) + len(prefix)`` bytes.

    Returns ``(pages, used, spilled, status, err)``: the records stored,
    the stream bytes they took (``prefix`` included), the bytes that
    followed them now in ``spill[:spilled]`` (from the first
    record this loop leaves to the parser on), a status (``DONE``,
    ``END``, ``STOPPED``, ``TIMEOUT`` or ``FAILED``) and an errno value for
    ``FAILED``. Raises RamStreamError for buffers that do not fit, before
    anything is read.
    """
    cdef uint8_t[::1] d = memoryview(dest).cast("B")
    cdef const uint8_t[::1] r = memoryview(ram).cast("B")
    cdef uint8_t[::1] dm = memoryview(dirty).cast("B")
    cdef uint8_t[::1] rm = memoryview(received).cast("B")
    cdef const uint8_t[::1] p = memoryview(prefix).cast("B")
    cdef uint8_t[::1] s = memoryview(spill).cast("B")
    cdef Ctx c
    cdef Py_ssize_t rec = page_size + 8, plen = p.shape[0], npages = dm.shape[0]
    cdef Py_ssize_t stored = 0, page = first_page, count, good = 0, spilled = 0, pos, pg
    cdef Py_ssize_t used = 0
    cdef uint64_t h, flags, mask
    cdef int status = S_DONE
    cdef bint stop, progress
    cdef uint8_t* tmp = NULL
    cdef const uint8_t* pre
    if page_size <= 0 or page_size % 8 or page_size & (page_size - 1):
        raise RamStreamError(f"page size {page_size} is not a power of 2 of at least 8",
                             field="page_size")
    if d.shape[0] < npages * page_size or r.shape[0] < npages * page_size \
            or rm.shape[0] < npages:
        raise RamStreamError(f"a block of {npages} pages does not fit its cache "
                             f"({d.shape[0]} bytes), RAM ({r.shape[0]}) or received bitmap "
                             f"({rm.shape[0]})", field="block")
    if not 0 <= first_page <= npages:
        raise RamStreamError(f"page {first_page} lies outside the block ({npages} pages)",
                             field="offset")
    if plen > _MAX_PREFIX or s.shape[0] < (_MAX_RUN + 1) * rec + plen:
        raise RamStreamError(f"spill of {s.shape[0]} bytes for a prefix of {plen}: "
                             f"{(_MAX_RUN + 1) * rec + plen} needed", field="spill")
    tmp = <uint8_t*>PyMem_Malloc(rec + _MAX_RUN * 8)
    c.iov = <iovec*>PyMem_Malloc(2 * _MAX_RUN * sizeof(iovec))
    if tmp == NULL or c.iov == NULL:
        PyMem_Free(tmp)
        PyMem_Free(c.iov)
        raise MemoryError()
    c.fd = fd
    c.wake = wake
    c.timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    c.err = 0
    c.page_size = page_size
    c.npages = npages
    c.dest = &d[0] if d.shape[0] else NULL
    c.ram = &r[0] if r.shape[0] else NULL
    c.dirty = &dm[0] if npages else NULL
    c.received = &rm[0] if npages else NULL
    c.spill = &s[0]
    c.hdr = tmp + rec
    mask = <uint64_t>(page_size - 1)
    pre = &p[0] if plen else NULL
    try:
        with nogil:
            while True:
                count = _window(&c, page)
                if count == 0:
                    if plen:
                        memcpy(c.spill, pre, plen)
                    spilled = plen
                    break
                status = _run(&c, page, count, pre, plen, &good, &spilled)
                stored += good
                used += good * rec
                page += good
                if status != S_DONE:
                    break
                # the whole records of this block read past the run: applied here
                pos = 0
                stop = False
                while spilled - pos >= 8:
                    h = load_be64(c.spill + pos)
                    flags = h & mask
                    pg = <Py_ssize_t>((h & ~mask) // <uint64_t>page_size)
                    if pg >= npages or (flags != (_F_ZERO | _F_CONTINUE)
                                        and flags != (_F_PAGE | _F_CONTINUE)):
                        stop = True
                        break
                    if flags & _F_ZERO:
                        if spilled - pos < 9:
                            break
                        if c.spill[pos + 8]:
                            stop = True  # the parser applies the fill rule of the stream's version
                            break
                        memset(c.dest + pg * page_size, 0, page_size)
                        pos += 9
                    else:
                        if spilled - pos < rec:
                            break
                        memcpy(c.dest + pg * page_size, c.spill + pos + 8, page_size)
                        pos += rec
                    _mark(&c, pg)
                    stored += 1
                    page = pg + 1
                used += pos
                if stop:
                    if pos:
                        memmove(c.spill, c.spill + pos, spilled - pos)
                    spilled -= pos
                    break
                # a partial record left: it starts the next run, which predicts its
                # page when its header says which; without progress the parser reads on
                progress = good > 0 or pos > 0
                plen = spilled - pos
                if plen:
                    memcpy(tmp, c.spill + pos, plen)
                if plen >= 8:
                    h = load_be64(tmp)
                    pg = <Py_ssize_t>((h & ~mask) // <uint64_t>page_size)
                    if (h & mask) == (_F_PAGE | _F_CONTINUE) and pg < npages and not c.dirty[pg]:
                        page = pg
                        progress = True
                if not progress:
                    memcpy(c.spill, tmp, plen)
                    spilled = plen
                    break
                pre = tmp
                spilled = 0
    finally:
        PyMem_Free(tmp)
        PyMem_Free(c.iov)
    return stored, used, spilled, status, c.err
