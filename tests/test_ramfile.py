"""RAM records written to files (qmigx.tools.ramfile) and its page-writer kernel.

The oracle is qmigx's RAM loader (RamLoader), which the stream tests check
against QEMU: whatever a stream leaves in memory, the files must hold, for
every record kind and order: pages sent twice, XBZRLE deltas on earlier
pages, ZERO records over data, fill bytes, compressed pages, blocks cut
into several regions, mapped twice, or not at all.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import xbzrle
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import RamStreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamLoader, RamWriter, compress_page
from qmigx.stream import RamBlockInfo, RamPages, RamSetup, Section, StreamWriter
from qmigx.stream.reader import StreamReader
from qmigx.tools.ramfile import RamFileSink, Region
from qmigx.wire import SectionType

PS = 4096
TWINS = [load_compiled("pagewrite"), load_reference("pagewrite")]


# --- the kernel and its twin ----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 31)), max_size=40))
def test_both_page_writers_write_the_same_bytes_with_the_same_calls(tmp_path_factory, moves):
    rng = np.random.default_rng(len(moves))
    data = rng.integers(0, 256, 16 * PS + 7, dtype=np.uint8).tobytes()
    pos = np.array([m[0] * PS + (m[0] % 3) for m in moves], np.int64)  # unaligned sources
    out = np.array([m[1] * PS for m in moves], np.int64)
    results = []
    for twin in TWINS:
        path = tmp_path_factory.mktemp("pw") / "out"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            calls = twin.write_pages(fd, data, pos, out, PS)
        finally:
            os.close(fd)
        results.append((calls, path.read_bytes()))
    assert results[0] == results[1]
    expected = bytearray(max(out, default=-PS) + PS)
    for p, o in zip(pos, out):  # in order: the last write of a page wins
        expected[o : o + PS] = data[p : p + PS]
    assert results[0][1] == bytes(expected)


def test_consecutive_pages_go_out_in_one_call(tmp_path):
    data = bytes(range(256)) * 16 * 2048  # 2048 pages
    pos = np.arange(2048, dtype=np.int64) * PS
    for twin in TWINS:
        fd = os.open(tmp_path / twin.__name__, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            assert twin.write_pages(fd, data, pos, pos.copy(), PS) == 2  # 1024 iovecs a call
            gaps = pos.copy()
            gaps[1000:] += PS
            assert twin.write_pages(fd, data, pos, gaps, PS) == 3
        finally:
            os.close(fd)


@pytest.mark.parametrize("twin", TWINS, ids=["cython", "python"])
def test_a_page_outside_the_buffer_is_refused_before_writing(tmp_path, twin):
    fd = os.open(tmp_path / "o", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ValueError, match="outside the buffer"):
            twin.write_pages(fd, bytes(2 * PS), np.array([0, PS + 1], np.int64),
                             np.array([0, PS], np.int64), PS)
        assert os.fstat(fd).st_size == 0
        with pytest.raises(OSError):
            twin.write_pages(-1, bytes(PS), np.array([0], np.int64), np.array([0], np.int64), PS)
    finally:
        os.close(fd)


# --- the sink, against the loader ------------------------------------------------------

BLOCKS = [RamBlockInfo("pc.ram", 64 * PS), RamBlockInfo("pc.rom", 8 * PS)]


def _page(rng, kind="random"):
    if kind == "zero":
        return bytes(PS)
    return rng.integers(0, 256, PS, dtype=np.uint8).tobytes()


def messy_stream(seed: int) -> bytes:
    """Three rounds over two blocks with every record kind, in a random order."""
    rng = np.random.default_rng(seed)
    shuffle = random.Random(seed)
    out = bytearray()
    f = QEMUFile(out.extend)
    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2", [])
    sec = Section(2, "ram", 0, 4)
    w.section_header(SectionType.SECTION_START, sec)
    ram.setup(BLOCKS)
    ram.eos()
    w.footer(sec)
    current = {b.idstr: np.zeros(b.used_length, np.uint8) for b in BLOCKS}
    for rnd in range(3):
        w.section_header(SectionType.SECTION_PART if rnd < 2 else SectionType.SECTION_END, sec)
        todo = [(b.idstr, o) for b in BLOCKS for o in range(0, b.used_length, PS)]
        shuffle.shuffle(todo)
        todo += todo[: len(todo) // 8]  # some pages twice in one section
        for name, off in todo[: len(todo) * (3 - rnd) // 3]:
            mem = current[name]
            old = mem[off : off + PS].copy()
            choice = shuffle.choice(["page", "zero", "fill", "xbzrle", "compress", "page"])
            if choice == "zero":
                mem[off : off + PS] = 0
                ram.zero(name, off)
            elif choice == "fill":
                mem[off : off + PS] = 0x5A
                ram.zero(name, off, 0x5A)
            elif choice == "compress":
                mem[off : off + PS] = np.frombuffer(_page(rng), np.uint8)
                ram.compressed(name, off, compress_page(mem[off : off + PS].tobytes()))
            elif choice == "xbzrle":
                new = old.copy()
                new[rng.integers(0, PS, 5)] ^= 0xFF
                delta = np.empty(PS, np.uint8)
                n = xbzrle.encode_buffer(old, new, delta)
                if n <= 0:
                    continue
                mem[off : off + PS] = new
                ram.xbzrle(name, off, delta[:n])
            else:
                mem[off : off + PS] = np.frombuffer(_page(rng), np.uint8)
                ram.page(name, off, mem[off : off + PS])
        ram.eos()
        w.footer(sec)
    w.eof()
    f.flush()
    return bytes(out)


def _loaded(stream: bytes) -> dict:
    loader = RamLoader(None)
    for ev in StreamReader(stream, vmdesc=None).events():
        if isinstance(ev, RamSetup):
            loader.on_setup(ev)
        elif isinstance(ev, RamPages):
            loader.on_pages(ev)
    return {b.idstr: bytes(b.memory) for b in loader.blocks}


def _sink(stream: bytes, regions: dict, tmp_path) -> None:
    with RamFileSink(regions, scratch_dir=str(tmp_path)) as sink:
        for ev in StreamReader(stream, vmdesc=None).events():
            if isinstance(ev, RamSetup):
                sink.on_setup(ev)
            elif isinstance(ev, RamPages):
                sink.on_pages(ev)


@pytest.mark.parametrize("seed", range(4))
def test_one_file_per_block_holds_what_a_destination_loads(tmp_path, seed):
    stream = messy_stream(seed)
    want = _loaded(stream)
    fds = {}
    try:
        for b in BLOCKS:
            fds[b.idstr] = os.open(tmp_path / b.idstr, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fds[b.idstr], b.used_length)
        _sink(stream, {k: [Region(0, BLOCKS[i].used_length, fd, 0)]
                       for i, (k, fd) in enumerate(fds.items())}, tmp_path)
    finally:
        for fd in fds.values():
            os.close(fd)
    for b in BLOCKS:
        assert (tmp_path / b.idstr).read_bytes() == want[b.idstr]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("qmigx-scratch")]


def test_split_twice_mapped_and_unmapped_stretches(tmp_path):
    """pc.ram in two pieces with a gap, pc.rom both at its place and at the end; the gap and
    the unmapped tail still serve XBZRLE deltas (via the scratch file)."""
    stream = messy_stream(11)
    want = _loaded(stream)
    size = 100 * PS
    fd = os.open(tmp_path / "layout", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        regions = {
            "pc.ram": [Region(0, 10 * PS, fd, 7), Region(20 * PS, 30 * PS, fd, 10 * PS + 7)],
            "pc.rom": [Region(0, 8 * PS, fd, 60 * PS), Region(4 * PS, 4 * PS, fd, 90 * PS)],
        }
        _sink(stream, regions, tmp_path)
    finally:
        os.close(fd)
    got = (tmp_path / "layout").read_bytes()
    ram, rom = want["pc.ram"], want["pc.rom"]
    assert got[7 : 7 + 10 * PS] == ram[: 10 * PS]
    assert got[10 * PS + 7 : 40 * PS + 7] == ram[20 * PS : 50 * PS]
    assert got[60 * PS : 68 * PS] == rom
    assert got[90 * PS : 94 * PS] == rom[4 * PS :]
    assert got[40 * PS + 7 : 60 * PS] == bytes(20 * PS - 7)  # nothing else written


def test_zero_records_leave_holes(tmp_path):
    stream = bytearray()
    f = QEMUFile(stream.extend)
    w, ram = StreamWriter(f), RamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2", [])
    sec = Section(2, "ram", 0, 4)
    w.section_header(SectionType.SECTION_START, sec)
    ram.setup([RamBlockInfo("pc.ram", 1024 * PS)])
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_END, sec)
    ram.zeros("pc.ram", np.arange(0, 1024 * PS, PS, dtype=np.uint64))
    ram.page("pc.ram", 512 * PS, b"\x01" * PS)
    ram.eos()
    w.footer(sec)
    w.eof()
    f.flush()
    fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 1024 * PS)
        _sink(bytes(stream), {"pc.ram": [Region(0, 1024 * PS, fd, 0)]}, tmp_path)
        assert os.fstat(fd).st_blocks * 512 <= 16 * PS
        assert os.pread(fd, PS, 512 * PS) == b"\x01" * PS
    finally:
        os.close(fd)


def test_a_bad_xbzrle_delta_names_its_record(tmp_path):
    stream = bytearray(messy_stream(2))
    # find an XBZRLE record (flag 0x40 in a page header) and corrupt its delta
    loader_err = None
    for i in range(len(stream) - 12):
        if stream[i + 7] & 0x40 and stream[i + 7] & 0x20 and stream[i + 8] == 1:
            length = int.from_bytes(stream[i + 9 : i + 11], "big")
            if 0 < length < 64:
                stream[i + 11 : i + 11 + length] = b"\xff" * length
                try:
                    _loaded(bytes(stream))
                except RamStreamError as exc:
                    loader_err = exc
                    break
                stream = bytearray(messy_stream(2))
    assert loader_err is not None
    fd = os.open(tmp_path / "r", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(RamStreamError) as exc:
            _sink(bytes(stream), {"pc.ram": [Region(0, 64 * PS, fd, 0)]}, tmp_path)
    finally:
        os.close(fd)
    assert exc.value.offset == loader_err.offset and exc.value.field == "xbzrle"
