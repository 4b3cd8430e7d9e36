"""XBZRLE: send a re-dirtied page as its difference to the last copy sent.

With the ``xbzrle`` capability the source keeps the pages it sent in a
cache and, when one of them is dirty again, sends only the changed byte
runs (xbzrle.md); the destination applies them on its own copy. Encoding
runs on every dirty page that hits the cache and decoding on every
XBZRLE record, so both come from the selected backend: the compiled SIMD
kernel normally, the plain-Python twin when ``QMIGX_NO_EXTENSIONS=1``.
Results are byte-identical to QEMU 7.2's.

* ``encode_buffer(old, new, out) -> int``: encoded length, 0 (unchanged,
  send nothing) or -1 (does not fit in ``len(out)``: send the page whole).
  Pages of any length, as QEMU's encoder takes them (an empty page is
  unchanged); a run longer than ``MAX_RUN``, on which QEMU's encoder
  stops with an assertion, gives -1.
* ``decode_buffer(src, dst) -> int``: apply a delta in place; validates it
  completely first, so on :class:`~qmigx.errors.XbzrleError` the page is
  untouched.
* ``encode_pages(old, new, out, lengths)`` and
  ``decode_pages(deltas, lengths, pages)``: the same for many pages per
  call (numpy arrays, one page per row), with the GIL released.
* ``encode_at(old, old_off, new, new_off, page_size, out, lengths)``: as
  ``encode_pages`` for pages read where they lie in two buffers (a mapped
  saved state), at the given offsets; -1 stands for an all-zero page.
* ``MAX_RUN`` (0x3FFF): the longest run a delta can hold (a 1- or 2-byte
  uleb); only pages longer than it can have a longer one.
* ``simd``: the compare path in use (``"avx512"``, ``"avx2"``,
  ``"portable"``; ``"python"`` for the twin).
"""

from __future__ import annotations

from qmigx._backend import load

_impl = load("xbzrle")

MAX_RUN: int = _impl.MAX_RUN
encode_buffer = _impl.encode_buffer
decode_buffer = _impl.decode_buffer
encode_pages = _impl.encode_pages
encode_at = _impl.encode_at
decode_pages = _impl.decode_pages
simd: str = _impl.simd

__all__ = [
    "MAX_RUN",
    "encode_buffer",
    "decode_buffer",
    "encode_pages",
    "encode_at",
    "decode_pages",
    "simd",
]
