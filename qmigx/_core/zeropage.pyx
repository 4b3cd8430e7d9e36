"""Zero-page detection (compiled kernel).

A page that is all zero is sent as a one-byte ZERO record instead of a
full page (ram.md §4.1), so every dirty page is tested before anything
else happens to it. ``zero_page_map`` tests a whole RAM block in one call
with the GIL released; the test itself uses AVX2 or SSE2 when the CPU has
them (chosen at import, see ``simd``) and a portable 64-bit-word loop
otherwise.
"""

from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_ND,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)

import numpy as np

from qmigx.errors import ParameterError

__all__ = ["is_zero", "zero_page_map", "simd"]

cdef extern from "zeropage_impl.h" nogil:
    ctypedef int (*qmx_zero_fn)(const unsigned char *p, size_t n) noexcept nogil
    enum:
        QMX_PATH_PORTABLE
        QMX_PATH_SSE2
        QMX_PATH_AVX2
    int qmx_path_available(int path)
    qmx_zero_fn qmx_zero_fn_for(int path)
    void qmx_zero_map(qmx_zero_fn fn, const unsigned char *p, size_t length,
                      size_t page, unsigned char *out)

cdef dict _PATHS = {
    "avx2": QMX_PATH_AVX2,
    "sse2": QMX_PATH_SSE2,
    "portable": QMX_PATH_PORTABLE,
}

cdef qmx_zero_fn _fn = qmx_zero_fn_for(QMX_PATH_PORTABLE)

# Below this size the scan takes less time than dropping and retaking the GIL.
cdef Py_ssize_t NOGIL_BYTES = 256 * 1024

#: The implementation in use: ``"avx2"``, ``"sse2"`` or ``"portable"``.
simd = "portable"


cdef int _get_bytes(object buf, Py_buffer *view) except -1:
    """Borrow ``buf`` as flat bytes (any item type, any C-contiguous layout).

    A raw buffer request instead of a typed memoryview: it costs a third
    as much per call, which matters for single 4 KiB pages; the kernel only
    reads through it.
    """
    try:
        return PyObject_GetBuffer(buf, view, PyBUF_SIMPLE)
    except (TypeError, ValueError, BufferError):
        pass
    # Same exception as the reference twin for what cannot be read as bytes.
    flat = memoryview(buf).cast("B")
    return PyObject_GetBuffer(flat, view, PyBUF_SIMPLE)


def _available_simd():
    """The paths this CPU can run, fastest first (for tests and benchmarks)."""
    return tuple(name for name, path in _PATHS.items() if qmx_path_available(path))


def _set_simd(name):
    """Force one path (tests compare every available path with the reference).

    Returns the previous path name so callers can restore it.
    """
    global _fn, simd
    if name not in _PATHS:
        raise ParameterError(f"unknown SIMD path {name!r}", field="simd")
    if not qmx_path_available(_PATHS[name]):
        raise ParameterError(f"SIMD path {name!r} not supported by this CPU", field="simd")
    previous = simd
    _fn = qmx_zero_fn_for(_PATHS[name])
    simd = name
    return previous


_set_simd(_available_simd()[0])


def is_zero(buf):
    """True if every byte of ``buf`` (any buffer, any length) is zero."""
    cdef Py_buffer view
    cdef int result = 1
    _get_bytes(buf, &view)
    try:
        if view.len >= NOGIL_BYTES:
            with nogil:
                result = _fn(<const unsigned char *>view.buf, <size_t>view.len)
        elif view.len > 0:
            result = _fn(<const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return result != 0


def zero_page_map(buf, Py_ssize_t page_size=4096, *, out=None):
    """Which pages of ``buf`` are all zero, as a numpy bool array.

    ``buf`` is any C-contiguous buffer (bytes, bytearray, mmap, numpy array
    of any dtype); page ``k`` is bytes ``[k*page_size, (k+1)*page_size)``
    and a final partial page is judged on its own bytes, so the result has
    ``ceil(len(buf) / page_size)`` entries. Pass ``out`` (a writable,
    contiguous 1-D bool buffer, normally a numpy bool array, of exactly that
    length) to reuse memory across calls; it is returned. The scan runs
    without the GIL (for buffers of 256 KiB or more; a smaller scan is over
    before a thread switch would pay off).
    """
    cdef Py_buffer view
    cdef Py_buffer dest
    cdef Py_ssize_t npages
    if page_size <= 0:
        raise ParameterError(f"page size must be positive, not {page_size}", field="page_size")
    _get_bytes(buf, &view)
    try:
        npages = (view.len + page_size - 1) // page_size
        if out is None:
            out = np.empty(npages, dtype=np.bool_)
        _get_out(out, &dest, npages)
        try:
            if view.len >= NOGIL_BYTES:
                with nogil:
                    qmx_zero_map(_fn, <const unsigned char *>view.buf, <size_t>view.len,
                                 <size_t>page_size, <unsigned char *>dest.buf)
            else:
                qmx_zero_map(_fn, <const unsigned char *>view.buf, <size_t>view.len,
                             <size_t>page_size, <unsigned char *>dest.buf)
        finally:
            PyBuffer_Release(&dest)
    finally:
        PyBuffer_Release(&view)
    return out


cdef int _get_out(object out, Py_buffer *dest, Py_ssize_t npages) except -1:
    try:
        PyObject_GetBuffer(out, dest, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND)
    except (TypeError, ValueError, BufferError):
        raise ParameterError(
            "out must be a writable, contiguous 1-D numpy bool array", field="out"
        ) from None
    if dest.ndim != 1 or dest.format == NULL or dest.format[0] != b"?" or dest.format[1] != 0:
        PyBuffer_Release(dest)
        raise ParameterError(
            "out must be a writable, contiguous 1-D numpy bool array", field="out"
        )
    if dest.shape[0] != npages:
        PyBuffer_Release(dest)
        raise ParameterError(
            f"out has {dest.shape[0]} entries, the buffer has {npages} pages", field="out"
        )
    return 0
