"""QEMU 10's additions to the stream, without QEMU: reading them, and refusing bad ones.

SWITCHOVER_START (command 11), MULTIFD_FLUSH records and the sync model
they announce, mapped-ram files (headers, bitmaps, pages at fixed
offsets, ``offset=N``), zero pages in multifd packets, ZERO records whose
fill byte QEMU 10 requires to be 0, and ``convert --for`` on synthetic
streams. Each bad input must fail with a typed error naming where.
The mapped-ram files are also built here by hand from the spec's layout
(qemu10.md §5.2), independently of qmigx's writer.
"""

from __future__ import annotations

import io
import time
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import errors
from qmigx.multifd.channels import MultifdReceiver
from qmigx.multifd.packet import pack_packet
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.ram import RAMBlock, RAMBlockList, RamLoader, RamWriter
from qmigx.stream import (
    Command,
    RamMappedBlock,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    Section,
    StreamParser,
    StreamReader,
    StreamWriter,
)
from qmigx.stream import RamBlockInfo
from qmigx.tools.streams import convert_stream, load_stream, save_stream, verify_stream
from qmigx.wire import MigCmd, SectionType

PS = 4096
SEC = Section(1, "ram", 0, 4)


def blocks_with_data() -> RAMBlockList:
    rng = np.random.default_rng(7)
    a = RAMBlock("pc.ram", np.zeros(70 * PS, np.uint8))
    b = RAMBlock("pc.rom", np.zeros(3 * PS, np.uint8))
    for p in (0, 1, 5, 6, 7, 69):
        a.memory[p * PS : (p + 1) * PS] = rng.integers(1, 256, PS)
    b.memory[PS : 2 * PS] = 0x5A
    return RAMBlockList([a, b])


def parse_all(data: bytes, **kw) -> list:
    p = StreamParser(**kw)
    p.feed(data)
    p.feed_eof()
    return list(p.events())


# --- a QEMU 10 stream: SWITCHOVER_START and MULTIFD_FLUSH ---------------------------------------


def stream10(*, flush_in_setup: bool = True, extra_flush: bool = True,
             switchover: bool = True, fill: int = 0, machine: str = "pc-i440fx-10.0") -> bytes:
    """A 10.0-machine stream shaped like QEMU's (qemu10.md §3.1, §4.4), one block."""
    sink = BytesSink()
    f = QEMUFile(sink)
    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    w.configuration(machine)
    w.section_header(SectionType.SECTION_START, SEC)
    ram.setup([RamBlockInfo("pc.ram", 4 * PS)])
    if flush_in_setup:
        ram.multifd_flush()
    ram.eos()
    w.footer(SEC)
    w.section_header(SectionType.SECTION_PART, SEC)
    ram.page("pc.ram", 0, np.full(PS, 7, np.uint8))
    ram.zero("pc.ram", PS, fill)
    if extra_flush:
        ram.multifd_flush()
        ram.multifd_flush()  # several may follow each other
    ram.eos()
    w.footer(SEC)
    if switchover:
        w.command(MigCmd.SWITCHOVER_START)
    w.section_header(SectionType.SECTION_END, SEC)
    ram.eos()
    w.footer(SEC)
    w.eof()
    w.vmdesc(b'{"configuration": {"vmsd_name": "configuration"}, "page_size": 4096, '
             b'"devices": []}')
    f.flush()
    return bytes(sink.data)


def test_qemu10_stream_events():
    evs = parse_all(stream10())
    cmds = [e for e in evs if isinstance(e, Command)]
    assert [c.cmd for c in cmds] == [MigCmd.SWITCHOVER_START] and cmds[0].payload == b""
    flushes = [e for e in evs if isinstance(e, RamMultifdFlush)]
    assert len(flushes) == 3 and all(f.section == SEC for f in flushes)
    data = stream10()
    assert [f.offset for f in flushes] == [i for i in range(len(data) - 7)
                                          if data[i : i + 8] == bytes.fromhex("0000000000000200")]
    loaded = load_stream(data)
    assert bytes(loaded.blocks["pc.ram"].memory[:PS]) == bytes([7]) * PS
    assert verify_stream(data)["multifd_flushes"] == 3


def test_sync_model_is_learnt_from_the_setup_section():
    p = StreamParser()
    p.feed(stream10())
    p.feed_eof()
    list(p.events())
    assert p.ctx.multifd_sync == "round" and p.ctx.multifd_flushes == 3
    p = StreamParser()
    p.feed(stream10(flush_in_setup=False, extra_flush=False))
    p.feed_eof()
    list(p.events())
    assert p.ctx.multifd_sync == "section" and p.ctx.multifd_flushes == 0


