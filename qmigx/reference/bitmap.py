"""Dirty bitmap with chunked log clearing, plain Python (test oracle).

Same class, names and results as ``qmigx._core.bitmap``, written one page
at a time so each rule is visible: a sync ORs the log in page by page and
arms the clear chunks of the synced range; taking a page first clears its
chunk's dirty log if the chunk is armed, then clears the page's bit.
"""

from __future__ import annotations

import logging

import numpy as np

from qmigx.errors import ParameterError, StateError

__all__ = [
    "DirtyBitmap",
    "CLEAR_BITMAP_SHIFT_DEFAULT",
    "CLEAR_BITMAP_SHIFT_MIN",
    "CLEAR_BITMAP_SHIFT_MAX",
]

CLEAR_BITMAP_SHIFT_DEFAULT = 18
CLEAR_BITMAP_SHIFT_MIN = 6
CLEAR_BITMAP_SHIFT_MAX = 31

_log = logging.getLogger("qmigx.bitmap")


def _clamp_shift(shift) -> int:
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


def _index(value, name: str) -> int:
    """An integer argument, refused like the compiled kernel's typed argument."""
    if isinstance(value, float):
        raise TypeError(f"{name} must be an integer")
    return int(value)


class _Bits:
    """Bits stored in uint64 words, page p = bit p % 64 of word p // 64."""

    def __init__(self, nbits: int) -> None:
        self.words = np.zeros((nbits + 63) // 64, dtype=np.uint64)

    def get(self, i: int) -> bool:
        return bool((int(self.words[i // 64]) >> (i % 64)) & 1)

    def put(self, i: int, value: bool) -> None:
        word = int(self.words[i // 64])
        mask = 1 << (i % 64)
        self.words[i // 64] = (word | mask) if value else (word & ~mask)


class DirtyBitmap:
    """Dirty bitmap of one RAM block (see the compiled kernel for details)."""

    def __init__(self, npages, clear_bitmap_shift=CLEAR_BITMAP_SHIFT_DEFAULT, source=None):
        npages = _index(npages, "npages")
        if npages < 0:
            raise ParameterError(f"negative page count {npages}", field="npages")
        self.npages = npages
        self.requested_clear_bitmap_shift = clear_bitmap_shift
        self.clear_bitmap_shift = _clamp_shift(clear_bitmap_shift)
        self.clear_bitmap_shift_clamped = self.clear_bitmap_shift != clear_bitmap_shift
        self.chunk_pages = 1 << self.clear_bitmap_shift
        self.nchunks = (npages + self.chunk_pages - 1) // self.chunk_pages
        self._dirty = _Bits(npages)
        self._armed = _Bits(self.nchunks)
        self.source = source

    # -- argument checks ----------------------------------------------------

    def _check_page(self, page) -> int:
        page = _index(page, "page")
        if not 0 <= page < self.npages:
            raise ParameterError(
                f"page {page} outside the block's {self.npages} pages", field="page"
            )
        return page

    def _check_range(self, start, n) -> tuple[int, int]:
        start, n = _index(start, "start"), _index(n, "n")
        if start < 0 or n < 0 or start + n > self.npages:
            raise ParameterError(
                f"pages [{start}, {start} + {n}) outside the block's {self.npages} pages",
                field="range",
            )
        return start, n

    # -- plain bit operations ------------------------------------------------

    def set(self, start, n=1) -> None:
        start, n = self._check_range(start, n)
        for p in range(start, start + n):
            self._dirty.put(p, True)

    def clear(self, start, n=1) -> None:
        start, n = self._check_range(start, n)
        for p in range(start, start + n):
            self._dirty.put(p, False)

    def set_all(self) -> None:
        self.set(0, self.npages)

    def test(self, page) -> bool:
        return self._dirty.get(self._check_page(page))

    def test_and_clear(self, page) -> bool:
        page = self._check_page(page)
        was = self._dirty.get(page)
        self._dirty.put(page, False)
        return was

    def find_next(self, start) -> int:
        start = _index(start, "start")
        if start < 0:
            raise ParameterError(f"negative start page {start}", field="start")
        for p in range(start, self.npages):
            if self._dirty.get(p):
                return p
        return self.npages

    def count(self) -> int:
        return sum(bin(int(w)).count("1") for w in self._dirty.words)

    # -- sync ----------------------------------------------------------------

    def sync(self, log, start=0, npages=None) -> int:
        data = memoryview(log).cast("B").tobytes()
        start = _index(start, "start")
        n = self.npages - start if npages is None else _index(npages, "npages")
        if start % 64:
            raise ParameterError(
                f"sync start page {start} is not a multiple of 64", field="start"
            )
        self._check_range(start, n)
        if not (n + 7) // 8 <= len(data) <= 8 * ((n + 63) // 64):
            raise ParameterError(
                f"dirty log of {len(data)} bytes does not cover {n} pages "
                f"({(n + 7) // 8} to {8 * ((n + 63) // 64)} bytes)",
                offset=len(data),
                field="log",
            )
        newly = 0
        for i in range(n):
            if (data[i // 8] >> (i % 8)) & 1:
                if not self._dirty.get(start + i):
                    newly += 1
                    self._dirty.put(start + i, True)
        if n:  # an empty range overlaps no chunk
            for chunk in range(start // self.chunk_pages, (start + n - 1) // self.chunk_pages + 1):
                self._armed.put(chunk, True)
        return newly

    def sync_from_source(self) -> int:
        if self.source is None:
            raise StateError("this DirtyBitmap has no dirty-log source", field="source")
        log = self.source.sync()
        if log is None:
            for chunk in range(self.nchunks):
                self._armed.put(chunk, True)
            return 0
        return self.sync(log)

    # -- taking pages for sending ------------------------------------------

    def _clear_chunk(self, chunk: int) -> None:
        first = chunk * self.chunk_pages
        if self.source is not None:
            self.source.clear(first, min(self.chunk_pages, self.npages - first))
        self._armed.put(chunk, False)

    def take(self, page) -> bool:
        page = self._check_page(page)
        if not self._dirty.get(page):
            return False
        chunk = page // self.chunk_pages
        if self._armed.get(chunk):
            self._clear_chunk(chunk)
        self._dirty.put(page, False)
        return True

    def take_next(self, start) -> int:
        page = self.find_next(start)
        if page < self.npages:
            self.take(page)
        return page

    def take_dirty(self, start, max_pages, out, lock=None) -> int:
        start, max_pages = _index(start, "start"), _index(max_pages, "max_pages")
        out = memoryview(out)
        if out.readonly or out.ndim != 1 or out.itemsize != 8 or out.format.lstrip("@=<") not in "ql":
            raise ValueError("out must be a writable 1-D int64 array")
        if start < 0:
            raise ParameterError(f"negative start page {start}", field="start")
        if not 0 <= max_pages <= len(out):
            raise ParameterError(
                f"max_pages {max_pages} not in 0..len(out) = {len(out)}", field="max_pages"
            )
        if lock is not None:  # another taker clears bits under it (the compiled one: no GIL)
            return self._take_dirty_locked(start, max_pages, out, lock)
        pages, armed = self._collect(start, max_pages, out)
        for chunk in armed:
            self._clear_chunk(chunk)
        for page in pages:
            self._dirty.put(page, False)
        return len(pages)

    def _collect(self, start: int, max_pages: int, out) -> tuple[list, list]:
        pages = []
        page = self.find_next(start)
        while page < self.npages and len(pages) < max_pages:
            pages.append(page)
            page = self.find_next(page + 1)
        for i, page in enumerate(pages):
            out[i] = page
        armed = []
        for page in pages:
            chunk = page // self.chunk_pages
            if self._armed.get(chunk) and chunk not in armed:
                armed.append(chunk)
        return pages, armed

    def _take_dirty_locked(self, start: int, max_pages: int, out, lock) -> int:
        """Found and taken under ``lock``; armed chunks' callbacks run without it."""
        with lock:
            pages, armed = self._collect(start, max_pages, out)
            if not armed:
                for page in pages:
                    self._dirty.put(page, False)
                return len(pages)
        for chunk in armed:
            self._clear_chunk(chunk)
        with lock:
            kept = [p for p in pages if self._dirty.get(p)]
            for i, page in enumerate(kept):
                self._dirty.put(page, False)
                out[i] = page
        return len(kept)

    # -- views -----------------------------------------------------------------

    @property
    def words(self) -> np.ndarray:
        view = self._dirty.words.view()
        view.flags.writeable = False
        return view

    def words_to_take(self) -> np.ndarray:
        """The words themselves, writable: a sender elsewhere clears the bits it takes.

        It must take them under the same lock as this bitmap's own takers,
        and leave pages of armed chunks (see :attr:`clear_bmap`) to them.
        """
        return self._dirty.words

    # chunk_pages is a plain attribute here (set in __init__)

    @property
    def clear_bmap(self) -> np.ndarray:
        view = self._armed.words.view()
        view.flags.writeable = False
        return view

    def is_armed(self, chunk) -> bool:
        chunk = _index(chunk, "chunk")
        if not 0 <= chunk < self.nchunks:
            raise ParameterError(f"chunk {chunk} outside 0..{self.nchunks - 1}", field="chunk")
        return self._armed.get(chunk)

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(npages={self.npages}, "
            f"clear_bitmap_shift={self.clear_bitmap_shift}, dirty={self.count()})"
        )
