"""A stream's state outlives one parser; a channel's read-ahead is shared by its readers."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from qmigx import RAMBlock, RAMBlockList
from qmigx.errors import TruncatedStreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamLoader, RamWriter
from qmigx.stream import (
    EndOfState,
    RamPages,
    RamSetup,
    ReceiveBuffer,
    Section,
    StreamContext,
    StreamParser,
    StreamWriter,
)
from qmigx.tools.streams import save_stream
from qmigx.wire import SectionType

PS = 4096


def test_a_parser_stops_at_eof_and_leaves_the_rest_to_the_next_reader():
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 8 * PS)])
    out = io.BytesIO()
    save_stream(out.write, blocks, vmdesc=False)
    trailer = b"\x00\x00\x00\x2a" + b"COLO-ish"
    data = out.getvalue() + trailer
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    rx = ReceiveBuffer()
    p = StreamParser(buffer=rx, stop_at_eof=True)
    f = os.fdopen(r, "rb", buffering=0)
    evs = []
    while not evs or not isinstance(evs[-1], EndOfState):
        assert p.fill(f.readinto, 4096)
        evs.extend(p.events())
    # whatever the parser read ahead is still there for a raw reader
    assert rx.read_exact(4, f.readinto) == b"\x00\x00\x00\x2a"
    assert rx.read_exact(8, f.readinto) == b"COLO-ish"
    with pytest.raises(TruncatedStreamError):
        rx.read_exact(1, f.readinto, what="colo message")
    f.close()


def _package(rw: RamWriter, w: StreamWriter, sec: Section, stype, pages) -> None:
    w.section_header(stype, sec)
    for off, byte in pages:
        rw.page("pc.ram", off, bytes([byte]) * PS)
    rw.eos()
    w.footer(sec)


def test_the_context_carries_section_ids_blocks_and_the_continue_block_across_parsers():
    out = io.BytesIO()
    f = QEMUFile(out.write)
    w, rw = StreamWriter(f), RamWriter(f)
    sec = Section(2, "ram", 0, 4)
    w.header()
    w.configuration("pc-i440fx-7.2")
    w.section_header(SectionType.SECTION_START, sec)
    from qmigx.stream import RamBlockInfo

    rw.setup([RamBlockInfo("pc.ram", 8 * PS, None, None)])
    rw.eos()
    w.footer(sec)
    _package(rw, w, sec, SectionType.SECTION_PART, [(0, 1), (PS, 2)])
    f.flush()
    first = out.getvalue()
    out.seek(0)
    out.truncate()
    # a second, headerless piece: PART of section 2, pages that CONTINUE the last block
    _package(rw, w, sec, SectionType.SECTION_PART, [(2 * PS, 3)])
    f.flush()
    second = out.getvalue()
    assert b"pc.ram" not in second  # really relies on the CONTINUE block

    ctx = StreamContext()
    loader = RamLoader(None)
    for data, header in ((first, True), (second, False)):
        p = StreamParser(context=ctx, header=header)
        p.feed(data)
        if not header:  # a package may end at any record boundary; a stream may not
            p.feed_eof()
        for ev in p.events():
            if isinstance(ev, RamSetup):
                loader.on_setup(ev)
            elif isinstance(ev, RamPages):
                loader.on_pages(ev)
    mem = loader.blocks["pc.ram"].memory
    assert [int(mem[i * PS]) for i in range(4)] == [1, 2, 3, 0]
    # without the context, the second piece names an unknown section
    p = StreamParser(header=False)
    p.feed(second)
    p.feed_eof()
    with pytest.raises(Exception, match="Unknown savevm section"):
        list(p.events())
