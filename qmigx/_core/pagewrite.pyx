# cython: language_level=3
"""Compiled page writer; see ``qmigx.reference.pagewrite`` for the twin.

Compiled because the work per page is tiny and there are many pages: a
1 GiB guest is 262,144 of them, and building one Python slice and one
iovec entry per page cost as much as the kernel's copy of the page. Here
the iovecs point straight into the stream buffer (an ``mmap`` of the
stream file) and the loop runs without the GIL.
"""

from libc.errno cimport errno, EINTR
from libc.stdint cimport int64_t, uint8_t
from posix.types cimport off_t
from posix.uio cimport iovec, pwritev
from posix.unistd cimport pwrite

cdef enum:
    IOV_MAX = 1024


def write_pages(int fd, const uint8_t[::1] data, const int64_t[::1] pos,
                const int64_t[::1] out, long page_size):
    """Write ``data[pos[i]:pos[i]+page_size]`` at file offset ``out[i]``, for every ``i``.

    Pages whose offsets follow each other go out in one ``pwritev`` (up to
    1024 at a time). Returns the number of system calls made. Raises
    ``OSError`` if a write fails; ``ValueError`` if a page lies outside
    ``data`` (checked before any write).
    """
    cdef Py_ssize_t n = pos.shape[0]
    cdef Py_ssize_t i, j, k
    cdef Py_ssize_t size = data.shape[0]
    cdef iovec iov[IOV_MAX]
    cdef ssize_t done, want, left
    cdef long calls = 0
    cdef int err = 0
    if out.shape[0] != n:
        raise ValueError("pos and out differ in length")
    if page_size <= 0:
        raise ValueError("page size must be positive")
    for i in range(n):
        if pos[i] < 0 or pos[i] + page_size > size:
            raise ValueError(f"page {i} at {pos[i]} lies outside the buffer of {size} bytes")
    if n == 0:
        return 0
    with nogil:
        i = 0
        while i < n:
            j = i + 1
            while j < n and j - i < IOV_MAX and out[j] == out[j - 1] + page_size:
                j += 1
            for k in range(i, j):
                iov[k - i].iov_base = <void*>&data[pos[k]]
                iov[k - i].iov_len = page_size
            want = (j - i) * page_size
            done = pwritev(fd, iov, <int>(j - i), <off_t>out[i])
            calls += 1
            if done < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            # a short write: the rest page by page
            while done < want:
                k = i + done // page_size
                left = pwrite(fd, &data[pos[k] + done % page_size],
                              page_size - done % page_size, <off_t>(out[i] + done))
                calls += 1
                if left < 0:
                    if errno != EINTR:
                        err = errno
                        break
                    continue
                done += left
            if err:
                break
            i = j
    if err:
        import os
        raise OSError(err, os.strerror(err))
    return calls
