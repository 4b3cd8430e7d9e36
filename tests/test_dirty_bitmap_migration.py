"""Dirty-bitmap migration (the ``dirty-bitmap`` section), without and with QEMU 7.2.

Without QEMU: the bitmap model against a naive per-granule oracle, the
source's bytes against a stored real QEMU 7.2 section (dirty_bitmap_vector.py),
the destination's handling of every kind of bad record (what QEMU treats as
fatal raises a typed error; what QEMU treats as "cancel the bitmaps, keep
loading" drops them with QEMU's message), aliases, the bitmaps file, the
stream tools, and qmigx -> qmigx through the command line.

With QEMU 7.2 (a virtio-blk raw disk, 64 MiB of guest RAM, no guest
kernel): bitmaps QEMU made and dirtied with ``qemu-io`` arrive in
``qmigx incoming --bitmaps`` with exactly the ranges the writes imply;
bitmaps ``qmigx send --bitmaps`` sends show, in a QEMU destination, the
granularity, count and SHA-256 of the same bitmaps made directly in a
second QEMU; and ``block-bitmap-mapping`` both ways, including a bitmap
dropped for want of a mapping. Expected bitmaps always come from the
writes (qemu_support.bitmaps.expected_bitmaps) or from QEMU, never from qmigx.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

import dirty_bitmap_vector as vector
from dirty_bitmap_helpers import (COMPLETE, EOS, MAPPING_OUT, SECTION, STEPS, bitmap_set, bits_rec,
                                  incoming_cli, load, qemu_to_qmigx, qemu_vm, qmigx_to_qemu, records,
                                  roundtrip, run_cli, save_base_stream, send_cli, sent, start_rec,
                                  want_bitmaps, words)
from qemu_support.bitmaps import expected_bitmaps, expected_ranges
from qemu_support.live import Uris
from qmigx.block_bitmaps import BlockDirtyBitmap, DirtyBitmapSet
from qmigx.block_dirty_bitmap import DirtyBitmapDestination, DirtyBitmapSource
from qmigx.control import Capabilities, Parameters
from qmigx.errors import BitmapError, DirtyBitmapError, ParameterError, StreamError
from qmigx.qemufile import BytesSink, NeedData, QEMUFile
from qmigx.savevm import Section

DATA = Path(__file__).resolve().parent / "data"


# --- the bitmap model -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_ranges_mark_exactly_the_granules_they_touch(seed):
    rnd = random.Random(seed)
    gran = 512 << rnd.randrange(8)
    size = rnd.randrange(0, 24 << 20) // 512 * 512
    writes = []
    for _ in range(rnd.randrange(12)):
        if not size:
            break
        off = rnd.randrange(size)
        writes.append([off, rnd.randrange(min(size - off, rnd.choice([700, 1 << 16, 1 << 24])) + 1)])
    bm = BlockDirtyBitmap("b", gran, size)
    bm.set_dirty(writes[::2])
    bm.set_dirty(writes[1::2])
    want = expected_ranges(writes, gran, size)
    assert bm.dirty_ranges() == want
    assert bm.dirty_granules() == sum(-(-n // gran) for _, n in want)


def test_sha256_is_qemus_for_the_vector():
    """QEMU's x-debug-block-dirty-bitmap-sha256 of bitmaps rebuilt from the writes alone."""
    v = vector.load()
    sizes = {dev: size for dev, _, size in v["disks"]}
    for dev, bitmaps in expected_bitmaps(v["steps"], sizes).items():
        for name, spec in bitmaps.items():
            bm = BlockDirtyBitmap.from_json(name, spec)
            q = v["query"][dev][name]
            assert bm.sha256() == q["sha256"], (dev, name)
            assert bm.dirty_granules() * bm.granularity == q["count"], (dev, name)


def test_runs_do_not_bridge_chunks_that_were_never_written():
    bm = BlockDirtyBitmap("b", 512, 512 * 8192 * 4)
    bm.set_dirty([[512 * 8191, 512], [512 * 8192 * 3, 1024]])  # last granule of chunk 0, first of chunk 3
    assert bm.chunk_indices() == [0, 3]
    assert bm.dirty_ranges() == [[512 * 8191, 512], [512 * 8192 * 3, 1024]]


def test_bits_past_the_end_never_count():
    bm = BlockDirtyBitmap("b", 512, 512 * 70)
    bm.write_words(0, np.array([0, 0xFFFF_FFFF_FFFF_FFFF], np.uint64))
    assert bm.dirty_ranges() == [[64 * 512, 6 * 512]]


