"""Plain-Python twin of ``qmigx._core.ramparse``: the RAM record scanner.

The scanner walks the records of a ``ram`` section payload (ram.md §2, §4)
and fills a :class:`RamRecords` batch with one row per page record: kind,
block index, offset in the block, and where its body lies in the input.
It interprets nothing else: applying records to memory, decompressing and
XBZRLE decoding happen elsewhere, so the same scan serves loading,
extraction, analysis and conversion.

Scanning stops, and ``scan`` returns, when:

* ``FULL``: the batch has no free row;
* ``NEED_DATA``: the next record is not complete in ``buf[:end]``;
* ``EOS``: an EOS record was consumed (the section payload ended);
* ``MEM_SIZE``: a setup record starts at the returned position (the
  caller parses it, since it is rare and variable);
* ``MULTIFD_FLUSH``: a MULTIFD_FLUSH record (QEMU 10, the bare word
  0x200) was consumed; the caller syncs its multifd channels.

Malformed records raise :class:`~qmigx.errors.RamStreamError` naming the
absolute offset of the record.
"""

from __future__ import annotations

import struct

from array import array

import numpy as np

from qmigx.errors import RamStreamError, printable_name

__all__ = [
    "RamRecords",
    "RamScanner",
    "KIND_ZERO",
    "KIND_PAGE",
    "KIND_XBZRLE",
    "KIND_COMPRESS",
    "FULL",
    "NEED_DATA",
    "EOS",
    "MEM_SIZE",
    "MULTIFD_FLUSH",
    "compress_bound",
    "note_runs",
]

KIND_ZERO = 0
KIND_PAGE = 1
KIND_XBZRLE = 2
KIND_COMPRESS = 3

FULL = 0
NEED_DATA = 1
EOS = 2
MEM_SIZE = 3
MULTIFD_FLUSH = 4

_F_ZERO = 0x002
_F_MEM_SIZE = 0x004
_F_PAGE = 0x008
_F_EOS = 0x010
_F_CONTINUE = 0x020
_F_XBZRLE = 0x040
_F_HOOK = 0x080
_F_COMPRESS = 0x100
_F_MULTIFD_FLUSH = 0x200

_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")


def compress_bound(n: int) -> int:
    """zlib's compressBound: the largest valid COMPRESS_PAGE body length."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


class RamRecords:
    """A batch of scanned page records, as parallel typed arrays (``array.array``).

    Row ``i`` describes one record: ``kind``, ``block`` (index into the
    scanner's block table), ``offset`` (byte offset of the page inside the
    block), ``pos``/``length`` (its body in the scanned buffer: the page
    for PAGE, the delta for XBZRLE, the zlib stream for COMPRESS), ``fill``
    (the byte of a ZERO record) and ``start`` (where the record began).
    ``pos`` and ``start`` are positions in the buffer passed to ``scan``.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.count = 0
        self.kind = array("B", bytes(capacity))
        self.block = array("i", bytes(4 * capacity))
        self.offset = array("Q", bytes(8 * capacity))
        self.pos = array("q", bytes(8 * capacity))
        self.length = array("i", bytes(4 * capacity))
        self.fill = array("B", bytes(capacity))
        self.start = array("q", bytes(8 * capacity))

    def copy(self):
        """A batch holding copies of this one's filled rows only."""
        new = RamRecords.__new__(RamRecords)
        n = self.count
        new.capacity = new.count = n
        for name in ("kind", "block", "offset", "pos", "length", "fill", "start"):
            setattr(new, name, getattr(self, name)[:n])
        return new

    def clear(self) -> None:
        self.count = 0


