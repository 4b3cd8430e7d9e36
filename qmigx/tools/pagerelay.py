"""Sending a saved stream's pages from their place in the file (``qmigx send FILE``).

A plain saved stream already holds most of what a precopy sends: runs of
PAGE and ZERO records, one block's pages in order, each record continuing
the one before. Loading them into RAM only to send them again costs a
copy into fresh memory and a fault per page. Instead the feed's loader
thread (:mod:`qmigx.tools.feed`) only notes, per page, where its latest
record lies in FILE, and the RAM engine, taking pages as it would from a
running guest, relays each run of them whose records lie back to back in
FILE: one header of its own (the first record may have to name the
block), then the rest of the run's bytes with ``sendfile``, straight from
the page cache. The rarer records are turned into pages in RAM as the
loader reads them (an XBZRLE delta applied to the page's last copy, read
back from FILE; a compressed page inflated) and go from RAM, as do pages
FILE never carried (zero).

This is the mirror of :mod:`qmigx.tools.pagespool`, which writes such
runs into OUT on the receiving side as they came.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Callable, Optional, Sequence

import numpy as np

from qmigx import _backend
from qmigx.errors import RamStreamError
from qmigx.migration.direct_send import direct_page_writer, latch_failure
from qmigx.placement import _check
from qmigx.ram import distinct
from qmigx.tools.pagelog import LoggingPlacement
from qmigx.tools.pagespool import plain_run_end

__all__ = ["RelayPlacement", "NEEDS_RAM"]

#: capabilities with which ``send`` must hold FILE's pages in RAM rather than relay
#: them: they encode against what was sent, split pages over channels or place them
#: once (and so does ``--shared-ram``)
NEEDS_RAM = frozenset({"xbzrle", "compress", "multifd", "mapped-ram", "postcopy-ram",
                       "x-colo", "dirty-bitmaps", "x-ignore-shared"})

_ramparse = _backend.load("ramparse")
_pagesend = _backend.load("pagesend")

_BE64 = struct.Struct(">Q")
_F_ZERO, _F_PAGE, _F_CONTINUE = 0x02, 0x08, 0x20


class RelayPlacement(LoggingPlacement):
    """Notes where each page's latest PAGE or ZERO record lies in ``path``.

    Per page: ``start`` (FILE offset of the record, -1 when the page's
    truth is in RAM) and ``end`` (where the record ends, after the page
    or a ZERO record's fill byte). Pages whose records lie back to back
    are relayed in one piece; the first record's header is written anew,
    since the block it continues may not be the last one sent. Pages are
    marked in the log as :class:`LoggingPlacement` does, after they are noted.
    """

    fills_ram = False
    live_view = False
    takes_batches = True

    def __init__(self, path, on_mark: Optional[Callable[[int, int], None]] = None) -> None:
        super().__init__(on_mark)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._start: dict[str, np.ndarray] = {}
        self._end: dict[str, np.ndarray] = {}
        self._table: list = []
        self._where_lock = threading.Lock()  # the loader writes, the engine reads
        #: pages relayed from FILE and sent from RAM, for the report and tests
        self.relayed_pages = 0
        self.ram_pages = 0

    def attach(self, blocks: Sequence) -> None:
        super().attach(blocks)
        self._table = list(blocks)
        for b in blocks:
            if b.idstr not in self._start:
                n = b.used_length // self.page_size
                self._start[b.idstr] = np.full(n, -1, np.int64)
                self._end[b.idstr] = np.full(n, -1, np.int64)

    # -- the loader's side --------------------------------------------------
    def view(self, block, offset: int) -> np.ndarray:
        """The page's current content (a copy): from FILE, or RAM."""
        _check(block, offset, self.page_size)
        p = offset // self.page_size
        with self._where_lock:
            start, end = int(self._start[block.idstr][p]), int(self._end[block.idstr][p])
        if start < 0:
            return np.array(block.buffer[offset : offset + self.page_size], np.uint8)
        if end - start < self.page_size + 8:  # a ZERO record: its last byte fills the page
            return np.full(self.page_size, os.pread(self.fd, 1, end - 1)[0], np.uint8)
        data = os.pread(self.fd, self.page_size, end - self.page_size)
        if len(data) != self.page_size:
            raise RamStreamError("FILE ended inside a page it held when read",
                                 offset=end - self.page_size, section="ram", field="page")
        return np.frombuffer(bytearray(data), np.uint8)

    def place(self, block, offset: int, data) -> None:
        _check(block, offset, self.page_size)
        p = offset // self.page_size
        block.buffer[offset : offset + self.page_size] = np.frombuffer(data, np.uint8)
        with self._where_lock:
            self._start[block.idstr][p] = -1
        self.mark_received(block, [offset])

    def place_batch(self, ev, first: int, stop: int) -> int:
        rec = ev.records
        j = plain_run_end(rec, first, stop)
        if j == first:
            return first
        n = rec.count
        base = np.int64(ev.base)
        starts = np.frombuffer(rec.start, np.int64, n)[first:j] + base
        ends = (np.frombuffer(rec.pos, np.int64, n)[first:j] + base
                + np.frombuffer(rec.length, np.int32, n)[first:j])
        blocks = np.frombuffer(rec.block, np.int32, n)[first:j]
        offsets = np.frombuffer(rec.offset, np.uint64, n)[first:j]
        pages = (offsets // np.uint64(self.page_size)).astype(np.intp)
        ids = distinct(blocks)
        for b in ids:
            sel = np.flatnonzero(blocks == b) if len(ids) > 1 else slice(None)
            blk = self._table[b]
            pg = pages[sel]
            st, en = self._start[blk.idstr], self._end[blk.idstr]
            with self._where_lock:
                if len(pg) > 1 and not (pg[1:] > pg[:-1]).all():  # a page twice: the last wins
                    for p, s, e in zip(pg.tolist(), starts[sel].tolist(), ends[sel].tolist()):
                        st[p], en[p] = s, e
                else:
                    st[pg] = starts[sel]
                    en[pg] = ends[sel]
            self.mark_received(blk, offsets[sel])
        return j

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the engine's side --------------------------------------------------
    def sender(self, channel, f) -> Callable:
        """``relay_pages(w, block, pages)`` for :class:`~qmigx.precopy.RamSaveState`.

        Writes on ``channel`` behind the QEMU file ``f`` (flushed first by
        the engine): with ``sendfile`` on a plain socket, else through
        ``f``. Returns ``(nbytes, zeros, normal)``, or None after latching
        the channel's error on ``f``.
        """
        direct_pages = direct_page_writer(channel, f)  # None: not a plain socket
        ps = self.page_size
        records = bytearray()

        def failed(status: int, err: int) -> None:
            if status == _pagesend.SHORT:
                f.set_error(RamStreamError("FILE ended inside a record it held when read",
                                           section="ram", field="page"))
            else:
                latch_failure(channel, f, status, err)

        def put(head: bytes, lo: int, count: int) -> Optional[int]:
            """``head``, then FILE's bytes ``[lo, lo + count)``; the bytes written, or None."""
            if direct_pages is not None:
                f.flush()  # what the file holds goes first
                fds = channel.socket_fds()
                if fds is None:
                    f.set_error(channel.failure("stopped", writing=True))
                    return None
                nbytes, status, err = _pagesend.send_file(fds[0], fds[1], head, self.fd, lo,
                                                          count, channel.timeout)
                channel.bytes_written += nbytes
                f.wrote_directly(nbytes)
                if status != _pagesend.DONE:
                    failed(status, err)
                    return None
                return nbytes
            data = os.pread(self.fd, count, lo) if count else b""
            if len(data) != count:
                failed(_pagesend.SHORT, 0)
                return None
            f.write(head)
            f.write(data)
            return len(head) + count

        def header(w, idstr: str, offset: int, flag: int) -> bytes:
            if w.last_block == idstr:
                return _BE64.pack(offset | flag | _F_CONTINUE)
            raw = idstr.encode()
            w.last_block = idstr
            return _BE64.pack(offset | flag) + bytes((len(raw),)) + raw

        def from_ram(w, blk, pages: np.ndarray) -> Optional[tuple[int, int, int]]:
            mem = blk.buffer[: blk.used_length]
            first = int(pages[0]) * ps
            page = mem[first : first + ps]
            zero = not page.any()
            head = header(w, blk.idstr, first, _F_ZERO if zero else _F_PAGE)
            nbytes = len(head) + (1 if zero else ps)
            f.write(head + (b"\0" if zero else page.tobytes()))
            zeros, normal = int(zero), int(not zero)
            rest = pages[1:]
            if not len(rest):
                return nbytes, zeros, normal
            if direct_pages is not None:
                f.flush()
                got = direct_pages(mem, rest)
                if got is None:
                    return None
                k, z, nm = got
            else:
                need = len(rest) * (ps + 8)
                if len(records) < need:
                    records.extend(bytes(need - len(records)))
                k, z, nm = _ramparse.encode_pages(mem, rest, records, ps)
                f.write(memoryview(records)[:k])
            return nbytes + k, zeros + z, normal + nm

        def send(w, blk, pages: np.ndarray) -> Optional[tuple[int, int, int]]:
            idstr = blk.idstr
            with self._where_lock:
                st = self._start[idstr][pages]
                en = self._end[idstr][pages]
            span = en - st
            infile = st >= 0
            joined = np.zeros(len(pages), bool)
            if len(pages) > 1:  # back to back in FILE (a record naming the block again is
                # fine: it can only name this one), or both in RAM
                joined[1:] = ((infile[1:] & infile[:-1] & (st[1:] == en[:-1]))
                              | ~(infile[1:] | infile[:-1]))
            bounds = np.r_[np.flatnonzero(~joined), len(pages)].tolist()
            total = zeros = normal = 0
            for a, b in zip(bounds[:-1], bounds[1:]):
                if not infile[a]:
                    got = from_ram(w, blk, pages[a:b])
                    if got is None:
                        return None
                    total, zeros, normal = total + got[0], zeros + got[1], normal + got[2]
                    self.ram_pages += b - a
                    continue
                whole = span[a] >= ps + 8
                lo = int(en[a]) - (ps if whole else 1)
                head = header(w, idstr, int(pages[a]) * ps, _F_PAGE if whole else _F_ZERO)
                nbytes = put(head, lo, int(en[b - 1]) - lo)
                if nbytes is None:
                    return None
                nz = int(np.count_nonzero(span[a:b] < ps + 8))
                total, zeros, normal = total + nbytes, zeros + nz, normal + (b - a - nz)
                self.relayed_pages += b - a
            return total, zeros, normal
        return send
