# cython: language_level=3
"""A lock both Python threads and compiled loops without the GIL can hold.

A channel written by several threads (the return path: PONGs, SHUT and
page requests; the preempt channel) and a dirty bitmap taken from by two
senders need mutual exclusion between Python code and a compiled loop
that never holds the GIL. ``threading.Lock`` cannot be taken from C
without the interpreter; a pthread mutex can, and Python takes it by
waiting without the GIL. The lock also carries the descriptors of the
channel it guards, so a loop writes where the Python writer would.
"""

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, const void* attr)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_trylock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_mutex_destroy(pthread_mutex_t* m)


cdef class WireLock:
    cdef pthread_mutex_t m
    cdef readonly int fd
    cdef readonly int wake
    cdef public bint closed
    cdef public unsigned long long sent
