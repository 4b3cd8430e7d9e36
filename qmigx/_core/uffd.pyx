"""userfaultfd write-protect fault handler and atomic dirty-log helpers.

Why this is compiled: in synchronous write-protect mode a thread that
writes to protected memory is stopped by the kernel until the handler
un-protects the page. A Python writer holds the GIL while it is stopped
(a numpy store does not release it), so a handler written in Python could
never run and both would hang. The loop below runs without the GIL from
the first instruction to the last, and records dirty pages with atomic
operations so ``take_log`` can hand them over from any thread while the
handler keeps working.

The kernel ABI (numbers and layouts) is described in qmigx/dirtylog.py;
the constants are repeated here so the module builds against any libc
headers, old or new.

Log layout: one bit per target page (4 KiB), numpy uint64 words, page p is
bit p % 64 of word p // 64.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t

import os

__all__ = ["serve_faults", "wait_batch", "take_log", "atomic_or_range", "drop_runs",
           "TARGET_PAGE_SHIFT"]

TARGET_PAGE_SHIFT = 12

cdef extern from *:
    """
    #include <errno.h>
    #include <poll.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/ioctl.h>
    #include <sched.h>
    #include <unistd.h>

    #define QUF_IOCTL_WRITEPROTECT 0xC018AA06UL  /* _IOWR(0xAA, 0x06, 24) */
    #define QUF_EVENT_PAGEFAULT 0x12
    #define QUF_FLAG_WP 0x2
    #define QUF_MSG_SIZE 32
    #define QUF_BATCH 64
    #define QUF_TARGET_SHIFT 12

    enum {
        QUF_STOPPED = 0,
        QUF_ERR_POLL = -1,
        QUF_ERR_READ = -2,
        QUF_ERR_IOCTL = -3,
        QUF_ERR_HANGUP = -4,
    };

    static inline void quf_or(uint64_t *w, uint64_t bits) {
        __atomic_fetch_or(w, bits, __ATOMIC_SEQ_CST);
    }

    /* Set bits [first, first + n) of the log with atomic ORs. */
    static void quf_or_range(uint64_t *log, uint64_t first, uint64_t n) {
        while (n) {
            uint64_t bit = first & 63;
            uint64_t take = 64 - bit;
            if (take > n) take = n;
            uint64_t mask = (take == 64) ? ~(uint64_t)0
                                         : (((uint64_t)1 << take) - 1) << bit;
            quf_or(&log[first >> 6], mask);
            first += take;
            n -= take;
        }
    }

    static int quf_unprotect(int uffd, uint64_t start, uint64_t len) {
        uint64_t arg[3];
        arg[0] = start;
        arg[1] = len;
        arg[2] = 0;  /* no MODE_WP: un-protect; no MODE_DONTWAKE: wake the writer */
        for (;;) {
            if (ioctl(uffd, QUF_IOCTL_WRITEPROTECT, arg) == 0) return 0;
            if (errno == EAGAIN || errno == EINTR) continue;  /* mm changing under us */
            return -1;
        }
    }

    /* Give up tracking without leaving a writer stopped: un-protect the whole
     * range (waking everyone) and report every page dirty. Runs before the
     * GIL is taken back, because a stopped writer may be holding it. */
    static int quf_fail(int uffd, uint64_t base, uint64_t length, uint64_t *log,
                        int *err, int code) {
        *err = errno;
        quf_unprotect(uffd, base, length);
        quf_or_range(log, 0, length >> QUF_TARGET_SHIFT);
        return code;
    }

    /* Serve write-protect faults until stop_fd becomes readable.
     *
     * Per fault the page's bit is set BEFORE the page is un-protected, so a
     * write can never complete without being in the log (a final sync after
     * the writers stopped sees it). stats[1] is odd while a batch is being
     * served: quf_wait_batch() lets clear() wait for it, so a re-protect can
     * not be undone by an un-protect of a page whose bit a sync has already
     * taken (that write would be lost). */
    static int quf_serve(int uffd, int stop_fd, uint64_t base, uint64_t length,
                         uint64_t host_page, uint64_t *log, uint64_t *stats,
                         int *err) {
        unsigned char buf[QUF_MSG_SIZE * QUF_BATCH];
        struct pollfd pfd[2];
        uint64_t npages = length >> QUF_TARGET_SHIFT;
        for (;;) {
            pfd[0].fd = uffd; pfd[0].events = POLLIN; pfd[0].revents = 0;
            pfd[1].fd = stop_fd; pfd[1].events = POLLIN; pfd[1].revents = 0;
            if (poll(pfd, 2, -1) < 0) {
                if (errno == EINTR) continue;
                return quf_fail(uffd, base, length, log, err, QUF_ERR_POLL);
            }
            if (pfd[1].revents) return QUF_STOPPED;
            if (pfd[0].revents & (POLLERR | POLLNVAL)) {
                errno = EBADF;
                return quf_fail(uffd, base, length, log, err, QUF_ERR_HANGUP);
            }
            if (!(pfd[0].revents & POLLIN)) continue;
            ssize_t got = read(uffd, buf, sizeof buf);
            if (got <= 0) {
                if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (got == 0) errno = EIO;  /* not a userfaultfd: never spin on EOF */
                return quf_fail(uffd, base, length, log, err, QUF_ERR_READ);
            }
            __atomic_fetch_add(&stats[1], 1, __ATOMIC_SEQ_CST);  /* batch begins: odd */
            for (ssize_t off = 0; off + QUF_MSG_SIZE <= got; off += QUF_MSG_SIZE) {
                uint64_t flags, addr;
                if (buf[off] != QUF_EVENT_PAGEFAULT) continue;
                memcpy(&flags, buf + off + 8, 8);
                memcpy(&addr, buf + off + 16, 8);
                addr &= ~(host_page - 1);
                if ((flags & QUF_FLAG_WP) && addr >= base && addr - base < length) {
                    uint64_t first = (addr - base) >> QUF_TARGET_SHIFT;
                    uint64_t n = host_page >> QUF_TARGET_SHIFT;
                    if (first + n > npages) n = npages - first;
                    quf_or_range(log, first, n);
                }
                /* counted before the writer wakes, so whoever it tells sees the count */
                __atomic_fetch_add(&stats[0], 1, __ATOMIC_SEQ_CST);
                if (quf_unprotect(uffd, addr, host_page) < 0) {
                    __atomic_fetch_add(&stats[1], 1, __ATOMIC_SEQ_CST);
                    return quf_fail(uffd, base, length, log, err, QUF_ERR_IOCTL);
                }
            }
            __atomic_fetch_add(&stats[1], 1, __ATOMIC_SEQ_CST);  /* batch done: even */
        }
    }

    /* Wait until the batch being served right now (if any) is finished. */
    static void quf_wait_batch(uint64_t *stats) {
        uint64_t seq = __atomic_load_n(&stats[1], __ATOMIC_SEQ_CST);
        if (!(seq & 1)) return;
        while (__atomic_load_n(&stats[1], __ATOMIC_SEQ_CST) == seq) sched_yield();
    }

    /* Move the log into out word by word (atomic exchange with 0), count bits. */
    static uint64_t quf_take(uint64_t *log, uint64_t *out, uint64_t nwords) {
        uint64_t total = 0;
        for (uint64_t i = 0; i < nwords; i++) {
            uint64_t w = __atomic_load_n(&log[i], __ATOMIC_RELAXED);
            if (w) w = __atomic_exchange_n(&log[i], 0, __ATOMIC_SEQ_CST);
            out[i] = w;
            total += (uint64_t)__builtin_popcountll(w);
        }
        return total;
    }
    """
    int QUF_STOPPED, QUF_ERR_POLL, QUF_ERR_READ, QUF_ERR_IOCTL, QUF_ERR_HANGUP
    int quf_serve(int uffd, int stop_fd, uint64_t base, uint64_t length,
                  uint64_t host_page, uint64_t *log, uint64_t *stats, int *err) nogil
    uint64_t quf_take(uint64_t *log, uint64_t *out, uint64_t nwords) nogil
    void quf_wait_batch(uint64_t *stats) nogil
    void quf_or_range(uint64_t *log, uint64_t first, uint64_t n) nogil


def serve_faults(int uffd, int stop_fd, unsigned long long base, unsigned long long length,
                 unsigned long long host_page_size, uint64_t[::1] log not None,
                 uint64_t[::1] stats not None):
    """Serve write-protect faults on ``[base, base + length)`` until ``stop_fd`` is readable.

    For every fault the host page's target pages are OR-ed into ``log``, then
    the page is un-protected (waking the writer). ``stats[0]`` counts faults
    served; ``stats[1]`` is odd while a batch of faults is being served
    (see :func:`wait_batch`).
    Runs without the GIL; meant to be the body of a handler thread.
    Returns 0 when stopped. If the fd fails it first un-protects the whole
    range (no writer stays stopped) and marks every page dirty, then raises
    OSError.
    """
    cdef uint64_t npages = length >> 12
    cdef int err = 0
    cdef int rc
    if length % 4096 or base % 4096:
        raise ValueError("base and length must be multiples of 4096")
    if host_page_size < 4096 or host_page_size & (host_page_size - 1):
        raise ValueError(f"host page size {host_page_size} is not a power of two >= 4096")
    if <uint64_t>log.shape[0] * 64 < npages:
        raise ValueError(f"log of {log.shape[0]} words is too small for {npages} pages")
    if stats.shape[0] < 2:
        raise ValueError("stats needs two words")
    with nogil:
        rc = quf_serve(uffd, stop_fd, base, length, host_page_size,
                       &log[0], &stats[0], &err)
    if rc == QUF_STOPPED:
        return 0
    what = {QUF_ERR_POLL: "poll", QUF_ERR_READ: "read", QUF_ERR_IOCTL: "UFFDIO_WRITEPROTECT",
            QUF_ERR_HANGUP: "poll"}.get(rc, "handler")
    raise OSError(err, f"userfaultfd {what} failed: {os.strerror(err)}")


def take_log(uint64_t[::1] log not None, uint64_t[::1] out not None):
    """Move ``log`` into ``out`` atomically per word (log words become 0); return the bit count.

    Safe while ``serve_faults`` or ``atomic_or_range`` run in other threads:
    every bit they set lands in exactly one ``take_log`` result.
    """
    cdef Py_ssize_t n = log.shape[0]
    cdef uint64_t total
    if out.shape[0] < n:
        raise ValueError(f"out has {out.shape[0]} words, log has {n}")
    if n == 0:
        return 0
    with nogil:
        total = quf_take(&log[0], &out[0], <uint64_t>n)
    return total


def atomic_or_range(uint64_t[::1] log not None, unsigned long long first, unsigned long long n):
    """Set bits ``[first, first + n)`` of ``log`` with atomic ORs (lock-free marking)."""
    if n == 0:
        return
    if first + n < first or first + n > <unsigned long long>log.shape[0] * 64:
        raise ValueError(f"bits {first}..{first + n} outside a log of {log.shape[0] * 64} bits")
    with nogil:
        quf_or_range(&log[0], first, n)


def wait_batch(uint64_t[::1] stats not None):
    """Return once the batch of faults ``serve_faults`` is serving now (if any) is done.

    Call before re-protecting pages whose log bits were taken: it keeps the
    handler's un-protect of such a page from landing after the re-protect.
    """
    if stats.shape[0] < 2:
        raise ValueError("stats needs two words")
    with nogil:
        quf_wait_batch(&stats[0])


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void* addr, size_t length, int advice)
    enum:
        MADV_DONTNEED

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, long offset, long length)
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE


def drop_runs(unsigned long long addr, int fd, const long long[::1] starts not None,
              const long long[::1] lengths not None):
    """Make runs of pages missing again: ``[addr + start, addr + start + length)`` each.

    Postcopy's LISTEN drops every page that arrived in precopy and was
    discarded since: thousands of scattered runs, one system call each,
    made here in one loop without the GIL instead of one Python call per
    run. ``fd`` >= 0 (shared memory backing the range from file offset 0):
    a hole is punched first, as private ``MADV_DONTNEED`` alone would leave
    the file's pages in place. Returns 0, or the errno of the first failing
    ``madvise`` (punching is best effort).
    """
    cdef Py_ssize_t i, n = starts.shape[0]
    cdef int err = 0
    if lengths.shape[0] != n:
        raise ValueError("starts and lengths differ in length")
    for i in range(n):
        if starts[i] < 0 or lengths[i] < 0:
            raise ValueError(f"run {i}: negative start or length")
    with nogil:
        for i in range(n):
            if lengths[i] == 0:
                continue
            if fd >= 0:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, starts[i], lengths[i])
            if madvise(<void*>(addr + <unsigned long long>starts[i]), <size_t>lengths[i],
                       MADV_DONTNEED) != 0 and err == 0:
                err = errno
    return err
