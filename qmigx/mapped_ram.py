"""Writing mapped-ram files (QEMU 9.0+'s ``mapped-ram`` capability, qemu10.md §5.2).

A mapped-ram migration goes to a file (``file:PATH[,offset=N]``): the
``ram`` setup record is followed, for each block, by a header that puts
the block's page bitmap right after it and its pages at a fixed place,
``pages_offset + i * page_size``, aligned to 1 MiB; the stream goes on
after the block's page area. Pages are never sent as records: a page is
written at its place (again, if it is dirtied again) and its bitmap bit
set; zero pages are not written and their bit is cleared, so the file is
sparse. The bitmaps are written once, when the migration completes.

* :func:`block_layout` computes a block's offsets, as QEMU does;
* :class:`MappedRamFile` is the source's side of a file it can seek and
  ``pwrite`` (the migration driver's, live);
* :func:`write_mapped_blocks` writes a complete snapshot sequentially
  through any sink (no seeking: bitmap, padding and page areas are
  written out, zero-filled where nothing is stored).

The reading side is :mod:`qmigx.stream.mapped_ram`.
"""

from __future__ import annotations

import os
import struct
from typing import Sequence

import numpy as np

from qmigx import zeropage
from qmigx.errors import ChannelError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RAMBlock
from qmigx.stream import MappedRamHeader
from qmigx.stream.mapped_ram import bitmap_size
from qmigx.wire import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_SIZE,
    MAPPED_RAM_HDR_VERSION,
    TARGET_PAGE_SIZE,
    RamFlag,
)

__all__ = ["block_layout", "MappedRamFile", "write_mapped_blocks", "MAPPED_RAM_CAPABILITY"]

#: The ``configuration/capabilities`` subsection that announces mapped-ram.
MAPPED_RAM_CAPABILITY = b"\0\0\0\1" + bytes((len(b"mapped-ram"),)) + b"mapped-ram"

_HDR = struct.Struct(">IQQQ")


