"""Per-chunk content digests for block migration (compiled kernel).

A disk image migrated by qmigx is written by other processes through the
file, so no dirty log sees those writes: the source instead remembers a
digest of every 1 MiB chunk it sent and compares it with the file's
content later. Every chunk of the image is digested once when sent and
again on every rescan, so the digest must cost far less than reading the
chunk; this loop runs at several GB/s without the GIL, where hashlib's
digests manage a few hundred MB/s.

The digest (the same in ``qmigx.reference.chunkhash``): the chunk is read
as little-endian 64-bit words ``w[i]``; each ``w[i] + (i + 1) * K`` goes
through a bijective 64-bit mixer and the results are summed modulo 2**64;
the sum, mixed once more with the word count, is the digest. Changing any
single word always changes it (the mixer is a bijection, the salt makes
position count); other changes collide with probability about 2**-64.
It is not a cryptographic hash: content chosen to collide could hide a
write, which only a writer working against its own disk would do. The
same pass reports whether the chunk is all zero.
"""

from libc.stdint cimport uint64_t, uint8_t
from libc.string cimport memcpy

from qmigx.errors import ParameterError

__all__ = ["chunk_digests"]

cdef uint64_t SALT = 0x9E3779B97F4A7C15ULL
cdef uint64_t MIX1 = 0xBF58476D1CE4E5B9ULL
cdef uint64_t MIX2 = 0x94D049BB133111EBULL


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    x ^= x >> 30
    x *= MIX1
    x ^= x >> 27
    x *= MIX2
    x ^= x >> 31
    return x


cdef void _digest_chunks(const unsigned char *p, Py_ssize_t nchunks, Py_ssize_t nwords,
                         uint64_t *digests, uint8_t *zero) noexcept nogil:
    cdef Py_ssize_t c, i
    cdef uint64_t w, acc0, acc1, ored, salt
    cdef uint64_t w1
    for c in range(nchunks):
        acc0 = 0
        acc1 = 0
        ored = 0
        salt = SALT
        i = 0
        # two independent sums let the multiplies of neighbouring words overlap
        while i + 1 < nwords:
            memcpy(&w, p + 8 * i, 8)
            memcpy(&w1, p + 8 * i + 8, 8)
            ored |= w | w1
            acc0 += _mix(w + salt)
            acc1 += _mix(w1 + salt + SALT)
            salt += 2 * SALT
            i += 2
        if i < nwords:
            memcpy(&w, p + 8 * i, 8)
            ored |= w
            acc0 += _mix(w + salt)
        digests[c] = _mix((acc0 + acc1) ^ <uint64_t>nwords)
        zero[c] = ored == 0
        p += 8 * nwords


def chunk_digests(buf, Py_ssize_t chunk_size, uint64_t[::1] digests, uint8_t[::1] zero):
    """Digest each ``chunk_size`` bytes of ``buf`` into ``digests``; flag zero chunks in ``zero``.

    ``buf`` is any C-contiguous buffer whose length is a multiple of
    ``chunk_size`` (itself a multiple of 8); the outputs need one entry per
    chunk. Runs without the GIL.
    """
    cdef const unsigned char[::1] data = memoryview(buf).cast("B")
    cdef Py_ssize_t n = data.shape[0]
    if chunk_size <= 0 or chunk_size % 8:
        raise ParameterError(f"chunk size {chunk_size} is not a positive multiple of 8",
                             field="chunk_size")
    if n % chunk_size:
        raise ParameterError(f"{n} bytes are not a whole number of {chunk_size}-byte chunks",
                             field="buf")
    cdef Py_ssize_t nchunks = n // chunk_size
    if digests.shape[0] < nchunks or zero.shape[0] < nchunks:
        raise ParameterError(f"output arrays hold fewer than {nchunks} chunks", field="digests")
    if nchunks == 0:
        return
    with nogil:
        _digest_chunks(&data[0], nchunks, chunk_size // 8, &digests[0], &zero[0])
