"""Zero-page detection, plain Python (test oracle for ``qmigx._core.zeropage``).

Same names and results as the compiled kernel, written for clarity: a
page is zero when counting its zero bytes gives its length.
"""

from __future__ import annotations

import numpy as np

from qmigx.errors import ParameterError

__all__ = ["is_zero", "zero_page_map", "simd"]

#: The twin has no SIMD paths; it names itself.
simd = "python"


def _as_bytes(buf) -> bytes:
    return memoryview(buf).cast("B").tobytes()


def _all_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


def is_zero(buf) -> bool:
    """True if every byte of ``buf`` (any buffer, any length) is zero."""
    return _all_zero(_as_bytes(buf))


def zero_page_map(buf, page_size: int = 4096, *, out=None) -> np.ndarray:
    """Which pages of ``buf`` are all zero (see the compiled kernel's docstring)."""
    if page_size <= 0:
        raise ParameterError(f"page size must be positive, not {page_size}", field="page_size")
    data = _as_bytes(buf)
    npages = (len(data) + page_size - 1) // page_size
    if out is None:
        out = np.empty(npages, dtype=np.bool_)
    else:
        _check_out(out, npages)
    for k in range(npages):
        out[k] = _all_zero(data[k * page_size : (k + 1) * page_size])
    return out


def _check_out(out, npages: int) -> None:
    try:
        view = memoryview(out)
    except TypeError:
        view = None
    if (
        view is None
        or view.readonly
        or not view.c_contiguous
        or view.ndim != 1
        or view.format != "?"
    ):
        raise ParameterError(
            "out must be a writable, contiguous 1-D numpy bool array", field="out"
        )
    if view.shape[0] != npages:
        raise ParameterError(
            f"out has {view.shape[0]} entries, the buffer has {npages} pages", field="out"
        )
