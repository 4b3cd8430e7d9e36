"""Dirty-bitmap migration: the ``dirty-bitmap`` live section
(QEMU's migration/block-dirty-bitmap.c).

The record grammar (other.md §3) is :class:`DirtyBitmapHandler`'s
``read_record``: a flags byte, the node and bitmap aliases when they
change, then a START, BITS or COMPLETE body; EOS ends a payload. Names
carry over from record to record, so the grammar keeps the last ones it
read in the record it returns, never in the handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from qmigx.errors import StreamError
from qmigx.qemufile import Cursor
from qmigx.savevm import SaveVMHandler, Section
from qmigx.wire import DIRTY_BITMAP_MAX_BUFSIZE, DirtyBitmapFlag as F

__all__ = ["DirtyBitmapRecord", "DirtyBitmapHandler"]


@dataclass(frozen=True)
class DirtyBitmapRecord:
    """One ``dirty-bitmap`` record, as read (names only when present)."""

    flags: int
    node: Optional[str] = None
    bitmap: Optional[str] = None
    granularity: Optional[int] = None  #: START
    bitmap_flags: Optional[int] = None  #: START
    first_sector: Optional[int] = None  #: BITS
    nr_sectors: Optional[int] = None  #: BITS
    bits: Optional[bytes] = None  #: BITS without ZEROES

    @property
    def is_eos(self) -> bool:
        return bool(self.flags & F.EOS)


class DirtyBitmapHandler(SaveVMHandler):
    """The ``dirty-bitmap`` section (parse-only here; the engine extends it)."""

    idstr = "dirty-bitmap"
    version_id = 1
    section_id = 3

    def read_record(self, cur: Cursor, section: Section) -> tuple[Any, bool]:
        at = cur.tell()
        flags = cur.read_u8()
        if flags & F.EXTRA_FLAGS:
            raise StreamError("dirty-bitmap extra flags are not supported",
                              offset=at, section=section.label, field="flags")
        if not flags:
            raise StreamError("dirty-bitmap record with no flags", offset=at,
                              section=section.label, field="flags")
        node = cur.read_str8(what="node alias") if flags & F.DEVICE_NAME else None
        bitmap = cur.read_str8(what="bitmap alias") if flags & F.BITMAP_NAME else None
        kw: dict = {}
        if flags & F.START:
            kw["granularity"] = cur.read_be32()
            kw["bitmap_flags"] = cur.read_u8()
        elif flags & F.BITS:
            kw["first_sector"] = cur.read_be64()
            kw["nr_sectors"] = cur.read_be32()
            if not flags & F.ZEROES:
                size_at = cur.tell()
                bufsize = cur.read_be64()
                if bufsize > DIRTY_BITMAP_MAX_BUFSIZE:
                    raise StreamError(f"dirty-bitmap chunk too large: {bufsize}",
                                      offset=size_at, section=section.label, field="bufsize")
                kw["bits"] = bytes(cur.read_bytes(bufsize))
        rec = DirtyBitmapRecord(flags, node, bitmap, **kw)
        return rec, bool(flags & F.EOS)

    def describe(self, record: DirtyBitmapRecord) -> Any:
        out: dict = {"flags": f"0x{record.flags:02x}"}
        for k in ("node", "bitmap", "granularity", "bitmap_flags", "first_sector",
                  "nr_sectors"):
            v = getattr(record, k)
            if v is not None:
                out[k] = v
        if record.bits is not None:
            out["bufsize"] = len(record.bits)
        return out
