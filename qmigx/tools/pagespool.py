"""A page placement that writes received pages to a stream file instead of RAM.

``qmigx incoming --save OUT`` of a precopy migration does not need the
guest's RAM at all, only OUT. A main-channel record that carries a whole
page or a ZERO record is already in the form OUT stores it, so runs of
them go from the receive buffer to OUT as they came, in one write each:
no copy into RAM, no RAM to allocate and fault in. The rarer records
are turned into whole pages first: an XBZRLE delta is applied to the
page's last copy, read back from OUT; a compressed page is inflated.

The file keeps QEMU's CONTINUE rule: a record that continues the last
block is written as it came only while OUT's last block is the stream's,
which holds because every record written here names or continues the
block of the record it stands for.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from qmigx import _backend
from qmigx.placement import PagePlacement, _check
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["SpoolPlacement", "plain_run_end"]

_ramparse = _backend.load("ramparse")

_CONTINUE = 0x20
#: the kinds of record a run written as it came holds
_PAGE_OR_ZERO = bytes((_ramparse.KIND_ZERO, _ramparse.KIND_PAGE))


def plain_run_end(rec, first: int, stop: int) -> int:
    """Where the run of PAGE and ZERO records from ``first`` (before ``stop``) ends."""
    kinds = rec.kind[first:stop]
    if not kinds.tobytes().translate(None, _PAGE_OR_ZERO):
        return stop
    return first + next(i for i, k in enumerate(kinds) if k not in _PAGE_OR_ZERO)


class SpoolPlacement(PagePlacement):
    """Places pages by appending records to ``out``, a stream file being written.

    ``out`` provides ``last_block`` (the block OUT's next CONTINUE record
    refers to), ``append_page(idstr, offset, data) -> position of the data``,
    ``append_zero(idstr, offset)``, ``append_records(data, last_idstr, count)
    -> position`` (records written as they are, before it returns: ``data``
    lies in the receive buffer) and ``read_at(position, n)``.

    Per page it keeps the position of its latest data in OUT, or
    ``-1 - fill`` when its latest record was a ZERO record (-1 when none
    came: a fresh destination's page is zero too). Runs written as they
    came are entered only when a page is read back or placed one by one,
    or the received bitmap is asked for: a precopy stream of PAGE and
    ZERO records costs each batch one write and nothing more.
    """

    fills_ram = False
    live_view = False
    takes_batches = True

    def __init__(self, out) -> None:
        super().__init__(TARGET_PAGE_SIZE)
        self.out = out
        self._where: dict[str, np.ndarray] = {}
        self._table: list = []
        self._runs: list = []  # (records, first, stop, shift) written, not yet entered
        self._lock = threading.Lock()  # place() may come from several threads

    def attach(self, blocks: Sequence) -> None:
        super().attach(blocks)
        self._table = list(blocks)
        for b in blocks:
            if b.idstr not in self._where:
                self._where[b.idstr] = np.full(b.used_length // self.page_size, -1, np.int64)

    def received_bitmap(self, block) -> np.ndarray:
        with self._lock:
            self._settle()
            return self.received[block.idstr]

    def view(self, block, offset: int) -> np.ndarray:
        """The page's current content, read back from OUT (a copy)."""
        _check(block, offset, self.page_size)
        with self._lock:
            self._settle()
            w = int(self._where[block.idstr][offset // self.page_size])
            if w < 0:
                return np.full(self.page_size, -1 - w, np.uint8)
            return np.frombuffer(bytearray(self.out.read_at(w, self.page_size)), np.uint8)

    def place(self, block, offset: int, data) -> None:
        _check(block, offset, self.page_size)
        with self._lock:
            self._settle()
            pos = self.out.append_page(block.idstr, offset, data)
            self._note(block.idstr, offset // self.page_size, pos)

    def place_zero(self, block, offset: int) -> None:
        _check(block, offset, self.page_size)
        with self._lock:
            self._settle()
            self.out.append_zero(block.idstr, offset)
            self._note(block.idstr, offset // self.page_size, -1)

    def _note(self, idstr: str, page: int, where: int) -> None:
        self._where[idstr][page] = where
        self.received[idstr][page] = True

    def place_batch(self, ev, first: int, stop: int) -> int:
        rec = ev.records
        j = plain_run_end(rec, first, stop)
        if j == first:
            return first
        data = ev.data
        if self.out.last_block != self._table[rec.block[first]].idstr and \
                data[rec.start[first] + 7] & _CONTINUE:
            return first  # cannot continue OUT's block: placed by the loader, named
        with self._lock:
            s0 = rec.start[first]
            at = self.out.append_records(data[s0 : rec.pos[j - 1] + rec.length[j - 1]],
                                         self._table[rec.block[j - 1]].idstr, j - first)
            self._runs.append((rec, first, j, at - s0))
        return j

    def _settle(self) -> None:
        """Enter the runs written since the last call, in order (a page in several,
        or twice in one, ends as its last), in one compiled pass: the end of a
        migration enters thousands at once."""
        runs, self._runs = self._runs, []
        if runs:
            _ramparse.note_runs(runs, [self._where[b.idstr] for b in self._table],
                                [self.received[b.idstr] for b in self._table], self.page_size)
