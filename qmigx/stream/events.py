"""The events a stream parser produces, one record class per record kind (stream.md)."""

from __future__ import annotations

import struct
from typing import Any, Optional, Union

from qmigx.qemufile import Cursor
from qmigx.records import Record
from qmigx.savevm import Section
from qmigx.wire import MigCmd, SectionType

__all__ = [
    "Section", "StreamHeader", "Configuration", "ConfigSubsection", "SectionStart",
    "SectionData", "RamBlockInfo", "RamSetup", "RamPages", "RamEOS", "SectionEnd", "Command",
    "EndOfState", "VMDescription", "SectionRecord", "EndOfStream", "Event",
    "MappedRamHeader", "RamMultifdFlush", "RamMappedBlock", "RamMappedPages",
]


class StreamHeader(Record):
    version: int
    offset: int = 0


class ConfigSubsection(Record):
    name: str
    version: int
    data: bytes


class Configuration(Record):
    """The configuration section (stream.md §3)."""

    machine_type: str
    subsections: tuple[ConfigSubsection, ...]
    offset: int
    raw: bytes

    @property
    def capabilities(self) -> list[str]:
        """Validated capabilities announced by the source (``x-ignore-shared``)."""
        for sub in self.subsections:
            if sub.name == "configuration/capabilities":
                cur = Cursor(sub.data)
                return [cur.read_str8() for _ in range(cur.read_be32())]
        return []

    @property
    def uuid(self) -> Optional[bytes]:
        for sub in self.subsections:
            if sub.name == "configuration/uuid":
                return sub.data
        return None

    @property
    def target_page_bits(self) -> Optional[int]:
        for sub in self.subsections:
            if sub.name == "configuration/target-page-bits":
                return struct.unpack(">I", sub.data)[0]
        return None


class SectionStart(Record):
    """A START/PART/END/FULL header. PART/END carry the START's identity."""

    type: SectionType
    section: Section
    offset: int


class SectionData(Record):
    """A non-RAM section payload, exactly as on the wire.

    ``value`` is the decoded state when the parser had a description for
    the section: a device loader's result, or the tree
    :func:`qmigx.vmstate.walk_with_vmdesc` makes from the stream's vmdesc.
    """

    type: SectionType
    section: Section
    payload: bytes
    offset: int
    value: Any = None


class MappedRamHeader(Record):
    """The header after each setup entry of a ``mapped-ram`` stream (qemu10.md §5.2).

    ``bitmap_offset`` and ``pages_offset`` are absolute file offsets: the
    block's page bitmap (host-endian ``unsigned long`` words, LSB first)
    and its page ``i`` at ``pages_offset + i * page_size``.
    """

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int


class RamBlockInfo(Record):
    """One entry of the RAM setup record (ram.md §3); ``mapped`` with mapped-ram."""

    idstr: str
    used_length: int
    page_size: Optional[int] = None
    gpa: Optional[int] = None
    mapped: Optional[MappedRamHeader] = None


class RamSetup(Record):
    """The RAM setup record (MEM_SIZE): the block list."""

    section: Section
    total: int
    blocks: tuple[RamBlockInfo, ...]
    offset: int
    raw: bytes


class RamPages(Record):
    """A batch of page records; see ``qmigx.reference.ramparse.RamRecords``.

    ``records.pos``/``records.start`` index into ``data``; ``base`` is the
    absolute stream offset of ``data[0]``. ``data`` is a view of the input:
    after :meth:`StreamParser.fill` it is the parser's own buffer, which the
    next ``fill`` reuses, so consume the event before reading more.
    """

    section: Section
    records: Any
    data: memoryview
    base: int
    blocks: tuple[str, ...]


class RamEOS(Record):
    section: Section
    offset: int


class RamMultifdFlush(Record):
    """A MULTIFD_FLUSH record (QEMU 10): every multifd channel syncs here.

    A source that syncs multifd per round writes one in its setup section;
    one that syncs per section never writes any (qemu10.md §4.4).
    """

    section: Section
    offset: int


class RamMappedBlock(Record):
    """mapped-ram: a setup entry, its header and its page bitmap (qemu10.md §5.2).

    Comes before the block's :class:`RamMappedPages`; ``index`` is the
    entry's position in the setup record. The :class:`RamSetup` of the
    whole list follows the last block.
    """

    section: Section
    index: int
    info: RamBlockInfo
    bitmap: bytes
    offset: int

    def page_bits(self):
        """Bit ``i`` (page ``i`` stored) as a numpy bool array of the block's pages."""
        import numpy as np

        n = self.info.used_length // self.info.mapped.page_size
        bits = np.unpackbits(np.frombuffer(self.bitmap, np.uint8), bitorder="little")
        return bits[:n].astype(bool)


class RamMappedPages(Record):
    """mapped-ram: whole pages of one block's page area as they pass in the input.

    ``data`` holds pages ``first_page, first_page + 1, ...`` of block
    ``index``; only those whose bitmap bit is set are meaningful. Like
    :class:`RamPages`, ``data`` is a view of the input: use it at once.
    """

    section: Section
    index: int
    first_page: int
    data: memoryview
    offset: int


class SectionEnd(Record):
    """The end of a section's payload, with its footer when it had one."""

    type: SectionType
    section: Section
    footer: bool
    offset: int


class Command(Record):
    """A ``QEMU_VM_COMMAND``; ``packaged`` holds a PACKAGED command's blob."""

    cmd: MigCmd
    payload: bytes
    offset: int
    packaged: Optional[bytes] = None


class EndOfState(Record):
    """The ``QEMU_VM_EOF`` byte: the device-state part of the stream ended."""

    offset: int


class VMDescription(Record):
    """The vmdesc trailer's JSON text."""

    json: bytes
    offset: int


class SectionRecord(Record):
    """One record of a live section other than ``ram`` (``block``, ``dirty-bitmap``).

    ``record`` is what the section's handler read (its ``read_record``);
    ``raw`` is the record's bytes as they stood in the stream.
    """

    section: Section
    record: Any
    offset: int
    raw: bytes


class EndOfStream(Record):
    """The input ended cleanly (only after ``feed_eof``)."""

    offset: int


Event = Union[
    StreamHeader, Configuration, SectionStart, SectionData, RamSetup, RamPages,
    RamEOS, SectionEnd, Command, EndOfState, VMDescription, EndOfStream, SectionRecord,
    RamMultifdFlush, RamMappedBlock, RamMappedPages,
]