class RamScanner:
    """Scans RAM records; remembers the last block across calls (CONTINUE).

    Args:
        page_size: the target page size (4096 on x86).
        names: block idstrs (bytes) in block-table order.
        lengths: each block's used length in bytes.
    """

    def __init__(self, page_size: int, names: list[bytes], lengths: list[int]) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self.last_block = -1
        self.set_blocks(names, lengths)

    def set_blocks(self, names: list[bytes], lengths: list[int]) -> None:
        """Replace the block table (after a setup record)."""
        self.names = [bytes(n) for n in names]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.lengths = array("q", [int(n) for n in lengths])

    def reset_last_block(self) -> None:
        self.last_block = -1

    def scan(self, buf, pos: int, end: int, out: RamRecords, base: int = 0) -> tuple[int, int]:
        """Scan ``buf[pos:end]`` into ``out``; return ``(new_pos, status)``.

        ``base`` is the absolute stream offset of ``buf[0]``, used in errors.
        """
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
        ps = self.page_size
        mask = ps - 1
        while True:
            if out.count >= out.capacity:
                return pos, FULL
            start = pos
            if end - pos < 8:
                return start, NEED_DATA
            hdr = _BE64.unpack_from(mv, pos)[0]
            flags = hdr & mask
            addr = hdr & ~mask & 0xFFFFFFFFFFFFFFFF
            p = pos + 8
            kind_flags = flags & ~_F_CONTINUE
            if kind_flags == _F_EOS:
                return p, EOS
            if kind_flags & _F_MEM_SIZE and kind_flags == _F_MEM_SIZE:
                return start, MEM_SIZE
            if kind_flags == _F_MULTIFD_FLUSH:
                if hdr != _F_MULTIFD_FLUSH:
                    raise RamStreamError(
                        f"MULTIFD_FLUSH record 0x{hdr:016x}: it is the bare word 0x200 "
                        f"(no offset, no CONTINUE)", offset=base + start, field="flags")
                return p, MULTIFD_FLUSH
            if kind_flags not in (_F_ZERO, _F_PAGE, _F_XBZRLE, _F_COMPRESS):
                if kind_flags & _F_HOOK:
                    raise RamStreamError(
                        "RAM_SAVE_FLAG_HOOK record: RDMA hooks are not supported",
                        offset=base + start, field="flags")
                raise RamStreamError(
                    f"Unknown combination of migration flags: 0x{flags:x}",
                    offset=base + start, field="flags")
            if flags & _F_CONTINUE:
                if self.last_block < 0:
                    raise RamStreamError(
                        "CONTINUE flag with no previous block (Ack, bad migration stream!)",
                        offset=base + start, field="flags")
                block = self.last_block
            else:
                if end - p < 1:
                    return start, NEED_DATA
                n = mv[p]
                if end - p < 1 + n:
                    return start, NEED_DATA
                name = bytes(mv[p + 1 : p + 1 + n])
                p += 1 + n
                block = self.index.get(name, -1)
                if block < 0:
                    raise RamStreamError(
                        f"Can't find block '{printable_name(name.decode('utf-8', 'surrogateescape'))}'",
                        offset=base + start, field="block")
            if addr >= self.lengths[block]:
                raise RamStreamError(
                    f"Illegal RAM offset 0x{addr:x} in block "
                    f"{self.names[block].decode('utf-8', 'replace')!r} "
                    f"(used length 0x{int(self.lengths[block]):x})",
                    offset=base + start, field="offset")
            fill = 0
            if kind_flags == _F_ZERO:
                if end - p < 1:
                    return start, NEED_DATA
                fill = mv[p]
                body, blen = p + 1, 0
                p += 1
                kind = KIND_ZERO
            elif kind_flags == _F_PAGE:
                if end - p < ps:
                    return start, NEED_DATA
                body, blen = p, ps
                p += ps
                kind = KIND_PAGE
            elif kind_flags == _F_XBZRLE:
                if end - p < 3:
                    return start, NEED_DATA
                if mv[p] != 0x01:
                    raise RamStreamError(
                        f"Failed to load XBZRLE page - wrong compression (flag 0x{mv[p]:x})",
                        offset=base + p, field="xbzrle.encoding")
                blen = _BE16.unpack_from(mv, p + 1)[0]
                if blen > ps:
                    raise RamStreamError(
                        f"Failed to load XBZRLE page - len overflow ({blen} > {ps})",
                        offset=base + p + 1, field="xbzrle.len")
                if end - p < 3 + blen:
                    return start, NEED_DATA
                body = p + 3
                p += 3 + blen
                kind = KIND_XBZRLE
            else:
                if end - p < 4:
                    return start, NEED_DATA
                blen = _BE32.unpack_from(mv, p)[0]
                if blen > compress_bound(ps):
                    raise RamStreamError(
                        f"Invalid compressed data length: {blen}",
                        offset=base + p, field="compress.len")
                if end - p < 4 + blen:
                    return start, NEED_DATA
                body = p + 4
                p += 4 + blen
                kind = KIND_COMPRESS
            i = out.count
            out.kind[i] = kind
            out.block[i] = block
            out.offset[i] = addr
            out.pos[i] = body
            out.length[i] = blen
            out.fill[i] = fill
            out.start[i] = start
            out.count = i + 1
            self.last_block = block
            pos = p


