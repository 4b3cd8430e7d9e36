"""Block migration: the ``block`` live section (QEMU's migration/block.c).

The record grammar (other.md §2) is here as :class:`BlockHandler`'s
``read_record``: a be64 header ``(sector << 9) | flags``, then for
DEVICE_BLOCK a str8 device name and, unless ZERO_BLOCK, one whole 1 MiB
chunk of data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from qmigx.errors import StreamError
from qmigx.qemufile import Cursor
from qmigx.savevm import SaveVMHandler, Section
from qmigx.wire import BDRV_SECTOR_BITS, BLK_MIG_BLOCK_SIZE, BlockFlag

__all__ = ["BlockRecord", "BlockHandler"]

_KNOWN = BlockFlag.DEVICE_BLOCK | BlockFlag.EOS | BlockFlag.PROGRESS | BlockFlag.ZERO_BLOCK


@dataclass(frozen=True)
class BlockRecord:
    """One ``block`` record: a chunk (data or zero), a progress mark, or EOS."""

    flags: int
    sector: int  #: first sector of the chunk; the percentage for PROGRESS
    device: Optional[str] = None
    data: Optional[memoryview] = None  #: the 1 MiB chunk (DEVICE_BLOCK without ZERO_BLOCK)

    @property
    def is_eos(self) -> bool:
        return bool(self.flags & BlockFlag.EOS)


class BlockHandler(SaveVMHandler):
    """The ``block`` section (parse-only here; the engine extends it)."""

    idstr = "block"
    version_id = 1
    section_id = 1

    def read_record(self, cur: Cursor, section: Section) -> tuple[Any, bool]:
        at = cur.tell()
        hdr = cur.read_be64()
        flags = hdr & ((1 << BDRV_SECTOR_BITS) - 1)
        sector = hdr >> BDRV_SECTOR_BITS
        if flags & ~_KNOWN or not flags:
            raise StreamError(f"Unknown block migration flags: 0x{flags:x}",
                              offset=at, section=section.label, field="flags")
        if flags & BlockFlag.DEVICE_BLOCK:
            name = cur.read_str8(what="block device name", allow_empty=True)
            data = None if flags & BlockFlag.ZERO_BLOCK else cur.read_bytes(BLK_MIG_BLOCK_SIZE)
            return BlockRecord(flags, sector, name, data), False
        if flags & BlockFlag.EOS:
            return BlockRecord(flags, sector), True
        return BlockRecord(flags, sector), False

    def describe(self, record: BlockRecord) -> Any:
        if record.flags & BlockFlag.DEVICE_BLOCK:
            return {"device": record.device, "sector": record.sector,
                    "zero": record.data is None}
        if record.flags & BlockFlag.PROGRESS:
            return {"progress": record.sector}
        return {"eos": True}