def test_zeroes_over_an_exabyte_allocate_nothing():
    bm = BlockDirtyBitmap("b", 512, None)
    bm.write_words(1 << 40, np.array([5], np.uint64))
    bm.clear_words(0, 1 << 50)
    assert bm.chunk_indices() == [(1 << 40) // 128] and bm.dirty_granules() == 0


# --- wire: the source against QEMU 7.2 ---------------------------------------------------------------


def vector_bitmaps() -> DirtyBitmapSet:
    v = vector.load()
    return bitmap_set(expected_bitmaps(v["steps"], {d: s for d, _, s in v["disks"]}))


def test_source_writes_qemus_bytes():
    v = vector.load()
    start, parts, end = sent(DirtyBitmapSource(vector_bitmaps()), parts=2)
    assert start.hex() == v["start"]
    assert [p.hex() for p in parts] == [v["part"]] * 2
    assert end.hex() == v["end"]


def test_destination_reads_qemus_bytes():
    v = vector.load()
    dst = DirtyBitmapDestination(nodes={d: s for d, _, s in v["disks"]})
    load(dst, bytes.fromhex(v["start"]), bytes.fromhex(v["part"]), bytes.fromhex(v["end"]))
    dst.load_cleanup(True)
    assert dst.cancelled is None and not dst.warnings
    got = dst.result
    assert got == vector_bitmaps()
    for dev, name in [("disk0", "fine"), ("disk0", "mid"), ("disk1", "solo"), ("disk1", "coarse")]:
        assert got.get(dev, name).sha256() == v["query"][dev][name]["sha256"]
        assert got.get(dev, name).enabled == v["query"][dev][name]["recording"]


def test_size_is_learnt_from_the_records_as_qemu_sends_them():
    v = vector.load()
    dst = DirtyBitmapDestination()
    load(dst, bytes.fromhex(v["start"]), bytes.fromhex(v["end"]))
    assert {(n, bm.name): bm.size for n, bm in dst.result} == {
        ("disk0", "fine"): v["disks"][0][2], ("disk0", "mid"): v["disks"][0][2],
        ("disk1", "solo"): v["disks"][1][2], ("disk1", "coarse"): v["disks"][1][2]}


def test_no_bitmaps_is_one_eos_and_then_inactive():
    src = DirtyBitmapSource(DirtyBitmapSet())
    assert src.is_active()
    sink = BytesSink()
    src.save_setup(QEMUFile(sink, buffer_size=1))
    assert bytes(sink.data) == EOS and not src.is_active() and not src.is_active_iterate()


def test_parts_only_while_the_guest_is_stopped_and_nothing_holds_convergence_back():
    running = [True]
    src = DirtyBitmapSource(bitmap_set({"d": {"b": {"granularity": 4096, "size": 1 << 20}}}),
                            running=lambda: running[0])
    src.save_setup(QEMUFile(BytesSink()))
    assert not src.is_active_iterate()
    running[0] = False
    assert src.is_active_iterate()
    sink = BytesSink()
    assert src.save_live_iterate(QEMUFile(sink, buffer_size=1)) is False and bytes(sink.data) == EOS
    assert src.save_pending() == (0, 0)  # precopy iterations cannot send bits (QEMU counts them)


def test_the_capability_decides_whether_the_section_exists():
    caps = Capabilities()
    src = DirtyBitmapSource(vector_bitmaps(), capabilities=caps)
    assert not src.is_active()
    caps.set_many([("dirty-bitmaps", True)], incoming=False)
    assert src.is_active()


@pytest.mark.parametrize("seed", range(25))
def test_roundtrip_random_bitmaps(seed):
    rnd = random.Random(1000 + seed)
    spec: dict = {}
    for n in range(rnd.randrange(1, 4)):
        size = rnd.randrange(1, 64 << 20) // 512 * 512 or 512
        node = spec.setdefault(f"node{n}", {})
        for b in range(rnd.randrange(1, 4)):
            gran = 512 << rnd.randrange(10)
            ranges = [[o, rnd.randrange(1, min(size - o, 1 << 22) + 1)]
                      for o in (rnd.randrange(size) for _ in range(rnd.randrange(30)))]
            node[f"bm{b}"] = {"granularity": gran, "size": size, "enabled": rnd.random() < 0.5,
                              "persistent": rnd.random() < 0.5, "dirty": ranges}
    want = bitmap_set(spec)
    assert roundtrip(spec).result == want
    sizes = {n: next(iter(b.values()))["size"] for n, b in spec.items()}
    assert roundtrip(spec, nodes=sizes).result == want


# --- source refusals (QEMU's init_dirty_bitmap_migration) -------------------------------------------


@pytest.mark.parametrize(("node", "name", "mapping", "text"), [
    ("", "b", None, "Bitmap 'b' in unnamed node can't be migrated"),
    ("#block123", "b", None, "Bitmap 'b' in a node with auto-generated name '#block123' can't be migrated"),
    ("d", "x" * 256, None, f"Cannot migrate bitmap '{'x' * 256}' on node 'd': Name is longer than 255 bytes"),
    ("n" * 256, "b", None, f"Cannot migrate bitmaps of node '{'n' * 256}': Name is longer than 255 bytes"),
])
def test_source_refuses_what_qemu_refuses(node, name, mapping, text):
    src = DirtyBitmapSource(bitmap_set({node: {name: {"granularity": 512, "size": 512}}}), mapping=mapping)
    with pytest.raises(BitmapError) as ei:
        src.save_setup(QEMUFile(BytesSink()))
    assert ei.value.message == f"Failed to initialize dirty tracking bitmap for blocks: {text}"


def test_mapping_sends_only_mapped_bitmaps_under_their_aliases():
    bitmaps = bitmap_set({"d0": {"a": {"granularity": 512, "size": 4096, "dirty": [[0, 1]]},
                                 "b": {"granularity": 512, "size": 4096}},
                          "d1": {"c": {"granularity": 512, "size": 4096}}})
    mapping = [{"node-name": "d0", "alias": "vol", "bitmaps": [
        {"name": "a", "alias": "first", "transform": {"persistent": True}}]}]
    start, _, end = sent(DirtyBitmapSource(bitmaps, mapping=mapping))
    recs = records(start)
    assert [(r.node, r.bitmap, r.bitmap_flags) for r in recs[:-1]] == [("vol", "first", 0x03)]
    # the destination maps it back, under a name of its own
    back = [{"node-name": "disk", "alias": "vol", "bitmaps": [{"name": "mine", "alias": "first"}]}]
    dst = DirtyBitmapDestination(mapping=back)
    load(dst, start, end)
    got = dst.result
    assert [(n, b.name, b.persistent, b.dirty_ranges()) for n, b in got] == [("disk", "mine", True, [[0, 512]])]


def test_mapping_is_checked_as_qemu_checks_it():
    with pytest.raises(ParameterError) as ei:
        DirtyBitmapSource(DirtyBitmapSet(), mapping=[
            {"node-name": "a", "alias": "x", "bitmaps": []},
            {"node-name": "a", "alias": "y", "bitmaps": []}]).save_setup(QEMUFile(BytesSink()))
    assert str(ei.value).startswith("Invalid mapping given for block-bitmap-mapping: "
                                    "The node name 'a' is mapped twice")


def test_parameters_carry_the_mapping_to_both_ends():
    p = Parameters()
    p.set({"block-bitmap-mapping": [{"node-name": "d0", "alias": "vol",
                                     "bitmaps": [{"name": "a", "alias": "z"}]}]})
    assert p.as_qmp()["block-bitmap-mapping"][0]["alias"] == "vol"
    bitmaps = bitmap_set({"d0": {"a": {"granularity": 512, "size": 512}}})
    start, _, end = sent(DirtyBitmapSource(bitmaps, parameters=p))
    assert records(start)[0].node == "vol"
    dst = DirtyBitmapDestination(parameters=p)
    load(dst, start, end)
    assert [(n, b.name) for n, b in dst.result] == [("d0", "a")]


# --- destination: bad input -----------------------------------------------------------------------


def loaded(*payloads: bytes, section: Section = SECTION, **kw) -> DirtyBitmapDestination:
    dst = DirtyBitmapDestination(**kw)
    load(dst, *payloads, section=section)
    return dst


def fatal(*payloads: bytes, **kw) -> DirtyBitmapError:
    dst = DirtyBitmapDestination(**kw)
    with pytest.raises(DirtyBitmapError) as ei:
        load(dst, *payloads)
    assert ei.value.section == "dirty-bitmap (3)"
    assert ei.value.offset is not None
    assert len(dst.result) == 0 and not list(dst.bitmaps), "a fatal error keeps no bitmap"
    return ei.value


GOOD_START = start_rec() + EOS


def test_a_complete_minimal_migration_loads():
    dst = loaded(start_rec(gran=512) + EOS, bits_rec(0, 8192, words(0, 65, 8191, n=128)) + COMPLETE + EOS)
    assert [(n, b.name, b.size, b.dirty_ranges()) for n, b in dst.result] == [
        ("d0", "b", 8192 * 512, [[0, 512], [65 * 512, 512], [8191 * 512, 512]])]


def test_duplicate_start_is_fatal():
    dst = DirtyBitmapDestination()
    with pytest.raises(DirtyBitmapError) as ei:
        load(dst, GOOD_START, start_rec(flags=0x14) + EOS)
    err = ei.value
    assert dst.cancelled is err and not dst.warnings, "raised, and not also logged"
    err = fatal(GOOD_START, start_rec(flags=0x14) + EOS)
    assert err.message == "Bitmap with the same name ('b') already exists on destination"
    assert (err.offset, err.field) == (0, "bitmap")  # offsets count from the payload given


def test_start_without_names_repeats_the_previous_bitmap_and_is_fatal():
    err = fatal(start_rec() + start_rec(flags=0x10) + EOS)
    assert "already exists" in err.message and err.offset == len(start_rec())


def test_reserved_start_flags_are_fatal():
    err = fatal(start_rec(bflags=0x09) + EOS)
    assert err.message == "Unknown flags in migrated dirty bitmap header: 9"
    assert err.field == "bitmap_flags"


@pytest.mark.parametrize("gran", [0, 256, 3 * 512, 65537])
def test_a_granularity_qemu_could_not_create_is_fatal(gran):
    assert fatal(start_rec(gran=gran) + EOS).field == "granularity"


def test_extra_flag_bytes_are_refused():
    with pytest.raises(DirtyBitmapError) as ei:
        records(b"\x81\x00" + EOS)
    assert ei.value.field == "flags"


def test_empty_names_are_fatal_as_in_qemu():
    with pytest.raises(DirtyBitmapError) as ei:
        records(b"\x1c\x00")
    assert ei.value.message == "Unable to read node alias string" and ei.value.offset == 1


def test_oversized_bufsize_is_fatal_even_after_a_cancel():
    huge = bytes([0x40]) + struct.pack(">QIQ", 0, 8192, 10241)
    with pytest.raises(DirtyBitmapError) as ei:
        records(huge + bytes(10241) + EOS)
    assert ei.value.field == "bufsize" and ei.value.offset == 13
    # a cancelled migration still reads (and checks) every record
    dst = loaded(bits_rec(0, 1, words(0), node=b"d0", bitmap=b"nope") + EOS)
    assert dst.cancelled is not None
    with pytest.raises(DirtyBitmapError):
        load(dst, huge + bytes(10241) + EOS)


@pytest.mark.parametrize(("first", "nr", "why"), [
    (8192, 8192, "past the bitmap"),        # starts at the end
    (0, 8192 + 128, "past the bitmap"),     # runs past it
    (32, 64, "not aligned"),                # not on a 64-granule boundary
    (0, 100, "neither aligned nor"),        # ends mid-word, not at the end
    (1 << 60, 8192, "beyond any disk"),     # byte offsets that overflow 64 bits
])
def test_ranges_outside_the_bitmap_are_fatal_and_write_nothing(first, nr, why):
    size = 8192 * 512  # one chunk of 512-byte granules
    err = fatal(start_rec(gran=512) + EOS, bits_rec(first, nr, bytes(1024)) + EOS, nodes={"d0": size})
    assert why in err.message and err.field == "first_sector"


def test_bits_before_any_start_cancel_with_qemus_message():
    warned = []
    dst = loaded(bits_rec(0, 8, words(0), node=b"d0", bitmap=b"ghost") + EOS, warn=warned.append)
    assert warned == ["Error: unknown dirty bitmap 'ghost' for block device 'd0'"]
    assert isinstance(dst.cancelled, DirtyBitmapError) and dst.cancelled.field == "bitmap"
    assert dst.cancelled.offset == 0 and dst.cancelled.section == "dirty-bitmap (3)"


def test_records_without_any_names_cancel():
    dst = loaded(bits_rec(0, 8, words(0)) + EOS)
    assert dst.cancelled.message == "Error: block device name is not set"


def test_a_cancel_drops_every_bitmap_and_ignores_the_rest():
    dst = loaded(start_rec(gran=512) + start_rec(flags=0x14, bitmap=b"c", gran=512) + EOS,
                 bits_rec(0, 8192, words(1, n=128), bitmap=b"b")
                 + bits_rec(0, 8192, bytes(8), bitmap=b"c")  # needs 1024 bytes: QEMU cancels
                 + bits_rec(0, 8192, words(2, n=128), bitmap=b"b")
                 + start_rec(flags=0x14, bitmap=b"late") + b"\x24\x01b" + b"\x24\x01c" + EOS)
    assert "granularity doesn't match the destination bitmap 'c'" in dst.cancelled.message
    assert len(dst.result) == 0 and not list(dst.bitmaps)
    assert len(dst.warnings) == 1


def test_a_bufsize_that_does_not_fit_the_range_cancels():
    good = words(0, n=128)
    start = start_rec(gran=512) + EOS
    for buf in (good[:-8], good + bytes(32)):  # one word short, one alignment step too long
        dst = loaded(start, bits_rec(0, 8192, buf) + EOS)
        assert dst.cancelled is not None and dst.cancelled.field == "bufsize"
    dst = loaded(start, bits_rec(0, 8192, good) + COMPLETE + EOS)
    assert dst.cancelled is None and len(dst.result) == 1


def test_unknown_nodes_cancel_when_the_nodes_are_known():
    dst = loaded(GOOD_START, nodes={"other": None})
    assert dst.cancelled.message == "Cannot find device='d0' nor node-name='d0'"


def test_an_unmapped_alias_is_dropped_with_qemus_message():
    mapping = [{"node-name": "real", "alias": "known", "bitmaps": [{"name": "x", "alias": "b"}]}]
    dst = loaded(GOOD_START, bits_rec(0, 8192, words(0)) + COMPLETE + EOS, mapping=mapping)
    assert dst.cancelled.message == "Error: Unknown node alias 'd0'" and len(dst.result) == 0
    dst = loaded(start_rec(node=b"known", bitmap=b"zz") + EOS, mapping=mapping)
    assert dst.cancelled.message == "Error: Unknown bitmap alias 'zz' on node 'real' (alias 'known')"


def test_other_section_versions_are_refused():
    with pytest.raises(DirtyBitmapError) as ei:
        load(DirtyBitmapDestination(), GOOD_START, section=Section(3, "dirty-bitmap", 0, 2))
    assert ei.value.field == "version_id"


@pytest.mark.parametrize("first", [1 << 54, (1 << 64) - 128])
def test_ranges_beyond_any_disk_are_fatal_when_the_size_is_learnt(first):
    err = fatal(start_rec(gran=512) + EOS, bits_rec(first, 100) + EOS)
    assert "beyond any disk" in err.message


def test_node_sizes_must_be_disk_sizes():
    with pytest.raises(BitmapError) as ei:
        DirtyBitmapDestination(nodes={"d0": 1000})
    assert ei.value.field == "size"


def test_an_unaligned_end_fixes_the_learnt_size():
    dst = loaded(start_rec(gran=512) + EOS, bits_rec(0, 100, words(99, n=4)) + COMPLETE + EOS)
    assert [b.size for _, b in dst.result] == [100 * 512]
    err = fatal(start_rec(gran=512) + EOS, bits_rec(0, 100, words(1, n=4))
                + bits_rec(0, 8192, bytes(1024)) + EOS)
    assert "past the bitmap" in err.message


def test_bitmaps_that_never_complete_are_not_kept():
    dst = loaded(GOOD_START, bits_rec(0, 8192, words(3)) + EOS)
    dst.load_cleanup(True)
    assert len(dst.result) == 0 and "did not complete" in dst.warnings[0]


def test_mutated_sections_raise_typed_errors_or_load_within_bounds():
    """Whatever the bytes, a typed error or bitmaps inside their sizes; never anything else."""
    v = vector.load()
    payloads = [bytes.fromhex(v["start"]), bytes.fromhex(v["end"])]
    rnd = random.Random(7)
    outcomes = set()
    for _ in range(300):
        which = rnd.randrange(2)
        data = bytearray(payloads[which])
        for _ in range(rnd.randrange(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        if rnd.random() < 0.2:
            data = data[: rnd.randrange(len(data))]
        dst = DirtyBitmapDestination(nodes={d: s for d, _, s in v["disks"]})
        try:
            load(dst, *(payloads[:which] + [bytes(data)] + payloads[which + 1 :]))
            outcomes.add("cancelled" if dst.cancelled else "loaded")
        except (StreamError, NeedData, AssertionError) as exc:
            outcomes.add(type(exc).__name__)
            continue
        for node, bm in dst.result:
            assert all(o + n <= bm.size for o, n in bm.dirty_ranges())
    assert {"DirtyBitmapError", "loaded"} <= outcomes


# --- through the engine and the stream tools ---------------------------------------------------------


def migrate_api(tmp_path: Path, bitmaps: DirtyBitmapSet, **dst_kw) -> DirtyBitmapDestination:
    from qmigx import (
        MigrationDestination,
        MigrationSource,
        MigrationStatus,
        RAMBlock,
        RAMBlockList,
    )

    caps = Capabilities()
    caps.set_many([("dirty-bitmaps", True)], incoming=False)
    loader = DirtyBitmapDestination(**dst_kw)
    dst = MigrationDestination(handlers=[loader])
    dst.incoming(f"unix:{tmp_path}/m.sock")
    src = MigrationSource(RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)]), capabilities=caps,
                          handlers=[DirtyBitmapSource(bitmaps, capabilities=caps)])
    src.migrate(f"unix:{tmp_path}/m.sock")
    assert src.wait(30) == MigrationStatus.COMPLETED, src.error
    assert dst.wait(30) == MigrationStatus.COMPLETED, dst.error
    return loader


