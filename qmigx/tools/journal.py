"""``qmigx incoming --save OUT`` written while pages arrive.

Writing OUT only after the migration ended adds the time of writing all of
guest RAM to the migration's. Instead a thread writes OUT as the
destination places pages: the header, the configuration and the RAM setup
once the setup record arrived, then PART records for every page placed
since the last round, read from guest RAM after the page's mark
(:class:`~qmigx.tools.pagelog.LoggingPlacement`). A page placed again
(a re-sent page, a multifd page, an XBZRLE delta applied) is appended
again: on load the last record wins, so OUT loads to what the destination
holds. At the end, what is left: the last pages, pages never placed (an
ignored shared block), the END section, the device state, EOF and the
vmdesc. Postcopy and COLO swap in placements of their own: OUT is then
written whole at the end, as before.

With ``spool=True`` (a precopy destination kept for OUT alone: no
multifd, postcopy, COLO or shared RAM) there is no RAM and no writer
thread: :class:`~qmigx.tools.pagespool.SpoolPlacement` appends the
records to OUT from the receive buffer as they arrive.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np

from qmigx import _backend
from qmigx.errors import StreamError
from qmigx.qemufile import QEMUFile
from qmigx.stream import RamBlockInfo, Section
from qmigx.tools.pagelog import LoggingPlacement
from qmigx.tools.pagespool import SpoolPlacement
from qmigx.tools.savestream import begin_stream, save_stream, write_devices
from qmigx.wire import TARGET_PAGE_SIZE, SectionType

__all__ = ["SaveJournal"]

_pagesend = _backend.load("pagesend")

#: Pages of the log looked at at a time (128 MiB of guest RAM).
_WINDOW = 32768
#: How often the writer looks for new pages while the migration runs.
_POLL_S = 0.02


class SaveJournal:
    """Writes the state a :class:`~qmigx.migration.MigrationDestination` receives to ``path``.

    Give :attr:`placement` to the destination (``loader_placement``)
    before it starts, call :meth:`start`, and :meth:`finish` once it
    completed; :meth:`abort` if it failed.
    """

    def __init__(self, path: str, dst, *, spool: bool = False) -> None:
        self.spool = spool
        self.placement = SpoolPlacement(self) if spool else LoggingPlacement()
        self.dst = dst
        self._file = open(path, "w+b")  # read back by SpoolPlacement.view
        self._f = QEMUFile(self._file.write)
        self._w = self._ram = self._sec = None
        self._blocks: list = []
        self._written: dict[str, np.ndarray] = {}  # pages already in OUT, per block
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.pages_written = 0

    def start(self) -> None:
        if self.spool:  # written by the receiving thread itself
            return
        self._thread = threading.Thread(target=self._run, name="save-journal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(_POLL_S):
                if self._w is None and not self._begin():
                    continue
                self._drain()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def _begin(self) -> bool:
        res = self.dst.result
        if res.setup is None:
            return False
        self._blocks = list(self.dst.blocks)
        self._w, self._ram = begin_stream(self._f, configuration=res.configuration)
        self._sec = Section(res.setup.section.section_id, "ram", 0, 4)
        self._w.section_header(SectionType.SECTION_START, self._sec)
        self._ram.setup([RamBlockInfo(b.idstr, b.used_length, None, None) for b in self._blocks])
        self._ram.eos()
        self._w.footer(self._sec)
        self._w.section_header(SectionType.SECTION_PART, self._sec)
        if self.spool:  # runs of records are written past QEMUFile from now on
            self._flushed()
            return True
        for b in self._blocks:
            self._written[b.idstr] = np.zeros(b.used_length // TARGET_PAGE_SIZE, bool)
        return True

    # -- what a SpoolPlacement writes through -------------------------------------
    @property
    def last_block(self) -> Optional[str]:
        return None if self._ram is None else self._ram.last_block

    def _ready(self) -> None:
        if self._w is None and not self._begin():
            raise StreamError("a page arrived before the RAM setup record", section="ram")

    def _flushed(self) -> None:
        self._f.flush()
        self._file.flush()
        self._f.check()

    def append_page(self, idstr: str, offset: int, data) -> int:
        """One PAGE record; the position of its data in OUT."""
        self._ready()
        self._ram.page(idstr, offset, data)
        self._flushed()
        self.pages_written += 1
        return self._f.total_transferred - TARGET_PAGE_SIZE

    def append_zero(self, idstr: str, offset: int) -> None:
        self._ready()
        self._ram.zeros(idstr, np.array([offset], np.uint64))
        self._flushed()
        self.pages_written += 1

    def append_records(self, data: memoryview, last_idstr: str, count: int) -> int:
        """``count`` records, as they are, ending in block ``last_idstr``; their position.

        One write from the receive buffer, in the receiving thread: a
        thread of its own gained nothing measurable on two cores (the
        source takes one), and costs handing the GIL back and forth.
        """
        self._ready()
        at = self._f.total_transferred
        fd = self._file.fileno()
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        self._f.wrote_directly(done)
        self._ram.last_block = last_idstr
        self.pages_written += count
        return at

    def read_at(self, pos: int, n: int) -> bytes:
        return os.pread(self._file.fileno(), n, pos)

    def _drain(self) -> None:
        """Append every page marked since the last round (a window at a time: small arrays)."""
        for blk in self._blocks:
            n = self.placement.npages(blk.idstr)
            for lo in range(0, n, _WINDOW):
                self._write(blk, self.placement.take(blk.idstr, lo, lo + _WINDOW))

    def _write(self, blk, pages: np.ndarray) -> None:
        if not len(pages):
            return
        pages = pages.astype(np.int64, copy=False)
        self._written[blk.idstr][pages] = True
        self.pages_written += len(pages)
        mem = blk.buffer[: blk.used_length]
        ram, ps = self._ram, TARGET_PAGE_SIZE
        if ram.last_block != blk.idstr:  # name the block once, then CONTINUE records
            first = int(pages[0])
            ram.page(blk.idstr, first * ps, mem[first * ps : (first + 1) * ps])
            pages = pages[1:]
        self._f.flush()
        if not len(pages):
            return
        # the records go from guest RAM to OUT in gathering writes: no copy of
        # the page in between (OUT is a regular file: a write never waits)
        self._file.flush()
        nbytes, _, _, status, err = _pagesend.send_pages(self._file.fileno(), -1, mem, pages, ps)
        self._f.wrote_directly(nbytes)
        if status != _pagesend.DONE:
            raise OSError(err, f"writing {self._file.name}: {os.strerror(err)}")

    def finish(self) -> None:
        """The migration completed: the rest of RAM, device state, EOF and vmdesc."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.error is not None:
                raise self.error
            res = self.dst.result
            swapped = self.dst.loader is not None and self.dst.loader.placement is not self.placement
            if swapped and self.spool:
                raise StreamError("postcopy or COLO placed pages that OUT never received; "
                                  "incoming --save spools only precopy")
            if self._w is None or swapped:
                # no RAM setup arrived, or postcopy/COLO placed pages this log
                # never saw: OUT is written whole now, from what RAM holds
                self._file.seek(0)
                self._file.truncate()
                save_stream(self._file.write, self.dst.blocks, res.sections,
                            configuration=res.configuration,
                            vmdesc=res.vmdesc if res.vmdesc is not None else False,
                            first_section_id=res.setup.section.section_id if res.setup else 2)
                return
            if self.spool:
                for blk in self._blocks:  # pages no record came for: zero on a fresh destination
                    missing = np.flatnonzero(~self.placement.received_bitmap(blk))
                    if len(missing):
                        offsets = missing.astype(np.uint64) * np.uint64(TARGET_PAGE_SIZE)
                        self._ram.zeros(blk.idstr, offsets)
            else:
                self._drain()
                for blk in self._blocks:  # pages never placed (an ignored shared block)
                    written = self._written[blk.idstr]
                    for lo in range(0, len(written), _WINDOW):
                        self._write(blk, np.flatnonzero(~written[lo : lo + _WINDOW]) + lo)
            w, sec = self._w, self._sec
            self._ram.eos()
            w.footer(sec)
            w.section_header(SectionType.SECTION_END, sec)
            self._ram.eos()
            w.footer(sec)
            write_devices(w, res.sections, sec.section_id,
                          res.vmdesc if res.vmdesc is not None else False)
            self._f.flush()
            self._f.check()
        finally:
            self._file.close()

    def abort(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._file.close()
