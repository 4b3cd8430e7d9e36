# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Page records written straight from guest memory to a socket, without the GIL.

The bytes are those of ``ramparse.encode_pages``: each page of one block
(named before) as ``be64(offset | ZERO | CONTINUE) + 0x00`` when all its
bytes are zero, else ``be64(offset | PAGE | CONTINUE)`` and the page. But
where ``encode_pages`` copies every page into a record buffer that is then
written (and copied again by the kernel), this loop hands the kernel
gathering writes whose buffers are the headers and the guest pages
themselves: the page is copied once. It is for a source whose guest is
stopped (a COLO checkpoint), where what is sent cannot change under it.
``send_file`` relays record bytes that already lie in a file (a saved
stream being sent on): a header, then the file's range with ``sendfile``,
so the kernel moves them from the page cache without a user-space copy.
``qmigx.reference.pagesend`` is the plain-Python twin.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from qmigx._core.byteorder cimport store_be64
from libc.errno cimport EAGAIN, EINTR, errno
from qmigx._core.fdwait cimport POLLOUT, WAIT_READY, iovec, wait_fd, write_all

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, long* offset, size_t count)

from qmigx.errors import RamStreamError

__all__ = ["send_pages", "send_file", "CHUNK", "DONE", "STOPPED", "TIMEOUT", "FAILED", "SHORT"]

cdef enum Status:
    S_DONE = 0
    S_STOPPED = 2
    S_TIMEOUT = 3
    S_FAILED = 5
    S_SHORT = 6

#: every record was written
DONE = S_DONE
#: the channel was shut down (its wake descriptor fired)
STOPPED = S_STOPPED
#: no progress for ``timeout`` seconds
TIMEOUT = S_TIMEOUT
#: a write failed (``errno`` returned)
FAILED = S_FAILED
#: ``send_file``: the source file ended before the range did
SHORT = S_SHORT

cdef enum:
    _CHUNK = 512        # records per gathering write: two buffers a page, IOV_MAX 1024
    _F_ZERO = 0x02
    _F_PAGE = 0x08
    _F_CONTINUE = 0x20

#: records per gathering write
CHUNK = _CHUNK