def test_flush_where_the_setup_had_none_is_refused():
    """A per-section source never flushes; a FLUSH after a setup without one is bad input."""
    data = stream10(flush_in_setup=False)
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(data)
    at = data.index(bytes.fromhex("0000000000000200"))
    assert ei.value.offset == at and ei.value.field == "flags" and "never per round" in str(ei.value)
    assert ei.value.section == "ram (1)"


@pytest.mark.parametrize("word", [0x220, 0x1200, 0x201])
def test_flush_is_the_bare_word(word):
    """0x200 with CONTINUE or an offset is no FLUSH; 0x201 is an unknown combination."""
    data = stream10().replace(bytes.fromhex("0000000000000200"), struct.pack(">Q", word), 1)
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(data)
    assert ei.value.field == "flags"
    assert ei.value.offset == stream10().index(bytes.fromhex("0000000000000200"))


def test_switchover_start_with_a_payload_is_refused():
    data = stream10()
    i = data.index(b"\x08\x00\x0b\x00\x00")
    bad = data[:i] + b"\x08\x00\x0b\x00\x01\x00" + data[i + 5 :]
    with pytest.raises(errors.StreamError) as ei:
        parse_all(bad)
    assert ei.value.offset == i and "SWITCHOVER_START received with bad length 1" in str(ei.value)


def test_zero_fill_is_qemu10s_rule_only():
    """7.2 fills a ZERO page with its byte; QEMU 10 refuses any but 0 (qemu10.md §3.2)."""
    data = stream10(fill=0x55)
    loaded = load_stream(data)
    assert bytes(loaded.blocks["pc.ram"].memory[PS : 2 * PS]) == b"\x55" * PS
    loader = RamLoader(None, zero_fill=True)
    with pytest.raises(errors.RamStreamError) as ei:
        for ev in parse_all(data):
            if isinstance(ev, RamSetup):
                loader.on_setup(ev)
            elif isinstance(ev, RamPages):
                loader.on_pages(ev)
    assert "Found a zero page with value 85" in str(ei.value) and ei.value.field == "fill"
    rec = data.index(struct.pack(">Q", PS | 0x22)) if struct.pack(">Q", PS | 0x22) in data else None
    assert ei.value.offset == rec


def test_convert_for_72_drops_what_72_does_not_know():
    data = stream10(machine="pc-i440fx-7.2")
    out = BytesSink()
    convert_stream(data, out, target="7.2")
    got = bytes(out.data)
    assert b"\x08\x00\x0b\x00\x00" not in got
    assert bytes.fromhex("0000000000000200") not in got
    assert not [e for e in parse_all(got) if isinstance(e, (RamMultifdFlush, Command))]
    assert got.endswith(b'{"page_size": 4096, "devices": []}')
    assert bytes(load_stream(got).blocks["pc.ram"].memory) == bytes(
        load_stream(data).blocks["pc.ram"].memory)


def test_convert_for_72_refuses_a_10_machine():
    with pytest.raises(errors.IncompatibleStreamError) as ei:
        convert_stream(stream10(), BytesSink(), target="7.2")
    assert "QEMU 7.2 lacks machine type 'pc-i440fx-10.0'" in str(ei.value)
    assert ei.value.field == "machine_type" and ei.value.offset == 8


def test_convert_for_10_makes_nonzero_fills_and_zlib_pages_whole():
    from streams import small_stream  # 7.2: XBZRLE and COMPRESS_PAGE records

    for data in (small_stream(), stream10(fill=0x55, machine="pc-i440fx-7.2")):
        out = BytesSink()
        convert_stream(data, out, target="10.0")
        got = bytes(out.data)
        kinds = set()
        fills = set()
        for ev in parse_all(got):
            if isinstance(ev, RamPages):
                kinds |= set(ev.records.kind[: ev.records.count])
                fills |= {ev.records.fill[i] for i in range(ev.records.count)
                          if ev.records.kind[i] == 0}
        assert 3 not in kinds and fills <= {0}  # no COMPRESS_PAGE, no fill but 0
        a, b = load_stream(got), load_stream(data)
        for blk in b.blocks:
            assert bytes(a.blocks[blk.idstr].memory) == bytes(blk.memory)
    with pytest.raises(errors.IncompatibleStreamError):
        convert_stream(small_stream(), BytesSink(), "compress", target="10.0")


