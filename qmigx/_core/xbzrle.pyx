"""XBZRLE delta encoding and decoding (compiled kernel).

A page that was sent before is sent again as the difference to the copy
the source cached last time (xbzrle.md). The encoder runs on every dirty
page that hits the cache and the decoder on every XBZRLE record, so both
are written for speed: changed bytes are located 64 at a time with SIMD
compares (AVX-512BW, AVX2 or a portable 64-bit-word loop, chosen at
import, see ``simd``), and the batch forms handle many pages per call
with the GIL released. Results are identical to QEMU 7.2's encoder and
decoder (byte for byte, including every overflow decision) and to the
plain-Python twin ``qmigx.reference.xbzrle``, for pages of any length:
QEMU's functions take any length (an empty page encodes to nothing, a
64 KiB page like any other), so these do too. The one thing QEMU's
encoder cannot do, a run longer than ``MAX_RUN`` (it stops on an
assertion), gives -1 here: the caller sends that page whole.
"""

from qmigx.errors import ParameterError, XbzrleError

__all__ = [
    "MAX_RUN",
    "encode_buffer",
    "decode_buffer",
    "encode_pages",
    "encode_at",
    "decode_pages",
    "simd",
]

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free

cdef extern from "xbzrle_impl.h" nogil:
    ctypedef struct xbz_scan_t:
        size_t first
        size_t changed
        size_t runs
    ctypedef int (*xbz_scan_fn)(const uint8_t *old, const uint8_t *cur,
                                size_t slen, uint64_t *masks,
                                xbz_scan_t *st) noexcept nogil
    enum:
        XBZ_MAX_RUN
        XBZ_PATH_PORTABLE
        XBZ_PATH_AVX2
        XBZ_PATH_AVX512
        XBZ_OK
        XBZ_E_ZRUN_TRUNCATED
        XBZ_E_ZRUN_ULEB
        XBZ_E_ZRUN_ZERO
        XBZ_E_ZRUN_PAST_PAGE
        XBZ_E_NZRUN_TRUNCATED
        XBZ_E_NZRUN_ULEB
        XBZ_E_NZRUN_ZERO
        XBZ_E_LITERAL_PAST_PAGE
        XBZ_E_LITERAL_PAST_INPUT
    int xbz_path_available(int path)
    xbz_scan_fn xbz_scan_for(int path)
    int xbz_encode(xbz_scan_fn scan, const uint8_t *old, const uint8_t *cur,
                   size_t slen, uint8_t *out, size_t dlen)
    void xbz_encode_pages(xbz_scan_fn scan, const uint8_t *old,
                          const uint8_t *cur, size_t n, size_t slen,
                          uint8_t *out, size_t dlen, int32_t *lengths)
    void xbz_encode_pages_baseline(const uint8_t *old, const uint8_t *cur,
                                   size_t n, size_t slen, uint8_t *out,
                                   size_t dlen, int32_t *lengths)
    int xbz_check(const uint8_t *src, size_t slen, size_t dlen,
                  size_t *where, size_t *dend)
    void xbz_apply(const uint8_t *src, size_t slen, uint8_t *dst)
    int xbz_decode_pages(const uint8_t *deltas, size_t dstride,
                         const int32_t *lengths, uint8_t *pages,
                         size_t psize, size_t n, size_t *bad_page,
                         size_t *where)

#: Longest run (unchanged or changed bytes) a delta can hold: 0x3FFF, the
#: largest 1- or 2-byte uleb. Only pages longer than this can have one.
MAX_RUN = XBZ_MAX_RUN

# message and field for each decoder status; the reference twin has the
# same table so that both raise identical errors
cdef dict _DECODE_ERRORS = {
    XBZ_E_ZRUN_TRUNCATED: ("fewer than 2 bytes left for a zero-run length", "zrun"),
    XBZ_E_ZRUN_ULEB: ("zero-run length is not a 1- or 2-byte uleb", "zrun"),
    XBZ_E_ZRUN_ZERO: ("zero-run length 0 after the first pair", "zrun"),
    XBZ_E_ZRUN_PAST_PAGE: ("zero run ends past the end of the page", "zrun"),
    XBZ_E_NZRUN_TRUNCATED: ("fewer than 2 bytes left for a literal-run length", "nzrun"),
    XBZ_E_NZRUN_ULEB: ("literal-run length is not a 1- or 2-byte uleb", "nzrun"),
    XBZ_E_NZRUN_ZERO: ("literal-run length 0", "nzrun"),
    XBZ_E_LITERAL_PAST_PAGE: ("literal run ends past the end of the page", "literal"),
    XBZ_E_LITERAL_PAST_INPUT: ("literal run ends past the end of the delta", "literal"),
}

