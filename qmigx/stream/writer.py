"""Writing stream records (QEMU's savevm.c, output side)."""

from __future__ import annotations

from typing import Optional

from qmigx.qemufile import QEMUFile
from qmigx.savevm import Section
from qmigx.stream.events import ConfigSubsection
from qmigx.wire import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, MigCmd, SectionType

__all__ = ["StreamWriter"]


class StreamWriter:
    """Writes stream records through a :class:`~qmigx.qemufile.QEMUFile`.

    Args:
        f: the output.
        footers: write section footers (QEMU's ``send-section-footer``,
            on for every machine type newer than 2.3).
    """

    def __init__(self, f: QEMUFile, *, footers: bool = True) -> None:
        self.f = f
        self.footers = footers

    def header(self) -> None:
        self.f.put_be32(QEMU_VM_FILE_MAGIC)
        self.f.put_be32(QEMU_VM_FILE_VERSION)

    def configuration(self, machine_type: str,
                      subsections: tuple[ConfigSubsection, ...] | list = ()) -> None:
        raw = machine_type.encode()
        self.f.put_u8(SectionType.CONFIGURATION)
        self.f.put_be32(len(raw))
        self.f.write(raw)
        for sub in subsections:
            self.f.put_u8(SectionType.SUBSECTION)
            self.f.put_str8(sub.name)
            self.f.put_be32(sub.version)
            self.f.write(sub.data)

    def raw_configuration(self, raw: bytes) -> None:
        """Write a configuration section exactly as read (``Configuration.raw``)."""
        self.f.put_u8(SectionType.CONFIGURATION)
        self.f.write(raw)

    def section_header(self, stype: SectionType, sec: Section) -> None:
        self.f.put_u8(stype)
        self.f.put_be32(sec.section_id)
        if stype in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            self.f.put_str8(sec.idstr)
            self.f.put_be32(sec.instance_id)
            self.f.put_be32(sec.version_id)

    def footer(self, sec: Section) -> None:
        if self.footers:
            self.f.put_u8(SectionType.SECTION_FOOTER)
            self.f.put_be32(sec.section_id)

    def section(self, stype: SectionType, sec: Section, payload: bytes) -> None:
        """A whole section: header, payload, footer."""
        self.section_header(stype, sec)
        self.f.write(payload)
        self.footer(sec)

    def command(self, cmd: MigCmd, payload: bytes = b"", packaged: Optional[bytes] = None) -> None:
        self.f.put_u8(SectionType.COMMAND)
        self.f.put_be16(cmd)
        self.f.put_be16(len(payload))
        self.f.write(payload)
        if packaged is not None:
            self.f.write(packaged)
        self.f.flush()

    def eof(self) -> None:
        self.f.put_u8(SectionType.EOF)

    def vmdesc(self, text: bytes) -> None:
        self.f.put_u8(SectionType.VMDESCRIPTION)
        self.f.put_be32(len(text))
        self.f.write(text)