# --- mapped-ram files ---------------------------------------------------------------------------


def mapped_by_hand(blocks: RAMBlockList, *, start: int = 0, tamper=None) -> bytes:
    """A mapped-ram file laid out as qemu10.md §5.2 says, built without qmigx's writers.

    ``tamper(name, header) -> header`` may change a block's header fields
    (version, page_size, bitmap_offset, pages_offset) as written.
    """
    out = bytearray(start)
    out += b"QEVM\0\0\0\3"
    mt = b"pc-i440fx-10.0"
    out += b"\x07" + struct.pack(">I", len(mt)) + mt
    out += b"\x05\x1aconfiguration/capabilities" + struct.pack(">II", 1, 1) + b"\x0amapped-ram"
    out += b"\x01" + struct.pack(">I", 1) + b"\x03ram" + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", sum(b.used_length for b in blocks) | 4)
    for blk in blocks:
        name = blk.idstr.encode()
        out += bytes((len(name),)) + name + struct.pack(">Q", blk.used_length)
        npages = blk.used_length // PS
        bitmap_offset = len(out) + 28
        bsize = -(-npages // 64) * 8
        pages_offset = -(-(bitmap_offset + bsize) // (1 << 20)) * (1 << 20)
        hdr = [1, PS, bitmap_offset, pages_offset]
        if tamper is not None:
            hdr = tamper(blk.idstr, hdr)
        out += struct.pack(">IQQQ", *hdr)
        bits = np.array([blk.memory[p * PS : (p + 1) * PS].any() for p in range(npages)])
        out += np.packbits(bits.astype(np.uint8), bitorder="little").tobytes().ljust(bsize, b"\0")
        out += bytes(pages_offset - len(out))
        for p in range(npages):
            out += bytes(blk.memory[p * PS : (p + 1) * PS]) if bits[p] else bytes(PS)
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 1)
    out += b"\x08\x00\x0b\x00\x00"
    out += b"\x03" + struct.pack(">I", 1) + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 1)
    out += b"\x00"
    return bytes(out)


def test_mapped_ram_file_loads_and_matches_qmigx_writer():
    blocks = blocks_with_data()
    by_hand = mapped_by_hand(blocks)
    sink = BytesSink()
    save_stream(sink, blocks, machine_type="pc-i440fx-10.0", vmdesc=False, mapped_ram=True,
                first_section_id=1)
    ours = bytes(sink.data)
    # the same layout: header offsets and page areas agree byte for byte up to the END
    cut = by_hand.index(b"\x08\x00\x0b\x00\x00")
    assert ours[:cut] == by_hand[:cut]
    for data in (by_hand, ours):
        loaded = load_stream(data)
        for blk in blocks:
            assert bytes(loaded.blocks[blk.idstr].memory) == bytes(blk.memory), blk.idstr
        summary = verify_stream(data)
        assert summary["pages"] == 0 and summary["mapped_pages"] == 7


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 64), st.integers(1000, 600_000)), min_size=3,
                max_size=40).filter(lambda s: sum(s) > 20_000))
def test_mapped_ram_in_any_chunks(sizes):
    """Sans-IO: the page areas are skipped and passed on whatever the chunking."""
    blocks = blocks_with_data()
    data = mapped_by_hand(blocks)
    p = StreamParser()
    loader = RamLoader(None)
    pos = 0
    i = 0
    from qmigx.stream import RamMappedPages

    def drain():
        for ev in p.events():
            if isinstance(ev, RamMappedBlock):
                loader.on_mapped_block(ev)
            elif isinstance(ev, RamMappedPages):
                loader.on_mapped_pages(ev)
            elif isinstance(ev, RamSetup):
                loader.on_setup(ev)

    while pos < len(data):
        n = sizes[i % len(sizes)]
        p.feed(data[pos : pos + n])
        pos += n
        i += 1
        drain()
    p.feed_eof()
    drain()
    for blk in blocks:
        assert bytes(loader.blocks[blk.idstr].memory) == bytes(blk.memory)