def test_bitmaps_travel_with_ram_through_the_engine(tmp_path):
    bitmaps = vector_bitmaps()
    assert migrate_api(tmp_path, bitmaps).result == bitmaps


def test_a_fatal_bitmap_error_fails_the_incoming_migration(tmp_path):
    from qmigx import (
        MigrationDestination,
        MigrationSource,
        MigrationStatus,
        RAMBlock,
        RAMBlockList,
    )

    class Twice(DirtyBitmapSource):  # a broken peer: START twice
        def save_setup(self, f):
            sink = BytesSink()
            inner = QEMUFile(sink)
            super().save_setup(inner)
            inner.flush()
            f.write(bytes(sink.data[:-1]) + start_rec(flags=0x10) + EOS)

    caps = Capabilities()
    caps.set_many([("dirty-bitmaps", True)], incoming=False)
    loader = DirtyBitmapDestination()
    dst = MigrationDestination(handlers=[loader])
    dst.incoming(f"unix:{tmp_path}/m.sock")
    src = MigrationSource(RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)]), capabilities=caps,
                          handlers=[Twice(vector_bitmaps(), capabilities=caps)])
    src.migrate(f"unix:{tmp_path}/m.sock")
    src.wait(30)
    assert dst.wait(30) == MigrationStatus.FAILED
    assert isinstance(dst.error, DirtyBitmapError) and "already exists" in dst.error.message
    assert len(loader.result) == 0