def apply_records(records: RamRecords, first: int, data, blocks: list, page_size: int = 4096,
                  stop: int = -1) -> int:
    """Apply ZERO and PAGE records ``first..`` to ``blocks``; stop at others.

    Returns the index of the first XBZRLE/COMPRESS record not applied, or
    ``records.count`` (``stop``, if given, ends the run before that record). A record outside its block buffer raises
    :class:`~qmigx.errors.RamStreamError`.
    """
    src = np.frombuffer(data, np.uint8)
    views = [np.frombuffer(b, np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
             for b in blocks]
    count = records.count if not 0 <= stop < records.count else stop
    i = first
    while i < count:
        k = int(records.kind[i])
        if k > KIND_PAGE:
            break
        b = int(records.block[i])
        off = int(records.offset[i])
        if b < 0 or b >= len(views) or off + page_size > len(views[b]):
            raise RamStreamError(f"record {i} lies outside its RAM block buffer", field="offset")
        page = views[b][off : off + page_size]
        if k == KIND_PAGE:
            p = int(records.pos[i])
            page[:] = src[p : p + page_size]
        elif records.fill[i] != 0 or page.any():
            page[:] = records.fill[i]
        i += 1
    return i


def encode_pages(mem, pages, out, page_size: int = 4096) -> tuple[int, int, int]:
    """Encode pages of one block as CONTINUE records, zero pages as ZERO.

    See the compiled twin; returns ``(nbytes, zero_pages, normal_pages)``.
    """
    if page_size <= 0 or page_size % 8:
        raise ValueError(f"bad page size {page_size}")
    m = memoryview(mem).cast("B")
    o = memoryview(out).cast("B")
    pg = [int(p) for p in pages]
    npages_mem = len(m) // page_size
    if len(o) < len(pg) * (8 + page_size):
        raise ValueError(f"out has {len(o)} bytes; {len(pg)} pages need "
                         f"{len(pg) * (8 + page_size)}")
    for p in pg:
        if p < 0 or p >= npages_mem:
            raise ValueError(f"page {p} outside the block ({npages_mem} pages)")
    w = zeros = 0
    for p in pg:
        page = m[p * page_size : (p + 1) * page_size]
        if not any(page):
            o[w : w + 9] = _BE64.pack(p * page_size | _F_ZERO | _F_CONTINUE) + b"\0"
            w += 9
            zeros += 1
        else:
            o[w : w + 8] = _BE64.pack(p * page_size | _F_PAGE | _F_CONTINUE)
            o[w + 8 : w + 8 + page_size] = page
            w += 8 + page_size
    return w, zeros, len(pg) - zeros


def note_runs(runs: list, tables: list, received: list, page_size: int = 4096) -> None:
    """See the compiled kernel: enter where each record of ``runs`` left its page."""
    if page_size <= 0:
        raise ValueError(f"page size {page_size} is not positive")
    if len(received) != len(tables):
        raise ValueError("tables and received differ in length")
    for records, first, stop, shift in runs:
        if first < 0 or stop > records.count or stop > len(records.kind):
            raise ValueError(f"run {first}..{stop} lies outside its batch")
        for i in range(first, stop):
            b = records.block[i]
            p = records.offset[i] // page_size
            if not (0 <= b < len(tables)) or p >= min(len(tables[b]), len(received[b])) \
                    or records.kind[i] > KIND_PAGE:
                raise RamStreamError(f"record {i} of a run is not a PAGE or ZERO record "
                                     f"inside its block's table", field="offset")
            tables[b][p] = (records.pos[i] + shift if records.kind[i] == KIND_PAGE
                            else -1 - records.fill[i])
            received[b][p] = True