def test_mapped_ram_at_a_file_offset(tmp_path):
    """``file:PATH,offset=N``: N zero bytes, then the stream; header offsets are file offsets."""
    blocks = blocks_with_data()
    path = tmp_path / "m.mig"
    path.write_bytes(mapped_by_hand(blocks, start=0x1000))
    reader = StreamReader(str(path))
    assert reader.offset == 0x1000
    headers = [ev.info.mapped for ev in reader.events() if isinstance(ev, RamMappedBlock)]
    assert headers[0].bitmap_offset > 0x1000 and headers[0].pages_offset == 0x100000
    loaded = load_stream(str(path))
    for blk in blocks:
        assert bytes(loaded.blocks[blk.idstr].memory) == bytes(blk.memory)
    with open(path, "rb") as fh:  # a non-seekable reader given the offset explicitly
        fh.seek(0x1000)
        raw = io.BufferedReader(io.BytesIO(fh.read()))
    evs = list(StreamReader(raw, vmdesc=None, offset=0x1000).events())
    assert [e.info.mapped for e in evs if isinstance(e, RamMappedBlock)] == headers


def _tamper(field: int, value):
    def t(name, hdr):
        if name == "pc.rom":
            hdr = list(hdr)
            hdr[field] = value(hdr) if callable(value) else value
        return hdr
    return t


@pytest.mark.parametrize("field, value, err, where", [
    (0, 2, "version 2 not supported", "mapped_ram.version"),
    (1, 8192, "page size 8192", "mapped_ram.page_size"),
    (3, lambda h: h[3] + 512, "bad alignment", "mapped_ram.pages_offset"),
    (2, lambda h: h[2] - 4, "before the end of its header", "mapped_ram.bitmap_offset"),
    (2, lambda h: h[3] - 4, "runs into the page area", "mapped_ram.pages_offset"),
])
def test_mapped_ram_bad_headers(field, value, err, where):
    data = mapped_by_hand(blocks_with_data(), tamper=_tamper(field, value))
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(data)
    assert err in str(ei.value) and ei.value.field == where
    assert ei.value.offset == data.index(b"\x06pc.rom") and "pc.rom" in str(ei.value)


@pytest.mark.parametrize("field, value, what", [
    (3, 1 << 40, "page area"),
    (2, lambda h: 1 << 40, "bitmap"),
])
def test_mapped_ram_offsets_past_the_file(field, value, what):
    """A header whose bitmap or pages lie past the end of the file: truncated, and where."""
    def t(name, hdr):
        hdr = _tamper(field, value)(name, hdr)
        if field == 2 and name == "pc.rom":
            hdr[3] = (1 << 40) + (1 << 20)
        return hdr
    data = mapped_by_hand(blocks_with_data(), tamper=t)
    with pytest.raises(errors.TruncatedStreamError) as ei:
        parse_all(data)
    assert f"mapped-ram {what}" in str(ei.value) and "runs past the end" in str(ei.value)
    assert ei.value.offset == data.index(b"\x06pc.rom")
    assert ei.value.field.startswith("mapped_ram.")


def test_mapped_ram_stream_with_page_records_or_flush_is_refused():
    blocks = blocks_with_data()
    data = mapped_by_hand(blocks)
    eos = data.index(struct.pack(">Q", 0x10) + b"\x7e")
    for inserted, text in ((struct.pack(">Q", 0x02) + b"\x06pc.rom" + b"\0", "page record"),
                           (struct.pack(">Q", 0x200), "MULTIFD_FLUSH")):
        bad = data[:eos] + inserted + data[eos:]
        with pytest.raises(errors.RamStreamError) as ei:
            parse_all(bad)
        assert text in str(ei.value) and ei.value.offset == eos


# --- multifd: QEMU 10's zero pages and SYNC packets, through a receiver ------------------------------


class _Chan:
    """A channel over bytes (what MultifdReceiver reads)."""

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def readinto(self, b) -> int:
        return self.buf.readinto(b)

    def readinto_exact(self, b) -> None:
        n = self.buf.readinto(b)
        if n != len(b):
            raise errors.ChannelError("end of stream", field="channel")

    def read_exact(self, n: int) -> bytes:
        d = self.buf.read(n)
        if len(d) != n:
            raise errors.ChannelError("end of stream", field="channel")
        return d

    def shutdown(self) -> None:
        pass


def _sync10() -> bytes:
    """QEMU 10's SYNC packet: flags SYNC, pages_alloc 0, zeroed -- 1344 bytes all the same."""
    return bytes.fromhex("11223344 00000001 00000001") + bytes(1344 - 12)


