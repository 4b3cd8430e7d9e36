"""RAM blocks and the ``ram`` section codec (QEMU's ram.c, stream side).

* :class:`RAMBlock` names a piece of guest memory the way QEMU does
  (idstr, used length, page size) and wraps any writable buffer: a numpy
  array, an anonymous or file ``mmap``, a bytearray.
* :class:`RamLoader` is the destination side: it checks the setup record
  against its blocks (or creates them) and applies page records in place,
  XBZRLE deltas on the current page content and zlib pages included.
* :class:`RamWriter` is the source side's record encoder: ZERO, PAGE,
  XBZRLE and COMPRESS_PAGE records with QEMU's CONTINUE rule, plus the
  setup record and EOS, and the byte counters query-migrate reports.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

from qmigx import _backend
from qmigx.errors import RamStreamError, StreamError
from qmigx.placement import CopyPlacement, PagePlacement
from qmigx.qemufile import QEMUFile
from qmigx.records import Record
from qmigx.stream import RamBlockInfo, RamMappedBlock, RamMappedPages, RamPages, RamSetup
from qmigx.wire import ENCODING_FLAG_XBZRLE, TARGET_PAGE_SIZE, RamFlag

__all__ = ["RAMBlock", "RAMBlockList", "RamLoader", "RamWriter", "RamStats", "compress_page",
           "aligned_array"]

_ramparse = _backend.load("ramparse")

_BE64 = struct.Struct(">Q")


def _as_u8(buf) -> np.ndarray:
    """A flat writable uint8 numpy view of any buffer (no copy)."""
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8) if buf.flags.c_contiguous else None
        if arr is None:
            raise ValueError("RAM block buffers must be C-contiguous")
        return arr
    return np.frombuffer(buf, np.uint8)


def aligned_array(shape, dtype=np.uint8) -> np.ndarray:
    """A zeroed numpy array on its own anonymous mapping (page aligned).

    Kernel dirty tracking (userfaultfd) needs memory that starts on a page
    boundary; ``np.zeros`` of a large size usually does not.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape)) if np.ndim(shape) else int(shape)
    nbytes = max(count * dt.itemsize, 1)
    m = mmap.mmap(-1, -(-nbytes // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE,
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(m, dt, count).reshape(shape)


class RAMBlock:
    """A named piece of guest memory, as QEMU's RAMBlock.

    Args:
        idstr: the block's name on the wire (``pc.ram``, ``mem0``, ...).
        buffer: its memory: any writable buffer of at least ``used_length``.
        used_length: bytes that migrate; defaults to the buffer's size.
        page_size: the host page size of the block (4096 unless hugepages).
        shared: whether the memory is shared with another process (a
            ``MAP_SHARED`` file or memfd); x-ignore-shared skips such blocks.
        gpa: its guest-physical base address, sent with x-ignore-shared.
        max_length: the largest size a resize may give it (resizable blocks).
    """

    def __init__(self, idstr: str, buffer, used_length: Optional[int] = None, *,
                 page_size: int = TARGET_PAGE_SIZE, shared: bool = False, gpa: int = 0,
                 max_length: Optional[int] = None) -> None:
        if not idstr or len(idstr.encode()) > 255:
            raise ValueError(f"RAM block name must be 1..255 bytes: {idstr!r}")
        self.idstr = idstr
        self._backing = buffer
        self.buffer = _as_u8(buffer)
        self.used_length = len(self.buffer) if used_length is None else int(used_length)
        if self.used_length > len(self.buffer):
            raise ValueError(f"{idstr}: used length {self.used_length} exceeds its buffer")
        if self.used_length % TARGET_PAGE_SIZE:
            raise ValueError(f"{idstr}: used length {self.used_length} is not page aligned")
        self.page_size = page_size
        self.shared = shared
        self.gpa = gpa
        self.max_length = self.used_length if max_length is None else max_length
        #: QEMU's RAM_RESIZEABLE: the setup record may change used_length
        self.resizable = max_length is not None

    @classmethod
    def anonymous(cls, idstr: str, size: int, *, hugepages: bool = False,
                  populate: bool = False, **kw) -> "RAMBlock":
        """Private anonymous memory (zero-filled, allocated on first touch).

        ``populate`` allocates every page up front (MAP_POPULATE): a
        destination about to fill the block then copies into ready memory
        instead of taking a fault per page (measured: 0.42 s per GiB in all
        against 0.5-0.7 s). ``hugepages`` asks for transparent huge pages,
        whose speed depends on the host's compaction (0.23 s to 2.5 s per
        GiB seen on one machine).
        """
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(-1, size, flags=flags)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        return cls(idstr, m, **kw)

    @classmethod
    def memfd(cls, idstr: str, size: int, **kw) -> "RAMBlock":
        """Shared memory on a memfd (another process can map ``block.fd``).

        Marked shared, so x-ignore-shared leaves it to be mapped by the
        destination rather than copied.
        """
        fd = os.memfd_create(idstr.replace("/", "_")[:200], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        blk = cls(idstr, m, size, shared=True, **kw)
        blk.fd = fd
        return blk

    @classmethod
    def from_file(cls, idstr: str, path: str, size: Optional[int] = None, *,
                  shared: bool = True, **kw) -> "RAMBlock":
        """Map a file. ``shared=False`` maps it copy-on-write: the file is never written."""
        fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
        try:
            if size is None:
                size = os.fstat(fd).st_size
            elif shared and os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            m = mmap.mmap(fd, size, flags=flags, prot=prot)
        finally:
            os.close(fd)
        return cls(idstr, m, size, shared=shared, **kw)

    @property
    def memory(self) -> np.ndarray:
        """The migrated part of the block as a uint8 array view."""
        return self.buffer[: self.used_length]

    def page(self, offset: int) -> np.ndarray:
        return self.buffer[offset : offset + TARGET_PAGE_SIZE]

    def resize(self, new_length: int) -> None:
        if new_length > min(self.max_length, len(self.buffer)):
            raise RamStreamError(
                f"Length mismatch: {self.idstr}: 0x{self.used_length:x} in != "
                f"0x{new_length:x}: Invalid argument", field="used_length")
        self.used_length = new_length

    def __repr__(self) -> str:
        return (f"RAMBlock({self.idstr!r}, used_length=0x{self.used_length:x}, "
                f"shared={self.shared})")


class RAMBlockList:
    """Blocks in RAM-list order, found by name."""

    def __init__(self, blocks: Iterable[RAMBlock] = ()) -> None:
        self._blocks: dict[str, RAMBlock] = {}
        for b in blocks:
            self.add(b)

    def add(self, block: RAMBlock) -> RAMBlock:
        if block.idstr in self._blocks:
            raise ValueError(f"duplicate RAM block {block.idstr!r}")
        self._blocks[block.idstr] = block
        return block

    def get(self, idstr: str) -> Optional[RAMBlock]:
        return self._blocks.get(idstr)

    def __getitem__(self, idstr: str) -> RAMBlock:
        return self._blocks[idstr]

    def __iter__(self):
        return iter(self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, idstr: str) -> bool:
        return idstr in self._blocks

    def names(self) -> list[str]:
        return list(self._blocks)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _populate_in_background(m: mmap.mmap, size: int, chunk: int = 32 << 20) -> None:
    """Fault a fresh mapping in, ahead of the loader, from another thread.

    The kernel zeroes pages in this thread (the madvise call releases the
    GIL) while the loader copies pages in; the loader then mostly finds
    memory ready instead of faulting on every page. Kernels without
    MADV_POPULATE_WRITE just skip it.
    """
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = np.frombuffer(m, np.uint8).ctypes.data  # ctypes drops the GIL; mmap.madvise doesn't

    def run() -> None:
        for off in range(0, size, chunk):
            if madvise(ctypes.c_void_p(base + off), min(chunk, size - off),
                       _MADV_POPULATE_WRITE) != 0:
                return

    threading.Thread(target=run, name="ram-populate", daemon=True).start()


def _fresh_block(info: RamBlockInfo, populate: bool = True) -> "RAMBlock":
    """A destination block made from a setup entry, populated in the background.

    Not populated for postcopy, whose pages must stay missing until placed.
    """
    blk = RAMBlock.anonymous(info.idstr, info.used_length, gpa=info.gpa or 0,
                             page_size=info.page_size or TARGET_PAGE_SIZE)
    if populate and info.used_length >= 16 << 20:
        _populate_in_background(blk._backing, info.used_length)
    return blk


def compress_page(page, level: int = 1) -> bytes:
    """One page as a complete zlib stream, as QEMU's compression threads make it."""
    c = zlib.compressobj(level)
    return c.compress(page) + c.flush(zlib.Z_FINISH)


class RamStats(Record, mutable=True):
    """Counters in query-migrate's ``ram`` and ``xbzrle-cache`` terms."""

    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    xbzrle_pages: int = 0
    xbzrle_bytes: int = 0
    compressed_pages: int = 0
    compressed_bytes: int = 0


def distinct(values: np.ndarray) -> list[int]:
    """The distinct values of a batch's block indexes, in ascending order.

    A batch nearly always names one block: checked in one pass. Not
    ``np.unique``, which imports ``numpy.ma`` (20 ms) the first time.
    """
    if not len(values):
        return []
    first = int(values[0])
    if (values == first).all():
        return [first]
    return sorted(set(values.tolist()))


class RamLoader:
    """Applies a ``ram`` section to RAM blocks (the destination side).

    Args:
        blocks: the destination's blocks. ``None`` creates anonymous blocks
            from the incoming setup record (a destination "with no RAM
            configured").
        ignore_shared: the destination's x-ignore-shared capability: its
            shared blocks must then receive no page.
        compress: the destination's ``compress`` capability; without it a
            COMPRESS_PAGE record is refused, as QEMU refuses it.
        strict_lengths: refuse a setup record whose block length differs
            from a non-resizable local block (QEMU's rule).
        factory: makes the block for a setup entry when ``blocks`` is None
            (default: anonymous memory).
        create_missing: with ``blocks`` given, still create the blocks the
            setup record names that are not among them.
        placement: where pages go (:mod:`qmigx.placement`); default: copied
            into the blocks.
        zero_fill: QEMU 10's rule that a ZERO record's fill byte is 0
            (qemu10.md §3.2); QEMU 7.2 fills the page with any byte.
    """

    def __init__(self, blocks: Optional[RAMBlockList] = None, *, ignore_shared: bool = False,
                 compress: bool = True, strict_lengths: bool = True,
                 factory=None, create_missing: bool = False,
                 placement: Optional[PagePlacement] = None, zero_fill: bool = False) -> None:
        self.placement = placement if placement is not None else CopyPlacement()
        self.create = blocks is None or create_missing
        self.factory = factory
        #: populate fresh blocks ahead of use (off in postcopy)
        self.populate = self.placement.fills_ram
        self.blocks = RAMBlockList() if blocks is None else blocks
        self.ignore_shared = ignore_shared
        self.compress = compress
        self.strict_lengths = strict_lengths
        self._table: list[RAMBlock] = []
        self._buffers: list[np.ndarray] = []
        self._xbzrle = None
        self.zero_fill = zero_fill
        self.pages_loaded = 0
        self._mapped: dict[int, tuple] = {}  # mapped-ram: index -> (block, bits, buffer)

    def _match(self, info: RamBlockInfo, offset: int, label: str) -> RAMBlock:
        """The local block for a setup entry: found (and resized if allowed) or created."""
        blk = self.blocks.get(info.idstr)
        if blk is None:
            if not self.create:
                raise RamStreamError(
                    f'Unknown ramblock "{info.idstr}", cannot accept migration',
                    offset=offset, section=label, field="idstr")
            if self.factory is not None:
                return self.blocks.add(self.factory(info))
            return self.blocks.add(_fresh_block(info, self.populate))
        if info.page_size is not None and info.page_size != blk.page_size:
            raise RamStreamError(f"Mismatched RAM page size {info.idstr} (local) "
                                 f"{blk.page_size} != {info.page_size}", offset=offset,
                                 section=label, field="page_size")
        if blk.used_length != info.used_length:
            # QEMU resizes only resizable blocks (ACPI tables, ROM blobs),
            # and never past their maximum; any other mismatch is fatal
            resizable = blk.max_length > blk.used_length or blk.resizable
            if self.strict_lengths and (not resizable or blk.max_length < info.used_length):
                raise RamStreamError(
                    f"Length mismatch: {info.idstr}: 0x{info.used_length:x} in != "
                    f"0x{blk.used_length:x}", offset=offset, section=label,
                    field="used_length")
            blk.resize(info.used_length)
        return blk

    def on_setup(self, ev: RamSetup) -> None:
        """Match (or create) the blocks listed by the setup record."""
        table = [self._match(info, ev.offset, ev.section.label) for info in ev.blocks]
        self._table = table
        self.placement.attach(table)
        self._buffers = self.placement.buffers(table)

    @property
    def table(self) -> list:
        """The blocks of the setup record, in its order (what placements attach)."""
        return self._table

    def use_placement(self, placement: PagePlacement) -> None:
        """Place the following pages with ``placement`` (a COLO secondary's RAM cache).

        The blocks of the setup record already read are attached to it.
        """
        self.placement = placement
        placement.attach(self._table)
        self._buffers = placement.buffers(self._table)

    def on_mapped_block(self, ev: RamMappedBlock) -> None:
        """mapped-ram: match (or create) one block; its bitmap says which pages follow."""
        blk = self._match(ev.info, ev.offset, ev.section.label)
        if self._ignored(blk):
            raise RamStreamError(f"block {blk.idstr} should not be migrated !", offset=ev.offset,
                                 section=ev.section.label, field="block")
        self.placement.attach([blk])
        bufs = self.placement.buffers([blk])
        self._mapped[ev.index] = (blk, ev.page_bits(), None if bufs is None else bufs[0])

    def on_mapped_pages(self, ev: RamMappedPages) -> None:
        """mapped-ram: place the pages of a chunk whose bitmap bit is set."""
        blk, bits, buf = self._mapped[ev.index]
        ps = TARGET_PAGE_SIZE
        n = len(ev.data) // ps
        first = ev.first_page
        sel = bits[first : first + n]
        if not sel.any():
            return
        src = np.frombuffer(ev.data, np.uint8).reshape(n, ps)
        if buf is None:
            for i in np.flatnonzero(sel):
                self.placement.place(blk, (first + int(i)) * ps, src[i])
        else:
            dst = buf[first * ps : (first + n) * ps].reshape(n, ps)
            if sel.all():
                dst[:] = src
            else:  # runs of stored pages: one copy each
                edges = np.flatnonzero(np.diff(np.r_[0, sel.astype(np.int8), 0]))
                for a, b in zip(edges[::2], edges[1::2]):
                    dst[a:b] = src[a:b]
            if self.placement.tracks_batches:
                offs = (np.flatnonzero(sel) + first).astype(np.uint64) * np.uint64(ps)
                self.placement.mark_received(blk, offs)
        self.pages_loaded += int(sel.sum())

    def _ignored(self, blk: RAMBlock) -> bool:
        return self.ignore_shared and blk.shared

    def on_pages(self, ev: RamPages) -> None:
        """Apply a batch of page records, in order."""
        if self.zero_fill:
            self.check_zero_fill(ev)
        self.apply_range(ev, 0, ev.records.count)
        self.pages_loaded += ev.records.count

    @staticmethod
    def check_zero_fill(ev: RamPages) -> None:
        """QEMU 10's rule: a ZERO record's fill byte must be 0 (7.2 fills with any byte)."""
        rec = ev.records
        kinds = np.frombuffer(rec.kind, np.uint8, rec.count)
        fills = np.frombuffer(rec.fill, np.uint8, rec.count)
        bad = np.flatnonzero((kinds == _ramparse.KIND_ZERO) & (fills != 0))
        if len(bad):
            i = int(bad[0])
            raise RamStreamError(f"Found a zero page with value {int(fills[i])}",
                                 offset=ev.base + int(rec.start[i]), section=ev.section.label,
                                 field="fill")

    def apply_range(self, ev: RamPages, first: int, stop: int) -> None:
        """Apply records ``first..stop-1`` of a batch, in order."""
        rec = ev.records
        if self.ignore_shared:
            self._check_ignored(ev)
        if self.placement.takes_batches:  # records as they came, others one by one
            i = first
            while i < stop:
                i = self.placement.place_batch(ev, i, stop)
                if i < stop:  # an XBZRLE delta needs the page it applies to
                    if rec.kind[i] == _ramparse.KIND_XBZRLE:
                        self._apply_one(ev, i)
                    else:
                        self._place_one(ev, i)
                    i += 1
            return
        if self._buffers is None:  # a placement that takes pages one by one
            for i in range(first, stop):
                self._place_one(ev, i)
            return
        i = first
        while i < stop:
            i = _ramparse.apply_records(rec, i, ev.data, self._buffers, TARGET_PAGE_SIZE, stop)
            if i >= stop:
                break
            self._apply_one(ev, i)
            i += 1
        if self.placement.tracks_batches:
            self._mark(rec, first, stop)

    def _mark(self, rec, first: int, stop: int) -> None:
        blocks = np.frombuffer(rec.block, np.int32, rec.count)[first:stop]
        offsets = np.frombuffer(rec.offset, np.uint64, rec.count)[first:stop]
        for b in distinct(blocks):
            self.placement.mark_received(self._table[b], offsets[blocks == b])

    def _place_one(self, ev: RamPages, i: int) -> None:
        """One record through :meth:`PagePlacement.place` (no writable buffers)."""
        rec = ev.records
        blk = self._table[int(rec.block[i])]
        off = int(rec.offset[i])
        kind = rec.kind[i]
        if kind == _ramparse.KIND_ZERO:
            if rec.fill[i] == 0:
                self.placement.place_zero(blk, off)
            else:
                self.placement.place(blk, off, bytes([rec.fill[i]]) * TARGET_PAGE_SIZE)
        elif kind == _ramparse.KIND_PAGE:
            pos = int(rec.pos[i])
            self.placement.place(blk, off, ev.data[pos : pos + TARGET_PAGE_SIZE])
        elif kind == _ramparse.KIND_XBZRLE:
            raise RamStreamError("an XBZRLE page where pages are placed whole (postcopy)",
                                 offset=ev.base + int(rec.start[i]), section=ev.section.label,
                                 field="flags")
        else:
            pos, length = int(rec.pos[i]), int(rec.length[i])
            at = ev.base + int(rec.start[i])
            if not self.compress:
                raise RamStreamError("Received an unexpected compressed page", offset=at,
                                     section=ev.section.label, field="flags")
            self.placement.place(blk, off, decompress_page(ev.data[pos : pos + length], at,
                                                           ev.section.label))

    def block_of(self, ev: RamPages, i: int) -> RAMBlock:
        """The block record ``i`` of a batch belongs to."""
        return self._table[int(ev.records.block[i])]

    def _check_ignored(self, ev: RamPages) -> None:
        rec = ev.records
        used = np.frombuffer(rec.block, np.int32, rec.count)
        for b in distinct(used):
            blk = self._table[b]
            if self._ignored(blk):
                i = int(np.argmax(used == b))
                raise RamStreamError(f"block {blk.idstr} should not be migrated !",
                                     offset=ev.base + int(rec.start[i]),
                                     section=ev.section.label, field="block")

    def _apply_one(self, ev: RamPages, i: int) -> None:
        rec = ev.records
        blk = self._table[int(rec.block[i])]
        off = int(rec.offset[i])
        page = self.placement.view(blk, off)
        if len(page) != TARGET_PAGE_SIZE:
            raise RamStreamError("record lies outside its RAM block buffer",
                                 offset=ev.base + int(rec.start[i]), section=ev.section.label)
        pos, length = int(rec.pos[i]), int(rec.length[i])
        body = ev.data[pos : pos + length]
        at = ev.base + int(rec.start[i])
        if rec.kind[i] == _ramparse.KIND_XBZRLE:
            if self._xbzrle is None:
                from qmigx import xbzrle

                self._xbzrle = xbzrle
            try:
                self._xbzrle.decode_buffer(body, page)
            except StreamError:  # already says where (a subclass of ValueError)
                raise
            except ValueError as exc:
                raise RamStreamError(f"Failed to load XBZRLE page - decode error! ({exc})",
                                     offset=at, section=ev.section.label,
                                     field="xbzrle") from None
        else:
            if not self.compress:
                raise RamStreamError("Received an unexpected compressed page", offset=at,
                                     section=ev.section.label, field="flags")
            page[:] = np.frombuffer(decompress_page(body, at, ev.section.label), np.uint8)
        if not self.placement.live_view:
            self.placement.place(blk, off, page)


def decompress_page(body, at: int = 0, section: Optional[str] = None) -> bytes:
    """Inflate one COMPRESS_PAGE body; it must hold exactly one page."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(body, TARGET_PAGE_SIZE)
        if not d.eof:
            out += d.decompress(d.unconsumed_tail, TARGET_PAGE_SIZE - len(out))
    except zlib.error as exc:
        raise RamStreamError(f"Failed to decompress page: {exc}", offset=at, section=section,
                             field="compress") from None
    if not d.eof or len(out) != TARGET_PAGE_SIZE or d.unconsumed_tail:
        raise RamStreamError("Failed to decompress page: not exactly one page", offset=at,
                             section=section, field="compress")
    return out


class RamWriter:
    """Encodes ``ram`` records, following QEMU's CONTINUE rule.

    The last block written persists across sections (ram.md §2.1), so one
    writer serves a whole stream.
    """

    #: PAGE records assembled per write by :meth:`pages` (4 MiB of pages).
    _CHUNK_PAGES = 1024

    def __init__(self, f: QEMUFile, page_size: int = TARGET_PAGE_SIZE) -> None:
        self.f = f
        self.page_size = page_size
        self.last_block: Optional[str] = None
        self.stats = RamStats()

    def _header(self, block: str, offset: int, flag: int) -> None:
        f = self.f
        if block == self.last_block:
            f.write(_BE64.pack(offset | flag | RamFlag.CONTINUE))
            self.stats.transferred += 8
        else:
            raw = block.encode()
            f.write(_BE64.pack(offset | flag) + bytes((len(raw),)) + raw)
            self.stats.transferred += 9 + len(raw)
            self.last_block = block

    def setup(self, blocks: Sequence[RamBlockInfo], *, ignore_shared: bool = False) -> None:
        """The MEM_SIZE record listing ``blocks`` (not followed by EOS)."""
        total = sum(b.used_length for b in blocks)
        out = bytearray(_BE64.pack(total | RamFlag.MEM_SIZE))
        for b in blocks:
            raw = b.idstr.encode()
            out += bytes((len(raw),)) + raw + _BE64.pack(b.used_length)
            if b.page_size is not None:
                out += _BE64.pack(b.page_size)
            if ignore_shared:
                out += _BE64.pack(b.gpa or 0)
        self.f.write(out)
        self.stats.transferred += len(out)

    def zero(self, block: str, offset: int, fill: int = 0) -> None:
        self._header(block, offset, RamFlag.ZERO)
        self.f.put_u8(fill)
        self.stats.transferred += 1
        self.stats.duplicate += 1

    def page(self, block: str, offset: int, data) -> None:
        self._header(block, offset, RamFlag.PAGE)
        self.f.write(data)
        self.stats.transferred += self.page_size
        self.stats.normal += 1

    def xbzrle(self, block: str, offset: int, delta) -> None:
        n = len(delta)
        if not 0 < n <= self.page_size:
            raise ValueError(f"XBZRLE delta of {n} bytes")
        named = block != self.last_block
        self._header(block, offset, RamFlag.XBZRLE)
        self.f.write(bytes((ENCODING_FLAG_XBZRLE,)) + struct.pack(">H", n))
        self.f.write(delta)
        self.stats.transferred += 3 + n
        self.stats.xbzrle_pages += 1
        self.stats.xbzrle_bytes += n + 3 + (1 + len(block.encode()) if named else 0)

    def compressed(self, block: str, offset: int, zdata: bytes) -> None:
        self._header(block, offset, RamFlag.COMPRESS_PAGE)
        self.f.put_be32(len(zdata))
        self.f.write(zdata)
        self.stats.transferred += 4 + len(zdata)
        self.stats.compressed_pages += 1
        self.stats.compressed_bytes += len(zdata)

    def pages(self, block: str, memory: np.ndarray, offsets: np.ndarray) -> None:
        """Many PAGE records of one block in one write (the bulk path)."""
        n = len(offsets)
        if n == 0:
            return
        ps = self.page_size
        first = 0
        if block != self.last_block:
            self.page(block, int(offsets[0]), memory[int(offsets[0]) : int(offsets[0]) + ps])
            first = 1
        pages = memory[: len(memory) // ps * ps].reshape(-1, ps)
        rec = np.empty((min(n - first, self._CHUNK_PAGES), 8 + ps), np.uint8)
        for lo in range(first, n, self._CHUNK_PAGES):
            offs = np.asarray(offsets[lo : lo + self._CHUNK_PAGES], dtype=np.uint64)
            r = rec[: len(offs)]
            r[:, :8] = (offs | np.uint64(RamFlag.PAGE | RamFlag.CONTINUE)).astype(">u8").view(
                np.uint8).reshape(-1, 8)
            idx = (offs // np.uint64(ps)).astype(np.intp)
            if idx[-1] - idx[0] == len(idx) - 1:  # a run of pages: no gather needed
                r[:, 8:] = pages[idx[0] : idx[-1] + 1]
            else:
                r[:, 8:] = pages[idx]
            self.f.write(r.reshape(-1))
            self.stats.transferred += r.size
            self.stats.normal += len(offs)

    def page_rows(self, block: str, offsets: np.ndarray, rows: np.ndarray) -> None:
        """PAGE records for pages already copied out (``rows[i]`` at ``offsets[i]``)."""
        n = len(offsets)
        if n == 0:
            return
        ps = self.page_size
        first = 0
        if block != self.last_block:
            self.page(block, int(offsets[0]), rows[0])
            first = 1
        if n > first:
            offs = np.asarray(offsets[first:], dtype=np.uint64)
            hdrs = (offs | np.uint64(RamFlag.PAGE | RamFlag.CONTINUE)).astype(">u8").view(
                np.uint8).reshape(-1, 8)
            if self.f._sink_v is not None:  # (header, page) pairs, gathered by the kernel
                iov: list = []
                for k in range(len(offs)):
                    iov.append(hdrs[k])
                    iov.append(rows[first + k])
                self.f.writev(iov)
            else:
                rec = np.empty((len(offs), 8 + ps), np.uint8)
                rec[:, :8] = hdrs
                rec[:, 8:] = rows[first:n]
                self.f.write(rec.reshape(-1))
            self.stats.transferred += len(offs) * (8 + ps)
            self.stats.normal += len(offs)

    def zeros(self, block: str, offsets: np.ndarray) -> None:
        """Many ZERO records of one block in one write."""
        n = len(offsets)
        if n == 0:
            return
        first = 0
        if block != self.last_block:
            self.zero(block, int(offsets[0]))
            first = 1
        if n > first:
            offs = np.asarray(offsets[first:], dtype=np.uint64)
            rec = np.zeros((len(offs), 9), np.uint8)
            rec[:, :8] = (offs | np.uint64(RamFlag.ZERO | RamFlag.CONTINUE)).astype(">u8").view(
                np.uint8).reshape(-1, 8)
            self.f.write(rec.reshape(-1))
            self.stats.transferred += rec.size
            self.stats.duplicate += len(offs)

    def eos(self) -> None:
        self.f.put_be64(RamFlag.EOS)
        self.stats.transferred += 8

    def multifd_flush(self) -> None:
        """MULTIFD_FLUSH (QEMU 10): the destination syncs every multifd channel here."""
        self.f.put_be64(RamFlag.MULTIFD_FLUSH)
        self.stats.transferred += 8
