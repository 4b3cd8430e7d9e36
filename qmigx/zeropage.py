"""Zero-page detection: which RAM pages can be sent as one-byte ZERO records.

The RAM engine tests every dirty page before anything else (ram.md §5,
step 3), so this is on the hot path of every migration. The functions
come from the selected backend: the compiled SIMD kernel normally, the
plain-Python twin when ``QMIGX_NO_EXTENSIONS=1``.

* ``is_zero(buf) -> bool`` for any buffer of any length.
* ``zero_page_map(buf, page_size=4096, *, out=None) -> numpy bool array``
  for a whole RAM block at once (a final partial page counts on its own
  bytes).
* ``simd``: the implementation in use (``"avx2"``, ``"sse2"``,
  ``"portable"``; ``"python"`` for the twin).
"""

from __future__ import annotations

from qmigx._backend import load

_impl = load("zeropage")

is_zero = _impl.is_zero
zero_page_map = _impl.zero_page_map
simd: str = _impl.simd

__all__ = ["is_zero", "zero_page_map", "simd"]
