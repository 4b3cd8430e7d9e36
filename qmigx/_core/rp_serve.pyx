# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The postcopy source's return path read, and requested pages sent, without the GIL.

With ``postcopy-preempt`` each requested page goes out on its own channel
as soon as the request is read. Done by the Python return-path thread,
every request first waits for the GIL, held in turn by the background
stream and anything else in the process: measured, a large part of a
request's latency. This loop reads the return path and, for each
REQ_PAGES / REQ_PAGES_ID of a known block, takes the pages' dirty bits
under the bitmaps' :class:`~qmigx._core.wirelock.WireLock` (the lock the
background stream takes its batches under, so a page goes out once) and
writes each page taken as a bare record (``be64 offset|PAGE[|CONTINUE]``,
the block name unless CONTINUE, 4 KiB) straight from guest memory to the
preempt channel, under that channel's lock.

Anything else it hands back at the message's own offset (``DONE``, ``pos``
there): another message type, an unknown block, a range QEMU refuses, a
page whose chunk still has its dirty log to clear. Python decodes it, with
its errors. ``qmigx.reference.rp_serve`` is the plain-Python twin.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memmove
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from qmigx._core.byteorder cimport load_be32, load_be64, store_be64
from qmigx._core.fdwait cimport POLLIN, iovec, monotonic_now, recv_nowait, wait_fd, write_all
from qmigx._core.wirelock cimport WireLock, pthread_mutex_lock, pthread_mutex_unlock

__all__ = ["serve_requests", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED", "WRITE_FAILED",
           "PAGE_SIZE", "MIN_BUFFER", "STATE_SLOTS"]

cdef enum Status:
    S_DONE = 0
    S_END = 1
    S_STOPPED = 2
    S_TIMEOUT = 3
    S_FAILED = 5
    S_WRITE_FAILED = 6

#: a message for Python is at ``pos``
DONE = S_DONE
#: the peer closed the return path
END = S_END
#: the return path was shut down
STOPPED = S_STOPPED
#: ``timeout_ms`` passed with nothing to read, or the loop ran that long: Python's turn
TIMEOUT = S_TIMEOUT
#: reading the return path failed (``err``)
FAILED = S_FAILED
#: writing the preempt channel failed (``err``)
WRITE_FAILED = S_WRITE_FAILED

cdef enum:
    _PAGE = 4096
    _PAGE_SHIFT = 12
    _REQ_PAGES_ID = 3
    _REQ_PAGES = 4
    _F_PAGE = 0x08
    _F_CONTINUE = 0x20
    _MAX_MESSAGE = 4 + 65535

PAGE_SIZE = _PAGE
#: the smallest ``buf`` the loop accepts (a whole message of the largest length)
MIN_BUFFER = _MAX_MESSAGE
#: ``state``: last request's block, last record's block, pages sent, requests served, bytes read
STATE_SLOTS = 5

cdef struct Block:
    const uint8_t* name
    Py_ssize_t name_len
    uint64_t* words
    const uint64_t* armed
    int shift
    const uint8_t* ram
    uint64_t npages


