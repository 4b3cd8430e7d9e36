# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The postcopy destination's fault thread without the GIL: userfaultfd to REQ_PAGES.

A thread that touches a missing page sleeps in the kernel until the page
is placed. Between its fault and the page request going out, a Python
fault thread first waits for the GIL, held in turn by the loader and the
stream threads: measured, that wait was a large part of a request's
latency. This loop reads the userfaultfd's page-fault events and writes
each request to the return path itself, under the return path's
:class:`~qmigx._core.wirelock.WireLock` (the one its Python writer takes),
as REQ_PAGES when the block is the previous request's, else REQ_PAGES_ID
(as QEMU's destination does).

A host page already received, or already asked for, is not asked again;
``asked_at`` stamps each request's time (``CLOCK_MONOTONIC``, the clock of
``time.monotonic``) so Python can settle it and measure its latency once
the page is placed. ``qmigx.reference.postcopy_fault`` is the twin.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from posix.unistd cimport read

from qmigx._core.byteorder cimport store_be32, store_be64
from qmigx._core.fdwait cimport POLLIN, iovec, monotonic_now, wait_fd, write_all
from qmigx._core.wirelock cimport WireLock, pthread_mutex_lock, pthread_mutex_unlock

__all__ = ["serve_faults", "STOPPED", "CLOSED", "READ_FAILED", "WRITE_FAILED", "PAGE_SIZE",
           "REQ_PAGES", "REQ_PAGES_ID"]

cdef enum Status:
    S_STOPPED = 2
    S_CLOSED = 3
    S_READ_FAILED = 5
    S_WRITE_FAILED = 6

#: the stop descriptor fired
STOPPED = S_STOPPED
#: the return path was closed (a request was dropped: ask again after recovery)
CLOSED = S_CLOSED
#: reading the userfaultfd failed (``err``)
READ_FAILED = S_READ_FAILED
#: writing the return path failed (``err``)
WRITE_FAILED = S_WRITE_FAILED

cdef enum:
    _PAGE = 4096
    _MSG = 32  # sizeof(struct uffd_msg)
    _EVENT_PAGEFAULT = 0x12
    _REQ_PAGES_ID = 3
    _REQ_PAGES = 4

PAGE_SIZE = _PAGE
REQ_PAGES = _REQ_PAGES
REQ_PAGES_ID = _REQ_PAGES_ID

cdef struct Block:
    const uint8_t* name
    Py_ssize_t name_len
    uint64_t addr
    uint64_t length
    uint64_t host_page
    const uint8_t* received
    double* asked_at


def serve_faults(int uffd, int stop, list blocks, WireLock lock not None, int64_t[::1] state):
    """Ask for every faulting page until stopped, the return path closes, or I/O fails.

    ``blocks``: ``(name, address, length, host_page_size, received,
    asked_at)`` per registered block (``received``: one bool per 4 KiB
    page, ``asked_at``: one float64 per 4 KiB page, set at a host page's
    first 4 KiB). ``state``: ``[faults, requests, last_block]`` (-1: no
    request yet), updated as the loop goes. ``lock.fd`` is the return
    path's socket. Returns ``(status, err)``.
    """
    if state.shape[0] < 3:
        raise ValueError("state needs 3 slots")
    if lock.fd < 0:
        raise ValueError("the return path has no socket for a compiled writer")
    cdef Py_ssize_t n = len(blocks), i
    cdef Block* t = <Block*>PyMem_Malloc(sizeof(Block) * (n if n else 1))
    if t == NULL:
        raise MemoryError()
    cdef const uint8_t[::1] nm
    cdef const uint8_t[::1] rv
    cdef double[::1] aa
    keep = []
    try:
        for i in range(n):
            name, addr, length, host_page, received, asked_at = blocks[i]
            nm = memoryview(name).cast("B")
            rv = memoryview(received).cast("B")
            aa = asked_at
            if not 0 < nm.shape[0] < 256:
                raise ValueError(f"block {i}: a name of 1-255 bytes")
            if host_page < _PAGE or host_page % _PAGE:
                raise ValueError(f"block {i}: host page size {host_page}")
            if rv.shape[0] != aa.shape[0] or <uint64_t>rv.shape[0] * _PAGE < <uint64_t>length:
                raise ValueError(f"block {i}: received/asked_at do not cover it")
            keep.append((nm, rv, aa))
            t[i].name = &nm[0]
            t[i].name_len = nm.shape[0]
            t[i].addr = addr
            t[i].length = length
            t[i].host_page = host_page
            t[i].received = &rv[0] if rv.shape[0] else NULL
            t[i].asked_at = &aa[0] if aa.shape[0] else NULL
        return _loop(uffd, stop, t, n, lock, &state[0])
    finally:
        PyMem_Free(t)


cdef tuple _loop(int uffd, int stop, Block* t, Py_ssize_t n, WireLock lock, int64_t* state):
    cdef uint8_t msgs[_MSG * 64]
    cdef uint8_t req[8 + 8 + 4 + 1 + 255]
    cdef iovec iov
    cdef ssize_t got, k
    cdef Py_ssize_t i
    cdef uint64_t addr, rel, host, idx, nbytes = 0
    cdef int status = 0, err = 0, w, st
    cdef bint closed = False, is_socket = True
    cdef size_t length
    with nogil:
        while status == 0:
            w = wait_fd(uffd, POLLIN, stop, -1, &err)
            if w == S_STOPPED:
                status = S_STOPPED
                break
            if w != -1:  # WAIT_READY
                status = S_READ_FAILED
                break
            got = read(uffd, msgs, sizeof(msgs))
            if got < 0:
                if errno == EAGAIN or errno == EINTR:
                    continue
                err = errno
                status = S_READ_FAILED
                break
            k = 0
            while k + _MSG <= got and status == 0:
                if msgs[k] != _EVENT_PAGEFAULT:
                    k += _MSG
                    continue
                memcpy(&addr, msgs + k + 16, 8)  # uffd_msg.arg.pagefault.address, host order
                k += _MSG
                for i in range(n):
                    if t[i].addr <= addr < t[i].addr + t[i].length:
                        break
                else:
                    continue  # not guest RAM: only the blocks are registered
                rel = addr - t[i].addr
                host = rel - rel % t[i].host_page
                idx = host // _PAGE
                state[0] += 1
                if t[i].received[idx] or t[i].asked_at[idx] > 0:
                    continue  # placed meanwhile, or already asked for
                t[i].asked_at[idx] = monotonic_now()
                state[1] += 1
                pthread_mutex_lock(&lock.m)
                if lock.closed:
                    pthread_mutex_unlock(&lock.m)
                    closed = True
                    continue
                store_be64(req + 4, host)
                store_be32(req + 12, <uint32_t>t[i].host_page)
                if i == state[2]:
                    length = 12
                    store_be32(req, (<uint32_t>_REQ_PAGES << 16) | 12)
                else:
                    length = 13 + t[i].name_len
                    store_be32(req, (<uint32_t>_REQ_PAGES_ID << 16) | <uint32_t>length)
                    req[16] = <uint8_t>t[i].name_len
                    memcpy(req + 17, t[i].name, t[i].name_len)
                iov.iov_base = req
                iov.iov_len = 4 + length
                st = write_all(lock.fd, lock.wake, -1, &is_socket, &iov, 1, &nbytes, &err)
                if st == -1:
                    lock.sent += 1
                    state[2] = i
                pthread_mutex_unlock(&lock.m)
                if st != -1:
                    status = S_WRITE_FAILED
            if closed and status == 0:
                status = S_CLOSED
    return status, err
