# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled page comparison and page digest; ``qmigx.reference.pagediff`` is the twin.

``qmigx diff`` compares two saved streams of 1 GiB guests where their
pages lie in the mapped files, and digests the base's RAM, instead of
loading both into memory: each page is read once, without the GIL.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from qmigx._core.byteorder cimport load_le64, store_be64

__all__ = ["changed_pages", "zero_pages", "gather_pages", "xbzrle_records", "XXH64"]

cdef uint64_t P1 = 0x9E3779B185EBCA87ULL
cdef uint64_t P2 = 0xC2B2AE3D27D4EB4FULL
cdef uint64_t P3 = 0x165667B19E3779F9ULL
cdef uint64_t P4 = 0x85EBCA77C2B2AE63ULL
cdef uint64_t P5 = 0x27D4EB2F165667C5ULL


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * P2
    return _rotl(acc, 31) * P1


cdef inline uint64_t _merge(uint64_t acc, uint64_t v) noexcept nogil:
    acc ^= _round(0, v)
    return acc * P1 + P4


cdef inline bint _is_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef const uint64_t* w = <const uint64_t*>p
    cdef Py_ssize_t k
    for k in range(n // 8):
        if w[k]:
            return False
    return True


cdef int _check(Py_ssize_t size, const int64_t[::1] off, Py_ssize_t page_size,
                str what) except -1:
    cdef Py_ssize_t i
    if page_size <= 0 or page_size % 32:
        raise ValueError(f"page size {page_size} is not a positive multiple of 32")
    for i in range(off.shape[0]):
        if off[i] >= 0 and off[i] + page_size > size:
            raise ValueError(f"{what} page {i} at {off[i]} lies outside the buffer of "
                             f"{size} bytes")
    return 0


def changed_pages(const uint8_t[::1] a, const int64_t[::1] a_off, const uint8_t[::1] b,
                  const int64_t[::1] b_off, uint8_t[::1] changed, Py_ssize_t page_size=4096):
    """Set ``changed[i]`` to 1 where page ``i`` differs between the two views; the count."""
    cdef Py_ssize_t n = a_off.shape[0], i, count = 0
    cdef const uint8_t* pa
    cdef const uint8_t* pb
    cdef bint diff
    _check(a.shape[0], a_off, page_size, "first")
    _check(b.shape[0], b_off, page_size, "second")
    if b_off.shape[0] != n:
        raise ValueError("the two views differ in page count")
    if changed.shape[0] < n:
        raise ValueError(f"changed holds {changed.shape[0]} entries; {n} pages need as many")
    if n == 0:
        return 0
    with nogil:
        for i in range(n):
            if a_off[i] < 0 and b_off[i] < 0:
                diff = False
            elif a_off[i] < 0:
                diff = not _is_zero(&b[b_off[i]], page_size)
            elif b_off[i] < 0:
                diff = not _is_zero(&a[a_off[i]], page_size)
            else:
                diff = memcmp(&a[a_off[i]], &b[b_off[i]], page_size) != 0
            changed[i] = diff
            count += diff
    return count


def zero_pages(const uint8_t[::1] data, const int64_t[::1] off, uint8_t[::1] zero,
               Py_ssize_t page_size=4096):
    """Set ``zero[i]`` to 1 where page ``i`` (at ``off[i]``; negative: a ZERO record)
    holds only zero bytes; the count."""
    cdef Py_ssize_t n = off.shape[0], i, count = 0
    cdef bint z
    _check(data.shape[0], off, page_size, "a")
    if zero.shape[0] < n:
        raise ValueError(f"zero holds {zero.shape[0]} entries; {n} pages need as many")
    with nogil:
        for i in range(n):
            z = off[i] < 0 or _is_zero(&data[off[i]], page_size)
            zero[i] = z
            count += z
    return count


def gather_pages(const uint8_t[::1] data, const int64_t[::1] off, uint8_t[:, ::1] out):
    """Copy page ``i`` (at ``off[i]``; negative: zeros) into row ``i`` of ``out``."""
    cdef Py_ssize_t n = off.shape[0], i, page_size = out.shape[1]
    _check(data.shape[0], off, page_size, "a")
    if out.shape[0] < n:
        raise ValueError(f"out holds {out.shape[0]} rows; {n} pages need as many")
    with nogil:
        for i in range(n):
            if off[i] < 0:
                memset(&out[i, 0], 0, page_size)
            else:
                memcpy(&out[i, 0], &data[off[i]], page_size)


def xbzrle_records(const uint64_t[::1] offs, const uint8_t[:, ::1] deltas,
                   const int32_t[::1] lengths, uint8_t[::1] out):
    """CONTINUE XBZRLE records into ``out``, one per row; the bytes written.

    Record ``i``: be64(``offs[i]`` | XBZRLE | CONTINUE), the encoding byte
    0x01, be16(``lengths[i]``), then the first ``lengths[i]`` bytes of
    ``deltas[i]`` (ram.md §2.3).
    """
    cdef Py_ssize_t n = offs.shape[0], i, w = 0, need = 0
    cdef int32_t k
    if lengths.shape[0] != n or deltas.shape[0] < n:
        raise ValueError("offs, deltas and lengths differ in length")
    for i in range(n):
        if lengths[i] <= 0 or lengths[i] > deltas.shape[1] or lengths[i] > 0xFFFF:
            raise ValueError(f"record {i}: delta length {lengths[i]}")
        need += 11 + lengths[i]
    if out.shape[0] < need:
        raise ValueError(f"out has {out.shape[0]} bytes; the records need {need}")
    with nogil:
        for i in range(n):
            k = lengths[i]
            store_be64(&out[w], offs[i] | 0x40 | 0x20)
            out[w + 8] = 0x01
            out[w + 9] = <uint8_t>(k >> 8)
            out[w + 10] = <uint8_t>(k & 0xFF)
            memcpy(&out[w + 11], &deltas[i, 0], k)
            w += 11 + k
    return w


cdef class XXH64:
    """XXH64 (seed 0) of whole pages read in place; negative offsets are zero pages."""

    cdef uint64_t v[4]
    cdef readonly unsigned long long length

    def __cinit__(self):
        self.v[0] = P1 + P2
        self.v[1] = P2
        self.v[2] = 0
        self.v[3] = 0 - P1
        self.length = 0

    def update_pages(self, const uint8_t[::1] data, const int64_t[::1] off,
                     Py_ssize_t page_size=4096):
        """Feed the pages of ``data`` at ``off`` (negative: zeros), in order."""
        cdef Py_ssize_t n = off.shape[0], i, s
        cdef const uint8_t* p
        cdef uint64_t v0 = self.v[0], v1 = self.v[1], v2 = self.v[2], v3 = self.v[3]
        _check(data.shape[0], off, page_size, "a")
        if n == 0:
            return
        with nogil:
            for i in range(n):
                if off[i] < 0:
                    for s in range(0, page_size, 32):
                        v0 = _round(v0, 0)
                        v1 = _round(v1, 0)
                        v2 = _round(v2, 0)
                        v3 = _round(v3, 0)
                    continue
                p = &data[off[i]]
                for s in range(0, page_size, 32):
                    v0 = _round(v0, load_le64(p + s))
                    v1 = _round(v1, load_le64(p + s + 8))
                    v2 = _round(v2, load_le64(p + s + 16))
                    v3 = _round(v3, load_le64(p + s + 24))
        self.v[0], self.v[1], self.v[2], self.v[3] = v0, v1, v2, v3
        self.length += n * page_size

    def intdigest(self):
        cdef uint64_t h
        if self.length >= 32:
            h = _rotl(self.v[0], 1) + _rotl(self.v[1], 7) + _rotl(self.v[2], 12) \
                + _rotl(self.v[3], 18)
            h = _merge(h, self.v[0])
            h = _merge(h, self.v[1])
            h = _merge(h, self.v[2])
            h = _merge(h, self.v[3])
        else:
            h = P5
        h += self.length
        h ^= h >> 33
        h *= P2
        h ^= h >> 29
        h *= P3
        h ^= h >> 32
        return h

    def hexdigest(self):
        return f"{self.intdigest():016x}"
