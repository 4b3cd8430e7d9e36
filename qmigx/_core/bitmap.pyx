"""Per-RAM-block dirty bitmap with chunked dirty-log clearing (compiled kernel).

The source sends what this bitmap says is dirty (ram.md §5-6) and pulls
the tracker's dirty log into it at every sync. QEMU does not re-arm the
tracker for the whole block at a sync; it remembers per chunk of
2^clear_bitmap_shift pages that the tracker's log still has to be
cleared, and clears a chunk only just before the first page of it is
sent (ram.md §12). That saves the clears for chunks with nothing to send
and keeps each clear small; the ordering (clear, then read the page)
is what makes later guest writes land in the next sync.

Layout: one bit per target page, numpy uint64 words, page p is bit p % 64
of word p // 64 (little-endian bit order, the same bytes as QEMU's
``unsigned long`` bitmaps on x86-64). Bits past ``npages`` are always 0.
"""

import logging

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

from qmigx._core.wirelock cimport WireLock, pthread_mutex_lock, pthread_mutex_unlock

import numpy as np

from qmigx.errors import ParameterError, StateError

__all__ = [
    "DirtyBitmap",
    "CLEAR_BITMAP_SHIFT_DEFAULT",
    "CLEAR_BITMAP_SHIFT_MIN",
    "CLEAR_BITMAP_SHIFT_MAX",
]

#: QEMU's default, bounds of ``x-clear-bitmap-shift`` (one chunk = 2^shift pages).
CLEAR_BITMAP_SHIFT_DEFAULT = 18
CLEAR_BITMAP_SHIFT_MIN = 6
CLEAR_BITMAP_SHIFT_MAX = 31

