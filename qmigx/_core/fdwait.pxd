# cython: language_level=3
"""Waiting on a non-blocking descriptor and consuming iovecs, without the GIL.

Shared by the compiled send and receive loops (multifd, COLO checkpoints,
postcopy's page requests): they poll their socket together with the
channel's wake descriptor (readable once the channel is shut down), drop
what each readv/sendmsg moved from their iovecs, write gathered buffers
until all is out, read without blocking and stamp times on the clock of
``time.monotonic``.
"""

from libc.errno cimport EAGAIN, EINTR, ENOTSOCK, errno
from libc.stdint cimport uint64_t
from libc.string cimport memset

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
    ssize_t readv(int fd, const iovec* iov, int iovcnt)
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    enum:
        MSG_NOSIGNAL

cdef extern from *:
    """
    #include <sys/socket.h>
    #include <time.h>
    /* CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic(). */
    static inline double qmigx_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    static inline ssize_t qmigx_recv_nowait(int fd, void *buf, size_t n) {
        return recv(fd, buf, n, MSG_DONTWAIT);
    }
    """
    double monotonic_now "qmigx_monotonic"() noexcept nogil
    ssize_t recv_nowait "qmigx_recv_nowait"(int fd, void* buf, size_t n) noexcept nogil

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


cdef inline int write_all(int fd, int wake, int timeout_ms, bint* is_socket, iovec* iov, int cnt,
                          uint64_t* nbytes, int* err) noexcept nogil:
    """Write every byte of ``iov``; WAIT_READY when done, else why not (``err``: errno).

    ``sendmsg`` with MSG_NOSIGNAL (a closed peer is EPIPE, not SIGPIPE) on a
    socket; ``writev`` on anything else, found out on the first ENOTSOCK and
    remembered in ``is_socket``. ``nbytes`` counts what went out.
    """
    cdef ssize_t k
    cdef int st
    cdef msghdr msg
    memset(&msg, 0, sizeof(msg))
    while cnt:
        if is_socket[0]:
            msg.msg_iov = iov
            msg.msg_iovlen = <size_t>cnt
            k = sendmsg(fd, &msg, MSG_NOSIGNAL)
            if k < 0 and errno == ENOTSOCK:
                is_socket[0] = False
                continue
        else:
            k = writev(fd, iov, cnt)
        if k < 0:
            if errno == EAGAIN:
                st = wait_fd(fd, POLLOUT, wake, timeout_ms, err)
                if st != WAIT_READY:
                    return st
                continue
            if errno == EINTR:
                continue
            err[0] = errno
            return WAIT_FAILED
        nbytes[0] += <uint64_t>k
        cnt = consume_iov(&iov, cnt, <size_t>k)
    return WAIT_READY