cdef dict _PATHS = {
    "avx512": XBZ_PATH_AVX512,
    "avx2": XBZ_PATH_AVX2,
    "portable": XBZ_PATH_PORTABLE,
}

cdef xbz_scan_fn _scan = xbz_scan_for(XBZ_PATH_PORTABLE)

#: The encoder's compare path in use: ``"avx512"``, ``"avx2"`` or ``"portable"``.
simd = "portable"


def _available_simd():
    """The paths this CPU can run, fastest first (for tests and benchmarks)."""
    return tuple(name for name, path in _PATHS.items() if xbz_path_available(path))


def _set_simd(name):
    """Force one compare path; returns the previous one so it can be restored.

    Tests run every available path against the reference twin.
    """
    global _scan, simd
    if name not in _PATHS:
        raise ParameterError(f"unknown SIMD path {name!r}", field="simd")
    if not xbz_path_available(_PATHS[name]):
        raise ParameterError(f"SIMD path {name!r} not supported by this CPU", field="simd")
    previous = simd
    _scan = xbz_scan_for(_PATHS[name])
    simd = name
    return previous


_set_simd(_available_simd()[0])


cdef object _decode_error(int code, size_t where, str prefix):
    """The one place where decoder status codes become exceptions."""
    message, field = _DECODE_ERRORS[code]
    return XbzrleError(prefix + message, offset=where, field=field)


# --- argument coercion -------------------------------------------------
# The fast paths take the buffer directly; anything else goes through
# memoryview, whose checks (and messages) match the reference twin.

cdef object _memview(object obj, str name):
    try:
        return memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must be a buffer (bytes, bytearray, memoryview, "
                        f"numpy array, mmap), not {type(obj).__name__}") from None


cdef object _flat_view(object obj, str name, bint writable):
    view = _memview(obj, name)
    if writable and view.readonly:
        raise TypeError(f"{name} must be a writable buffer")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if view.nbytes == 0:
        return memoryview(bytearray())  # memoryview cannot cast empty views
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


