"""Dirty page tracking for one RAM block, and the protocol of dirty-log sources.

The RAM engine sends the pages a :class:`DirtyBitmap` marks dirty and
refreshes it from a dirty-log source (hypervisor log, explicit marking,
userfaultfd...) at every bitmap sync (ram.md §6). The source's log is
cleared lazily in chunks of ``2^clear_bitmap_shift`` pages, each just
before the first page of the chunk is taken for sending (ram.md §12), so
writes made after a page is taken are caught by the next sync.

``DirtyBitmap`` comes from the selected backend (compiled kernel normally,
the plain-Python twin with ``QMIGX_NO_EXTENSIONS=1``); ``DirtyLogSource``
is the interface trackers implement.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from qmigx._backend import load

_impl = load("bitmap")

DirtyBitmap = _impl.DirtyBitmap
CLEAR_BITMAP_SHIFT_DEFAULT: int = _impl.CLEAR_BITMAP_SHIFT_DEFAULT
CLEAR_BITMAP_SHIFT_MIN: int = _impl.CLEAR_BITMAP_SHIFT_MIN
CLEAR_BITMAP_SHIFT_MAX: int = _impl.CLEAR_BITMAP_SHIFT_MAX


@runtime_checkable
class DirtyLogSource(Protocol):
    """What a dirty-page tracker provides for one RAM block.

    ``sync()`` returns the pages dirtied since the previous ``sync()`` as a
    bitmap in :class:`DirtyBitmap`'s layout (a numpy uint64 word array, page
    p = bit p % 64 of word p // 64, or the same bytes in any buffer), or
    ``None`` if nothing was dirtied.

    ``clear(start_page, npages)`` re-arms tracking for those pages: writes
    after it returns must appear in a later ``sync()``. The bitmap calls it
    once per armed chunk, before handing out the first page of the chunk for
    sending, with ``npages`` cut at the end of the block.
    """

    def sync(self) -> Any | None: ...

    def clear(self, start_page: int, npages: int) -> None: ...


__all__ = [
    "DirtyBitmap",
    "DirtyLogSource",
    "CLEAR_BITMAP_SHIFT_DEFAULT",
    "CLEAR_BITMAP_SHIFT_MIN",
    "CLEAR_BITMAP_SHIFT_MAX",
]
