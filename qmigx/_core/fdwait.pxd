# cython: language_level=3
"""Waiting on a non-blocking descriptor and consuming iovecs, without the GIL.

Shared by the multifd send and receive loops: both poll their socket
together with the channel's wake descriptor (readable once the channel is
shut down), and both drop what each readv/sendmsg moved from their iovecs.
"""

from libc.errno cimport EINTR, errno

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef enum WaitStatus:
    WAIT_READY = -1
    WAIT_STOPPED = 2
    WAIT_TIMEOUT = 3
    WAIT_FAILED = 5


cdef inline int wait_fd(int fd, short events, int wake, int timeout_ms, int* err) noexcept nogil:
    """Wait until ``fd`` has ``events``; WAIT_READY, or why not (``err``: errno)."""
    cdef pollfd fds[2]
    cdef int r
    fds[0].fd = fd
    fds[0].events = events
    fds[0].revents = 0
    fds[1].fd = wake
    fds[1].events = POLLIN
    fds[1].revents = 0
    while True:
        r = poll(fds, 2, timeout_ms)
        if r < 0 and errno == EINTR:
            continue
        break
    if r < 0:
        err[0] = errno
        return WAIT_FAILED
    if fds[1].revents:
        return WAIT_STOPPED
    if r == 0:
        return WAIT_TIMEOUT
    return WAIT_READY


cdef inline int consume_iov(iovec** iov, int cnt, size_t k) noexcept nogil:
    """Drop ``k`` bytes moved from the front of ``*iov``; the iovecs left (empty ones skipped)."""
    cdef iovec* v = iov[0]
    while k > 0 and cnt:
        if k >= v[0].iov_len:
            k -= v[0].iov_len
            v += 1
            cnt -= 1
        else:
            v[0].iov_base = <char*>v[0].iov_base + k
            v[0].iov_len -= k
            k = 0
    while cnt and v[0].iov_len == 0:
        v += 1
        cnt -= 1
    iov[0] = v
    return cnt
