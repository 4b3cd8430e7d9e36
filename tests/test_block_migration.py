"""Block migration: the ``block`` section's grammar, its handlers, the tools and the CLI.

Unit tests write streams with :class:`BlockSaveHandler` through a
QEMUFile and read them back with the parser and
:class:`BlockLoadHandler`; the expected image is always the source file
as the test itself wrote it (or as QEMU left it).

Interop tests with a real QEMU 7.2 (marked ``qemu``) migrate a
virtio-blk raw disk both ways while it is written: by QEMU's own
``qemu-io`` (HMP) on a QEMU source, by a separate writer process on a
qmigx source. Each write is made once the chunk it lands in has reached
the destination, so only the dirty phase can deliver it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qmigx import MigrationDestination, MigrationSource, MigrationStatus, RAMBlock, RAMBlockList
from qmigx import block as block_mod
from qmigx._backend import load_compiled, load_reference
from qmigx.block import BlockHandler, BlockLoadHandler, BlockRecord, BlockSaveHandler, parse_drive
from qmigx.block_image import ZERO_DIGEST
from qmigx.control import Capabilities, Parameters
from qmigx.errors import BlockStreamError, ParameterError, TruncatedStreamError
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.savevm import SaveVMRegistry, Section
from qmigx.stream import SectionRecord, StreamParser, StreamWriter
from qmigx.wire import BlockFlag, SectionType

from qemu_support.guest import build_guest
from qemu_support.harness import Qemu, QemuError, save_stream
from qemu_support.disks import chunk_arrived, run_writer, wait_until
from qemu_support.live import LockedGuest, QmigxIncoming, Uris, qmigx_env, qmigx_send_argv

MIB = 1 << 20
SEC = Section(1, "block", 0, 1)
REPO = Path(__file__).resolve().parents[1]


def make_image(path: Path, size: int, *, seed: int = 1, zero_chunks=()) -> bytes:
    """A raw image of random bytes; the chunks listed are all zero."""
    data = bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    for c in zero_chunks:
        data[c * MIB : (c + 1) * MIB] = bytes(len(data[c * MIB : (c + 1) * MIB]))
    path.write_bytes(data)
    return bytes(data)


def write_stream(handler: BlockSaveHandler, *, rate: int = 1, between=None,
                 max_rounds: int = 1000) -> bytes:
    """A stream of one ``block`` section: START, PARTs until nothing is pending, END.

    ``rate`` is the per-iteration byte budget (1: one chunk per PART);
    ``between(i)`` runs after PART ``i``.
    """
    sink = BytesSink()
    f = QEMUFile(sink)
    w = StreamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2")
    w.section_header(SectionType.SECTION_START, SEC)
    handler.save_setup(f)
    w.footer(SEC)
    f.rate_limit_max = rate
    for i in range(max_rounds):
        if not sum(handler.save_pending()):
            break
        w.section_header(SectionType.SECTION_PART, SEC)
        handler.save_live_iterate(f)
        w.footer(SEC)
        f.rate_limit_reset()
        if between is not None:
            between(i)
    w.section_header(SectionType.SECTION_END, SEC)
    handler.save_complete_precopy(f)
    w.footer(SEC)
    handler.save_cleanup()
    w.eof()
    f.flush()
    return bytes(sink.data)


def sections(data: bytes, registry=None) -> list[tuple[str, list[BlockRecord]]]:
    """Each block section's type and records, as the parser delimits them."""
    p = StreamParser(registry=registry)
    p.feed(data)
    p.feed_eof()
    out: list = []
    for ev in p.events():
        if type(ev).__name__ == "SectionStart" and ev.section.idstr == "block":
            out.append((ev.type.name, []))
        elif isinstance(ev, SectionRecord):
            out[-1][1].append(ev.record)
    return out


def load(data: bytes, handler: BlockLoadHandler) -> None:
    """Apply a stream's block records as the destination driver does."""
    reg = SaveVMRegistry([handler])
    p = StreamParser(registry=reg)
    p.feed(data)
    p.feed_eof()
    ok = False
    try:
        handler.load_setup()
        for ev in p.events():
            if isinstance(ev, SectionRecord):
                handler.load_record(ev.record, ev.section)
        ok = True
    finally:
        handler.load_cleanup(ok)


def kinds(records: list[BlockRecord]) -> list:
    """Records as short tuples: ('P', pct), ('D', sector), ('Z', sector), ('EOS',)."""
    out = []
    for r in records:
        if r.flags & BlockFlag.DEVICE_BLOCK:
            out.append(("Z" if r.is_zero else "D", r.sector))
        elif r.flags & BlockFlag.PROGRESS:
            out.append(("P", r.sector))
        else:
            out.append(("EOS",))
    return out