cdef inline bint _is_zero(const uint8_t* src, Py_ssize_t page_size) noexcept nogil:
    cdef const uint64_t* words = <const uint64_t*>src
    cdef Py_ssize_t k
    if words[0] or (<const uint64_t*>(src + page_size - 8))[0]:
        return False
    for k in range(page_size // 8):
        if words[k]:
            return False
    return True


def send_pages(int fd, int wake, mem, pages, Py_ssize_t page_size=4096, timeout=None):
    """Write pages ``pages`` (int64 page numbers) of ``mem`` to ``fd`` as CONTINUE records.

    ``wake`` becomes readable when the channel is shut down. Returns
    ``(nbytes, zero_pages, normal_pages, status, err)``: the bytes written,
    the records of each kind in the chunks of ``CHUNK`` written whole, a status (``DONE``,
    ``STOPPED``, ``TIMEOUT`` or ``FAILED``) and an errno value for
    ``FAILED``. Raises RamStreamError for a page outside ``mem`` or a bad
    page size, before anything is written.
    """
    cdef const uint8_t[::1] m = memoryview(mem).cast("B")
    cdef const int64_t[::1] pg = pages
    cdef Py_ssize_t n = pg.shape[0]
    cdef Py_ssize_t npages_mem = m.shape[0] // page_size if page_size > 0 else 0
    cdef int timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    cdef Py_ssize_t i, lo, hi, zeros = 0, normal = 0, czeros, cnormal
    cdef int cnt, st = -1, err = 0
    cdef bint is_socket = True, in_hdr
    cdef uint64_t nbytes = 0
    cdef uint8_t* hdr = NULL
    cdef uint8_t* h
    cdef iovec* iov = NULL
    cdef const uint8_t* src
    cdef int64_t p
    if page_size <= 0 or page_size % 8:
        raise RamStreamError(f"page size {page_size} is not a positive multiple of 8",
                             field="page_size")
    for i in range(n):
        if pg[i] < 0 or pg[i] >= npages_mem:
            raise RamStreamError(f"page {pg[i]} lies outside the block ({npages_mem} pages)",
                                 field="offset")
    if n == 0:
        return 0, 0, 0, S_DONE, 0
    hdr = <uint8_t*>PyMem_Malloc(_CHUNK * 9)
    iov = <iovec*>PyMem_Malloc(2 * _CHUNK * sizeof(iovec))
    if hdr == NULL or iov == NULL:
        PyMem_Free(hdr)
        PyMem_Free(iov)
        raise MemoryError()
    try:
        with nogil:
            lo = 0
            while lo < n:
                hi = lo + _CHUNK if lo + _CHUNK < n else n
                h = hdr
                cnt = 0
                in_hdr = False
                czeros = cnormal = 0
                for i in range(lo, hi):
                    p = pg[i]
                    src = &m[p * page_size]
                    # a header right after another in ``hdr``: one buffer for both
                    if not in_hdr:
                        iov[cnt].iov_base = h
                        iov[cnt].iov_len = 0
                        cnt += 1
                        in_hdr = True
                    if _is_zero(src, page_size):
                        store_be64(h, <uint64_t>(p * page_size) | _F_ZERO | _F_CONTINUE)
                        h[8] = 0
                        h += 9
                        iov[cnt - 1].iov_len += 9
                        czeros += 1
                    else:
                        store_be64(h, <uint64_t>(p * page_size) | _F_PAGE | _F_CONTINUE)
                        h += 8
                        iov[cnt - 1].iov_len += 8
                        iov[cnt].iov_base = <void*>src
                        iov[cnt].iov_len = page_size
                        cnt += 1
                        in_hdr = False
                        cnormal += 1
                st = write_all(fd, wake, timeout_ms, &is_socket, iov, cnt, &nbytes, &err)
                if st >= 0:
                    break
                zeros += czeros
                normal += cnormal
                lo = hi
    finally:
        PyMem_Free(hdr)
        PyMem_Free(iov)
    return nbytes, zeros, normal, (S_DONE if st < 0 else st), err


def send_file(int fd, int wake, head, int src_fd, long long offset, long long count,
              timeout=None):
    """Write ``head``, then ``count`` bytes of file ``src_fd`` from ``offset``, to ``fd``.

    The range goes with ``sendfile`` (the file's offset is left alone).
    Returns ``(nbytes, status, err)``: the bytes written, ``DONE``,
    ``STOPPED``, ``TIMEOUT``, ``FAILED`` (``err`` the errno value) or
    ``SHORT`` (the file ended before the range did).
    """
    cdef const uint8_t[::1] h = memoryview(head).cast("B")
    cdef int timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    cdef int st = -1, err = 0
    cdef bint is_socket = True
    cdef uint64_t nbytes = 0
    cdef iovec iov[1]
    cdef long off = offset
    cdef long long left = count
    cdef ssize_t k
    if offset < 0 or count < 0:
        raise RamStreamError(f"file range {offset}+{count} is negative", field="offset")
    with nogil:
        if h.shape[0]:
            iov[0].iov_base = <void*>&h[0]
            iov[0].iov_len = <size_t>h.shape[0]
            st = write_all(fd, wake, timeout_ms, &is_socket, iov, 1, &nbytes, &err)
        while st < 0 and left > 0:
            k = sendfile(fd, src_fd, &off, <size_t>(left if left < (1 << 30) else (1 << 30)))
            if k < 0:
                if errno == EAGAIN:
                    st = wait_fd(fd, POLLOUT, wake, timeout_ms, &err)
                    if st == WAIT_READY:
                        st = -1
                    continue
                if errno == EINTR:
                    continue
                err = errno
                st = S_FAILED
                break
            if k == 0:
                st = S_SHORT
                break
            nbytes += <uint64_t>k
            left -= k
    return nbytes, (S_DONE if st < 0 else st), err