@pytest.fixture(scope="module")
def bitmap_stream(tmp_path_factory) -> Path:
    """A whole stream with a dirty-bitmap section, written by the qmigx source to a file."""
    from qmigx import MigrationSource, MigrationStatus, RAMBlock, RAMBlockList

    path = tmp_path_factory.mktemp("stream") / "bitmaps.mig"
    caps = Capabilities()
    caps.set_many([("dirty-bitmaps", True)], incoming=False)
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)])
    blocks["pc.ram"].memory[::4096] = 3
    src = MigrationSource(blocks, capabilities=caps,
                          handlers=[DirtyBitmapSource(vector_bitmaps(), capabilities=caps)])
    src.migrate(f"file:{path}")
    assert src.wait(30) == MigrationStatus.COMPLETED, src.error
    return path


def test_analyze_decodes_the_records(bitmap_stream):
    r = run_cli("analyze", "-f", bitmap_stream)
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)["dirty-bitmap (3)"]
    starts = [x for x in recs if x["type"] == "start"]
    assert [(x.get("node"), x["bitmap"], x["granularity"], x["enabled"]) for x in starts] == [
        ("disk0", "mid", 4096, False), (None, "fine", 512, True),  # newest first, as QEMU lists them
        ("disk1", "coarse", 131072, True), (None, "solo", 65536, True)]
    bits = [x for x in recs if x["type"] == "bits"]
    assert sum(x.get("dirty_bits", 0) for x in bits) == sum(
        b.dirty_granules() for _, b in vector_bitmaps())
    assert any(x["zeroes"] for x in bits) and [x["type"] for x in recs].count("complete") == 4


