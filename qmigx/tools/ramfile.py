"""Page records written straight to files: sparse, streamed, flat in memory.

An ELF core, one file per RAM block, a delta against a template: each is
guest RAM laid out in files. :class:`RamFileSink` applies a stream's page
records to such a layout as they are parsed, without ever holding guest
RAM in memory:

* each block is cut into :class:`Region` pieces, each a stretch of the
  block at some offset of some file (a block may appear more than once:
  the BIOS is mapped both below 1 MiB and below 4 GiB);
* PAGE records are written with ``pwritev``, many contiguous pages per
  call, straight from the parser's buffer (an ``mmap`` of the stream when
  reading a file): the only copy is the kernel's;
* ZERO records write nothing: files start empty (holes), so a page
  nobody wrote reads as zeros. A bitmap (one byte per page) remembers
  which pages hold data, so a later ZERO record for such a page writes
  zeros over it;
* XBZRLE records read the page back (``pread``), decode onto it and write
  it again; COMPRESS_PAGE records are inflated and written;
* the last record for a page wins, as on a destination.

Parts of a block that no region covers still receive pages (an XBZRLE
record may need them later): they go to a sparse scratch file that is
removed on close.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Optional, Sequence

import numpy as np

from qmigx import _backend
from qmigx.errors import RamStreamError, StreamError
from qmigx.ram import decompress_page, distinct
from qmigx.records import Record
from qmigx.stream import RamPages, RamSetup
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["Region", "RamFileSink"]

_ramparse = _backend.load("ramparse")
_pagewrite = _backend.load("pagewrite")


class Region(Record):
    """``length`` bytes of a block from ``block_offset`` live in ``fd`` at ``file_offset``."""

    block_offset: int
    length: int
    fd: int
    file_offset: int


class _Block:
    __slots__ = ("idstr", "regions", "nonzero", "starts", "ends")

    def __init__(self, idstr: str, regions: list, npages: int) -> None:
        self.idstr = idstr
        self.regions = regions
        self.nonzero = np.zeros(npages, bool)
        self.starts = np.array([r.block_offset for r in regions], np.uint64)
        self.ends = np.array([r.block_offset + r.length for r in regions], np.uint64)

    def where(self, offset: int) -> list:
        return [(r.fd, r.file_offset + offset - r.block_offset) for r in self.regions
                if r.block_offset <= offset < r.block_offset + r.length]


class RamFileSink:
    """Applies RAM records to files (see the module docstring).

    Args:
        regions: block idstr -> the :class:`Region` list where it goes.
            Blocks the setup record names that are missing here, and parts
            of blocks no region covers, go to a scratch file.
        page_size: the target page size.
        scratch_dir: where the scratch file is made (default: the temp dir).
    """

    #: pages are written straight from the parser's buffer: readers may map the input
    zero_copy = True

    def __init__(self, regions: Mapping[str, Sequence[Region]], *,
                 page_size: int = TARGET_PAGE_SIZE, scratch_dir: Optional[str] = None) -> None:
        self.regions = {k: list(v) for k, v in regions.items()}
        self.page_size = page_size
        self.scratch_dir = scratch_dir
        self._scratch: Optional[int] = None
        self._scratch_size = 0
        self._table: list[_Block] = []
        self._blocks: dict[str, _Block] = {}
        self._zero = bytes(page_size)
        self._xbzrle = None
        self._mapped: dict = {}  # mapped-ram: block index -> (block, page bitmap)
        self.pages = 0

    # -- setup ----------------------------------------------------------------
    def on_setup(self, ev: RamSetup) -> None:
        """Build the block table of a setup record (kept across a repeated setup)."""
        table = []
        for info in ev.blocks:
            blk = self._blocks.get(info.idstr)
            if blk is None:
                blk = self._make_block(info.idstr, info.used_length)
                self._blocks[info.idstr] = blk
            table.append(blk)
        self._table = table

    def on_mapped_block(self, ev) -> None:
        """mapped-ram (QEMU 10): one block; its bitmap says which of its pages the file holds."""
        blk = self._blocks.get(ev.info.idstr)
        if blk is None:
            blk = self._make_block(ev.info.idstr, ev.info.used_length)
            self._blocks[ev.info.idstr] = blk
        self._mapped[ev.index] = (blk, ev.page_bits())

    def on_mapped_pages(self, ev) -> None:
        """mapped-ram: a chunk of a block's pages; those its bitmap marks are written."""
        blk, bits = self._mapped[ev.index]
        ps = self.page_size
        n = len(ev.data) // ps
        first = ev.first_page
        sel = bits[first : first + n]
        if not sel.any():
            return
        data = memoryview(ev.data)
        edges = np.flatnonzero(np.diff(np.r_[0, sel.astype(np.int8), 0]))
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
            for i in range(a, b):  # page by page: regions may split a run
                self._write_all(blk, (first + i) * ps, data[i * ps : (i + 1) * ps])
            blk.nonzero[first + a : first + b] = True
        self.pages += int(sel.sum())

    def _make_block(self, idstr: str, length: int) -> _Block:
        regions = sorted(self.regions.get(idstr, ()), key=lambda r: r.block_offset)
        covered = []
        pos = 0
        for r in regions:
            if r.block_offset > pos:
                covered.append((pos, r.block_offset))
            pos = max(pos, r.block_offset + r.length)
        if pos < length:
            covered.append((pos, length))
        extra = []
        for lo, hi in covered:  # uncovered stretches: the scratch file keeps them
            extra.append(Region(lo, hi - lo, self._scratch_fd(), self._scratch_size))
            self._scratch_size += hi - lo
        return _Block(idstr, regions + extra, -(-length // self.page_size))

    def _scratch_fd(self) -> int:
        if self._scratch is None:
            fd, path = tempfile.mkstemp(prefix="qmigx-scratch-", dir=self.scratch_dir)
            os.unlink(path)
            self._scratch = fd
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None:
            os.close(self._scratch)
            self._scratch = None

    def __enter__(self) -> "RamFileSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pages ----------------------------------------------------------------
    def on_pages(self, ev: RamPages) -> None:
        """Apply one batch of page records, in order."""
        rec = ev.records
        n = rec.count
        if n == 0:
            return
        kind = np.frombuffer(rec.kind, np.uint8, n)
        fill = np.frombuffer(rec.fill, np.uint8, n)
        odd = np.flatnonzero((kind >= _ramparse.KIND_XBZRLE)
                             | ((kind == _ramparse.KIND_ZERO) & (fill != 0)))
        lo = 0
        for i in odd.tolist() + [n]:
            if i > lo:
                self._plain(ev, lo, i)
            if i < n:
                self._one(ev, i)
            lo = i + 1
        self.pages += n

    def _plain(self, ev: RamPages, lo: int, hi: int) -> None:
        """Records ``lo..hi-1``: only PAGE and ZERO-with-0 ones."""
        rec = ev.records
        n = rec.count
        block = np.frombuffer(rec.block, np.int32, n)[lo:hi]
        offset = np.frombuffer(rec.offset, np.uint64, n)[lo:hi]
        ps = self.page_size
        ublocks = distinct(block)
        if len(ublocks) == 1:
            groups = [(ublocks[0], np.arange(hi - lo))]
        else:
            groups = [(b, np.flatnonzero(block == b)) for b in ublocks]
        kind = np.frombuffer(rec.kind, np.uint8, n)[lo:hi]
        pos = np.frombuffer(rec.pos, np.int64, n)[lo:hi]
        for b, idx in groups:
            blk = self._table[b]
            offs = offset[idx]
            pages = (offs // np.uint64(ps)).astype(np.intp)
            if len(pages) > 1 and not (pages[1:] > pages[:-1]).all() and \
                    len(np.unique(pages)) != len(pages):  # a page twice: keep the order exact
                for i in idx.tolist():
                    self._one(ev, lo + i)
                continue
            is_page = kind[idx] == _ramparse.KIND_PAGE
            zero_idx = idx[~is_page]
            if len(zero_idx):
                zpages = pages[~is_page]
                dirty = blk.nonzero[zpages]
                if dirty.any():
                    for off in offs[~is_page][dirty].tolist():
                        self._write_all(blk, off, self._zero)
                    blk.nonzero[zpages] = False
            page_idx = idx[is_page]
            if len(page_idx):
                self._write_pages(ev.data, blk, offs[is_page], pos[page_idx])
                blk.nonzero[pages[is_page]] = True

    def _write_pages(self, data, blk: _Block, offs: np.ndarray, pos: np.ndarray) -> None:
        whole = len(blk.regions) == 1 and blk.regions[0].block_offset == 0
        for k, r in enumerate(blk.regions):
            if whole:
                sel_offs, sel_pos = offs, pos
            else:
                inside = (offs >= blk.starts[k]) & (offs < blk.ends[k])
                if not inside.any():
                    continue
                sel_offs, sel_pos = offs[inside], pos[inside]
            out = sel_offs.astype(np.int64)
            out += r.file_offset - r.block_offset
            _pagewrite.write_pages(r.fd, data, np.ascontiguousarray(sel_pos, np.int64), out,
                                   self.page_size)

    def _write_all(self, blk: _Block, offset: int, page) -> None:
        for fd, at in blk.where(offset):
            _pwritev(fd, [page], at, len(page))

    def _read(self, blk: _Block, offset: int) -> bytearray:
        where = blk.where(offset)
        fd, at = where[0]
        data = os.pread(fd, self.page_size, at)
        buf = bytearray(self.page_size)
        buf[: len(data)] = data
        return buf

    def _one(self, ev: RamPages, i: int) -> None:
        """One record of any kind, applied on its own."""
        rec = ev.records
        blk = self._table[int(rec.block[i])]
        off = int(rec.offset[i])
        page_no = off // self.page_size
        kind = rec.kind[i]
        ps = self.page_size
        at = ev.base + int(rec.start[i])
        if kind == _ramparse.KIND_ZERO:
            fill = rec.fill[i]
            if fill == 0:
                if blk.nonzero[page_no]:
                    self._write_all(blk, off, self._zero)
                    blk.nonzero[page_no] = False
                return
            self._write_all(blk, off, bytes((fill,)) * ps)
        elif kind == _ramparse.KIND_PAGE:
            pos = int(rec.pos[i])
            self._write_all(blk, off, ev.data[pos : pos + ps])
        elif kind == _ramparse.KIND_XBZRLE:
            page = self._read(blk, off)
            pos, length = int(rec.pos[i]), int(rec.length[i])
            if self._xbzrle is None:
                from qmigx import xbzrle

                self._xbzrle = xbzrle
            try:
                self._xbzrle.decode_buffer(ev.data[pos : pos + length],
                                           np.frombuffer(page, np.uint8))
            except StreamError:
                raise
            except ValueError as exc:
                raise RamStreamError(f"Failed to load XBZRLE page - decode error! ({exc})",
                                     offset=at, section=ev.section.label,
                                     field="xbzrle") from None
            self._write_all(blk, off, page)
        else:
            pos, length = int(rec.pos[i]), int(rec.length[i])
            self._write_all(blk, off, decompress_page(ev.data[pos : pos + length], at,
                                                      ev.section.label))
        blk.nonzero[page_no] = True


def _pwritev(fd: int, bufs: list, offset: int, total: int) -> None:
    """pwritev until every byte is written (a short write continues)."""
    done = os.pwritev(fd, bufs, offset)
    if done < total:
        rest = b"".join(bytes(b) for b in bufs)
        while done < total:
            done += os.pwrite(fd, rest[done:], offset + done)