_log = logging.getLogger("qmigx.bitmap")

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>

    #if (defined(__GNUC__) || defined(__clang__)) && \\
        (defined(__x86_64__) || defined(__i386__))
    #define QBM_X86 1
    #else
    #define QBM_X86 0
    #endif

    #define QBM_INLINE static inline __attribute__((always_inline))

    /* Bodies are generic and always inlined, so that the copies inside the
     * target("popcnt") wrappers below get the popcnt instruction while the
     * module itself is compiled for the baseline CPU. */

    /* OR a little-endian byte log into dst (word aligned), masked to nbits,
     * returning the number of bits that were 0 in dst and 1 in the log.
     * loglen >= ceil(nbits / 8) is guaranteed by the caller. */
    QBM_INLINE uint64_t qbm_or_log_body(uint64_t *dst, const unsigned char *log,
                                        size_t loglen, size_t nbits)
    {
        size_t nw = (nbits + 63) >> 6, k = 0, avail;
        uint64_t newly = 0, l, d, last = 0;
        if (nw == 0) {
            return 0;
        }
        /* every word but the last is entirely inside the log */
        for (; k + 4 < nw; k += 4) {
            uint64_t l4[4];
            memcpy(l4, log + k * 8, sizeof(l4));
            if ((l4[0] | l4[1] | l4[2] | l4[3]) == 0) {
                continue;
            }
            for (int j = 0; j < 4; j++) {
                if (l4[j]) {
                    d = dst[k + j];
                    newly += (uint64_t)__builtin_popcountll(l4[j] & ~d);
                    dst[k + j] = d | l4[j];
                }
            }
        }
        for (; k + 1 < nw; k++) {
            memcpy(&l, log + k * 8, 8);
            if (l) {
                d = dst[k];
                newly += (uint64_t)__builtin_popcountll(l & ~d);
                dst[k] = d | l;
            }
        }
        avail = loglen - k * 8;
        memcpy(&last, log + k * 8, avail < 8 ? avail : 8);
        if (nbits & 63) {
            last &= (((uint64_t)1) << (nbits & 63)) - 1;
        }
        d = dst[k];
        newly += (uint64_t)__builtin_popcountll(last & ~d);
        dst[k] = d | last;
        return newly;
    }

    QBM_INLINE uint64_t qbm_count_body(const uint64_t *w, size_t nw)
    {
        uint64_t a = 0, b = 0, c = 0, e = 0;
        size_t k = 0;
        for (; k + 4 <= nw; k += 4) {
            a += (uint64_t)__builtin_popcountll(w[k]);
            b += (uint64_t)__builtin_popcountll(w[k + 1]);
            c += (uint64_t)__builtin_popcountll(w[k + 2]);
            e += (uint64_t)__builtin_popcountll(w[k + 3]);
        }
        for (; k < nw; k++) {
            a += (uint64_t)__builtin_popcountll(w[k]);
        }
        return a + b + c + e;
    }

    static uint64_t qbm_or_log_generic(uint64_t *dst, const unsigned char *log,
                                       size_t loglen, size_t nbits)
    {
        return qbm_or_log_body(dst, log, loglen, nbits);
    }

    static uint64_t qbm_count_generic(const uint64_t *w, size_t nw)
    {
        return qbm_count_body(w, nw);
    }

    #if QBM_X86
    __attribute__((target("popcnt")))
    static uint64_t qbm_or_log_popcnt(uint64_t *dst, const unsigned char *log,
                                      size_t loglen, size_t nbits)
    {
        return qbm_or_log_body(dst, log, loglen, nbits);
    }

    __attribute__((target("popcnt")))
    static uint64_t qbm_count_popcnt(const uint64_t *w, size_t nw)
    {
        return qbm_count_body(w, nw);
    }
    #endif

    #if QBM_X86
    #include <immintrin.h>

    /* Per-64-bit-lane popcount: nibble table lookup, then byte sums. */
    __attribute__((target("avx2")))
    static inline __m256i qbm_popcount_lanes(__m256i v)
    {
        const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                               0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
        const __m256i nibble = _mm256_set1_epi8(0x0f);
        __m256i lo = _mm256_and_si256(v, nibble);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo),
                                        _mm256_shuffle_epi8(table, hi));
        return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
    }

    #define QBM_LD(p) _mm256_loadu_si256((const __m256i *)(p))

    /* Same contract as qbm_or_log_body.  Reads dst in full, 128 bytes at a
     * time, rather than only where the log has bits: a sequential stream
     * the prefetcher follows, where scattered reads would each pay a cache
     * and TLB miss.  Blocks that add no new bit are not written back. */
    __attribute__((target("avx2,popcnt")))
    static uint64_t qbm_or_log_avx2(uint64_t *dst, const unsigned char *log,
                                    size_t loglen, size_t nbits)
    {
        size_t nw = (nbits + 63) >> 6, k = 0, avail;
        uint64_t newly, l, d, last = 0;
        uint64_t lanes[4];
        __m256i acc = _mm256_setzero_si256();
        if (nw == 0) {
            return 0;
        }
        for (; k + 16 < nw; k += 16) {
            const unsigned char *q = log + k * 8;
            __m256i d0 = QBM_LD(dst + k), d1 = QBM_LD(dst + k + 4);
            __m256i d2 = QBM_LD(dst + k + 8), d3 = QBM_LD(dst + k + 12);
            __m256i n0 = _mm256_andnot_si256(d0, QBM_LD(q));
            __m256i n1 = _mm256_andnot_si256(d1, QBM_LD(q + 32));
            __m256i n2 = _mm256_andnot_si256(d2, QBM_LD(q + 64));
            __m256i n3 = _mm256_andnot_si256(d3, QBM_LD(q + 96));
            __m256i any = _mm256_or_si256(_mm256_or_si256(n0, n1), _mm256_or_si256(n2, n3));
            if (_mm256_testz_si256(any, any)) {
                continue;
            }
            _mm256_storeu_si256((__m256i *)(dst + k), _mm256_or_si256(d0, n0));
            _mm256_storeu_si256((__m256i *)(dst + k + 4), _mm256_or_si256(d1, n1));
            _mm256_storeu_si256((__m256i *)(dst + k + 8), _mm256_or_si256(d2, n2));
            _mm256_storeu_si256((__m256i *)(dst + k + 12), _mm256_or_si256(d3, n3));
            acc = _mm256_add_epi64(
                acc, _mm256_add_epi64(
                         _mm256_add_epi64(qbm_popcount_lanes(n0), qbm_popcount_lanes(n1)),
                         _mm256_add_epi64(qbm_popcount_lanes(n2), qbm_popcount_lanes(n3))));
        }
        _mm256_storeu_si256((__m256i *)lanes, acc);
        newly = lanes[0] + lanes[1] + lanes[2] + lanes[3];
        for (; k + 1 < nw; k++) {
            memcpy(&l, log + k * 8, 8);
            d = dst[k];
            newly += (uint64_t)__builtin_popcountll(l & ~d);
            dst[k] = d | l;
        }
        avail = loglen - k * 8;
        memcpy(&last, log + k * 8, avail < 8 ? avail : 8);
        if (nbits & 63) {
            last &= (((uint64_t)1) << (nbits & 63)) - 1;
        }
        d = dst[k];
        newly += (uint64_t)__builtin_popcountll(last & ~d);
        dst[k] = d | last;
        return newly;
    }

    #undef QBM_LD
    #endif

    /* 0 generic, 1 popcnt, 2 avx2 (which implies popcnt) */
    static int qbm_level = 0;

    static void qbm_init(void)
    {
    #if QBM_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("popcnt")) {
            qbm_level = __builtin_cpu_supports("avx2") ? 2 : 1;
        }
    #endif
    }

    static void qbm_force_level(int level)
    {
        qbm_init();
        if (level < qbm_level) {
            qbm_level = level;
        }
    }

    static uint64_t qbm_or_log(uint64_t *dst, const unsigned char *log,
                               size_t loglen, size_t nbits)
    {
    #if QBM_X86
        if (qbm_level == 2) {
            return qbm_or_log_avx2(dst, log, loglen, nbits);
        }
        if (qbm_level == 1) {
            return qbm_or_log_popcnt(dst, log, loglen, nbits);
        }
    #endif
        return qbm_or_log_generic(dst, log, loglen, nbits);
    }

    static uint64_t qbm_count(const uint64_t *w, size_t nw)
    {
    #if QBM_X86
        if (qbm_level >= 1) {
            return qbm_count_popcnt(w, nw);
        }
    #endif
        return qbm_count_generic(w, nw);
    }

    /* First set bit at or after start, or nbits. */
    static size_t qbm_find_next(const uint64_t *w, size_t nbits, size_t start)
    {
        size_t nw = (nbits + 63) >> 6, i, r;
        uint64_t cur;
        if (start >= nbits) {
            return nbits;
        }
        i = start >> 6;
        cur = w[i] & (~(uint64_t)0 << (start & 63));
        while (!cur) {
            i++;
            while (i + 4 <= nw && (w[i] | w[i + 1] | w[i + 2] | w[i + 3]) == 0) {
                i += 4;
            }
            if (i >= nw) {
                return nbits;
            }
            cur = w[i];
        }
        r = (i << 6) + (size_t)__builtin_ctzll(cur);
        return r < nbits ? r : nbits;
    }

    /* Up to max set bits at or after start, ascending, into out. */
    static size_t qbm_collect(const uint64_t *w, size_t nbits, size_t start,
                              size_t max, int64_t *out)
    {
        size_t n = 0, nw = (nbits + 63) >> 6, i;
        uint64_t cur;
        if (start >= nbits || max == 0) {
            return 0;
        }
        i = start >> 6;
        cur = w[i] & (~(uint64_t)0 << (start & 63));
        for (;;) {
            while (cur) {
                out[n++] = (int64_t)((i << 6) + (size_t)__builtin_ctzll(cur));
                if (n == max) {
                    return n;
                }
                cur &= cur - 1;
            }
            i++;
            while (i + 4 <= nw && (w[i] | w[i + 1] | w[i + 2] | w[i + 3]) == 0) {
                i += 4;
            }
            if (i >= nw) {
                return n;
            }
            cur = w[i];
        }
    }

    /* The armed chunks of ascending pages, each once, ascending. */
    static size_t qbm_armed_chunks(const int64_t *pages, size_t n, unsigned shift,
                                   const uint64_t *armed, int64_t *chunks)
    {
        size_t m = 0, k;
        uint64_t prev = ~(uint64_t)0, ch;
        for (k = 0; k < n; k++) {
            ch = (uint64_t)pages[k] >> shift;
            if (ch != prev) {
                prev = ch;
                if ((armed[ch >> 6] >> (ch & 63)) & 1) {
                    chunks[m++] = (int64_t)ch;
                }
            }
        }
        return m;
    }

    static void qbm_clear_pages(uint64_t *w, const int64_t *pages, size_t n)
    {
        size_t k;
        for (k = 0; k < n; k++) {
            uint64_t p = (uint64_t)pages[k];
            w[p >> 6] &= ~(((uint64_t)1) << (p & 63));
        }
    }

    static void qbm_set_range(uint64_t *w, size_t start, size_t n)
    {
        size_t end = start + n, i, j, k;
        uint64_t first, last;
        if (n == 0) {
            return;
        }
        i = start >> 6;
        j = (end - 1) >> 6;
        first = ~(uint64_t)0 << (start & 63);
        last = ~(uint64_t)0 >> (63 - ((end - 1) & 63));
        if (i == j) {
            w[i] |= first & last;
            return;
        }
        w[i] |= first;
        for (k = i + 1; k < j; k++) {
            w[k] = ~(uint64_t)0;
        }
        w[j] |= last;
    }

    static void qbm_clear_range(uint64_t *w, size_t start, size_t n)
    {
        size_t end = start + n, i, j, k;
        uint64_t first, last;
        if (n == 0) {
            return;
        }
        i = start >> 6;
        j = (end - 1) >> 6;
        first = ~(uint64_t)0 << (start & 63);
        last = ~(uint64_t)0 >> (63 - ((end - 1) & 63));
        if (i == j) {
            w[i] &= ~(first & last);
            return;
        }
        w[i] &= ~first;
        for (k = i + 1; k < j; k++) {
            w[k] = 0;
        }
        w[j] &= ~last;
    }
    """
    void qbm_init() nogil
    void qbm_force_level(int level) nogil
    int qbm_level
    uint64_t qbm_or_log(uint64_t *dst, const unsigned char *log, size_t loglen,
                        size_t nbits) nogil
    uint64_t qbm_count(const uint64_t *w, size_t nw) nogil
    size_t qbm_find_next(const uint64_t *w, size_t nbits, size_t start) nogil
    size_t qbm_collect(const uint64_t *w, size_t nbits, size_t start, size_t max,
                       int64_t *out) nogil
    size_t qbm_armed_chunks(const int64_t *pages, size_t n, unsigned shift,
                            const uint64_t *armed, int64_t *chunks) nogil
    void qbm_clear_pages(uint64_t *w, const int64_t *pages, size_t n) nogil
    void qbm_set_range(uint64_t *w, size_t start, size_t n) nogil
    void qbm_clear_range(uint64_t *w, size_t start, size_t n) nogil

qbm_init()

cdef tuple _LEVELS = ("portable", "popcnt", "avx2")


def _simd_path():
    """The sync implementation in use: "avx2", "popcnt" or "portable"."""
    return _LEVELS[qbm_level]


def _set_simd(name):
    """Use at most this sync implementation (tests run each one); returns the previous.

    A name the CPU cannot run falls back to the best one it can.
    """
    previous = _LEVELS[qbm_level]
    if name not in _LEVELS:
        raise ParameterError(f"unknown SIMD path {name!r}", field="simd")
    qbm_force_level(_LEVELS.index(name))
    return previous


cdef const unsigned char[::1] _as_bytes(object buf) except *:
    cdef const unsigned char[::1] view
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        view = memoryview(buf).cast("B")
    return view


cdef object _read_only(object arr):
    view = arr.view()
    view.flags.writeable = False
    return view


def _clamp_shift(shift):
    """QEMU's clamp of x-clear-bitmap-shift, logging as QEMU reports it."""
    shift = int(shift)
    if shift > CLEAR_BITMAP_SHIFT_MAX:
        _log.error("clear_bitmap_shift (%d) too big, using max value (%d)",
                   shift, CLEAR_BITMAP_SHIFT_MAX)
        return CLEAR_BITMAP_SHIFT_MAX
    if shift < CLEAR_BITMAP_SHIFT_MIN:
        _log.error("clear_bitmap_shift (%d) too small, using min value (%d)",
                   shift, CLEAR_BITMAP_SHIFT_MIN)
        return CLEAR_BITMAP_SHIFT_MIN
    return shift


