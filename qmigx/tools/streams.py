"""Whole streams: read, load, verify and convert (QEMU's savevm.c, file side).

These functions drive :class:`~qmigx.stream.StreamParser` over a file,
bytes or any readable object, and give the operations the command-line
tools are made of. Reading is chunked (``readinto`` into the parser's own
buffer), so memory stays near the size of guest RAM whatever the stream
size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from qmigx.block_dirty_bitmap import DirtyBitmapDestination
from qmigx.errors import StreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RAMBlockList, RamLoader, RamWriter, compress_page
from qmigx.stream import (
    Command,
    Configuration,
    EndOfStream,
    RamMappedBlock,
    RamMappedPages,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    Section,
    SectionData,
    SectionRecord,
    SectionStart,
    StreamWriter,
    VMDescription,
    default_registry,
    parse_vmdesc,
)
from qmigx.stream.reader import Source, StreamReader
from qmigx.tools.packaged import packaged_events
from qmigx.savevm import DeviceState, vmstate_device
from qmigx.wire import TARGET_PAGE_SIZE, SectionType

__all__ = [
    "Source",
    "StreamReader",
    "LoadedStream",
    "load_stream",
    "verify_stream",
    "convert_stream",
    "save_stream",
    "DeviceState",
    "vmstate_device",
    "RAM_ENCODINGS",
]

from qmigx.tools.convert import RAM_ENCODINGS, convert_stream  # noqa: E402


@dataclass
class LoadedStream:
    """What a stream carried, with RAM loaded into blocks."""

    configuration: Optional[Configuration] = None
    blocks: RAMBlockList = field(default_factory=RAMBlockList)
    ram_setup: Optional[RamSetup] = None
    sections: list = field(default_factory=list)  # SectionData of non-RAM sections
    commands: list = field(default_factory=list)
    vmdesc: Optional[bytes] = None
    size: int = 0
    #: how its source synced multifd: "round" (a MULTIFD_FLUSH in setup), else "section"
    multifd_sync: Optional[str] = None


def load_stream(source: Source, blocks: Optional[RAMBlockList] = None, *,
                factory: Optional[Callable] = None, progress=None,
                create_missing: bool = False, base=None, chain=()) -> LoadedStream:
    """Read a whole stream, applying its RAM to ``blocks`` (created if None).

    With ``create_missing``, blocks the stream names that ``blocks`` lacks
    are created too. ``base`` loads a delta (``qmigx diff``) over the full
    stream it was made from (``chain``: the deltas in between, oldest
    first); the delta's recorded base digest must match.
    """
    if base is not None:
        from qmigx.tools.delta import load_delta

        return load_delta(source, base, chain=chain)
    reader = StreamReader(source, progress=progress)
    loader = RamLoader(blocks, factory=factory, create_missing=create_missing)
    out = LoadedStream(blocks=loader.blocks, vmdesc=reader.vmdesc_text)
    for ev in reader.events():
        t = type(ev)
        if t is RamPages:
            loader.on_pages(ev)
        elif t is RamMappedPages:
            loader.on_mapped_pages(ev)
        elif t is RamMappedBlock:
            loader.on_mapped_block(ev)
        elif t is RamSetup:
            loader.on_setup(ev)
            out.ram_setup = ev
        elif t is SectionData:
            out.sections.append(ev)
        elif t is Configuration:
            out.configuration = ev
        elif t is Command:
            out.commands.append(ev)
        elif t is VMDescription:
            out.vmdesc = ev.json
        elif t is EndOfStream:
            out.size = ev.offset
    out.multifd_sync = reader.parser.ctx.multifd_sync
    return out


def verify_stream(source: Source, progress=None) -> dict:
    """A full structural check; returns a summary, raises on the first fault.

    Every record is parsed, every page applied to a scratch copy of RAM (so
    XBZRLE deltas and zlib pages are fully decoded), every record of the
    other live sections (``block``, ``dirty-bitmap``) is read by its grammar
    (``records`` counts them), dirty-bitmap records are loaded as a
    destination loads them (``bitmaps``: how many arrived complete;
    ``bitmap_warnings``: what would cancel them), every device section is
    delimited by its vmdesc entry when there is one, and the vmdesc must
    describe each FULL section.
    """
    bitmaps = DirtyBitmapDestination()
    registry = default_registry()
    registry.remove(bitmaps.idstr, bitmaps.instance_id)
    registry.add(bitmaps)
    reader = StreamReader(source, progress=progress, registry=registry)
    loader = RamLoader(None)
    summary = {"sections": 0, "pages": 0, "records": 0, "commands": 0, "vmdesc": False,
               "bytes": 0, "mapped_pages": 0, "multifd_flushes": 0}
    full: list[Section] = []
    for ev in reader.events():
        t = type(ev)
        if t is SectionRecord and ev.section.idstr == bitmaps.idstr:
            bitmaps.load_record(ev.record, ev.section)
        elif t is RamPages:
            loader.on_pages(ev)
            summary["pages"] += ev.records.count
        elif t is RamMappedPages:
            before = loader.pages_loaded
            loader.on_mapped_pages(ev)
            summary["mapped_pages"] += loader.pages_loaded - before
        elif t is RamMappedBlock:
            loader.on_mapped_block(ev)
        elif t is RamMultifdFlush:
            summary["multifd_flushes"] += 1
        elif t is RamSetup:
            loader.on_setup(ev)
        elif t is SectionStart:
            summary["sections"] += 1
            if ev.type == SectionType.SECTION_FULL and ev.section.idstr != "ram":
                full.append(ev.section)
        elif t is SectionRecord:
            summary["records"] += 1
        elif t is Command:
            summary["commands"] += 1
            if ev.packaged is not None:  # postcopy: the device sections travel in a package
                for inner in packaged_events(ev, reader.vmdesc):
                    if type(inner) is SectionStart:
                        summary["sections"] += 1
                        summary["packaged"] = summary.get("packaged", 0) + 1
                        if inner.type == SectionType.SECTION_FULL:
                            full.append(inner.section)
        elif t is VMDescription:
            summary["vmdesc"] = True
            desc = parse_vmdesc(ev.json)
            described = {(d.get("name"), d.get("instance_id")) for d in desc.get("devices", ())}
            for sec in full:
                if (sec.idstr, sec.instance_id) not in described:
                    raise StreamError("device section missing from the vmdesc",
                                      offset=ev.offset, section=sec.label)
        elif t is EndOfStream:
            summary["bytes"] = ev.offset
    bitmaps.load_cleanup(True)
    summary["bitmaps"] = len(bitmaps.result)
    summary["bitmap_warnings"] = list(bitmaps.warnings)
    return summary


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
    from qmigx.stream import ConfigSubsection, RamBlockInfo

    if encoding not in ("page", "zero", "compress"):
        raise ValueError(f"save encoding must be page, zero or compress, not {encoding!r}")
    f = QEMUFile(sink)
    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    if configuration is not None:
        w.raw_configuration(configuration.raw)
    else:
        subs = []
        caps = [n for n, on in ((b"x-ignore-shared", ignore_shared), (b"mapped-ram", mapped_ram))
                if on]
        if caps:
            subs.append(ConfigSubsection("configuration/capabilities", 1,
                                         len(caps).to_bytes(4, "big")
                                         + b"".join(bytes((len(n),)) + n for n in caps)))
        w.configuration(machine_type, subs)
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
        _write_devices(w, devices, first_section_id, vmdesc)
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
    _write_devices(w, devices, first_section_id, vmdesc)
    f.flush()
    f.check()
    return ram


def _write_devices(w: StreamWriter, devices, first_section_id: int, vmdesc) -> None:
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