def test_verify_loads_the_bitmaps_and_convert_keeps_them(bitmap_stream, tmp_path):
    r = run_cli("verify", bitmap_stream)
    assert r.returncode == 0 and "4 dirty bitmaps" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "compressed.mig"
    assert run_cli("convert", bitmap_stream, out, "--ram-encoding", "compress").returncode == 0
    from qmigx.stream import SectionRecord
    from qmigx.tools.streams import StreamReader

    def raw(path):
        return b"".join(ev.raw for ev in StreamReader(str(path)).events()
                        if isinstance(ev, SectionRecord))

    assert raw(out) == raw(bitmap_stream) and out.stat().st_size < bitmap_stream.stat().st_size
    r = run_cli("verify", out)
    assert r.returncode == 0 and "4 dirty bitmaps" in r.stdout


def test_verify_reports_a_stream_whose_bitmaps_qemu_would_drop(bitmap_stream, tmp_path):
    data = bitmap_stream.read_bytes()
    bad = tmp_path / "bad.mig"
    bad.write_bytes(data.replace(b"\x04fine", b"\x04fin_", 1))  # renamed in its START only
    r = run_cli("verify", bad)
    assert r.returncode == 0, r.stderr
    assert "would be dropped: Error: unknown dirty bitmap 'fine' for block device 'disk0'" in r.stdout