# -- the grammar ---------------------------------------------------------------------------


def _qemu_example() -> bytes:
    """The records QEMU 7.2 sent for a 3 MiB + 3 sectors disk ``d0`` with zero-blocks (spec)."""
    start = bytes.fromhex("01 00000001 05") + b"block" + bytes.fromhex("00000000 00000001")
    body = bytes.fromhex("0000000000000002 7e00000001")
    part = (bytes.fromhex("02 00000001") + bytes.fromhex("0000000000000004")
            + bytes.fromhex("0000000000000001 02") + b"d0" + bytes(range(256)) * 4096
            + bytes.fromhex("0000000000100009 02") + b"d0"
            + bytes.fromhex("0000000000000002 7e00000001"))
    end = (bytes.fromhex("03 00000001") + bytes.fromhex("000000000000c804")
           + bytes.fromhex("0000000000000002 7e00000001"))
    return b"QEVM\0\0\0\3" + start + body + part + end + b"\0"


def test_qemu_records_decode_as_qemu_sent_them():
    secs = sections(_qemu_example())
    assert [t for t, _ in secs] == ["SECTION_START", "SECTION_PART", "SECTION_END"]
    assert kinds(secs[0][1]) == [("EOS",)]
    part = secs[1][1]
    assert kinds(part) == [("P", 0), ("D", 0), ("Z", 2048), ("EOS",)]
    assert part[1].device == "d0" and bytes(part[1].data[:4]) == b"\0\1\2\3"
    assert len(part[1].data) == MIB and part[2].data is None
    assert kinds(secs[2][1]) == [("P", 100), ("EOS",)]
    h = BlockHandler()
    assert [h.describe(r) for r in part[:3]] == [
        {"progress": 0}, {"device": "d0", "sector": 0, "zero": False},
        {"device": "d0", "sector": 2048, "zero": True}]


def _one_record(payload: bytes, version: int = 1) -> bytes:
    """A stream whose block START holds ``payload`` (then an EOS and the footer)."""
    start = bytes.fromhex("01 00000001 05") + b"block" + struct.pack(">II", 0, version)
    return (b"QEVM\0\0\0\3" + start + payload + bytes.fromhex("0000000000000002 7e00000001")
            + b"\0")


@pytest.mark.parametrize("flags", [0x00, 0x08, 0x10, 0x100, 0x0A | 0x40])
def test_unknown_block_flags_are_a_typed_error_naming_the_record(flags):
    data = _one_record(struct.pack(">Q", (7 << 9) | flags))
    with pytest.raises(BlockStreamError) as ei:
        sections(data)
    e = ei.value
    assert "Unknown block migration flags" in e.message
    assert e.offset == 8 + 19 and e.section == "block (1)" and e.field == "flags"


def test_a_newer_block_section_version_is_refused():
    with pytest.raises(BlockStreamError) as ei:
        sections(_one_record(b"", version=2))
    assert "unsupported version 2" in ei.value.message and ei.value.field == "version_id"


def test_a_truncated_chunk_names_its_record_and_section():
    rec = struct.pack(">QB", (2048 << 9) | 1, 2) + b"d0" + bytes(1000)
    data = _one_record(b"")[:-14] + rec  # the stream stops inside the chunk's data
    with pytest.raises(TruncatedStreamError) as ei:
        sections(data)
    assert ei.value.offset == 8 + 19 and ei.value.section == "block (1)"


def test_eos_set_on_a_progress_record_ends_the_payload_as_in_qemu():
    data = _one_record(struct.pack(">Q", (50 << 9) | 0x06))
    data = data.replace(bytes.fromhex("0000000000000002 7e"), bytes.fromhex("7e"), 1)
    secs = sections(data)
    assert kinds(secs[0][1]) == [("P", 50)]


# -- drives --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,why", [
    ("d0", "expected NAME=PATH"), ("=x", "expected NAME=PATH"), ("d0=", "expected NAME=PATH"),
    ("0disk=x", "QEMU's rule"), ("d 0=x", "QEMU's rule"), ("a" * 256 + "=x", "longer than 255"),
])
def test_bad_drive_arguments_are_one_line_parameter_errors(text, why):
    with pytest.raises(ParameterError) as ei:
        parse_drive(text)
    assert why in str(ei.value) and "\n" not in str(ei.value)


