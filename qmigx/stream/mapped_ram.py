"""The setup record of a ``mapped-ram`` stream (QEMU 9.0+, qemu10.md §5.2), sans-IO.

With capability ``mapped-ram`` (``file:`` migrations) RAM is not sent as
page records: each entry of the setup record is followed by a header
naming where, in the file, the block's page bitmap and its pages lie,
and the stream itself continues after the block's page area. The file
is thus laid out as::

    entry (str8 idstr, be64 used_length [, page size] [, gpa]) + header
    bitmap (ceil(pages / 64) x 8 bytes)      at header.bitmap_offset
    zeros up to the next MiB
    page i of the block                      at header.pages_offset + i x page_size
    next entry                               at header.pages_offset + used_length

:class:`MappedSetupReader` reads that sequentially, so a pipe, a socket
and mmap windows of a file all work: it emits a
:class:`~qmigx.stream.RamMappedBlock` (entry, header, bitmap) and then the
block's page area in whole-page :class:`~qmigx.stream.RamMappedPages`
chunks as the bytes pass by, and the :class:`~qmigx.stream.RamSetup` of
the whole list after the last block. QEMU reads the bitmap and pages by
offset wherever they are; this reader needs them in QEMU's order (bitmap
after its header, pages after the bitmap), which is how QEMU writes them,
and refuses anything else with the offending offset.
"""

from __future__ import annotations

from typing import Optional

from qmigx.errors import RamStreamError, TruncatedStreamError
from qmigx.qemufile import Cursor, NeedData
from qmigx.savevm import Section
from qmigx.stream.events import (
    MappedRamHeader,
    RamBlockInfo,
    RamMappedBlock,
    RamMappedPages,
    RamSetup,
)
from qmigx.wire import MAPPED_RAM_HDR_VERSION

__all__ = ["MappedSetupReader", "bitmap_size"]

_ENTRY, _BITMAP, _PAGES = range(3)


