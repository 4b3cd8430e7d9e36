# cython: language_level=3
"""A pthread mutex for Python and compiled loops, with the channel it guards (see the .pxd)."""

__all__ = ["WireLock"]


cdef class WireLock:
    """Mutual exclusion shared with compiled loops; ``with lock:`` as a ``threading.Lock``.

    Args:
        fd: the socket a compiled loop writes to under this lock (-1: none,
            the writes stay with Python, e.g. a TLS session).
        wake: the channel's wake descriptor (readable once it is shut down).

    ``closed`` (messages are dropped from then on) and ``sent`` (messages
    written) are read and written under the lock by either side.
    """

    def __cinit__(self, int fd=-1, int wake=-1):
        pthread_mutex_init(&self.m, NULL)
        self.fd = fd
        self.wake = wake
        self.closed = False
        self.sent = 0

    def __dealloc__(self):
        pthread_mutex_destroy(&self.m)

    def acquire(self, bint blocking=True) -> bool:
        """Take the lock; waits without the GIL, so a compiled holder can finish."""
        if pthread_mutex_trylock(&self.m) == 0:
            return True
        if not blocking:
            return False
        with nogil:
            pthread_mutex_lock(&self.m)
        return True

    def release(self) -> None:
        pthread_mutex_unlock(&self.m)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        pthread_mutex_unlock(&self.m)
        return False