def test_drives_must_exist_and_be_named_once(tmp_path):
    img = tmp_path / "a.img"
    make_image(img, MIB)
    with pytest.raises(ParameterError, match="No such file"):
        BlockSaveHandler([f"d0={tmp_path}/missing.img"])
    with pytest.raises(ParameterError, match="given twice"):
        BlockLoadHandler([f"d0={img}", f"d0={img}"])
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(ParameterError, match="empty"):
        BlockSaveHandler({"d0": str(tmp_path / "empty.img")})
    with pytest.raises(ParameterError, match="not a regular file"):
        BlockLoadHandler({"d0": str(tmp_path)})


# -- sending and receiving ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * MIB + 3 * 512, 2 * MIB, 5000, MIB - 512])
@pytest.mark.parametrize("zero_blocks", [False, True])
def test_round_trip_gives_a_byte_identical_image(tmp_path, size, zero_blocks):
    src = tmp_path / "src.img"
    want = make_image(src, size, zero_chunks=[1])
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\xff" * size)
    data = write_stream(BlockSaveHandler({"d0": str(src)}, zero_blocks=zero_blocks))
    sink = BlockLoadHandler({"d0": str(dst)})
    load(data, sink)
    assert dst.read_bytes() == want
    nchunks = -(-size // MIB)
    zeros = [c for c in range(nchunks) if not any(want[c * MIB : (c + 1) * MIB])]
    assert sink.zero_chunks == len(zeros)
    recs = [r for _, rs in sections(data) for r in rs]
    sent_zero = [r.sector // 2048 for r in recs if r.flags & BlockFlag.DEVICE_BLOCK and r.is_zero]
    assert sent_zero == (zeros if zero_blocks else [])


def test_qemus_record_sequence_for_a_partial_last_chunk(tmp_path):
    """START is EOS alone; PROGRESS before each bulk chunk; END: PROGRESS 100 and EOS."""
    src = tmp_path / "src.img"
    make_image(src, 3 * MIB + 3 * 512, zero_chunks=[1])
    secs = sections(write_stream(BlockSaveHandler({"d0": str(src)}, zero_blocks=True)))
    assert [(t, kinds(r)) for t, r in secs] == [
        ("SECTION_START", [("EOS",)]),
        ("SECTION_PART", [("P", 0), ("D", 0), ("EOS",)]),
        ("SECTION_PART", [("P", 33), ("Z", 2048), ("EOS",)]),
        ("SECTION_PART", [("P", 66), ("D", 4096), ("EOS",)]),
        ("SECTION_PART", [("P", 99), ("D", 6144), ("EOS",)]),
        ("SECTION_PART", [("EOS",)]),  # the bulk phase ends; nothing is dirty
        ("SECTION_END", [("P", 100), ("EOS",)]),
    ]


def test_without_disks_the_section_still_runs_as_in_qemu():
    secs = sections(write_stream(BlockSaveHandler([])))
    assert [(t, kinds(r)) for t, r in secs] == [
        ("SECTION_START", [("EOS",)]),
        ("SECTION_PART", [("P", 100), ("EOS",)]),
        ("SECTION_END", [("P", 100), ("EOS",)]),
    ]


def test_an_unlimited_iteration_sends_every_disk_in_one_part(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 2 * MIB, seed=1)
    make_image(b, MIB, seed=2)
    h = BlockSaveHandler({"a": str(a), "b": str(b)})
    secs = sections(write_stream(h, rate=0))
    part = secs[1][1]
    assert [(r.device, r.sector) for r in part if r.flags & BlockFlag.DEVICE_BLOCK] == [
        ("a", 0), ("a", 2048), ("b", 0)]
    # QEMU counts a finished disk up to its last chunk's start: b's chunk moves nothing
    assert kinds(part) == [("P", 0), ("D", 0), ("P", 33), ("D", 2048), ("D", 0), ("EOS",)]


def test_writes_after_a_chunk_was_sent_are_sent_again(tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    make_image(src, 4 * MIB)
    h = BlockSaveHandler({"d0": str(src)}, rescan_interval=0)

    def writer(i):
        if i == 1:  # chunk 0 and 1 were sent: change chunk 0, twice in a row
            with open(src, "r+b") as f:
                f.seek(100)
                f.write(b"first")
                f.seek(100)
                f.write(b"again")

    data = write_stream(h, between=writer)
    want = src.read_bytes()
    assert want[100:105] == b"again"
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(4 * MIB))
    load(data, BlockLoadHandler({"d0": str(dst)}))
    assert dst.read_bytes() == want
    recs = [(t, kinds(r)) for t, r in sections(data)]
    resent = [t for t, k in recs if ("D", 0) in k]
    # bulk, then once more: in the dirty phase, or at the end when the
    # rescan that finds it waits for a slow earlier scan (a loaded machine)
    assert resent[0] == "SECTION_PART" and len(resent) == 2, recs
    assert resent[1] in ("SECTION_PART", "SECTION_END"), recs
    assert h.dirty_found == 1


def test_a_write_in_the_last_moment_goes_in_the_end_section(tmp_path):
    src = tmp_path / "src.img"
    make_image(src, 2 * MIB)
    h = BlockSaveHandler({"d0": str(src)}, rescan_interval=3600)
    sink = BytesSink()
    f = QEMUFile(sink)
    h.save_setup(f)
    h.save_live_iterate(f)  # no rate limit: the whole bulk phase
    h.save_live_iterate(f)
    assert h.bulk_completed
    with open(src, "r+b") as g:
        g.seek(MIB + 7)
        g.write(b"late")
    assert h.save_pending() == (0, 0)  # within rescan_interval: not rescanned yet
    f.flush()
    before = len(sink.data)
    h.save_complete_precopy(f)
    f.flush()
    end = _records_of(bytes(sink.data[before:]))
    assert kinds(end) == [("D", 2048), ("P", 100), ("EOS",)]
    assert bytes(end[0].data[7:11]) == b"late"


def _records_of(payload: bytes) -> list[BlockRecord]:
    """Records of raw block payloads (no section headers), in order."""
    from qmigx.qemufile import Cursor

    cur = Cursor(payload)
    out = []
    while cur.remaining():
        rec, _ = BlockHandler().read_record(cur, SEC)
        out.append(rec)
    return out


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    """With a trustworthy signature, rescans are skipped until the file changes."""
    monkeypatch.setattr(block_mod, "RACY_SECONDS", 0.0)
    src = tmp_path / "src.img"
    make_image(src, 3 * MIB)
    h = BlockSaveHandler({"d0": str(src)}, rescan_interval=0)
    f = QEMUFile(BytesSink())
    f.rate_limit_max = 1
    h.save_setup(f)
    for _ in range(5):
        h.save_live_iterate(f)
        h.save_pending()
    assert h.rescans == 0
    with open(src, "r+b") as g:
        g.write(b"x")
    assert h.save_pending() == (MIB, 0)
    assert h.rescans == 1 and h.dirty_found == 1
    # a write that puts the mtime back still moves the ctime
    st = src.stat()
    with open(src, "r+b") as g:
        g.seek(2 * MIB)
        g.write(b"y")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    h.save_pending()
    h.save_complete_precopy(f)
    assert h.rescans >= 2 and h.dirty_found == 2
    h.save_cleanup()


def test_trust_mtime_off_rescans_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(block_mod, "RACY_SECONDS", 0.0)
    src = tmp_path / "src.img"
    make_image(src, 2 * MIB)
    h = BlockSaveHandler({"d0": str(src)}, rescan_interval=0, trust_mtime=False)
    f = QEMUFile(BytesSink())
    h.save_setup(f)
    h.save_live_iterate(f)
    h.save_pending()
    time.sleep(0.05)  # a rescan waits four times its own duration before the next
    h.save_pending()
    assert h.rescans == 2 and h.dirty_found == 0
    h.save_cleanup()


def test_disk_figures_are_qemus(tmp_path):
    """transferred counts the chunks whose read started, minus the last; gone after END."""
    src = tmp_path / "src.img"
    make_image(src, 3 * MIB)
    h = BlockSaveHandler({"d0": str(src)})
    f = QEMUFile(BytesSink())
    f.rate_limit_max = 1
    assert h.disk_info() is None
    h.save_setup(f)
    seen = [h.disk_info()]
    for _ in range(4):
        h.save_live_iterate(f)
        seen.append(h.disk_info())
    assert [d["transferred"] for d in seen] == [0, 0, MIB, 2 * MIB, 2 * MIB]
    assert all(d["total"] == 3 * MIB and d["remaining"] == 3 * MIB - d["transferred"]
               for d in seen)
    h.save_complete_precopy(f)
    assert h.disk_info() is None


# -- receiving: bad records never write outside the image ---------------------------------------


def _chunk_record(name: bytes, sector: int, *, zero: bool = False, fill: int = 0x11) -> bytes:
    flags = BlockFlag.DEVICE_BLOCK | (BlockFlag.ZERO_BLOCK if zero else 0)
    return (struct.pack(">QB", (sector << 9) | flags, len(name)) + name
            + (b"" if zero else bytes([fill]) * MIB))


def test_an_unknown_device_fails_with_qemus_text(tmp_path):
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\x77" * MIB)
    data = _one_record(_chunk_record(b"d0", 0) + _chunk_record(b"nope", 0))
    with pytest.raises(BlockStreamError) as ei:
        load(data, BlockLoadHandler({"d0": str(dst)}))
    e = ei.value
    assert e.message == "Error unknown block device nope"
    assert e.offset == 8 + 19 + 11 + MIB and e.section == "block (1)" and e.field == "device"
    assert dst.read_bytes() == b"\x11" * MIB  # the first record, for d0, was applied


@pytest.mark.parametrize("size", [MIB, 3 * MIB + 1536, 5000])
def test_a_chunk_starting_past_the_end_is_refused_and_nothing_is_written(tmp_path, size):
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\x77" * size)
    end_sector = -(-size // 512)
    for sector in (end_sector, end_sector + 2048, (1 << 54) - 1):
        data = _one_record(_chunk_record(b"d0", sector))
        with pytest.raises(BlockStreamError) as ei:
            load(data, BlockLoadHandler({"d0": str(dst)}))
        assert ei.value.field == "sector" and "past its end" in ei.value.message
        assert ei.value.offset == 8 + 19
    assert dst.read_bytes() == b"\x77" * size


def test_a_tail_chunk_writes_only_inside_the_image(tmp_path):
    size = 3 * MIB + 1536
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\x77" * size)
    last = (size - 1536) // 512  # the last sectors, 3 of them inside
    load(_one_record(_chunk_record(b"d0", last, fill=0x42)), BlockLoadHandler({"d0": str(dst)}))
    got = dst.read_bytes()
    assert len(got) == size and got[-1536:] == b"\x42" * 1536 and got[:-1536] == b"\x77" * (size - 1536)
    # an unaligned record near the end, and a zero one: clipped the same way
    load(_one_record(_chunk_record(b"d0", end := (size // 512) - 1, zero=True)),
         BlockLoadHandler({"d0": str(dst)}))
    got = dst.read_bytes()
    assert len(got) == size and got[end * 512 :] == bytes(512) and got[-1024:-512] == b"\x42" * 512


def test_zero_records_zero_the_image(tmp_path):
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\x77" * 2 * MIB)
    load(_one_record(_chunk_record(b"d0", 2048, zero=True) + _chunk_record(b"d0", 0, fill=0)),
         BlockLoadHandler({"d0": str(dst)}))
    assert dst.read_bytes() == bytes(2 * MIB)


# -- the digest kernel --------------------------------------------------------------------------


def test_compiled_and_reference_digests_agree_and_see_every_single_word_change():
    comp, ref = load_compiled("chunkhash"), load_reference("chunkhash")
    rng = np.random.default_rng(5)
    buf = bytearray(rng.integers(0, 256, 3 * MIB, dtype=np.uint8).tobytes())
    buf[MIB : 2 * MIB] = bytes(MIB)
    out = [(np.zeros(3, np.uint64), np.zeros(3, np.uint8)) for _ in range(2)]
    comp.chunk_digests(buf, MIB, *out[0])
    ref.chunk_digests(buf, MIB, *out[1])
    assert (out[0][0] == out[1][0]).all() and list(out[0][1]) == list(out[1][1]) == [0, 1, 0]
    assert int(out[0][0][1]) == ZERO_DIGEST
    d, z = np.zeros(1, np.uint64), np.zeros(1, np.uint8)
    base = bytes(buf[:MIB])
    comp.chunk_digests(base, MIB, d, z)
    first = int(d[0])
    seen = {first}
    for pos, bit in [(0, 0), (8, 63), (MIB - 1, 7), (4096, 31)]:
        changed = bytearray(base)
        changed[pos] ^= 1 << (bit % 8)
        comp.chunk_digests(changed, MIB, d, z)
        seen.add(int(d[0]))
    swapped = bytearray(base)
    swapped[0:8], swapped[8:16] = base[8:16], base[0:8]
    comp.chunk_digests(swapped, MIB, d, z)
    seen.add(int(d[0]))
    assert len(seen) == 6
    with pytest.raises(ParameterError):
        comp.chunk_digests(bytes(100), MIB, d, z)


# -- the engine, in one process --------------------------------------------------------------------


def test_engine_migrates_a_disk_while_its_guest_writes_it(tmp_path):
    size = 6 * MIB + 4096
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, size, zero_chunks=[2, 3])
    dst.write_bytes(b"\xee" * size)
    caps = Capabilities()
    caps.set_many([("block", True), ("zero-blocks", True)])
    params = Parameters(capabilities=caps)
    params.set({"max-bandwidth": 8 << 20})  # about a second of bulk phase
    sender = BlockSaveHandler({"d0": str(src)}, capabilities=caps, rescan_interval=0)
    receiver = BlockLoadHandler({"d0": str(dst)})
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)])
    guest = LockedGuest()  # completion stops its writes, as QEMU stops its vCPUs
    writes = []
    d = MigrationDestination(handlers=[receiver])
    d.incoming(f"unix:{tmp_path}/m.sock")
    s = MigrationSource(blocks, guest=guest, capabilities=caps, parameters=params,
                        handlers=[sender])
    disk_seen = []

    def vcpu():
        fd = os.open(src, os.O_WRONLY)
        try:
            while guest.running:
                q = s.query()
                if "disk" in q:
                    disk_seen.append(q["disk"])
                    if q["disk"]["transferred"] >= MIB:  # chunk 0 went: dirty it (and others)
                        n = len(writes)
                        if guest.write(lambda: os.pwrite(fd, bytes([n % 251 + 1]) * 4096,
                                                         (4096 * 97 * n) % size)):
                            writes.append(n)
                time.sleep(0.01)
        finally:
            os.close(fd)

    t = threading.Thread(target=vcpu)
    s.migrate(f"unix:{tmp_path}/m.sock")
    t.start()
    try:
        assert s.wait(60) == MigrationStatus.COMPLETED, s.query()
    finally:
        guest.stop()
        t.join()
    assert d.wait(60) == MigrationStatus.COMPLETED, d.query()
    assert "disk" not in s.query()
    assert disk_seen and all(x["total"] == size for x in disk_seen)
    assert len(writes) >= 2 and sender.dirty_found >= 1
    assert dst.read_bytes() == src.read_bytes()
    assert receiver.progress == 100 and sender.zero_chunks >= 1


# -- tools ------------------------------------------------------------------------------------------


@pytest.fixture
def block_stream_file(tmp_path) -> tuple[Path, bytes]:
    src = tmp_path / "src.img"
    want = make_image(src, 2 * MIB + 512, zero_chunks=[1])
    data = write_stream(BlockSaveHandler({"disk0": str(src)}, zero_blocks=True))
    path = tmp_path / "block.mig"
    path.write_bytes(data)
    return path, want


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qmigx", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd or REPO)


def test_analyze_shows_block_records(block_stream_file):
    from qmigx.tools.analyze import analyze_state

    path, _ = block_stream_file
    state = analyze_state(str(path))
    assert state["block (1)"] == [
        {"progress": 0}, {"device": "disk0", "sector": 0, "zero": False},
        {"progress": 49}, {"device": "disk0", "sector": 2048, "zero": True},
        {"progress": 99}, {"device": "disk0", "sector": 4096, "zero": False},
        {"progress": 100}]
    r = _cli("analyze", "-f", path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["block (1)"][3] == {"device": "disk0", "sector": 2048, "zero": True}


def test_verify_parses_every_block_record_and_convert_keeps_them(block_stream_file, tmp_path):
    from qmigx.tools.streams import convert_stream, verify_stream

    path, want = block_stream_file
    summary = verify_stream(str(path))
    # START: EOS; 3 PARTs: PROGRESS, chunk, EOS; a PART: EOS; END: PROGRESS 100, EOS
    assert summary["records"] == 1 + 3 * 3 + 1 + 2
    out = io.BytesIO()
    convert_stream(str(path), out.write, "page")
    assert out.getvalue() == path.read_bytes()
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(len(want)))
    load(out.getvalue(), BlockLoadHandler({"disk0": str(dst)}))
    assert dst.read_bytes() == want
    broken = path.read_bytes()[: -(MIB // 2)]
    (tmp_path / "broken.mig").write_bytes(broken)
    r = _cli("verify", tmp_path / "broken.mig")
    assert r.returncode == 1 and "block (1)" in r.stderr and len(r.stderr.splitlines()) == 1


# -- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("args,why", [
    (["incoming", "unix:/tmp/x.sock", "--drive", "disk0"], "expected NAME=PATH"),
    (["incoming", "unix:/tmp/x.sock", "--drive", "disk0=/nonexistent/img"], "No such file"),
    (["send", "nofile", "unix:/tmp/x.sock", "--drive", "disk0=/x"], "needs --cap block=on"),
    (["send", "nofile", "unix:/tmp/x.sock", "--cap", "block=on", "--drive", "9=/x"], "QEMU's rule"),
])
def test_bad_drive_options_get_one_line(args, why):
    r = _cli(*args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmigx: error: ") and why in lines[0], r.stderr


def _qmp(machine, execute: str, **arguments):
    from qmigx.qmp import Session, dispatch
    from qmigx.qmp.commands import Context

    session = Session()
    session.negotiated = True
    return dispatch({"execute": execute, "arguments": arguments}, Context(machine, session))


def test_qmp_migrate_with_blk_moves_the_disk_and_drops_the_capability_after(tmp_path):
    from qmigx.qmp import Machine

    src_img, dst_img = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src_img, 3 * MIB, zero_chunks=[1])
    dst_img.write_bytes(bytes(3 * MIB))
    src = Machine(ram_bytes=4 << 20, paused=True, drives=[f"disk0={src_img}"])
    dst = Machine(ram_bytes=4 << 20, incoming="defer", drives=[f"disk0={dst_img}"])
    uri = f"unix:{tmp_path}/m.sock"
    assert _qmp(dst, "migrate-incoming", uri=uri) == {"return": {}}
    assert _qmp(src, "migrate-set-capabilities",
                capabilities=[{"capability": "block", "state": True}]) == {"return": {}}
    assert _qmp(src, "migrate", uri=uri, blk=True)["error"]["desc"] == (
        "Command options are incompatible with current migration capabilities")
    _qmp(src, "migrate-set-capabilities", capabilities=[{"capability": "block", "state": False}])
    assert _qmp(src, "migrate", uri=uri, blk=True) == {"return": {}}
    caps = {c["capability"]: c["state"] for c in _qmp(src, "query-migrate-capabilities")["return"]}
    deadline = time.monotonic() + 30
    while (q := _qmp(src, "query-migrate")["return"])["status"] != "completed":
        assert q["status"] in ("setup", "active", "device"), q
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "disk" not in q
    after = {c["capability"]: c["state"] for c in _qmp(src, "query-migrate-capabilities")["return"]}
    assert caps["block"] is True and after["block"] is False
    wait_until(lambda: _qmp(dst, "query-migrate")["return"].get("status") == "completed",
               "the destination to complete")
    assert dst_img.read_bytes() == want


# -- QEMU 7.2 ---------------------------------------------------------------------------------------

needs_qemu = [pytest.mark.qemu]  # gated by tests/conftest.py
DISK = "disk0"  #: the harness's -drive id


def qemu(fn):
    for mark in needs_qemu:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


@pytest.fixture(scope="module")
def guest_kernel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "guest.bin"
    path.write_bytes(build_guest(0xB10C, 64 << 20, dirty=False))
    return path


@pytest.fixture(scope="module")
def disk_stream(tmp_path_factory):
    """A paused QEMU 7.2 VM with a virtio-blk disk, saved (no block section): what send replays.

    No guest kernel: its RAM is then mostly zero pages, so the rate limit
    that keeps the migration going while the disk is written is spent on
    the disk.
    """
    d = tmp_path_factory.mktemp("disk-stream")
    return save_stream(d / "disk.stream", devices=("virtio-blk-pci",), guest=False, workdir=d)


@qemu
@pytest.mark.parametrize("zero_blocks", [False, True], ids=["data", "zero-blocks"])
def test_qemu_source_to_qmigx_incoming_while_qemu_io_writes(tmp_path, uris, guest_kernel,
                                                           zero_blocks):
    size = 3 * MIB + 3 * 512  # QEMU sends any size; its tail chunk's padding must not land
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    before = make_image(src, size, seed=3, zero_chunks=[1])
    dst.write_bytes(b"\xee" * size)
    uri = uris.make("unix")
    with Qemu(ram="64M", kernel=guest_kernel, devices=("virtio-blk-pci",), disk=src,
              workdir=tmp_path, name="src") as vm:
        vm.wait_guest_ready(60)
        with QmigxIncoming(uri, tmp_path, ram_dir=tmp_path / "rd", drives=[(DISK, dst)]) as inc:
            vm.set_capabilities({"block": True, "zero-blocks": zero_blocks})
            vm.set_parameters({"max-bandwidth": 1 << 20})  # seconds of RAM: time to write
            vm.migrate(uri)
            wait_until(chunk_arrived(dst, before), "chunk 0 on the destination")
            during = vm.query_migrate()
            for cmd in ('qemu-io disk0 "write -P 0x5a 0 64k"',
                        f'qemu-io disk0 "write -P 0xa5 {size - 1024} 1k"'):
                assert vm.cmd("human-monitor-command", **{"command-line": cmd}) == ""
            vm.set_parameters({"max-bandwidth": 1 << 30})
            done = vm.wait_migration(60)
            rc, err = inc.wait(60)
        assert rc == 0, err[-3000:]
    final = src.read_bytes()
    assert final[:65536] == b"\x5a" * 65536 and final[-1024:] == b"\xa5" * 1024
    assert dst.read_bytes() == final
    # QEMU's figures: the whole size; "transferred" stops at the last chunk's start
    assert during["disk"]["total"] == size and "disk" not in done
    assert set(during["disk"]) == set(during["ram"])


@qemu
@pytest.mark.parametrize("zero_blocks", [False, True], ids=["data", "zero-blocks"])
def test_qmigx_send_to_qemu_while_a_process_writes(tmp_path, uris, disk_stream, zero_blocks):
    size = 16 * MIB
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    before = make_image(src, size, seed=4, zero_chunks=[2, 9])
    dst.write_bytes(bytes(size))
    uri = uris.make("unix")
    caps = {"block": True, "zero-blocks": zero_blocks}
    info = disk_stream
    with Qemu(machine=info.machine, ram=info.ram, kernel=info.kernel, devices=info.devices,
              disk=dst, paused=True, incoming=True, workdir=tmp_path, name="dst") as vm:
        vm.migrate_incoming(uri)
        argv = qmigx_send_argv(info.stream, uri, caps=caps, drives=[(DISK, src)],
                               params={"max-bandwidth": "4M"})  # about 10 chunks a second
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=qmigx_env(), cwd=REPO) as send:
            try:
                wait_until(chunk_arrived(dst, before), "chunk 0 on the QEMU destination")
                run_writer(src, size - 4096)
                out, err = send.communicate(timeout=120)
            finally:
                send.kill()
        assert send.returncode == 0, err[-3000:]
        vm.wait_migration(60)
        assert vm.status() == "paused"
    final = src.read_bytes()
    assert final[:65536] == b"\x5a" * 65536 and final != before
    assert dst.read_bytes() == final
    resent = int(out.split(" found changed after sending")[0].rsplit(", ", 1)[1])
    assert resent >= 1, out


@qemu
def test_qemu_destination_takes_a_partial_last_chunk_only_as_zero_block(tmp_path, uris,
                                                                        disk_stream):
    """QEMU 7.2 writes a data chunk as a whole MiB, past a disk's end; a zero chunk it clips."""
    size = 3 * MIB + 3 * 512
    src = tmp_path / "src.img"
    want = make_image(src, size, seed=5)
    want = want[: 3 * MIB] + bytes(3 * 512)
    src.write_bytes(want)
    info = disk_stream
    for zero_blocks in (True, False):
        dst = tmp_path / f"dst{int(zero_blocks)}.img"
        dst.write_bytes(b"\xee" * size)
        uri = uris.make("unix")
        with Qemu(machine=info.machine, ram=info.ram, kernel=info.kernel, devices=info.devices,
                  disk=dst, paused=True, incoming=True, workdir=tmp_path,
                  name=f"dst{int(zero_blocks)}") as vm:
            vm.migrate_incoming(uri)
            argv = qmigx_send_argv(info.stream, uri, drives=[(DISK, src)],
                                   caps={"block": True, "zero-blocks": zero_blocks})
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                               env=qmigx_env(), cwd=REPO)
            if zero_blocks:
                assert r.returncode == 0, r.stderr[-3000:]
                vm.wait_migration(60)
                assert dst.read_bytes() == want
            else:
                with pytest.raises(QemuError, match=r"(?s)section id 1\(block\).*Input/output error"):
                    vm.wait_migration(60)


