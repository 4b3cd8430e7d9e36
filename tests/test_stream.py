"""The stream codec: events, sans-IO feeding, and typed errors on bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import errors
from qmigx.tools.streams import load_stream, verify_stream
from qmigx.stream import (
    Command,
    EndOfStream,
    RamPages,
    RamSetup,
    SectionData,
    StreamParser,
    find_vmdesc,
)
from qmigx.wire import MigCmd

from streams import DEV_DESC, expected_memory, small_stream

STREAM = small_stream()


def parse_all(data: bytes, **kw) -> list:
    p = StreamParser(**kw)
    p.feed(data)
    p.feed_eof()
    return list(p.events())


def summary(events) -> list:
    """Events as comparable tuples (RAM batches flattened to records)."""
    out = []
    for ev in events:
        if isinstance(ev, SectionData):
            out.append(("data", ev.type, ev.section, ev.payload, ev.offset))
        elif isinstance(ev, RamPages):
            r = ev.records
            for i in range(r.count):
                body = bytes(ev.data[r.pos[i] : r.pos[i] + r.length[i]])
                out.append(("page", int(r.kind[i]), int(r.block[i]), int(r.offset[i]),
                            int(r.start[i]) + ev.base, body))
        else:
            out.append(repr(ev))
    return out


def test_small_stream_loads_exactly():
    loaded = load_stream(STREAM)
    for name, mem in expected_memory().items():
        assert np.array_equal(loaded.blocks[name].memory, mem), name
    assert [c.cmd for c in loaded.commands] == [MigCmd.OPEN_RETURN_PATH, MigCmd.PING]
    assert [s.section.idstr for s in loaded.sections] == ["dev0"]
    assert loaded.sections[0].payload == b"\x12\x34\x00\x00\x00\x05"


def test_events_cover_the_stream():
    evs = parse_all(STREAM)
    assert isinstance(evs[-1], EndOfStream) and evs[-1].offset == len(STREAM)
    setup = [e for e in evs if isinstance(e, RamSetup)][0]
    assert [(b.idstr, b.used_length) for b in setup.blocks] == [("pc.ram", 6 * 4096),
                                                                ("pc.rom", 2 * 4096)]
    kinds = sorted({int(k) for e in evs if isinstance(e, RamPages)
                    for k in e.records.kind[: e.records.count]})
    assert kinds == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=40))
def test_chunked_feeding_gives_the_same_events(cuts):
    want = summary(parse_all(STREAM))
    p = StreamParser()
    got = []
    pos = 0
    for n in cuts:
        p.feed(STREAM[pos : pos + n])
        pos += n
        got.extend(summary(p.events()))
        if pos >= len(STREAM):
            break
    if pos < len(STREAM):
        p.feed(STREAM[pos:])
    p.feed_eof()
    got.extend(summary(p.events()))
    assert got == want


def test_fill_from_a_file_object_gives_the_same_events(tmp_path):
    path = tmp_path / "s.mig"
    path.write_bytes(STREAM)
    want = summary(parse_all(STREAM))
    p = StreamParser()
    got = []
    with open(path, "rb") as f:
        while True:
            n = p.fill(f.readinto, size=1000)
            got.extend(summary(p.events()))
            if n == 0:
                break
    assert got == want


def test_every_prefix_is_a_typed_truncation_error():
    # QEMU accepts a stream cut right after its EOF byte (only the vmdesc is
    # missing, which it merely warns about); every other prefix is truncated.
    after_eof = find_vmdesc(STREAM)[0]
    for n in range(len(STREAM)):
        if n == after_eof:
            assert isinstance(parse_all(STREAM[:n])[-1], EndOfStream)
            continue
        with pytest.raises(errors.StreamError) as ei:
            parse_all(STREAM[:n])
        err = ei.value
        assert isinstance(err, errors.TruncatedStreamError), (n, err)
        assert err.offset is not None and err.offset <= n


def test_every_prefix_is_a_clean_need_more_without_eof():
    for n in range(0, len(STREAM), 7):
        p = StreamParser()
        p.feed(STREAM[:n])
        list(p.events())  # must not raise: the rest may still come
        assert p.offset <= n


@pytest.mark.parametrize("magic", [b"QEVN", b"\0\0\0\0", b"MVEQ"])
def test_wrong_magic(magic):
    with pytest.raises(errors.BadHeaderError) as ei:
        parse_all(magic + STREAM[4:])
    assert ei.value.offset == 0 and ei.value.field == "magic"
    assert "Not a migration stream" in str(ei.value)


@pytest.mark.parametrize("version,text", [(2, "obsolete"), (4, "Unsupported"), (0, "Unsupported")])
def test_wrong_version(version, text):
    with pytest.raises(errors.BadHeaderError) as ei:
        parse_all(STREAM[:4] + struct.pack(">I", version) + STREAM[8:])
    assert ei.value.offset == 4 and text in str(ei.value)


def test_every_flipped_header_bit_is_refused():
    for byte in range(8):
        for bit in range(8):
            data = bytearray(STREAM)
            data[byte] ^= 1 << bit
            with pytest.raises(errors.BadHeaderError):
                parse_all(bytes(data))


#: the XBZRLE record of page 1 of pc.ram (named: the previous record was pc.rom's)
XBZ = b"\x00\x00\x00\x00\x00\x00\x10\x40\x06pc.ram\x01"
XBZ_LEN = len(XBZ)  # offset of the be16 length inside the record


def _offset_of(needle: bytes, start: int = 0) -> int:
    i = STREAM.find(needle, start)
    assert i >= 0
    return i


def test_unknown_section_type():
    eof = len(STREAM) - len(find_vmdesc(STREAM)[1]) - 5 - 1
    assert STREAM[eof] == 0
    data = STREAM[:eof] + b"\x09" + STREAM[eof + 1 :]
    with pytest.raises(errors.UnknownSectionError) as ei:
        parse_all(data, vmdesc={"devices": [json.loads(DEV_DESC)]})
    assert ei.value.offset == eof and "type 9" in str(ei.value)
    # without one given, the parser finds the vmdesc at the end of the input
    with pytest.raises(errors.UnknownSectionError) as ei:
        parse_all(data)
    assert ei.value.offset == eof


def test_unknown_section_id():
    part = _offset_of(b"\x02\x00\x00\x00\x02")
    data = STREAM[:part] + b"\x02\x00\x00\x00\x63" + STREAM[part + 5 :]
    with pytest.raises(errors.UnknownSectionError) as ei:
        parse_all(data)
    assert ei.value.offset == part and ei.value.field == "section_id"


def test_wrong_block_name():
    i = _offset_of(b"\x06pc.rom", _offset_of(b"\x06pc.rom") + 1)  # in a page record
    data = STREAM[:i] + b"\x06pc.rox" + STREAM[i + 7 :]
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(data)
    assert "Can't find block 'pc.rox'" in str(ei.value)
    assert ei.value.offset == i - 8 and ei.value.section == "ram (2)"


def test_oversize_xbzrle_length():
    i = _offset_of(XBZ)  # XBZRLE|CONTINUE at page 1
    data = bytearray(STREAM)
    data[i + XBZ_LEN : i + XBZ_LEN + 2] = struct.pack(">H", 4097)
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(bytes(data))
    assert ei.value.field == "xbzrle.len" and ei.value.offset == i + XBZ_LEN


def test_oversize_compressed_length():
    i = _offset_of(b"\x00\x00\x00\x00\x00\x00\x41\x20")  # COMPRESS|CONTINUE at page 4
    data = bytearray(STREAM)
    data[i + 8 : i + 12] = struct.pack(">I", 0xFFFFFFF0)
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(bytes(data))
    assert ei.value.field == "compress.len"


def test_illegal_ram_offset():
    i = _offset_of(XBZ)
    data = bytearray(STREAM)
    data[i : i + 8] = struct.pack(">Q", 0x100000 | 0x40)
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(bytes(data))
    assert "Illegal RAM offset 0x100000" in str(ei.value)


def test_unknown_ram_flags():
    i = _offset_of(XBZ)
    data = bytearray(STREAM)
    data[i : i + 8] = struct.pack(">Q", 0x1000 | 0x0A)  # ZERO|PAGE together
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(bytes(data))
    assert "Unknown combination of migration flags: 0xa" in str(ei.value)


def test_malformed_xbzrle_data_fails_the_load_and_leaves_ram_alone():
    i = _offset_of(XBZ)
    n = struct.unpack(">H", STREAM[i + XBZ_LEN : i + XBZ_LEN + 2])[0]
    data = bytearray(STREAM)
    body = i + XBZ_LEN + 2
    data[body : body + n] = b"\x80\x80" * (n // 2) + b"\x80" * (n % 2)
    with pytest.raises(errors.RamStreamError) as ei:
        load_stream(bytes(data))
    assert "XBZRLE" in str(ei.value) and ei.value.offset == i


def test_mismatched_footer():
    i = _offset_of(b"\x7e\x00\x00\x00\x03")
    data = STREAM[:i] + b"\x7e\x00\x00\x00\x04" + STREAM[i + 5 :]
    with pytest.raises(errors.StreamError) as ei:
        parse_all(data, vmdesc={"devices": [json.loads(DEV_DESC)]})
    assert "Mismatched section id in footer" in str(ei.value)


def test_setup_total_must_match_the_blocks():
    i = _offset_of(b"\x00\x00\x00\x00\x00\x00\x80\x04")  # total 8 pages | MEM_SIZE
    data = STREAM[:i] + struct.pack(">Q", 0x7000 | 4) + STREAM[i + 8 :]
    with pytest.raises(errors.RamStreamError) as ei:
        parse_all(data)
    assert "exceeds the remaining total" in str(ei.value)


@pytest.mark.parametrize("cmd,payload,text", [
    (2, b"\0\0\0", "PING received with bad length"),
    (0, b"", "MIG_CMD 0x0 unknown"),
    (12, b"", "MIG_CMD 0xc unknown"),
    (11, b"\0", "SWITCHOVER_START received with bad length 1"),  # QEMU 10: len 0 only
    (6, b"\x00\x02ab\x00" + b"\0" * 15, "not a multiple of 16"),
])
def test_bad_commands(cmd, payload, text):
    i = _offset_of(b"\x08\x00\x01\x00\x00")
    rec = b"\x08" + struct.pack(">HH", cmd, len(payload)) + payload
    with pytest.raises(errors.StreamError) as ei:
        parse_all(STREAM[:i] + rec + STREAM[i:])
    assert text in str(ei.value) and ei.value.offset == i


def test_packaged_command_carries_its_blob():
    i = _offset_of(b"\x08\x00\x01\x00\x00")
    rec = b"\x08\x00\x07\x00\x04" + struct.pack(">I", 3) + b"abc"
    evs = parse_all(STREAM[:i] + rec + STREAM[i:])
    pk = [e for e in evs if isinstance(e, Command) and e.cmd == MigCmd.PACKAGED]
    assert pk and pk[0].packaged == b"abc"


def test_device_sections_without_vmdesc_are_delimited_by_footers():
    data = small_stream(vmdesc=False)
    evs = parse_all(data)
    dev = [e for e in evs if isinstance(e, SectionData)]
    assert [d.payload for d in dev] == [b"\x12\x34\x00\x00\x00\x05"]


def test_trailing_garbage_after_vmdesc():
    with pytest.raises(errors.StreamError) as ei:
        parse_all(STREAM + b"xx")
    assert ei.value.offset == len(STREAM)


def test_verify_summary():
    s = verify_stream(STREAM)
    assert s["bytes"] == len(STREAM) and s["vmdesc"] and s["pages"] == 10


def test_cli_reports_bad_input_on_one_line(tmp_path):
    bad = tmp_path / "bad.mig"
    bad.write_bytes(STREAM[: len(STREAM) // 2])
    r = subprocess.run([sys.executable, "-m", "qmigx", "verify", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmigx: error: ")
    assert "offset 0x" in lines[0] and "Traceback" not in r.stderr


def test_ram_block_backings():
    import mmap
    import os

    from qmigx.ram import RAMBlock, aligned_array

    blk = RAMBlock.memfd("pc.ram", 1 << 20)
    blk.memory[:4] = 9
    other = mmap.mmap(blk.fd, 1 << 20)  # what another process mapping the fd sees
    assert other[:4] == b"\t\t\t\t" and blk.shared
    anon = RAMBlock.anonymous("a", 1 << 20, hugepages=True)
    assert not anon.shared and anon.used_length == 1 << 20
    arr = aligned_array((256, 4096))
    assert arr.ctypes.data % 4096 == 0 and not arr.any()
    np_block = RAMBlock("n", np.zeros((16, 4096), np.uint8))
    assert np_block.used_length == 16 * 4096
    with pytest.raises(ValueError):
        RAMBlock("bad", bytearray(1000))  # not page aligned in size
    os.close(blk.fd)


def test_analyze_decodes_device_sections_inside_a_package():
    """Postcopy streams carry their devices in MIG_CMD_PACKAGED (postcopy.md)."""
    from qmigx.tools.analyze import analyze_state
    from qmigx.qemufile import BytesSink, QEMUFile
    from qmigx.stream import Section, StreamWriter
    from qmigx.wire import SectionType

    inner = BytesSink()
    iw = StreamWriter(QEMUFile(inner))
    iw.section(SectionType.SECTION_FULL, Section(7, "dev0", 0, 1), b"\x00\x05\x00\x00\x00\x06")
    iw.f.flush()
    out = BytesSink()
    w = StreamWriter(QEMUFile(out))
    w.header()
    w.configuration("pc-i440fx-7.2")
    blob = bytes(inner.data)
    w.command(MigCmd.PACKAGED, struct.pack(">I", len(blob)), blob)
    w.eof()
    w.vmdesc(('{"page_size": 4096, "devices": [%s]}' % DEV_DESC).encode())
    w.f.flush()
    state = analyze_state(bytes(out.data))
    assert state["dev0 (7)"] == {"x": "0x0005", "y": "0x00000006"}


def test_destination_refuses_a_length_change_of_a_fixed_block():
    from qmigx.errors import RamStreamError as RSE
    from qmigx.ram import RAMBlock, RAMBlockList

    small = RAMBlockList([RAMBlock("pc.ram", np.zeros(8 * 4096, np.uint8)),
                          RAMBlock("pc.rom", np.zeros(2 * 4096, np.uint8))])
    with pytest.raises(RSE) as ei:  # the stream's pc.ram is 6 pages: QEMU says no
        load_stream(STREAM, small)
    assert "Length mismatch: pc.ram" in str(ei.value)
    resizable = RAMBlockList([RAMBlock("pc.ram", np.zeros(8 * 4096, np.uint8),
                                       max_length=8 * 4096),
                              RAMBlock("pc.rom", np.zeros(2 * 4096, np.uint8))])
    loaded = load_stream(STREAM, resizable)  # a resizable block (ACPI tables) adapts
    assert loaded.blocks["pc.ram"].used_length == 6 * 4096


def test_analyze_memory_dump_and_extract_flags(tmp_path):
    """``-m`` lists every page as the script would; ``-x`` writes files to the cwd."""
    path = tmp_path / "s.mig"
    path.write_bytes(STREAM)
    r = subprocess.run([sys.executable, "-m", "qmigx", "analyze", "-f", str(path), "-m"],
                       capture_output=True, text=True, check=True)
    mem = json.loads(r.stdout)["ram (2)"]["memory"]
    exp = expected_memory()
    assert mem["pc.ram (0x0000000000000000)"] == "Filled with 0x00"
    # the page XBZRLE changed shows its final content
    assert mem["pc.ram (0x0000000000001000)"] == " ".join(
        "%02x" % c for c in exp["pc.ram"][4096:8192])
    assert len(mem) == 8  # 6 + 2 pages, each listed once
    work = tmp_path / "x"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "qmigx", "analyze", "-f", str(path), "-x"],
                       capture_output=True, text=True, check=True, cwd=work)
    assert (work / "desc.json").exists() and (work / "state.json").exists()
    assert (work / "pc.ram").read_bytes() == exp["pc.ram"].tobytes()
    assert set(r.stdout.split()) >= {"desc.json", "state.json", "pc.ram", "pc.rom"}


def test_a_fake_footer_inside_device_state_does_not_cut_the_section():
    """Device bytes may contain ``7E <section id> 00``; a destination that has no
    vmdesc yet must not take it for the section's end (it waits for the vmdesc
    that follows EOF, as the data arrives in pieces)."""
    from qmigx.qemufile import BytesSink, QEMUFile
    from qmigx.stream import Section, StreamWriter
    from qmigx.wire import SectionType

    payload = b"\x12\x34" + b"\x7e\x00\x00\x00\x03" + b"\x00\x00\x00\x00\x00\x05"  # 13 bytes
    desc = ('{"name": "dev0", "instance_id": 0, "vmsd_name": "dev0", "version": 1, '
            '"fields": [{"name": "blob", "type": "buffer", "size": 13}]}')
    out = BytesSink()
    w = StreamWriter(QEMUFile(out))
    w.header()
    w.configuration("pc-i440fx-7.2")
    w.section(SectionType.SECTION_FULL, Section(3, "dev0", 0, 1), payload)
    w.eof()
    w.vmdesc(('{"page_size": 4096, "devices": [%s]}' % desc).encode())
    w.f.flush()
    data = bytes(out.data)
    for step in (1, 5, 17, len(data)):
        p = StreamParser()
        got = []
        for i in range(0, len(data), step):
            p.feed(data[i : i + step])
            got += [e.payload for e in p.events() if isinstance(e, SectionData)]
        p.feed_eof()
        got += [e.payload for e in p.events() if isinstance(e, SectionData)]
        assert got == [payload], step