# --- the bitmaps file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "field"), [
    ([], ""),
    ({"d": []}, "d"),
    ({"d": {"b": {"granularity": 4096}}}, "d/b/size"),
    ({"d": {"b": {"granularity": 1000, "size": 4096}}}, "d/b/granularity"),
    ({"d": {"b": {"granularity": 4096, "size": 1000}}}, "d/b/size"),
    ({"d": {"b": {"granularity": 4096, "size": 4096, "dirty": [[4000, 200]]}}}, "d/b/dirty[0]"),
    ({"d": {"b": {"granularity": 4096, "size": 4096, "dirty": [[0, -1]]}}}, "d/b/dirty[0]"),
    ({"d": {"b": {"granularity": 4096, "size": 4096, "dirty": [[0, True]]}}}, "d/b/dirty"),
    ({"d": {"b": {"granularity": 4096, "size": 4096, "enabled": 1}}}, "d/b/enabled"),
    ({"d": {"b": {"granularity": 4096, "size": 4096, "colour": "red"}}}, "d/b"),
    ({"d": {"": {"granularity": 4096, "size": 4096}}}, "d//name"),
    ({"d": {"a": {"granularity": 512, "size": 4096}, "b": {"granularity": 512, "size": 8192}}}, "d"),
])
def test_bad_bitmaps_files_say_where(spec, field, tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(BitmapError) as ei:
        DirtyBitmapSet.load(str(path))
    assert ei.value.field == field


def test_the_file_holds_merged_sorted_ranges_and_reads_back(tmp_path):
    spec = {"d": {"b": {"granularity": 4096, "size": 1 << 20, "persistent": True, "enabled": False,
                        "dirty": [[9000, 1], [0, 10], [4096, 4096], [1048575, 1]]}}}
    path = tmp_path / "b.json"
    bitmap_set(spec).save(str(path))
    text = json.loads(path.read_text())
    assert text == {"d": {"b": {"granularity": 4096, "size": 1 << 20, "persistent": True,
                                "enabled": False, "dirty": expected_ranges(
                                    spec["d"]["b"]["dirty"], 4096, 1 << 20)}}}
    assert DirtyBitmapSet.load(str(path)) == bitmap_set(spec)


# --- qmigx -> qmigx, as a user runs it --------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_stream(tmp_path_factory) -> Path:
    """A QEMU 7.2 stream to replay with ``qmigx send`` (kept in tests/data)."""
    path = tmp_path_factory.mktemp("replay") / "pc-paused.mig"
    with gzip.open(DATA / "qemu72-pc-paused.mig.gz") as f:
        path.write_bytes(f.read())
    return path


def test_qmigx_to_qmigx_with_aliases(tmp_path, replay_stream):
    spec = {"d0": {"fine": {"granularity": 512, "size": 8 << 20, "dirty": [[100, 1], [6 << 20, 70000]]},
                   "keep": {"granularity": 65536, "size": 8 << 20, "enabled": False,
                            "dirty": [[0, 1 << 20]]}},
            "d1": {"x": {"granularity": 4096, "size": 1 << 20, "dirty": []}}}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    out_mapping = json.dumps([{"node-name": "d0", "alias": "vol", "bitmaps": [
        {"name": "fine", "alias": "f", "transform": {"persistent": True}},
        {"name": "keep", "alias": "k"}]}])
    in_mapping = json.dumps([{"node-name": "disk", "alias": "vol", "bitmaps": [
        {"name": "fine2", "alias": "f"}, {"name": "keep", "alias": "k"}]}])
    uris = Uris()
    try:
        uri = uris.make("unix")
        with incoming_cli(uri, tmp_path, tmp_path / "out.json",
                          params={"block-bitmap-mapping": in_mapping}) as inc:
            r = send_cli(replay_stream, uri, caps={"dirty-bitmaps": True}, bitmaps=tmp_path / "in.json",
                         params={"block-bitmap-mapping": out_mapping})
            assert r.returncode == 0, r.stderr
            rc, err = inc.wait(60)
        assert rc == 0, err
    finally:
        uris.close()
    got = json.loads((tmp_path / "out.json").read_text())
    want = {"disk": {
        "fine2": {**spec["d0"]["fine"], "persistent": True, "enabled": True,
                  "dirty": expected_ranges(spec["d0"]["fine"]["dirty"], 512, 8 << 20)},
        "keep": {**spec["d0"]["keep"], "persistent": False,
                 "dirty": expected_ranges(spec["d0"]["keep"]["dirty"], 65536, 8 << 20)}}}
    assert got == want
    report = json.loads((tmp_path / "inc.json").read_text())
    assert report["dirty-bitmaps"]["warnings"] == [] and report["dirty-bitmaps"]["cancelled"] is None


def test_qmigx_to_qmigx_drops_an_unmapped_alias_with_a_warning(tmp_path, replay_stream):
    spec = {"d0": {"b": {"granularity": 512, "size": 1 << 20, "dirty": [[0, 1]]}}}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    mapping = json.dumps([{"node-name": "elsewhere", "alias": "other", "bitmaps": []}])
    uris = Uris()
    try:
        uri = uris.make("unix")
        with incoming_cli(uri, tmp_path, tmp_path / "out.json",
                          params={"block-bitmap-mapping": mapping}) as inc:
            r = send_cli(replay_stream, uri, caps={"dirty-bitmaps": True}, bitmaps=tmp_path / "in.json")
            assert r.returncode == 0, r.stderr
            rc, err = inc.wait(60)
    finally:
        uris.close()
    assert rc == 0, err
    assert "qmigx: warning: Error: Unknown node alias 'd0'" in err.splitlines()
    assert json.loads((tmp_path / "out.json").read_text()) == {}
    report = json.loads((tmp_path / "inc.json").read_text())["dirty-bitmaps"]
    assert report["cancelled"] == "Error: Unknown node alias 'd0'" and report["received"] == []


@pytest.mark.parametrize(("node", "rc", "message"), [
    ("other=8388608", 0, "qmigx: warning: Cannot find device='d0' nor node-name='d0'"),
    ("d0=1048576", 1, "qmigx: error: bitmap 'b': range ending at byte 4194304 lies past the "
                      "bitmap's 1048576 bytes (at offset "),
])
def test_known_nodes_on_a_qmigx_destination(tmp_path, replay_stream, node, rc, message):
    (tmp_path / "in.json").write_text(json.dumps(
        {"d0": {"b": {"granularity": 512, "size": 8 << 20, "dirty": [[0, 1]]}}}))
    uris = Uris()
    try:
        uri = uris.make("unix")
        with incoming_cli(uri, tmp_path, tmp_path / "out.json", extra=("--bitmap-node", node)) as inc:
            send_cli(replay_stream, uri, caps={"dirty-bitmaps": True}, bitmaps=tmp_path / "in.json")
            got, err = inc.wait(60)
    finally:
        uris.close()
    assert got == rc and any(line.startswith(message) for line in err.splitlines()), err
    out = tmp_path / "out.json"
    assert (json.loads(out.read_text()) == {}) if rc == 0 else not out.exists()


def test_send_refuses_bitmaps_without_the_capability(tmp_path, replay_stream):
    (tmp_path / "in.json").write_text("{}")
    r = send_cli(replay_stream, f"file:{tmp_path}/x.mig", bitmaps=tmp_path / "in.json")
    assert r.returncode == 1 and "dirty-bitmaps capability" in r.stderr


def test_send_names_a_bad_bitmaps_file(tmp_path, replay_stream):
    (tmp_path / "in.json").write_text(json.dumps({"d": {"b": {"granularity": 3, "size": 512}}}))
    r = send_cli(replay_stream, f"file:{tmp_path}/x.mig", caps={"dirty-bitmaps": True},
                 bitmaps=tmp_path / "in.json")
    assert r.returncode == 1
    assert r.stderr.startswith("qmigx: error: d/b: Granularity must be power of 2"), r.stderr


# --- with QEMU 7.2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


@pytest.fixture(scope="module")
def base_stream(tmp_path_factory) -> Path:
    return save_base_stream(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The bitmaps of :data:`STEPS` as a QEMU that made them itself reports them."""
    from qemu_support.bitmaps import query_bitmaps, run_steps

    d = tmp_path_factory.mktemp("reference")
    with qemu_vm(d, "ref", paused=True) as vm:
        run_steps(vm, STEPS)
        return query_bitmaps(vm)


@pytest.mark.qemu
def test_stored_vector_is_what_qemu_sends(tmp_path):
    v = vector.load()
    got = vector.capture(tmp_path)
    for key in ("start", "part", "end", "query"):
        assert got[key] == v[key], key


@pytest.mark.qemu
def test_qemu_bitmaps_arrive_in_qmigx_exactly(tmp_path, uris):
    got, _, report, qemu_view = qemu_to_qmigx(tmp_path, uris)
    assert got == want_bitmaps()
    assert list(got["disk0"]) == ["mid", "late", "wide", "fine"]  # QEMU's order: newest first
    for name, bm in DirtyBitmapSet.from_json(got).nodes["disk0"].items():
        q = qemu_view["disk0"][name]
        assert (bm.sha256(), bm.dirty_granules() * bm.granularity) == (q["sha256"], q["count"]), name
    assert not report["dirty-bitmaps"]["warnings"]
    assert len(report["dirty-bitmaps"]["received"]) == 4


@pytest.mark.qemu
def test_qemu_mapping_to_qmigx_mapping(tmp_path, uris):
    back = [{"node-name": "mydisk", "alias": "vol", "bitmaps": [
        {"name": "fine-copy", "alias": "f"}, {"name": "late", "alias": "l"}]}]
    got, _, report, _ = qemu_to_qmigx(tmp_path, uris, src_params={"block-bitmap-mapping": MAPPING_OUT},
                                      dst_params={"block-bitmap-mapping": json.dumps(back)})
    want = want_bitmaps()["disk0"]
    assert got == {"mydisk": {"late": want["late"],
                              "fine-copy": {**want["fine"], "persistent": True}}}
    assert report["dirty-bitmaps"]["cancelled"] is None


@pytest.mark.qemu
def test_qemu_aliased_bitmaps_without_a_matching_mapping_are_dropped(tmp_path, uris):
    elsewhere = [{"node-name": "mydisk", "alias": "other", "bitmaps": []}]
    got, err, report, _ = qemu_to_qmigx(tmp_path, uris, src_params={"block-bitmap-mapping": MAPPING_OUT},
                                        dst_params={"block-bitmap-mapping": json.dumps(elsewhere)})
    assert got == {}
    assert "qmigx: warning: Error: Unknown node alias 'vol'" in err.splitlines()
    assert report["dirty-bitmaps"]["warnings"] == ["Error: Unknown node alias 'vol'"]
    assert report["status"] == "completed"


@pytest.mark.qemu
def test_qmigx_bitmaps_in_qemu_equal_bitmaps_qemu_made(tmp_path, uris, base_stream, reference):
    got, _ = qmigx_to_qemu(tmp_path, uris, base_stream, want_bitmaps())
    assert got == reference
    assert {n: b["granularity"] for n, b in got["disk0"].items()} == {
        "fine": 512, "wide": 1 << 20, "late": 65536, "mid": 4096}


@pytest.mark.qemu
def test_qmigx_mapping_to_qemu_mapping(tmp_path, uris, base_stream, reference):
    bitmaps = {"mine": want_bitmaps()["disk0"]}  # any node name: the mapping gives the alias
    out = [{"node-name": "mine", "alias": "vol", "bitmaps": [
        {"name": "fine", "alias": "f"}, {"name": "mid", "alias": "m"}]}]
    back = [{"node-name": "node0", "alias": "vol", "bitmaps": [
        {"name": "fine-copy", "alias": "f", "transform": {"persistent": True}},
        {"name": "mid", "alias": "m"}]}]
    got, _ = qmigx_to_qemu(tmp_path, uris, base_stream, bitmaps,
                           src_params={"block-bitmap-mapping": out}, dst_params={"block-bitmap-mapping": back})
    assert got == {"disk0": {"fine-copy": {**reference["disk0"]["fine"], "persistent": True},
                             "mid": reference["disk0"]["mid"]}}


@pytest.mark.qemu
def test_qmigx_aliases_unknown_to_qemu_are_dropped_by_qemu(tmp_path, uris, base_stream):
    out = [{"node-name": "disk0", "alias": "vol", "bitmaps": [{"name": "fine", "alias": "f"}]}]
    got, log = qmigx_to_qemu(tmp_path, uris, base_stream, want_bitmaps(),
                             src_params={"block-bitmap-mapping": out})
    assert got == {}
    assert "Cannot find device='vol' nor node-name='vol'" in log


@pytest.mark.qemu
def test_a_running_source_sends_no_parts_and_the_engine_writes_qemus_sections(tmp_path):
    """QEMU (guest running) -> file, and qmigx's engine (guest running) -> file: same sections."""
    from qemu_support.bitmaps import migrate_to_file, run_steps

    from qmigx import (
        MigrationSource,
        MigrationStatus,
        RAMBlock,
        RAMBlockList,
        SimpleGuest,
    )

    with qemu_vm(tmp_path, "src") as vm:
        run_steps(vm, STEPS)
        vm.set_capabilities({"dirty-bitmaps": True})
        migrate_to_file(vm, tmp_path / "qemu.mig")
    theirs = vector.sections((tmp_path / "qemu.mig").read_bytes())
    caps = Capabilities()
    caps.set_many([("dirty-bitmaps", True)], incoming=False)
    guest = SimpleGuest(running=True)
    handler = DirtyBitmapSource(bitmap_set(want_bitmaps()), capabilities=caps,
                                running=lambda: guest.running)
    src = MigrationSource(RAMBlockList([RAMBlock.anonymous("pc.ram", 1 << 20)]), guest=guest,
                          capabilities=caps, handlers=[handler])
    src.migrate(f"file:{tmp_path}/qmigx.mig")
    assert src.wait(30) == MigrationStatus.COMPLETED, src.error
    ours = vector.sections((tmp_path / "qmigx.mig").read_bytes())
    assert theirs["part"] == [] and ours == theirs


@pytest.mark.qemu
def test_a_bitmap_that_exists_on_the_qemu_destination_fails_the_migration(tmp_path, uris, base_stream):
    """QEMU treats a START for an existing bitmap as fatal, as qmigx's destination does."""
    from qemu_support.bitmaps import add_bitmap

    (tmp_path / "in.json").write_text(json.dumps(want_bitmaps()))
    uri = uris.make("unix")
    with qemu_vm(tmp_path, "dst", paused=True, incoming=True) as dst:
        add_bitmap(dst, "disk0", "mid", 4096)
        dst.migrate_incoming(uri)
        send_cli(base_stream, uri, caps={"dirty-bitmaps": True}, bitmaps=tmp_path / "in.json")
        dst.proc.wait(30)  # a QEMU destination exits when loading fails
        log = dst.log_path.read_text()
    assert "Bitmap with the same name ('mid') already exists on destination" in log
    assert dst.proc.returncode != 0
