"""Writing a stream from blocks and device state (``incoming --save``, ``convert``, ``diff``).

Apart from :mod:`qmigx.tools.streams`, which re-exports it, so that the
delta tools can write streams without importing the loaders that use them.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from qmigx.qemufile import QEMUFile
from qmigx.ram import RAMBlockList, RamWriter, compress_page
from qmigx.stream import (
    Configuration,
    Section,
    SectionData,
    StreamWriter,
)
from qmigx.wire import TARGET_PAGE_SIZE, SectionType

__all__ = ["save_stream", "begin_stream", "write_devices"]



def save_stream(sink: Callable, blocks: RAMBlockList, devices: list = (), *,
                machine_type: str = "pc-i440fx-7.2", encoding: str = "zero",
                ignore_shared: bool = False, compress_level: int = 1,
                first_section_id: int = 2, vmdesc=True,
                configuration: Optional[Configuration] = None,
                mapped_ram: bool = False, start: int = 0) -> RamWriter:
    """Write a complete precopy stream of ``blocks`` and ``devices``.

    The shape is QEMU's for a paused guest: header, configuration, ``ram``
    START (setup), one PART with every page, END, a FULL section per
    device, EOF and the vmdesc. ``encoding`` is ``page``, ``zero`` or
    ``compress`` (see :func:`convert_stream`). Returns the RAM writer, whose
    ``stats`` count what was sent.

    ``devices`` holds :class:`DeviceState` values, or received
    :class:`~qmigx.stream.SectionData` written back verbatim with their
    section ids. ``vmdesc`` is True (built from the DeviceState entries),
    False (none) or the bytes of a whole vmdesc document to write as is.
    ``configuration`` replays a received configuration section.

    ``mapped_ram`` writes a QEMU 10 ``mapped-ram`` file instead (the
    capability in the configuration, pages at fixed offsets after each
    setup entry, no page records; load it with ``file:PATH``); ``start``
    is the file offset the stream will begin at (``file:PATH,offset=N``).
    """
    from qmigx import zeropage
    from qmigx.stream import RamBlockInfo

    if encoding not in ("page", "zero", "compress"):
        raise ValueError(f"save encoding must be page, zero or compress, not {encoding!r}")
    f = QEMUFile(sink)
    w, ram = begin_stream(f, configuration=configuration, machine_type=machine_type,
                          caps=[n for n, on in ((b"x-ignore-shared", ignore_shared),
                                                (b"mapped-ram", mapped_ram)) if on])
    sec = Section(first_section_id, "ram", 0, 4)
    infos = [RamBlockInfo(b.idstr, b.used_length, None, b.gpa if ignore_shared else None)
             for b in blocks]
    w.section_header(SectionType.SECTION_START, sec)
    if mapped_ram:
        from qmigx.mapped_ram import write_mapped_blocks

        write_mapped_blocks(f, list(blocks), start=start, gpa=ignore_shared)
        ram.eos()
        w.footer(sec)
        w.section_header(SectionType.SECTION_END, sec)
        ram.eos()
        w.footer(sec)
        write_devices(w, devices, first_section_id, vmdesc)
        f.flush()
        f.check()
        return ram
    ram.setup(infos, ignore_shared=ignore_shared)
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_PART, sec)
    ps = TARGET_PAGE_SIZE
    for blk in blocks:
        if ignore_shared and blk.shared:
            continue
        mem = blk.memory
        zmap = zeropage.zero_page_map(mem, ps)
        offsets = np.arange(len(zmap), dtype=np.uint64) * np.uint64(ps)
        if encoding == "page":
            ram.pages(blk.idstr, mem, offsets)
            continue
        # keep page order: alternate runs of zero and non-zero pages
        edges = np.flatnonzero(np.diff(zmap.astype(np.int8))) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(zmap)]):
            if zmap[lo]:
                ram.zeros(blk.idstr, offsets[lo:hi])
            elif encoding == "compress":
                for off in offsets[lo:hi]:
                    o = int(off)
                    ram.compressed(blk.idstr, o, compress_page(mem[o : o + ps], compress_level))
            else:
                ram.pages(blk.idstr, mem, offsets[lo:hi])
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_END, sec)
    ram.eos()
    w.footer(sec)
    write_devices(w, devices, first_section_id, vmdesc)
    f.flush()
    f.check()
    return ram


def begin_stream(f: QEMUFile, *, configuration: Optional[Configuration] = None,
                 machine_type: str = "pc-i440fx-7.2", caps=()) -> tuple:
    """Header and configuration (a received one replayed, else one naming ``caps``).

    Returns the stream and RAM writers over ``f``; shared with the writer
    of ``incoming --save`` (:mod:`qmigx.tools.journal`).
    """
    from qmigx.stream import ConfigSubsection

    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    if configuration is not None:
        w.raw_configuration(configuration.raw)
    else:
        subs = []
        if caps:
            subs.append(ConfigSubsection("configuration/capabilities", 1,
                                         len(caps).to_bytes(4, "big")
                                         + b"".join(bytes((len(n),)) + n for n in caps)))
        w.configuration(machine_type, subs)
    return w, ram


def write_devices(w: StreamWriter, devices, first_section_id: int, vmdesc) -> None:
    """FULL device sections, EOF and the vmdesc (see :func:`save_stream`)."""
    ps = TARGET_PAGE_SIZE
    entries = []
    for i, dev in enumerate(devices):
        if isinstance(dev, SectionData):
            w.section(SectionType.SECTION_FULL, dev.section, dev.payload)
            continue
        dsec = Section(first_section_id + 1 + i, dev.idstr, dev.instance_id, dev.version_id)
        w.section(SectionType.SECTION_FULL, dsec, dev.payload)
        if dev.vmdesc is not None:
            entries.append(dev.vmdesc)
    w.eof()
    if isinstance(vmdesc, (bytes, bytearray)):
        w.vmdesc(bytes(vmdesc))
    elif vmdesc:
        text = '{"page_size": %d, "devices": [%s]}' % (ps, ", ".join(entries))
        w.vmdesc(text.encode())
