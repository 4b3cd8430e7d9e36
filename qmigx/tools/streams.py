"""Whole streams: read, load, verify and convert (QEMU's savevm.c, file side).

These functions drive :class:`~qmigx.stream.StreamParser` over a file,
bytes or any readable object, and give the operations the command-line
tools are made of. Reading is chunked (``readinto`` into the parser's own
buffer), so memory stays near the size of guest RAM whatever the stream
size.
"""

from __future__ import annotations

from typing import Callable, Optional


from qmigx.block_dirty_bitmap import DirtyBitmapDestination
from qmigx.errors import StreamError
from qmigx.ram import RAMBlockList, RamLoader
from qmigx.stream import (
    Command,
    EndOfStream,
    RamMappedBlock,
    RamMappedPages,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    Section,
    SectionRecord,
    SectionStart,
    VMDescription,
    default_registry,
    parse_vmdesc,
)
from qmigx.stream.reader import Source, StreamReader
from qmigx.tools.loaded import LoadedStream, load_plain
from qmigx.tools.packaged import packaged_events
from qmigx.savevm import DeviceState, vmstate_device
from qmigx.wire import SectionType

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
from qmigx.tools.savestream import save_stream  # noqa: E402


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
    return load_plain(source, blocks, factory=factory, progress=progress,
                      create_missing=create_missing)


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