def test_receiver_reads_qemu10_sync_packets_and_zero_pages():
    blocks = RAMBlockList([RAMBlock("pc.ram", np.full(16 * PS, 0xAA, np.uint8))])
    data = pack_packet(flags=0, pages_alloc=128, packet_num=1, ramblock="pc.ram",
                       offsets=[2 * PS], zero_offsets=[0, 5 * PS],
                       data=np.full(PS, 3, np.uint8).tobytes())
    chan = _Chan(_sync10() + data + _sync10() + _sync10())
    rx = MultifdReceiver([chan], blocks)
    try:
        for _ in range(3):
            rx.wait_sync(10)
    finally:
        rx.close()
    mem = blocks["pc.ram"].memory
    assert (mem[:PS] == 0).all() and (mem[5 * PS : 6 * PS] == 0).all()
    assert (mem[2 * PS : 3 * PS] == 3).all() and (mem[PS : 2 * PS] == 0xAA).all()
    assert rx.zero_pages == 2 and rx.pages == 1 and rx.syncs == [3]


def test_receiver_refuses_zero_pages_outside_the_block():
    blocks = RAMBlockList([RAMBlock("pc.ram", np.zeros(16 * PS, np.uint8))])
    data = pack_packet(flags=0, pages_alloc=128, packet_num=1, ramblock="pc.ram",
                       offsets=[], zero_offsets=[16 * PS])
    rx = MultifdReceiver([_Chan(data + _sync10())], blocks)
    try:
        with pytest.raises(errors.MultifdPacketError) as ei:
            rx.wait_sync(10)
    finally:
        rx.close()
    assert ei.value.field == "offsets[0]"


# --- the destination tells channels apart by their first bytes (QEMU 10, qemu10.md §4.6) ------------


@pytest.mark.parametrize("machine", ["pc-i440fx-10.0", "pc-i440fx-7.2"])
def test_multifd_channels_may_connect_before_the_main_channel(machine, tmp_path, monkeypatch):
    """A source that opens its multifd channels first: QEVM still names the main channel."""
    from qmigx import transport
    from qmigx.control import Capabilities, Parameters
    from qmigx.migration import MigrationDestination, MigrationSource
    import qmigx.migration.source as source_mod

    def settings():
        c = Capabilities(qemu_version="10.0")
        c.set("multifd")
        p = Parameters(capabilities=c, qemu_version="10.0")
        p.set({"multifd-channels": 3, "multifd-compression": "zlib"})
        return c, p

    rng = np.random.default_rng(3)
    mem = np.zeros(256 * PS, np.uint8)
    mem[: 100 * PS] = rng.integers(0, 256, 100 * PS)
    blocks = RAMBlockList([RAMBlock("pc.ram", mem)])
    c, p = settings()
    dst = MigrationDestination(capabilities=c, parameters=p, accept_timeout=30)
    dst.incoming(f"unix:{tmp_path}/m.sock")
    early: list = []
    real_connect, real_extra = transport.connect, transport.connect_extra

    def connect(uri, **kw):
        early.extend(real_extra(uri, **kw) for _ in range(3))
        time.sleep(0.2)  # let the destination accept them first
        return real_connect(uri, **kw)

    monkeypatch.setattr(source_mod.transport, "connect", connect)
    monkeypatch.setattr(source_mod.transport, "connect_extra", lambda uri, **kw: early.pop(0))
    c2, p2 = settings()
    src = MigrationSource(blocks, capabilities=c2, parameters=p2, machine_type=machine)
    src.guest.running = False
    src.migrate(f"unix:{tmp_path}/m.sock")
    assert src.wait(60).value == "completed", src.error
    assert dst.wait(60).value == "completed", dst.error
    assert np.array_equal(dst.blocks["pc.ram"].memory, mem)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_scanner_twins_agree_on_multifd_flush(backend):
    """Both RAM scanners stop after a bare 0x200 word and refuse 0x200 with more bits."""
    from qmigx._backend import load_compiled, load_reference

    k = (load_compiled if backend == "compiled" else load_reference)("ramparse")
    sc = k.RamScanner(PS, [b"pc.ram"], [8 * PS])
    rec = k.RamRecords(16)
    data = struct.pack(">QQ", 0x200, 0x10)
    assert sc.scan(data, 0, len(data), rec, 100) == (8, k.MULTIFD_FLUSH)
    assert sc.scan(data, 8, len(data), rec, 100) == (16, k.EOS)
    for word in (0x220, 0x3200):
        bad = struct.pack(">Q", word)
        with pytest.raises(errors.RamStreamError) as ei:
            sc.scan(bad, 0, 8, rec, 100)
        assert ei.value.offset == 100 and "MULTIFD_FLUSH" in str(ei.value)