@qemu
def test_qmigx_to_qmigx_while_a_process_writes(tmp_path, uris):
    from qmigx.savevm import vmstate_device
    from qmigx.synthetic import synthetic_blocks, synthetic_devices
    from qmigx.tools.streams import save_stream as save_state

    state = tmp_path / "state.mig"
    with open(state, "wb") as f:
        save_state(f.write, synthetic_blocks(2 << 20, 7),
                   [vmstate_device(*d) for d in synthetic_devices(7)])
    size = 16 * MIB + 512
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    before = make_image(src, size, seed=6, zero_chunks=[4])
    dst.write_bytes(bytes(size))
    uri = uris.make("unix")
    with QmigxIncoming(uri, tmp_path, ram_dir=tmp_path / "rd", drives=[("vda", dst)]) as inc:
        argv = qmigx_send_argv(state, uri, caps={"block": True, "zero-blocks": True},
                               drives=[("vda", src)], params={"max-bandwidth": "4M"})
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=qmigx_env(), cwd=REPO) as send:
            try:
                wait_until(chunk_arrived(dst, before), "chunk 0 on the qmigx destination")
                run_writer(src, 12 * MIB + 100)
                out, err = send.communicate(timeout=120)
            finally:
                send.kill()
        assert send.returncode == 0, err[-3000:]
        rc, ierr = inc.wait(60)
        assert rc == 0, ierr[-3000:]
    final = src.read_bytes()
    assert final[:65536] == b"\x5a" * 65536
    assert dst.read_bytes() == final
    assert int(out.split(" found changed after sending")[0].rsplit(", ", 1)[1]) >= 1, out