cdef const uint8_t[::1] _rbuf(object obj, str name) except *:
    cdef const uint8_t[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        view = _flat_view(obj, name, False)
    return view


cdef uint8_t[::1] _wbuf(object obj, str name) except *:
    cdef uint8_t[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        view = _flat_view(obj, name, True)
    return view


cdef object _pages_view(object obj, str name, bint writable):
    shape = _memview(obj, name).shape
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-dimensional (pages x bytes), "
                         f"got {len(shape)} dimension(s)")
    view = _flat_view(obj, name, writable)
    rows, row_bytes = shape[0], shape[1] * memoryview(obj).itemsize
    if view.nbytes == 0:
        import numpy  # memoryview cannot cast empty views

        return numpy.empty((rows, row_bytes), dtype=numpy.uint8)
    return view.cast("B", shape=[rows, row_bytes])


cdef const uint8_t[:, ::1] _rpages(object obj, str name) except *:
    cdef const uint8_t[:, ::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        view = _pages_view(obj, name, False)
    return view


cdef uint8_t[:, ::1] _wpages(object obj, str name) except *:
    cdef uint8_t[:, ::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        view = _pages_view(obj, name, True)
    return view


cdef object _lengths_error(object obj, bint writable):
    try:
        view = memoryview(obj)
    except TypeError:
        return TypeError(f"lengths must be a 1-D int32 array, not {type(obj).__name__}")
    if view.ndim != 1 or view.format.lstrip("@=") != "i" or view.itemsize != 4:
        return TypeError(f"lengths must be a 1-D int32 array "
                         f"(got format {view.format!r}, {view.ndim} dimension(s))")
    if writable and view.readonly:
        return TypeError("lengths must be a writable buffer")
    return ValueError("lengths must be C-contiguous")


cdef int32_t[::1] _wlengths(object obj) except *:
    cdef int32_t[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        raise _lengths_error(obj, True) from None
    return view


cdef const int32_t[::1] _rlengths(object obj) except *:
    cdef const int32_t[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        raise _lengths_error(obj, False) from None
    return view


# --- public API ----------------------------------------------------------

def encode_buffer(old, new, out):
    """Encode the change from ``old`` to ``new`` into ``out``, as QEMU does.

    Returns the encoded length, 0 if the pages are identical (nothing to
    send; always for empty pages), or -1 if the encoding does not fit in
    ``len(out)`` or holds a run longer than ``MAX_RUN`` (send the page
    whole). ``old`` and ``new`` are buffers of the same length, any
    length. Only ``out[:result]`` is meaningful: bytes after it may have
    been used as scratch space (never beyond ``len(out)``).
    """
    cdef const uint8_t[::1] a = _rbuf(old, "old")
    cdef const uint8_t[::1] b = _rbuf(new, "new")
    cdef uint8_t[::1] o = _wbuf(out, "out")
    cdef Py_ssize_t slen = a.shape[0]
    cdef int result
    if b.shape[0] != slen:
        raise ValueError(f"old and new differ in length ({slen} != {b.shape[0]})")
    if slen == 0:
        return 0  # QEMU's loop over the page never runs
    with nogil:
        result = xbz_encode(_scan, &a[0], &b[0], <size_t>slen,
                            &o[0] if o.shape[0] else <uint8_t *>NULL,
                            <size_t>o.shape[0])
    return result


def decode_buffer(src, dst):
    """Apply the delta ``src`` in place on the page ``dst``; return QEMU's d.

    Bytes of ``dst`` outside the literal runs keep their value: the delta
    is relative to the page as the destination last received it. The
    whole delta is validated before anything is written, so on
    :class:`~qmigx.errors.XbzrleError` (offset = position in ``src``)
    ``dst`` is untouched. The result is the end of the last literal run.
    """
    cdef const uint8_t[::1] s = _rbuf(src, "src")
    cdef uint8_t[::1] p = _wbuf(dst, "dst")
    cdef size_t slen = <size_t>s.shape[0]
    cdef size_t where = 0, dend = 0
    cdef int rc
    if slen == 0:
        return 0
    with nogil:
        rc = xbz_check(&s[0], slen, <size_t>p.shape[0], &where, &dend)
        if rc == XBZ_OK:
            xbz_apply(&s[0], slen, &p[0])
    if rc != XBZ_OK:
        raise _decode_error(rc, where, "")
    return dend


cdef object _encode_pages_with(int baseline, object old, object new, object out,
                               object lengths):
    cdef const uint8_t[:, ::1] a = _rpages(old, "old")
    cdef const uint8_t[:, ::1] b = _rpages(new, "new")
    cdef uint8_t[:, ::1] o = _wpages(out, "out")
    cdef int32_t[::1] lens = _wlengths(lengths)
    cdef Py_ssize_t n = a.shape[0], slen = a.shape[1], dlen = o.shape[1]
    if b.shape[0] != n or b.shape[1] != slen:
        raise ValueError(f"old and new differ in shape ({n}, {slen}) != "
                         f"({b.shape[0]}, {b.shape[1]})")
    if o.shape[0] != n or lens.shape[0] != n:
        raise ValueError(f"out has {o.shape[0]} rows and lengths {lens.shape[0]} "
                         f"entries; expected {n}")
    if slen == 0:
        lens[:] = 0  # empty pages are unchanged
        return None
    if n == 0:
        return None
    with nogil:
        if baseline:
            xbz_encode_pages_baseline(&a[0, 0], &b[0, 0], <size_t>n, <size_t>slen,
                                      &o[0, 0] if dlen else <uint8_t *>NULL,
                                      <size_t>dlen, &lens[0])
        else:
            xbz_encode_pages(_scan, &a[0, 0], &b[0, 0], <size_t>n, <size_t>slen,
                             &o[0, 0] if dlen else <uint8_t *>NULL, <size_t>dlen,
                             &lens[0])
    return None


def encode_pages(old, new, out, lengths):
    """Encode many pages in one call, with the GIL released.

    ``old`` and ``new``: (n, page_size) C-contiguous byte arrays; ``out``:
    (n, dlen) receiving each encoding in its row; ``lengths``: int32 array
    of n receiving each page's :func:`encode_buffer` result.
    """
    return _encode_pages_with(0, old, new, out, lengths)


def encode_at(old, old_off, new, new_off, Py_ssize_t page_size, out, lengths):
    """:func:`encode_pages` for pages read where they lie, with the GIL released.

    Page k is the ``page_size`` bytes of ``new`` at ``new_off[k]`` against
    those of ``old`` at ``old_off[k]`` (int64 offsets; a negative one
    stands for an all-zero page, as a ZERO record leaves it). A saved
    state mapped whole is encoded against another without copying either
    side's pages out first; ``out`` is (n, dlen) as for ``encode_pages``.
    """
    cdef const uint8_t[::1] a = _rbuf(old, "old")
    cdef const uint8_t[::1] b = _rbuf(new, "new")
    cdef const int64_t[::1] ao = old_off
    cdef const int64_t[::1] bo = new_off
    cdef uint8_t[:, ::1] o = _wpages(out, "out")
    cdef int32_t[::1] lens = _wlengths(lengths)
    cdef Py_ssize_t n = ao.shape[0], dlen = o.shape[1], k
    cdef uint8_t* zero
    cdef const uint8_t* pa
    cdef const uint8_t* pb
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, not {page_size}")
    if bo.shape[0] != n or o.shape[0] != n or lens.shape[0] != n:
        raise ValueError(f"old_off, new_off, out and lengths differ in length "
                         f"({n}, {bo.shape[0]}, {o.shape[0]}, {lens.shape[0]})")
    for k in range(n):
        if ao[k] > a.shape[0] - page_size or bo[k] > b.shape[0] - page_size:
            raise ValueError(f"page {k}: offset past the end of its buffer")
    if n == 0:
        return None
    zero = <uint8_t*>calloc(<size_t>page_size, 1)
    if zero == NULL:
        raise MemoryError()
    try:
        with nogil:
            for k in range(n):
                pa = zero
                pb = zero
                if ao[k] >= 0:
                    pa = &a[ao[k]]
                if bo[k] >= 0:
                    pb = &b[bo[k]]
                lens[k] = xbz_encode(_scan, pa, pb, <size_t>page_size,
                                     &o[k, 0] if dlen else <uint8_t *>NULL, <size_t>dlen)
    finally:
        free(zero)
    return None


def _encode_pages_baseline(old, new, out, lengths):
    """:func:`encode_pages` with a plain word-at-a-time scalar encoder.

    The scanning strategy the spec describes for QEMU (no SIMD, no masks),
    same results. Not used by qmigx: benchmarks time the kernel against it
    in the same run, so "x times QEMU's approach" holds on any machine.
    """
    return _encode_pages_with(1, old, new, out, lengths)


def decode_pages(deltas, lengths, pages):
    """Apply many deltas in one call, with the GIL released.

    ``deltas``: (n, dlen) bytes, row k holding ``lengths[k]`` bytes of
    delta for page k (0 = leave page k alone); ``pages``: (n, page_size),
    changed in place. Every delta is validated before any page is
    touched: on the first malformed one an :class:`~qmigx.errors.XbzrleError`
    naming the page index is raised and no page has changed.
    """
    cdef const uint8_t[:, ::1] s = _rpages(deltas, "deltas")
    cdef const int32_t[::1] lens = _rlengths(lengths)
    cdef uint8_t[:, ::1] p = _wpages(pages, "pages")
    cdef Py_ssize_t n = s.shape[0], dlen = s.shape[1], k
    cdef size_t bad = 0, where = 0
    cdef int rc
    if lens.shape[0] != n or p.shape[0] != n:
        raise ValueError(f"lengths has {lens.shape[0]} entries and pages "
                         f"{p.shape[0]} rows; expected {n}")
    for k in range(n):
        if lens[k] < 0 or lens[k] > dlen:
            raise ValueError(f"lengths[{k}] = {lens[k]} is outside 0..{dlen}")
    if n == 0:
        return None
    with nogil:
        rc = xbz_decode_pages(&s[0, 0] if dlen else <uint8_t *>NULL, <size_t>dlen,
                              &lens[0],
                              &p[0, 0] if p.shape[1] else <uint8_t *>NULL,
                              <size_t>p.shape[1], <size_t>n, &bad, &where)
    if rc != XBZ_OK:
        raise _decode_error(rc, where, f"page {bad}: ")
    return None
