"""What QEMU's ``scripts/analyze-migration.py`` prints, for every stream.

The JSON has the same shape and formatting as QEMU 7.2's script: one key
``"<idstr> (<section_id>)"`` per section in stream order, device fields
decoded by the stream's own vmdesc (integers as hex strings), and for
``ram`` the block sizes (``"section sizes"``) and, with ``-m``, every
page. Unlike the script it also reads XBZRLE and compressed pages,
x-ignore-shared setup records and configuration subsections.
"""

from __future__ import annotations

import collections
import json
import os

from qmigx.errors import StreamError
from qmigx.stream.reader import Source, StreamReader
from qmigx.stream import (
    Command,
    StreamParser,
    RamMappedBlock,
    RamMappedPages,
    RamPages,
    RamSetup,
    SectionData,
    SectionRecord,
    SectionStart,
    VMDescription,
)
from qmigx.wire import TARGET_PAGE_SIZE, SectionType

__all__ = ["analyze_state", "vmdesc_json", "dumps", "extract_blocks"]


def dumps(obj) -> str:
    """Serialise as the script does (4-space indent, ``','`` and ``': '``)."""
    return json.JSONEncoder(indent=4, separators=(",", ": ")).encode(obj)


def vmdesc_json(source: Source) -> collections.OrderedDict:
    """The stream's vmdesc as the script's ``-d desc`` shows it."""
    reader = StreamReader(source)
    if reader.vmdesc_text is None and not isinstance(source, (str, os.PathLike, bytes,
                                                              bytearray, memoryview)) \
            and not getattr(source, "seekable", lambda: False)():
        # a pipe or a decompressor: the vmdesc is at the end of what it gives
        for ev in reader.events():
            if type(ev) is VMDescription:
                return json.loads(ev.json, object_pairs_hook=collections.OrderedDict)
    if reader.vmdesc_text is None:
        raise StreamError("No Debug Migration device found (the stream has no vmdesc)",
                          field="vmdesc")
    return json.loads(reader.vmdesc_text, object_pairs_hook=collections.OrderedDict)


def analyze_state(source: Source, *, memory: bool = False, progress=None,
                  loader=None) -> collections.OrderedDict:
    """The script's ``-d state`` dictionary (``memory``: its ``-m``).

    ``loader``: a :class:`~qmigx.ram.RamLoader` to apply the pages to (the
    ``-m`` dump and extraction need the final RAM); without it only record
    headers are read.
    """
    from qmigx.vmstate import analyze_value

    # headers only, unless pages are wanted: map the file instead of reading it
    reader = StreamReader(source, progress=progress, ordered=True,
                          use_mmap=not memory and (loader is None
                                                   or getattr(loader, "zero_copy", False)))
    sections: collections.OrderedDict = collections.OrderedDict()
    sizes = collections.OrderedDict()
    mem = collections.OrderedDict()
    ram_value = None
    if loader is None and memory:
        from qmigx.ram import RamLoader

        loader = RamLoader(None)
    # QEMU 10's vmdesc (it starts with "configuration") is read by 10.0's script rules
    by_name = isinstance(reader.vmdesc, dict) and "configuration" in reader.vmdesc
    for ev in reader.events():
        t = type(ev)
        if t is RamPages:
            if loader is not None:
                loader.on_pages(ev)
            if memory:
                _dump_pages(ev, loader, mem)
        elif t is RamMappedBlock:
            if loader is not None:
                loader.on_mapped_block(ev)
        elif t is RamMappedPages:
            if loader is not None:
                loader.on_mapped_pages(ev)
            if memory:
                _dump_mapped(ev, loader, mem)
        elif t is SectionStart:
            if ev.section.idstr == "ram" and ev.type in (SectionType.SECTION_START,
                                                        SectionType.SECTION_FULL):
                ram_value = collections.OrderedDict([("section sizes", sizes)])
                if memory:
                    ram_value["memory"] = mem
                sections[ev.section.label] = ram_value
        elif t is RamSetup:
            if loader is not None:
                loader.on_setup(ev)
            for b in ev.blocks:
                sizes[b.idstr] = "0x%016x" % b.used_length
        elif t is SectionData:
            _device(ev, sections, analyze_value, by_name)
        elif t is SectionRecord:
            handler = reader.parser.registry.live(ev.section.idstr)
            if not ev.record.is_eos:
                sections.setdefault(ev.section.label, []).append(handler.describe(ev.record))
        elif t is Command and ev.packaged is not None:
            # postcopy packs the device sections into a PACKAGED command
            sub = StreamParser(header=False, vmdesc=reader.vmdesc)
            sub.feed(ev.packaged)
            sub.feed_eof()
            for inner in sub.events():
                if type(inner) is SectionData:
                    _device(inner, sections, analyze_value, by_name)
    return sections


def _device(ev: SectionData, sections: dict, analyze_value, by_name: bool) -> None:
    if ev.type not in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        return
    if ev.value is not None:
        sections[ev.section.label] = analyze_value(ev.value, by_name=by_name)
    else:  # no description: the raw bytes, as the script shows unknown fields
        sections[ev.section.label] = " ".join("%02x" % c for c in ev.payload)


def _dump_pages(ev: RamPages, loader, mem: dict) -> None:
    rec = ev.records
    for i in range(rec.count):
        blk = loader.block_of(ev, i)
        off = int(rec.offset[i])
        key = "%s (0x%016x)" % (blk.idstr, off)
        if rec.kind[i] == 0:
            mem[key] = "Filled with 0x%02x" % rec.fill[i]
        else:
            mem[key] = " ".join("%02x" % c for c in blk.buffer[off : off + TARGET_PAGE_SIZE])


def _dump_mapped(ev: RamMappedPages, loader, mem: dict) -> None:
    """``-m`` for a mapped-ram chunk: the stored pages (bitmap bit set), in file order."""
    blk, bits, _ = loader._mapped[ev.index]
    n = len(ev.data) // TARGET_PAGE_SIZE
    for i in bits[ev.first_page : ev.first_page + n].nonzero()[0]:
        off = (ev.first_page + int(i)) * TARGET_PAGE_SIZE
        page = ev.data[int(i) * TARGET_PAGE_SIZE : (int(i) + 1) * TARGET_PAGE_SIZE]
        mem["%s (0x%016x)" % (blk.idstr, off)] = " ".join("%02x" % c for c in page)


def block_filename(idstr: str) -> str:
    """File name of a RAM block in an extract directory (its idstr, URL-quoted)."""
    import urllib.parse

    return urllib.parse.quote(idstr, safe="") + ".bin"


def extract_blocks(loader, directory: str, name_of) -> list[str]:
    """Write each loaded block's used bytes to ``directory/name_of(idstr)``."""
    written = []
    for blk in loader.blocks:
        path = os.path.join(directory, name_of(blk.idstr))
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as f:
            f.write(memoryview(blk.memory))
        written.append(path)
    return written
