"""A page placement that logs what it placed, for a reader in another thread.

Streaming a saved state in or out means acting on pages while they are
still being placed: ``qmigx send FILE`` sends RAM that a loader thread is
still filling (:mod:`qmigx.tools.feed`), ``qmigx incoming --save OUT``
appends received pages to OUT while more arrive
(:mod:`qmigx.tools.journal`). Both learn which pages changed from this log,
filled after each page's data is in place, so a page taken from the log
and read afterwards is never older than its mark; a page placed again
after it was taken is marked again, and a stream may carry a page more
than once because on load the last record wins.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import numpy as np

from qmigx.placement import CopyPlacement
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["LoggingPlacement"]


class LoggingPlacement(CopyPlacement):
    """:class:`~qmigx.placement.CopyPlacement` that marks every page it places.

    ``on_mark(index, last_page)``, if given, is called after each batch
    with the block's index in the setup record and the highest page of the
    batch (the feed's progress through a block). The received bitmap of the
    base class is left alone for batches (nothing here reads it), so a
    batch costs one indexed store.
    """

    tracks_batches = True

    def __init__(self, on_mark: Optional[Callable[[int, int], None]] = None) -> None:
        super().__init__(TARGET_PAGE_SIZE)
        self.on_mark = on_mark
        self.order: dict[str, int] = {}
        self._marks: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def attach(self, blocks: Sequence) -> None:
        super().attach(blocks)
        for b in blocks:
            if b.idstr not in self._marks:
                self.order[b.idstr] = len(self.order)
                self._marks[b.idstr] = np.zeros(b.used_length // self.page_size, np.uint8)

    def mark_received(self, block, offsets) -> None:
        pages = (np.asarray(offsets, np.uint64) // np.uint64(self.page_size)).astype(np.intp)
        if not len(pages):
            return
        with self._lock:
            self._marks[block.idstr][pages] = 1
        if self.on_mark is not None:
            self.on_mark(self.order[block.idstr], int(pages.max()))

    def place(self, block, offset: int, data) -> None:
        super().place(block, offset, data)
        self.mark_received(block, [offset])

    def take(self, idstr: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """The pages of block ``idstr`` in ``[start, stop)`` marked since they were last
        taken, ascending; unmarks them."""
        marks = self._marks.get(idstr)
        if marks is None:
            return np.empty(0, np.intp)
        with self._lock:
            pages = np.flatnonzero(marks[start:stop])
            if start:
                pages += start
            marks[pages] = 0
        return pages

    def npages(self, idstr: str) -> int:
        marks = self._marks.get(idstr)
        return 0 if marks is None else len(marks)

    def take_bitmap(self, idstr: str) -> Optional[np.ndarray]:
        """As :meth:`take`, as a dirty-log bitmap (uint64 words, page p = bit p % 64), or None."""
        marks = self._marks[idstr]
        with self._lock:
            if not marks.any():
                return None
            bits = np.packbits(marks, bitorder="little")
            marks[:] = 0
        words = np.zeros(8 * ((len(marks) + 63) // 64), np.uint8)
        words[: len(bits)] = bits
        return words.view("<u8")

    def forget(self, idstr: str, start: int, npages: int) -> None:
        """Unmark pages ``[start, start + npages)`` (they are about to be read anyway)."""
        with self._lock:
            self._marks[idstr][start : start + npages] = 0