cdef Py_ssize_t _find(Block* t, Py_ssize_t n, const uint8_t* name, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if t[i].name_len == k and memcmp(t[i].name, name, k) == 0:
            return i
    return -1


def serve_requests(int fd, int wake, buf, Py_ssize_t have, list blocks,
                   WireLock take_lock not None, WireLock out not None, int64_t[::1] state,
                   int timeout_ms):
    """Serve page requests until a message needs Python, the path ends, or ``timeout_ms``.

    ``blocks``: ``(name, words, armed, clear_shift, ram)`` per RAM block in
    the source's order (``words``: its dirty bitmap as uint64 words,
    ``armed``: the chunks whose dirty log is still to clear, ``ram``: its
    memory). ``buf[:have]`` holds bytes read and not decoded. ``out.fd``
    is the preempt channel. ``state``: see :data:`STATE_SLOTS` (-1: no
    block yet), updated as the loop goes. Returns ``(status, pos, have,
    err)``: ``buf[pos:have]`` is what is left undecoded.
    """
    cdef uint8_t[::1] b = memoryview(buf).cast("B")
    cdef Py_ssize_t cap = b.shape[0]
    if cap < MIN_BUFFER:
        raise ValueError(f"buf must hold at least {MIN_BUFFER} bytes")
    if not 0 <= have <= cap:
        raise ValueError("have is outside buf")
    if state.shape[0] < STATE_SLOTS:
        raise ValueError(f"state needs {STATE_SLOTS} slots")
    if out.fd < 0:
        raise ValueError("the preempt channel has no socket for a compiled writer")
    cdef Py_ssize_t n = len(blocks), i
    if not -1 <= state[0] < n or not -1 <= state[1] < n:
        raise ValueError("state names no block of blocks")
    cdef Block* t = <Block*>PyMem_Malloc(sizeof(Block) * (n if n else 1))
    if t == NULL:
        raise MemoryError()
    cdef const uint8_t[::1] nm
    cdef uint64_t[::1] wd
    cdef const uint64_t[::1] ar
    cdef const uint8_t[::1] rm
    keep = []
    try:
        for i in range(n):
            name, words, armed, shift, ram = blocks[i]
            nm = memoryview(name).cast("B")
            wd = words
            ar = armed
            rm = memoryview(ram).cast("B")
            if not 0 < nm.shape[0] < 256:
                raise ValueError(f"block {i}: a name of 1-255 bytes")
            npages = rm.shape[0] // _PAGE
            if <uint64_t>wd.shape[0] * 64 < <uint64_t>npages or not 0 <= shift < 63 or \
                    <uint64_t>ar.shape[0] * 64 < (npages + (1 << shift) - 1) >> shift:
                raise ValueError(f"block {i}: its bitmaps do not cover it")
            keep.append((nm, wd, ar, rm))
            t[i].name = &nm[0]
            t[i].name_len = nm.shape[0]
            t[i].words = &wd[0] if wd.shape[0] else NULL
            t[i].armed = &ar[0] if ar.shape[0] else NULL
            t[i].shift = shift
            t[i].ram = &rm[0] if rm.shape[0] else NULL
            t[i].npages = npages
        return _loop(fd, wake, t, n, &b[0], cap, have, take_lock, out, &state[0], timeout_ms)
    finally:
        PyMem_Free(t)


cdef tuple _loop(int fd, int wake, Block* t, Py_ssize_t n, uint8_t* b, Py_ssize_t cap,
                 Py_ssize_t have, WireLock take_lock, WireLock out, int64_t* state,
                 int timeout_ms):
    cdef Py_ssize_t pos = 0, need, blk, k
    cdef uint32_t h, typ, ln
    cdef uint64_t start, length, first, last, p, chunk, bit, nbytes = 0
    cdef ssize_t got
    cdef int status = S_DONE, err = 0, w, st
    cdef bint took, armed, is_socket = True
    cdef uint8_t head[8 + 1 + 255]
    cdef iovec iov[2]
    cdef double t_end = monotonic_now() + timeout_ms * 1e-3
    with nogil:
        while True:
            need = 4
            if have - pos >= 4:
                h = load_be32(b + pos)
                typ = h >> 16
                ln = h & 0xFFFF
                need = 4 + ln
                if have - pos >= need:
                    if typ == _REQ_PAGES and ln == 12:
                        blk = state[0]
                    elif typ == _REQ_PAGES_ID and ln >= 13 and ln == 13 + b[pos + 16]:
                        blk = _find(t, n, b + pos + 17, b[pos + 16])
                    else:
                        break  # another message: Python's
                    if blk < 0:
                        break  # no block, or an unknown one: Python says so
                    start = load_be64(b + pos + 4)
                    length = load_be32(b + pos + 12)
                    if start & (_PAGE - 1) or length == 0 or \
                            start + length > t[blk].npages * _PAGE or start + length < start:
                        break  # QEMU refuses it: Python raises
                    first = start >> _PAGE_SHIFT
                    last = (start + length - 1) >> _PAGE_SHIFT
                    armed = False
                    for chunk in range(first >> t[blk].shift, (last >> t[blk].shift) + 1):
                        if (t[blk].armed[chunk >> 6] >> (chunk & 63)) & 1:
                            armed = True
                            break
                    if armed:
                        break  # the dirty log is cleared by Python first
                    for p in range(first, last + 1):
                        bit = (<uint64_t>1) << (p & 63)
                        pthread_mutex_lock(&take_lock.m)
                        took = (t[blk].words[p >> 6] & bit) != 0
                        if took:
                            t[blk].words[p >> 6] &= ~bit
                        pthread_mutex_unlock(&take_lock.m)
                        if not took:
                            continue
                        pthread_mutex_lock(&out.m)
                        if out.closed:
                            pthread_mutex_unlock(&out.m)
                            continue
                        if state[1] == blk:
                            store_be64(head, (p << _PAGE_SHIFT) | _F_PAGE | _F_CONTINUE)
                            iov[0].iov_len = 8
                        else:
                            store_be64(head, (p << _PAGE_SHIFT) | _F_PAGE)
                            head[8] = <uint8_t>t[blk].name_len
                            memmove(head + 9, t[blk].name, t[blk].name_len)
                            iov[0].iov_len = 9 + t[blk].name_len
                        iov[0].iov_base = head
                        iov[1].iov_base = <void*>(t[blk].ram + (p << _PAGE_SHIFT))
                        iov[1].iov_len = _PAGE
                        st = write_all(out.fd, out.wake, -1, &is_socket, iov, 2, &nbytes, &err)
                        if st == -1:
                            state[1] = blk
                            out.sent += 1
                            state[2] += 1
                        pthread_mutex_unlock(&out.m)
                        if st != -1:
                            status = S_WRITE_FAILED
                            break
                    if status != S_DONE:
                        break
                    state[0] = blk
                    state[3] += 1
                    pos += need
                    if timeout_ms >= 0 and monotonic_now() > t_end:
                        status = S_TIMEOUT
                        break
                    continue
            # short of `need` bytes: make room and read
            if pos == have:
                pos = have = 0
            elif cap - pos < need:
                memmove(b, b + pos, have - pos)
                have -= pos
                pos = 0
            got = recv_nowait(fd, b + have, cap - have)
            if got > 0:
                have += got
                state[4] += got
                continue
            if got == 0:
                status = S_END
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                w = wait_fd(fd, POLLIN, wake, timeout_ms, &err)
                if w == -1:  # WAIT_READY
                    continue
                status = w  # STOPPED, TIMEOUT or FAILED: the same codes
                break
            err = errno
            status = S_FAILED
            break
    return status, pos, have, err