def block_layout(header_at: int, used_length: int,
                 page_size: int = TARGET_PAGE_SIZE) -> MappedRamHeader:
    """Where a block's bitmap and pages go when its header is written at ``header_at``."""
    bitmap_offset = header_at + MAPPED_RAM_HDR_SIZE
    end = bitmap_offset + bitmap_size(used_length // page_size)
    align = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    return MappedRamHeader(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset,
                           -(-end // align) * align)


def _entry(blk: RAMBlock, gpa: bool) -> bytes:
    raw = blk.idstr.encode()
    out = bytes((len(raw),)) + raw + struct.pack(">Q", blk.used_length)
    if gpa:
        out += struct.pack(">Q", blk.gpa or 0)
    return out


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    """A bool-per-page array as QEMU's bitmap: 64-bit little-endian words, LSB first."""
    words = bitmap_size(len(bits))
    raw = np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()
    return raw + bytes(words - len(raw))


class MappedRamFile:
    """The source's mapped-ram file: the stream through ``f``, pages by ``pwrite``.

    Args:
        f: the stream's writer; its sink writes at ``fd``'s file position.
        fd: the file (opened for writing; seekable).
        start: the file offset the stream started at (``offset=N``).
    """

    def __init__(self, f: QEMUFile, fd: int, start: int = 0) -> None:
        self.f = f
        self.fd = fd
        self.start = start
        self._skipped = 0
        self.headers: dict[str, MappedRamHeader] = {}
        self.bits: dict[str, np.ndarray] = {}
        self.pages_written = 0
        self.bytes_written = 0

    def position(self) -> int:
        """The file offset the next stream byte goes to."""
        return self.start + self.f.total_transferred + self._skipped

    def setup(self, blocks: Sequence[RAMBlock], *, gpa: bool = False) -> None:
        """The MEM_SIZE record with each block's entry and header; skip each page area."""
        f = self.f
        total = sum(b.used_length for b in blocks)
        f.put_be64(total | RamFlag.MEM_SIZE)
        for blk in blocks:
            f.write(_entry(blk, gpa))
            hdr = block_layout(self.position(), blk.used_length)
            f.write(_HDR.pack(hdr.version, hdr.page_size, hdr.bitmap_offset, hdr.pages_offset))
            self.headers[blk.idstr] = hdr
            self.bits[blk.idstr] = np.zeros(blk.used_length // TARGET_PAGE_SIZE, bool)
            self._seek(hdr.pages_offset + blk.used_length)

    def _seek(self, target: int) -> None:
        self.f.flush()
        self.f.check()
        try:
            os.lseek(self.fd, target, os.SEEK_SET)
        except OSError as e:
            raise ChannelError(f"mapped-ram needs a seekable file: {e.strerror}",
                               field="uri") from None
        self._skipped += target - self.position()

    def pages(self, blk: RAMBlock, offsets: np.ndarray, rows: np.ndarray) -> None:
        """Store pages at their places (``rows[i]`` is the page at ``offsets[i]``); zero pages
        are not written, only their bit cleared."""
        hdr = self.headers[blk.idstr]
        bits = self.bits[blk.idstr]
        ps = TARGET_PAGE_SIZE
        idx = (np.asarray(offsets, np.uint64) // np.uint64(ps)).astype(np.intp)
        zero = zeropage.zero_page_map(rows, ps)
        bits[idx[zero]] = False
        keep = np.flatnonzero(~zero)
        if not len(keep):
            return
        bits[idx[keep]] = True
        # runs of consecutive pages go out in one pwrite each
        runs = np.flatnonzero(np.diff(idx[keep]) != 1) + 1
        for lo, hi in zip(np.r_[0, runs], np.r_[runs, len(keep)]):
            sel = keep[lo:hi]
            data = np.ascontiguousarray(rows[sel])
            where = hdr.pages_offset + int(idx[sel[0]]) * ps
            try:
                n = os.pwrite(self.fd, data, where)
            except OSError as e:
                raise ChannelError(f"mapped-ram page write at 0x{where:x} failed: {e.strerror}",
                                   field="uri") from None
            if n != data.nbytes:
                raise ChannelError(f"mapped-ram page write at 0x{where:x} was short",
                                   field="uri")
            self.bytes_written += n
        self.pages_written += len(keep)

    def write_bitmaps(self) -> None:
        """Each block's bitmap, at its place (at completion, as QEMU does)."""
        for name, hdr in self.headers.items():
            raw = _bits_to_bytes(self.bits[name])
            os.pwrite(self.fd, raw, hdr.bitmap_offset)
            self.bytes_written += len(raw)


def write_mapped_blocks(f: QEMUFile, blocks: Sequence[RAMBlock], *, start: int = 0,
                        gpa: bool = False) -> int:
    """A complete mapped-ram setup record, written sequentially through ``f``.

    ``start`` is the file offset of ``f``'s first byte (the stream's
    ``offset=N``). Each block's bitmap has a bit for every non-zero page;
    the page area holds those pages and zeros elsewhere. Returns the
    number of pages stored.
    """
    ps = TARGET_PAGE_SIZE
    f.put_be64(sum(b.used_length for b in blocks) | RamFlag.MEM_SIZE)
    stored = 0
    for blk in blocks:
        f.write(_entry(blk, gpa))
        hdr = block_layout(start + f.total_transferred, blk.used_length)
        f.write(_HDR.pack(hdr.version, hdr.page_size, hdr.bitmap_offset, hdr.pages_offset))
        mem = blk.memory
        bits = ~zeropage.zero_page_map(mem, ps)
        stored += int(bits.sum())
        f.write(_bits_to_bytes(bits))
        f.write(bytes(hdr.pages_offset - (start + f.total_transferred)))
        f.write(mem)  # the pages whose bit is clear are zero pages: zeros either way
    return stored
