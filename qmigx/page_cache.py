"""The XBZRLE page cache: which pages the source can send as deltas.

XBZRLE encodes a page against the copy sent last time, so the source
keeps those copies in a direct-mapped cache with QEMU's exact rules
(xbzrle.md §7): the rules decide which pages get delta-encoded, and the
statistics feed query-migrate's ``xbzrle-cache`` block (§8). The class
comes from the selected backend (compiled kernel normally, the
plain-Python twin with ``QMIGX_NO_EXTENSIONS=1``).

``PageCache(cache_size, page_size=4096)``; per page ``is_cached(addr,
generation)``, ``get(addr)``, ``insert(addr, data, generation)``,
``insert_zero(addr, generation)``; per batch ``lookup_batch(addrs,
generation, out_slots)`` and ``insert_batch(addrs, pages, generation,
out_slots)`` with slot indices into ``data``; ``resize``, ``reset``;
statistics ``stats()``, ``count_encoded``, ``count_overflow``,
``update_rates``.
"""

from __future__ import annotations

from qmigx._backend import load

_impl = load("page_cache")

PageCache = _impl.PageCache
CACHED_PAGE_LIFETIME: int = _impl.CACHED_PAGE_LIFETIME
EMPTY_KEY: int = _impl.EMPTY_KEY
SIZE_ERROR: str = _impl.SIZE_ERROR

__all__ = ["PageCache", "CACHED_PAGE_LIFETIME", "EMPTY_KEY", "SIZE_ERROR"]