cdef class DirtyBitmap:
    """Dirty bitmap of one RAM block of ``npages`` target pages.

    Args:
        npages: pages in the block (>= 0).
        clear_bitmap_shift: log2 of the pages per clear chunk (QEMU's
            ``x-clear-bitmap-shift``, default 18). Values outside 6..31 are
            clamped as QEMU does; ``clear_bitmap_shift_clamped`` and
            ``requested_clear_bitmap_shift`` record it.
        source: optional dirty-log source (``qmigx.bitmap.DirtyLogSource``):
            ``sync_from_source()`` pulls ``source.sync()``, and
            ``source.clear(first_page, npages)`` is called for each armed chunk
            just before its first page is taken.

    The bitmap starts clean; call ``set_all()`` for the first pass (QEMU
    starts with every page dirty). Page numbers out of range raise
    :class:`ParameterError`.
    """

    cdef readonly Py_ssize_t npages
    cdef readonly int clear_bitmap_shift
    cdef readonly object requested_clear_bitmap_shift
    cdef readonly bint clear_bitmap_shift_clamped
    cdef readonly Py_ssize_t nchunks
    cdef readonly object source
    cdef object _clear_cb
    cdef object _words_arr
    cdef object _clear_arr
    cdef uint64_t[::1] _w
    cdef uint64_t[::1] _c

    def __init__(self, Py_ssize_t npages, clear_bitmap_shift=CLEAR_BITMAP_SHIFT_DEFAULT,
                 source=None):
        if npages < 0:
            raise ParameterError(f"negative page count {npages}", field="npages")
        self.npages = npages
        self.requested_clear_bitmap_shift = clear_bitmap_shift
        self.clear_bitmap_shift = _clamp_shift(clear_bitmap_shift)
        self.clear_bitmap_shift_clamped = self.clear_bitmap_shift != clear_bitmap_shift
        self.nchunks = (
            npages + ((<Py_ssize_t>1) << self.clear_bitmap_shift) - 1
        ) >> self.clear_bitmap_shift
        self._words_arr = np.zeros((npages + 63) // 64, dtype=np.uint64)
        self._clear_arr = np.zeros((self.nchunks + 63) // 64, dtype=np.uint64)
        self._w = self._words_arr
        self._c = self._clear_arr
        self.source = source
        self._clear_cb = None if source is None else source.clear

    # -- argument checks ----------------------------------------------------

    cdef inline int _check_page(self, Py_ssize_t page) except -1:
        if page < 0 or page >= self.npages:
            raise ParameterError(
                f"page {page} outside the block's {self.npages} pages", field="page"
            )
        return 0

    cdef inline int _check_range(self, Py_ssize_t start, Py_ssize_t n) except -1:
        if start < 0 or n < 0 or start > self.npages or n > self.npages - start:
            raise ParameterError(
                f"pages [{start}, {start} + {n}) outside the block's {self.npages} pages",
                field="range",
            )
        return 0

    # -- plain bit operations ------------------------------------------------

    def set(self, Py_ssize_t start, Py_ssize_t n=1):
        """Mark pages ``[start, start + n)`` dirty."""
        self._check_range(start, n)
        if n:
            with nogil:
                qbm_set_range(&self._w[0], <size_t>start, <size_t>n)

    def clear(self, Py_ssize_t start, Py_ssize_t n=1):
        """Mark pages ``[start, start + n)`` clean (no clear callback)."""
        self._check_range(start, n)
        if n:
            with nogil:
                qbm_clear_range(&self._w[0], <size_t>start, <size_t>n)

    def set_all(self):
        """Mark every page dirty (the state at migration setup)."""
        if self.npages:
            qbm_set_range(&self._w[0], 0, <size_t>self.npages)

    def test(self, Py_ssize_t page):
        """True if ``page`` is dirty."""
        self._check_page(page)
        return (self._w[page >> 6] >> (page & 63)) & 1 == 1

    def test_and_clear(self, Py_ssize_t page):
        """Clear ``page``'s bit; True if it was dirty. No clear callback."""
        cdef uint64_t bit
        self._check_page(page)
        bit = (<uint64_t>1) << (page & 63)
        if self._w[page >> 6] & bit:
            self._w[page >> 6] &= ~bit
            return True
        return False

    def find_next(self, Py_ssize_t start):
        """First dirty page at or after ``start``, or ``npages`` if none."""
        cdef size_t r
        if start < 0:
            raise ParameterError(f"negative start page {start}", field="start")
        if start >= self.npages:
            return self.npages
        with nogil:
            r = qbm_find_next(&self._w[0], <size_t>self.npages, <size_t>start)
        return r

    def count(self):
        """Number of dirty pages."""
        cdef uint64_t r = 0
        if self.npages:
            with nogil:
                r = qbm_count(&self._w[0], <size_t>self._w.shape[0])
        return r

    # -- sync ----------------------------------------------------------------

    def sync(self, log, Py_ssize_t start=0, npages=None):
        """OR a dirty log into pages ``[start, start + npages)``; newly dirty count.

        ``log`` covers the range bit for bit in this bitmap's layout: a
        numpy uint64 word array or any buffer of little-endian bytes, of
        ``ceil(npages / 8)`` to ``8 * ceil(npages / 64)`` bytes (so both a
        tight byte string and whole words fit); bits past the range are
        ignored. ``start`` must be a multiple of 64, ``npages`` defaults to
        the rest of the block. The log is only read.

        Returns the pages set in the log that were not dirty here (what
        QEMU adds to its dirty-page count), and arms every clear chunk
        overlapping the range, whether or not anything was dirty.
        """
        cdef const unsigned char[::1] data = _as_bytes(log)
        cdef Py_ssize_t n = self.npages - start if npages is None else npages
        cdef Py_ssize_t length = data.shape[0]
        cdef uint64_t newly = 0
        if start % 64:
            raise ParameterError(
                f"sync start page {start} is not a multiple of 64", field="start"
            )
        self._check_range(start, n)
        if length < (n + 7) // 8 or length > 8 * ((n + 63) // 64):
            raise ParameterError(
                f"dirty log of {length} bytes does not cover {n} pages "
                f"({(n + 7) // 8} to {8 * ((n + 63) // 64)} bytes)",
                offset=length,
                field="log",
            )
        if n == 0:
            return 0
        with nogil:
            newly = qbm_or_log(&self._w[start >> 6], &data[0], <size_t>length, <size_t>n)
        self._arm(start, n)
        return newly

    def sync_from_source(self):
        """Pull ``source.sync()`` for the whole block; newly dirty count.

        A ``None`` log means nothing was dirtied; the chunks are armed all
        the same, as after any sync.
        """
        if self.source is None:
            raise StateError("this DirtyBitmap has no dirty-log source", field="source")
        log = self.source.sync()
        if log is None:
            self._arm(0, self.npages)
            return 0
        return self.sync(log)

    cdef _arm(self, Py_ssize_t start, Py_ssize_t n):
        cdef size_t first, last
        if n <= 0:
            return
        first = (<size_t>start) >> self.clear_bitmap_shift
        last = (<size_t>(start + n - 1)) >> self.clear_bitmap_shift
        qbm_set_range(&self._c[0], first, last - first + 1)

    # -- taking pages for sending ------------------------------------------

    cdef int _fire(self, int64_t chunk) except -1:
        """Clear the tracker's log for one armed chunk, then disarm it."""
        cdef int64_t first = chunk << self.clear_bitmap_shift
        cdef int64_t size = (<int64_t>1) << self.clear_bitmap_shift
        if self._clear_cb is not None:
            self._clear_cb(first, min(size, self.npages - first))
        self._c[chunk >> 6] &= ~((<uint64_t>1) << (chunk & 63))
        return 0

    cdef inline bint _armed(self, int64_t chunk) noexcept:
        return (self._c[chunk >> 6] >> (chunk & 63)) & 1

    def take(self, Py_ssize_t page):
        """Take one page for sending if it is dirty; True if it was.

        If the page's chunk is armed, ``source.clear`` is called for the
        chunk first; then the bit is cleared.
        """
        cdef uint64_t bit
        cdef int64_t chunk
        self._check_page(page)
        bit = (<uint64_t>1) << (page & 63)
        if not self._w[page >> 6] & bit:
            return False
        chunk = page >> self.clear_bitmap_shift
        if self._armed(chunk):
            self._fire(chunk)
        self._w[page >> 6] &= ~bit
        return True

    def take_next(self, Py_ssize_t start):
        """Take the first dirty page at or after ``start``; ``npages`` if none.

        Fires ``source.clear`` for the page's chunk if armed, then clears
        the bit, then returns the page: the tracker's log is cleared before
        the caller reads the page.
        """
        cdef Py_ssize_t page = self.find_next(start)
        cdef int64_t chunk
        if page >= self.npages:
            return self.npages
        chunk = page >> self.clear_bitmap_shift
        if self._armed(chunk):
            self._fire(chunk)
        self._w[page >> 6] &= ~((<uint64_t>1) << (page & 63))
        return page

    def take_dirty(self, Py_ssize_t start, Py_ssize_t max_pages, int64_t[::1] out,
                   WireLock lock=None):
        """Take up to ``max_pages`` dirty pages at or after ``start``, in order.

        Writes the page numbers, ascending, to ``out[:count]`` (an int64
        array with room for ``max_pages``; later entries are untouched)
        and returns ``count`` (0 when nothing is dirty from ``start`` on; no
        wrap-around). Ordering guarantee, for every returned page: its
        chunk's ``source.clear`` (once per armed chunk, chunks ascending)
        has returned, and its dirty bit has been cleared, before this
        method returns. The pages are found without the GIL, the callbacks
        run with it, then the bits are cleared.

        If a callback raises, the chunks already cleared stay disarmed and
        no dirty bit is cleared, so no page is lost; the exception
        propagates.

        ``lock``: another taker (the compiled server of postcopy page
        requests) clears bits under it without the GIL. The pages are then
        found and taken under it in one stretch without the GIL, so the
        lock is never held while this thread waits for the GIL. Pages of
        armed chunks are taken again under the lock after their callbacks
        (which run without it): only those still dirty are returned.
        """
        cdef size_t count = 0, nchunks = 0, k
        cdef int64_t *chunks = NULL
        cdef unsigned shift = <unsigned>self.clear_bitmap_shift
        if start < 0:
            raise ParameterError(f"negative start page {start}", field="start")
        if max_pages < 0 or max_pages > out.shape[0]:
            raise ParameterError(
                f"max_pages {max_pages} not in 0..len(out) = {out.shape[0]}",
                field="max_pages",
            )
        if start >= self.npages or max_pages == 0:
            return 0
        if lock is not None:
            return self._take_dirty_locked(start, max_pages, out, lock)
        with nogil:
            count = qbm_collect(&self._w[0], <size_t>self.npages, <size_t>start,
                                <size_t>max_pages, &out[0])
        if count == 0:
            return 0
        chunks = <int64_t *>malloc(count * sizeof(int64_t))
        if chunks == NULL:
            raise MemoryError()
        try:
            with nogil:
                nchunks = qbm_armed_chunks(&out[0], count, shift, &self._c[0], chunks)
            for k in range(nchunks):
                self._fire(chunks[k])
        finally:
            free(chunks)
        with nogil:
            qbm_clear_pages(&self._w[0], &out[0], count)
        return count

    cdef size_t _take_dirty_locked(self, Py_ssize_t start, Py_ssize_t max_pages,
                                   int64_t[::1] out, WireLock lock) except? 0:
        cdef size_t count = 0, nchunks = 0, k, kept
        cdef int64_t *chunks = NULL
        cdef unsigned shift = <unsigned>self.clear_bitmap_shift
        cdef uint64_t p, bit
        chunks = <int64_t *>malloc(<size_t>max_pages * sizeof(int64_t))
        if chunks == NULL:
            raise MemoryError()
        try:
            with nogil:
                pthread_mutex_lock(&lock.m)
                count = qbm_collect(&self._w[0], <size_t>self.npages, <size_t>start,
                                    <size_t>max_pages, &out[0])
                if count:
                    nchunks = qbm_armed_chunks(&out[0], count, shift, &self._c[0], chunks)
                    if nchunks == 0:
                        qbm_clear_pages(&self._w[0], &out[0], count)
                pthread_mutex_unlock(&lock.m)
            if count == 0 or nchunks == 0:
                return count
            for k in range(nchunks):
                self._fire(chunks[k])
        finally:
            free(chunks)
        with nogil:
            pthread_mutex_lock(&lock.m)
            kept = 0
            for k in range(count):
                p = <uint64_t>out[k]
                bit = (<uint64_t>1) << (p & 63)
                if self._w[p >> 6] & bit:
                    self._w[p >> 6] &= ~bit
                    out[kept] = out[k]
                    kept += 1
            pthread_mutex_unlock(&lock.m)
        return kept

    # -- views -----------------------------------------------------------------

    @property
    def words(self):
        """Read-only view of the bitmap words (uint64, page p = bit p % 64 of word p // 64)."""
        return _read_only(self._words_arr)

    def words_to_take(self):
        """The words themselves, writable: a sender elsewhere clears the bits it takes.

        It must take them under the same lock as this bitmap's own takers,
        and leave pages of armed chunks (see :attr:`clear_bmap`) to them.
        """
        return self._words_arr

    @property
    def chunk_pages(self):
        """Pages per clear chunk (2^clear_bitmap_shift)."""
        return (<int64_t>1) << self.clear_bitmap_shift

    @property
    def clear_bmap(self):
        """Read-only view of the armed-chunk bitmap (bit c = chunk c needs clearing)."""
        return _read_only(self._clear_arr)

    def is_armed(self, Py_ssize_t chunk):
        """True if chunk ``chunk`` (pages ``chunk << shift`` on) awaits its clear."""
        if chunk < 0 or chunk >= self.nchunks:
            raise ParameterError(f"chunk {chunk} outside 0..{self.nchunks - 1}", field="chunk")
        return bool(self._armed(chunk))

    def __repr__(self):
        return (
            f"DirtyBitmap(npages={self.npages}, "
            f"clear_bitmap_shift={self.clear_bitmap_shift}, dirty={self.count()})"
        )