def bitmap_size(pages: int) -> int:
    """Bytes of a block's bitmap: whole 64-bit words (QEMU's ``unsigned long``)."""
    return -(-pages // 64) * 8


class MappedSetupReader:
    """Reads one mapped-ram setup record, block by block (see the module docstring).

    Args:
        section: the ``ram`` START section.
        total: the MEM_SIZE record's total, which the entries must add up to.
        at: absolute offset of the MEM_SIZE record.
        page_size: the target page size; headers must name the same.
        gpa: entries carry a GPA (x-ignore-shared).
    """

    def __init__(self, section: Section, total: int, at: int, page_size: int,
                 gpa: bool) -> None:
        self.section = section
        self.total = total
        self.remaining = total
        self.at = at
        self.page_size = page_size
        self.gpa = gpa
        self.blocks: list[RamBlockInfo] = []
        self._phase = _ENTRY
        self._info: Optional[RamBlockInfo] = None
        self._sent = 0  # bytes of the current page area already passed on

    @property
    def done(self) -> bool:
        return self.remaining == 0 and self._phase == _ENTRY

    def step(self, cur: Cursor, eof: bool) -> list:
        """Consume what ``cur`` allows of the record; return events.

        Raises :class:`~qmigx.qemufile.NeedData` when the next piece is not
        complete (the caller rewinds ``cur`` and retries with more input).
        """
        if self._phase == _ENTRY:
            return self._entry(cur)
        if self._phase == _BITMAP:
            return self._bitmap(cur, eof)
        return self._pages(cur, eof)

    # -- one entry and its header ---------------------------------------------------
    def _entry(self, cur: Cursor) -> list:
        label = self.section.label
        entry_at = cur.tell()
        name = cur.read_str8(what="RAM block name", allow_empty=False)
        used = cur.read_be64()
        gpa = cur.read_be64() if self.gpa else None
        version = cur.read_be32()
        page_size = cur.read_be64()
        bitmap_offset = cur.read_be64()
        pages_offset = cur.read_be64()
        end = cur.tell()

        def bad(msg: str, field: str) -> RamStreamError:
            return RamStreamError(f"RAM block {name!r}: {msg}", offset=entry_at, section=label,
                                  field=field)

        if used > self.remaining:
            raise bad(f"length 0x{used:x} exceeds the remaining total 0x{self.remaining:x}",
                      "used_length")
        if used % self.page_size:
            raise bad(f"length 0x{used:x} not page aligned", "used_length")
        if version > MAPPED_RAM_HDR_VERSION:
            raise bad(f"mapped-ram header version {version} not supported (at most "
                      f"{MAPPED_RAM_HDR_VERSION})", "mapped_ram.version")
        if page_size != self.page_size:
            raise bad(f"mapped-ram page size {page_size}, expected {self.page_size}",
                      "mapped_ram.page_size")
        if pages_offset % self.page_size:
            raise bad(f"page area at 0x{pages_offset:x} has bad alignment",
                      "mapped_ram.pages_offset")
        if bitmap_offset < end:
            raise bad(f"bitmap at 0x{bitmap_offset:x} lies before the end of its header "
                      f"(0x{end:x})", "mapped_ram.bitmap_offset")
        bsize = bitmap_size(used // self.page_size)
        if bitmap_offset + bsize > pages_offset:
            raise bad(f"bitmap 0x{bitmap_offset:x}+0x{bsize:x} runs into the page area at "
                      f"0x{pages_offset:x}", "mapped_ram.pages_offset")
        if len(self.blocks) >= 4096:
            raise bad("more than 4096 RAM blocks", "idstr")
        hdr = MappedRamHeader(version, page_size, bitmap_offset, pages_offset)
        self._info = RamBlockInfo(name, used, None, gpa, hdr)
        self.remaining -= used
        self._phase = _BITMAP
        self._entry_at = entry_at
        return []

    # -- the bitmap -----------------------------------------------------------------
    def _bitmap(self, cur: Cursor, eof: bool) -> list:
        info = self._info
        hdr = info.mapped
        size = bitmap_size(info.used_length // self.page_size)
        if not _skip_to(cur, hdr.bitmap_offset, eof, self._past_end(
                f"bitmap at 0x{hdr.bitmap_offset:x}", "mapped_ram.bitmap_offset")):
            return []
        if eof and hdr.bitmap_offset + size > cur.base + cur.end:
            raise self._past_end(f"bitmap 0x{hdr.bitmap_offset:x}+0x{size:x}",
                                 "mapped_ram.bitmap_offset")
        bitmap = bytes(cur.read_bytes(size))
        self.blocks.append(info)
        self._phase = _PAGES
        self._sent = 0
        return [RamMappedBlock(self.section, len(self.blocks) - 1, info, bitmap, self._entry_at)]

    # -- the page area --------------------------------------------------------------
    def _pages(self, cur: Cursor, eof: bool) -> list:
        info = self._info
        hdr = info.mapped
        ps = self.page_size
        start = hdr.pages_offset + self._sent
        area_end = hdr.pages_offset + info.used_length
        if self._sent == 0 and not _skip_to(cur, start, eof, self._past_end(
                f"page area 0x{hdr.pages_offset:x}+0x{info.used_length:x}",
                "mapped_ram.pages_offset")):
            return []
        if start == area_end:
            return self._block_done()
        have = min(cur.base + cur.end, area_end) - start
        n = have - have % ps
        if n <= 0:
            if eof:
                raise self._past_end(f"page area 0x{hdr.pages_offset:x}+0x{info.used_length:x}",
                                     "mapped_ram.pages_offset")
            raise NeedData(start + ps)
        data = cur.buf[cur.pos : cur.pos + n]
        cur.pos += n
        first = self._sent // ps
        self._sent += n
        evs: list = [RamMappedPages(self.section, len(self.blocks) - 1, first, data, start)]
        if self._sent == info.used_length:
            evs += self._block_done()
        return evs

    def _block_done(self) -> list:
        self._phase = _ENTRY
        self._info = None
        if self.remaining:
            return []
        return [RamSetup(self.section, self.total, tuple(self.blocks), self.at, b"")]

    def _past_end(self, what: str, field: str) -> TruncatedStreamError:
        name = self._info.idstr if self._info is not None else "?"
        return TruncatedStreamError(
            f"mapped-ram {what} of RAM block {name!r} runs past the end of the input",
            offset=self._entry_at, section=self.section.label, field=field)


def _skip_to(cur: Cursor, target: int, eof: bool, past_end: Exception) -> bool:
    """Advance ``cur`` to absolute offset ``target``; False: consumed all there is so far.

    Raises ``past_end`` when the input ended before ``target``, and
    :class:`NeedData` when nothing was consumed (the caller waits for input).
    """
    here = cur.tell()
    if target < here:
        raise AssertionError("mapped-ram skip backwards")  # excluded by the header checks
    avail = cur.base + cur.end
    if target <= avail:
        cur.pos = target - cur.base
        return True
    if eof:
        raise past_end
    if here == avail:
        raise NeedData(target)
    cur.pos = cur.end
    return False
