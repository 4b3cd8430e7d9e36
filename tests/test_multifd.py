"""Multifd framing (both backends) and the per-channel compression streams."""

from __future__ import annotations

import mmap
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx import multifd as mf
from qmigx.multifd import init_packet as ip
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import MultifdPacketError, ParameterError
from qmigx.wire import MULTIFD_MAGIC, MultifdFlag

COMPILED = load_compiled("multifd_packet")
REFERENCE = load_reference("multifd_packet")
PAGE = 4096
BLOCKS = {"pc.ram": 64 << 20, "pc.bios": 256 << 10, "tiny": 100}


pytestmark = pytest.mark.kernel("multifd_packet")


@pytest.fixture
def k(kernel):
    """The compiled framing kernel, then its reference twin (tests/conftest.py)."""
    return kernel


def outcome(fn, *args, **kwargs):
    """What a call did, comparable across backends: the result or the error and where."""
    try:
        res = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return ("error", type(exc).__name__, getattr(exc, "field", None),
                getattr(exc, "offset", None), str(exc))
    if hasattr(res, "to_dict"):
        return ("ok", type(res).__name__, res.to_dict())
    if isinstance(res, (bytes, bytearray)):
        return ("ok", bytes(res))
    return ("ok", res)


def packet(k, *, flags=0, pages_alloc=128, offsets=(0, 0x6000), ramblock="pc.ram",
           next_packet_size=None, packet_num=3, normal_pages=None, zero_offsets=None):
    offs = np.asarray(offsets, dtype=np.uint64)
    n = len(offs) if normal_pages is None else normal_pages
    if next_packet_size is None:
        next_packet_size = n * PAGE
    out = bytearray(k.header_size(pages_alloc))
    k.pack_packet_header(out, flags=flags, pages_alloc=pages_alloc, normal_pages=n,
                         next_packet_size=next_packet_size, packet_num=packet_num,
                         ramblock=ramblock, offsets=offs, zero_offsets=zero_offsets)
    return out


# ---------------------------------------------------------------------------
# init packet (plain Python: qmigx.multifd.init_packet)


def test_init_packet_known_bytes():
    raw = ip.pack_init_packet(None, 0)
    assert raw == bytes.fromhex("1122334400000001") + bytes(56)  # multifd.md §3, verified
    assert ip.pack_init_packet(bytes(range(16)), 5)[8:25] == bytes(range(16)) + b"\x05"


def test_init_packet_round_trip():
    uuid = bytes(range(100, 116))
    got = ip.unpack_init_packet(ip.pack_init_packet(uuid, 3), channels=4, uuid=uuid)
    assert (got.uuid, got.channel_id) == (uuid, 3)
    assert got == ip.InitPacket(uuid, 3)


@pytest.mark.parametrize(
    "mutate, kwargs, field, offset",
    [
        (lambda b: b.__setitem__(0, 0x12), {}, "magic", 0),
        (lambda b: b.__setitem__(7, 2), {}, "version", 4),
        (lambda b: b.__setitem__(10, 1), {}, "uuid", 8),
        (lambda b: None, {"uuid": b"\1" * 16}, "uuid", 8),
        (lambda b: b.__setitem__(24, 2), {}, "id", 24),  # id == channels: QEMU lets it in
        (lambda b: b.__setitem__(24, 9), {}, "id", 24),
    ],
)
def test_init_packet_errors(mutate, kwargs, field, offset):
    raw = bytearray(ip.pack_init_packet(None, 1))
    mutate(raw)
    with pytest.raises(MultifdPacketError) as info:
        ip.unpack_init_packet(raw, channels=2, **kwargs)
    assert (info.value.field, info.value.offset) == (field, offset)


def test_init_packet_ignores_unused_garbage():
    raw = bytearray(ip.pack_init_packet(None, 1))
    raw[25:64] = b"\xaa" * 39  # 4.1 leaves these uninitialised
    assert ip.unpack_init_packet(raw, channels=2).channel_id == 1


@pytest.mark.parametrize("n, field", [(0, "magic"), (6, "version"), (20, "uuid"), (24, "id"), (63, "unused")])
def test_init_packet_truncated(n, field):
    with pytest.raises(MultifdPacketError) as info:
        ip.unpack_init_packet(ip.pack_init_packet(None, 0)[:n], channels=2)
    assert info.value.field == field


# ---------------------------------------------------------------------------
# page packet header


def test_header_size(k):
    assert k.header_size(128) == 1344
    assert k.header_size(0) == 320


def test_header_known_bytes(k):
    """The verified 7.2 packet of multifd.md §4.2 (first fields, name, offsets)."""
    offs = [0x0, 0x6000, 0x7000, 0x10000] + [0x20000 + i * PAGE for i in range(45)]
    raw = packet(k, flags=1, offsets=offs, next_packet_size=0x31000, packet_num=3)
    assert raw[:32] == bytes.fromhex(
        "11223344 00000001 00000001 00000080 00000031 00031000 0000000000000003")
    assert raw[32:64] == bytes(32)
    assert raw[64:320] == b"pc.ram" + bytes(250)
    assert raw[320:352] == bytes.fromhex(
        "0000000000000000 0000000000006000 0000000000007000 0000000000010000")
    assert raw[320 + 8 * 49:] == bytes(8 * (128 - 49))
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS)
    assert hdr.sync and hdr.normal_pages == 49 and hdr.data_size == 49 * PAGE
    assert hdr.offsets.tolist() == offs


@pytest.mark.parametrize("version, name", [("7.2", "normal_pages"), ("4.1", "pages_used")])
def test_layout_switch_only_renames(k, version, name):
    raw = packet(k, offsets=[PAGE, 3 * PAGE])
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS, version=version)
    other = "pages_used" if name == "normal_pages" else "normal_pages"
    assert getattr(hdr, name) == 2 and not hasattr(hdr, other)
    assert list(hdr.to_dict()) == ["flags", "pages_alloc", name, "next_packet_size",
                                   "packet_num", "ramblock", "offsets", "data_size"]
    raw41 = bytearray(len(raw))
    k.pack_packet_header(raw41, flags=0, pages_alloc=128, pages_used=2,
                         next_packet_size=2 * PAGE, packet_num=3, ramblock="pc.ram",
                         offsets=np.array([PAGE, 3 * PAGE], np.uint64))
    assert raw41 == raw


def test_round_trip_and_attributes(k):
    offs = np.array([0, PAGE, 7 * PAGE], np.uint64)
    raw = packet(k, flags=MultifdFlag.ZSTD | MultifdFlag.SYNC, offsets=offs,
                 next_packet_size=777, packet_num=2**64 - 1, ramblock="pc.bios")
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS, compression="zstd")
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.next_packet_size) == (5, 128, 3, 777)
    assert (hdr.packet_num, hdr.ramblock, hdr.data_size) == (2**64 - 1, "pc.bios", 777)
    assert hdr.sync and hdr.compression_bits == 4 and hdr.header_size == 1344
    assert hdr.offsets.dtype == np.uint64 and hdr.offsets.tolist() == offs.tolist()
    with pytest.raises(ValueError):
        hdr.offsets[0] = 1  # read-only
    assert hdr == k.unpack_packet_header(raw, blocks=BLOCKS, compression=4)
    assert "pc.bios" in repr(hdr)


def test_pageless_packet_ignores_stale_fields(k):
    """7.2 leaves next_packet_size, ramblock and offsets of the previous packet (§4.2)."""
    raw = packet(k, flags=1, offsets=[5, 0xFFFF_FFFF_FFFF_FFFF], normal_pages=0,
                 ramblock="gone", next_packet_size=118784)
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS, compression="zlib")
    assert hdr.normal_pages == 0 and hdr.sync
    assert hdr.ramblock == "" and hdr.offsets.size == 0 and hdr.data_size == 0
    assert hdr.next_packet_size == 118784


def test_qemu10_zero_pages_follow_the_normal_offsets(k):
    """QEMU 10: zero_pages at +32, their offsets after the normal ones (qemu10.md §4.2)."""
    raw = packet(k, flags=MultifdFlag.ZLIB, offsets=[0, 0x9000], zero_offsets=[0x6000, 0x4000],
                 next_packet_size=77)
    assert raw[16:20] == bytes.fromhex("00000002") and raw[32:36] == bytes.fromhex("00000002")
    assert raw[320:352] == bytes.fromhex(
        "0000000000000000 0000000000009000 0000000000006000 0000000000004000")
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS, compression="zlib", version="10.0")
    assert type(hdr).__name__ == "PacketHeader10"
    assert (hdr.normal_pages, hdr.zero_pages, hdr.data_size) == (2, 2, 77)
    assert hdr.offsets.tolist() == [0, 0x9000] and hdr.zero_offsets.tolist() == [0x6000, 0x4000]
    # a 7.2 reader never looks at +32: the same bytes are two normal pages to it
    assert k.unpack_packet_header(raw, blocks=BLOCKS, compression="zlib").normal_pages == 2


def test_qemu10_zero_only_packet_has_no_data_but_its_method_bit(k):
    raw = packet(k, flags=MultifdFlag.ZSTD, offsets=[], zero_offsets=[PAGE], next_packet_size=0)
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS, compression="zstd", version="10.0")
    assert (hdr.normal_pages, hdr.zero_pages, hdr.data_size) == (0, 1, 0)
    assert hdr.ramblock == "pc.ram"
    bare = packet(k, offsets=[], zero_offsets=[PAGE], next_packet_size=0)
    assert error_of(k, bare, blocks=BLOCKS, compression="zstd", version="10.0") == ("flags", 8)


def test_qemu10_sync_packet_has_pages_alloc_zero(k):
    """QEMU 10's SYNC: zeroed, pages_alloc 0 -- its header area is still 1344 bytes on the wire."""
    raw = bytes.fromhex("11223344 00000001 00000001 00000000") + bytes(1344 - 16)
    for version in ("7.2", "10.0"):
        hdr = k.unpack_packet_header(raw, blocks=BLOCKS, compression="zlib", version=version)
        assert hdr.sync and hdr.pages_alloc == 0 and hdr.normal_pages == 0 and hdr.data_size == 0


@pytest.mark.parametrize("zero_at_32, field", [(127, "zero_pages"), (0xFFFFFFFF, "zero_pages")])
def test_qemu10_zero_pages_beyond_room(k, zero_at_32, field):
    raw = bytearray(packet(k, offsets=[0, PAGE]))
    raw[32:36] = zero_at_32.to_bytes(4, "big")
    assert error_of(k, raw, blocks=BLOCKS, version="10.0") == (field, 32)


def test_qemu10_zero_page_offset_outside_the_block(k):
    raw = packet(k, offsets=[0], zero_offsets=[PAGE, 64 << 20])
    field, offset = error_of(k, raw, blocks=BLOCKS, version="10.0")
    assert (field, offset) == ("offsets[2]", 320 + 16)


def error_of(k, raw, **kwargs):
    with pytest.raises(MultifdPacketError) as info:
        k.unpack_packet_header(raw, **kwargs)
    return info.value.field, info.value.offset


def test_error_magic(k):
    raw = packet(k)
    raw[3] ^= 1
    assert error_of(k, raw) == ("magic", 0)
    assert error_of(k, raw[:5]) == ("magic", 0)


def test_error_version(k):
    raw = packet(k)
    raw[7] = 2
    assert error_of(k, raw) == ("version", 4)


def test_error_pages_alloc(k):
    raw = packet(k, pages_alloc=129)
    assert error_of(k, raw) == ("pages_alloc", 12)
    assert k.unpack_packet_header(raw, max_pages=129).pages_alloc == 129
    assert error_of(k, packet(k), max_pages=64) == ("pages_alloc", 12)


def test_error_normal_pages(k):
    raw = packet(k, pages_alloc=4, offsets=[0, PAGE])
    raw[16:20] = (5).to_bytes(4, "big")
    assert error_of(k, raw) == ("normal_pages", 16)


@pytest.mark.parametrize("n, field, offset", [
    (0, "magic", 0), (3, "magic", 0), (8, "flags", 8), (13, "pages_alloc", 12),
    (16, "normal_pages", 16), (23, "next_packet_size", 20), (30, "packet_num", 24),
    (40, "unused", 32), (319, "ramblock", 64), (320, "offsets[0]", 320),
    (1343, "offsets[127]", 1336),
])
def test_error_truncated(k, n, field, offset):
    assert error_of(k, packet(k)[:n]) == (field, offset)


def test_error_compression_flags(k):
    assert error_of(k, packet(k), compression="zlib") == ("flags", 8)
    assert error_of(k, packet(k, flags=MultifdFlag.ZLIB), compression="none") == ("flags", 8)
    assert error_of(k, packet(k, flags=0x8)) == ("flags", 8)
    assert k.unpack_packet_header(packet(k, flags=0x10)).flags == 0x10  # outside the mask


def test_error_next_packet_size(k):
    raw = packet(k, flags=MultifdFlag.ZLIB, next_packet_size=2 * 128 * PAGE + 1)
    assert error_of(k, raw, compression="zlib") == ("next_packet_size", 20)
    raw = packet(k, flags=MultifdFlag.ZLIB, next_packet_size=2 * 128 * PAGE)
    assert k.unpack_packet_header(raw, compression="zlib").data_size == 2 * 128 * PAGE


def test_error_ramblock(k):
    assert error_of(k, packet(k, ramblock="nope"), blocks=BLOCKS) == ("ramblock", 64)
    raw = packet(k)
    raw[64:320] = b"x" * 256
    assert error_of(k, raw) == ("ramblock", 64)


@pytest.mark.parametrize("offsets, bad", [
    ([0, PAGE + 1, 5], 1),  # misaligned
    ([0, (64 << 20) - PAGE, 64 << 20], 2),  # last page + 1 of the block
    ([2**64 - PAGE], 0),
])
def test_error_offsets(k, offsets, bad):
    assert error_of(k, packet(k, offsets=offsets), blocks=BLOCKS) == (f"offsets[{bad}]", 320 + 8 * bad)


def test_error_offsets_block_smaller_than_a_page(k):
    assert error_of(k, packet(k, offsets=[0], ramblock="tiny"), blocks=BLOCKS) == ("offsets[0]", 320)


def test_offsets_without_blocks_only_alignment(k):
    hdr = k.unpack_packet_header(packet(k, offsets=[2**64 - PAGE], ramblock="any"))
    assert hdr.offsets.tolist() == [2**64 - PAGE]
    assert error_of(k, packet(k, offsets=[3])) == ("offsets[0]", 320)


def test_page_size_other_than_4k(k):
    raw = packet(k, offsets=[0x10000, 0x20000])
    assert k.unpack_packet_header(raw, page_size=0x10000, blocks=BLOCKS).data_size == 0x20000
    assert error_of(k, packet(k, offsets=[PAGE]), page_size=0x10000) == ("offsets[0]", 320)


@pytest.mark.parametrize("make", [
    bytes, bytearray, memoryview,
    lambda b: np.frombuffer(bytes(b), np.uint8),
    lambda b: np.frombuffer(bytes(b), ">u8"),
    lambda b: np.frombuffer(bytes(b), np.uint8).reshape(-1, 64),
])
def test_unpack_accepts_any_buffer(k, make):
    raw = packet(k)
    assert k.unpack_packet_header(make(raw), blocks=BLOCKS).normal_pages == 2


def test_unpack_from_mmap(k):
    raw = packet(k)
    with mmap.mmap(-1, len(raw)) as m:
        m[:] = raw
        assert k.unpack_packet_header(m, blocks=BLOCKS).offsets.tolist() == [0, 0x6000]


def test_rejects_bad_buffers_and_arguments(k):
    raw = np.frombuffer(bytes(packet(k)) * 2, np.uint8)
    with pytest.raises(TypeError):
        k.unpack_packet_header(raw[::2])
    with pytest.raises(TypeError):
        k.unpack_packet_header([1, 2, 3])
    for kwargs in ({"page_size": 3000}, {"page_size": 0}, {"compression": "lz4"},
                   {"compression": 1}, {"version": "5.0"}):
        with pytest.raises(ValueError):
            k.unpack_packet_header(bytes(raw), **kwargs)
    with pytest.raises(OverflowError):
        k.unpack_packet_header(bytes(raw), max_pages=-1)
    with pytest.raises(TypeError):
        k.unpack_packet_header(bytes(raw), page_size=4096.0)


@pytest.mark.parametrize("make", [
    bytearray,
    lambda n: np.zeros(n, np.uint8),
    lambda n: np.zeros(n // 8, np.uint64),
    lambda n: memoryview(bytearray(n)),
])
def test_pack_into_any_writable_buffer(k, make):
    out = make(1344)
    assert k.pack_packet_header(out, flags=0, pages_alloc=128, normal_pages=1,
                                next_packet_size=PAGE, packet_num=1, ramblock="pc.ram",
                                offsets=[PAGE]) == 1344
    assert bytes(memoryview(out).cast("B")) == packet(k, offsets=[PAGE], packet_num=1)


def test_pack_errors_leave_out_untouched(k):
    args = dict(flags=0, pages_alloc=4, normal_pages=1, next_packet_size=0, packet_num=0,
                ramblock="pc.ram", offsets=[0])
    cases = [
        (ValueError, dict(normal_pages=5, offsets=[0] * 5)),
        (ValueError, dict(ramblock="x" * 256)),
        (ValueError, dict(ramblock="a\0b")),
        (ValueError, dict(offsets=[0] * 5)),
        (ValueError, dict(normal_pages=2)),
        (TypeError, dict(pages_used=1)),
        (TypeError, dict(ramblock=1)),
        (OverflowError, dict(flags=2**32)),
        (OverflowError, dict(packet_num=-1)),
        (OverflowError, dict(offsets=[-1])),
    ]
    for exc, change in cases:
        out = bytearray(b"\xee" * 400)
        with pytest.raises(exc):
            k.pack_packet_header(out, **{**args, **change})
        assert out == b"\xee" * 400
    with pytest.raises(ValueError):
        k.pack_packet_header(bytearray(351), **args)
    with pytest.raises(TypeError):
        k.pack_packet_header(bytes(400), **args)
    with pytest.raises(TypeError):
        k.pack_packet_header(bytearray(400), **{k2: v for k2, v in args.items() if k2 != "normal_pages"})


def test_pack_packet_appends_data(k):
    data = bytes(range(256)) * 16
    raw = k.pack_packet(flags=1, pages_alloc=2, packet_num=9, ramblock="pc.ram",
                        offsets=np.array([PAGE * 4], np.uint64), data=data)
    hdr = k.unpack_packet_header(raw, blocks=BLOCKS)
    assert hdr.normal_pages == 1 and hdr.next_packet_size == PAGE
    assert raw[hdr.header_size:] == data


def test_surrogate_names_round_trip(k):
    raw = bytearray(packet(k, ramblock="x"))
    raw[64:68] = b"\xffab\0"
    hdr = k.unpack_packet_header(raw)
    assert hdr.ramblock == "\udcffab"
    assert packet(k, ramblock=hdr.ramblock)[64:68] == b"\xffab\0"


# ---------------------------------------------------------------------------
# the two backends agree


header_args = st.fixed_dictionaries({
    "flags": st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2, 3, 4, 5]),
    "pages_alloc": st.integers(0, 130),
    "fill": st.floats(0, 1),
    "next_packet_size": st.integers(0, 2**32 - 1),
    "packet_num": st.integers(0, 2**64 - 1),
    "ramblock": st.sampled_from(["pc.ram", "pc.bios", "tiny", "", "unknown", "é"]),
    "offset_pages": st.lists(st.integers(0, (64 << 20) // PAGE), max_size=130),
    "misalign": st.integers(0, 3),
})


def build(a):
    n = int(a["pages_alloc"] * a["fill"])
    offs = (a["offset_pages"] * (n // max(len(a["offset_pages"]), 1) + 1))[:n] if a["offset_pages"] else [0] * n
    offs = np.array([o * PAGE + a["misalign"] * (i == n // 2) for i, o in enumerate(offs)], np.uint64)
    return dict(flags=a["flags"], pages_alloc=a["pages_alloc"], normal_pages=n,
                next_packet_size=a["next_packet_size"], packet_num=a["packet_num"],
                ramblock=a["ramblock"], offsets=offs)


@settings(max_examples=300, deadline=None)
@given(header_args, st.sampled_from(["none", "zlib", "zstd"]), st.sampled_from(["7.2", "4.1", "10.0"]))
def test_backends_agree_on_headers(a, compression, version):
    kwargs = build(a)
    outs = []
    for kk in (COMPILED, REFERENCE):
        buf = bytearray(kk.header_size(kwargs["pages_alloc"]) + 8)
        outs.append((outcome(kk.pack_packet_header, buf, **kwargs), bytes(buf)))
    assert outs[0] == outs[1]
    raw = outs[0][1]
    results = [outcome(kk.unpack_packet_header, raw, blocks=BLOCKS, compression=compression,
                       version=version, max_pages=128) for kk in (COMPILED, REFERENCE)]
    assert results[0] == results[1]
    if results[0][0] == "ok":
        d = results[0][2]
        count = d["pages_used" if version == "4.1" else "normal_pages"]
        if count:
            assert d["offsets"] == kwargs["offsets"].tolist()
            assert d["ramblock"] == kwargs["ramblock"]
        assert d["packet_num"] == kwargs["packet_num"]


def check_valid(d, blocks, compression_bits, max_pages=128):
    """Invariants every successfully unpacked header satisfies."""
    assert d["pages_alloc"] <= max_pages
    n = d["normal_pages"]
    z = d.get("zero_pages", 0)
    assert n + z <= d["pages_alloc"] and len(d["offsets"]) == n
    assert len(d.get("zero_offsets", ())) == z
    if n + z:
        assert d["flags"] & (0x3E if "zero_pages" in d else 0xE) == compression_bits
        assert d["ramblock"] in blocks
        for off in d["offsets"] + d.get("zero_offsets", []):
            assert off % PAGE == 0 and off + PAGE <= blocks[d["ramblock"]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1400), st.integers(0, 255)), max_size=8),
       st.integers(0, 1400), st.sampled_from(["none", "zlib"]), st.sampled_from(["7.2", "10.0"]))
def test_mutated_packets_raise_or_validate(flips, cut, compression, version):
    base = packet(COMPILED, flags=0x2 if compression == "zlib" else 0,
                  offsets=[PAGE * i for i in range(0, 40, 3)],
                  zero_offsets=[PAGE * i for i in range(1, 40, 7)] if version == "10.0" else None)
    raw = bytearray(base)
    for pos, val in flips:
        if pos < len(raw):
            raw[pos] = val
    raw = raw[:cut] if cut < len(raw) else raw
    results = [outcome(kk.unpack_packet_header, bytes(raw), blocks=BLOCKS, compression=compression,
                       version=version) for kk in (COMPILED, REFERENCE)]
    assert results[0] == results[1]
    if results[0][0] == "error":
        assert results[0][1] == "MultifdPacketError" and results[0][2] is not None
    else:
        check_valid(results[0][2], BLOCKS, 0x2 if compression == "zlib" else 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(0, 4))
def test_random_init_packets_are_refused(raw, channels):
    """Random bytes (almost never a valid magic and version) give the typed error."""
    result = outcome(ip.unpack_init_packet, raw, channels=channels)
    assert result[0] == "error" and result[1] == "MultifdPacketError"


# ---------------------------------------------------------------------------
# placing and gathering pages


def guarded(n, fill=0xA5, guard=64):
    buf = np.full(n + 2 * guard, fill, np.uint8)
    return buf, buf[guard:guard + n]


def test_place_and_gather_round_trip(k):
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256, 32 * PAGE, dtype=np.uint8)
    offs = np.array([5, 0, 31, 7], np.uint64) * PAGE
    data = bytearray(len(offs) * PAGE)
    assert k.gather_pages(block, offs, data, PAGE) == len(data)
    for i, off in enumerate(offs.tolist()):
        assert data[i * PAGE:(i + 1) * PAGE] == block[off:off + PAGE].tobytes()
    full, target = guarded(32 * PAGE)
    assert k.place_pages(bytes(data), offs, target, PAGE) == len(data)
    for off in offs.tolist():
        assert np.array_equal(target[off:off + PAGE], block[off:off + PAGE])
    assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()


def test_place_pages_refuses_bad_offsets_untouched(k):
    full, target = guarded(8 * PAGE)
    data = bytes(3 * PAGE)
    for offs, field in (([0, PAGE, 8 * PAGE], "offsets[2]"), ([0, 3, PAGE], "offsets[1]"),
                        ([2**64 - PAGE], "offsets[0]")):
        with pytest.raises(MultifdPacketError) as info:
            k.place_pages(data, np.array(offs, np.uint64), target, PAGE)
        assert info.value.field == field
        assert (full == 0xA5).all()
    with pytest.raises(MultifdPacketError) as info:
        k.place_pages(data[:-1], [0, PAGE, 2 * PAGE], target, PAGE)
    assert info.value.field == "data" and (full == 0xA5).all()
    with pytest.raises(TypeError):
        k.place_pages(data, [0], bytes(8 * PAGE), PAGE)
    assert k.place_pages(b"", [], target, PAGE) == 0


def test_gather_pages_errors(k):
    with pytest.raises(ValueError):
        k.gather_pages(bytes(4 * PAGE), [4 * PAGE], bytearray(PAGE), PAGE)
    with pytest.raises(ValueError):
        k.gather_pages(bytes(4 * PAGE), [0, PAGE], bytearray(PAGE), PAGE)
    with pytest.raises(ValueError):
        k.gather_pages(bytes(100), [0], bytearray(PAGE), PAGE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 20).map(lambda p: p * 512), max_size=12),
       st.integers(0, 12 * 512), st.sampled_from([512, 1024]))
def test_place_pages_backends_agree_and_stay_in_bounds(offsets, block_len, page_size):
    data = bytes(range(256)) * (len(offsets) * page_size // 256 + 1)
    results = []
    for kk in (COMPILED, REFERENCE):
        full, target = guarded(block_len)
        res = outcome(kk.place_pages, data, np.array(offsets, np.uint64), target, page_size)
        assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()
        if res[0] == "error":
            assert (target == 0xA5).all()
        results.append((res, full.tobytes()))
    assert results[0] == results[1]


# ---------------------------------------------------------------------------
# compression streams


def make_pages(rng, n):
    pages = np.zeros((n, PAGE), np.uint8)
    pages[:, :200] = rng.integers(0, 256, (n, 200))
    pages[:, 1000:3000] = np.arange(2000, dtype=np.uint8)
    return pages


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_stream_round_trip_many_packets(method):
    rng = np.random.default_rng(2)
    tx, rx = mf.send_stream(method), mf.recv_stream(method)
    for n in (1, 128, 17, 3, 128):
        pages = make_pages(rng, n)
        data = tx.compress_pages(pages if n % 2 else list(pages))
        full, target = guarded(n * PAGE)
        assert rx.decompress_into(data, target, n, PAGE) == n * PAGE
        assert target.tobytes() == pages.tobytes()
        assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()


def test_stream_wire_markers():
    rng = np.random.default_rng(3)
    z = mf.ZlibSendStream(1)
    first, second = z.compress_pages(make_pages(rng, 2)), z.compress_pages(make_pages(rng, 2))
    assert first[:2] == b"\x78\x01" and first.endswith(b"\x00\x00\xff\xff")
    assert second[:1] != b"\x78" and second.endswith(b"\x00\x00\xff\xff")
    s = mf.ZstdSendStream(1)
    first, second = s.compress_pages(make_pages(rng, 2)), s.compress_pages(make_pages(rng, 2))
    assert first[:4] == b"\x28\xb5\x2f\xfd" and second[:4] != b"\x28\xb5\x2f\xfd"
    assert mf.NoneSendStream().compress_pages([]) == z.compress_pages([]) == s.compress_pages([]) == b""


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_stream_continuity_needs_one_decoder(method):
    pages = np.tile(np.arange(PAGE, dtype=np.uint8) * 7, (8, 1))
    tx = mf.send_stream(method)
    packets = [tx.compress_pages(pages[i:i + 2]) for i in range(0, 8, 2)]
    rx = mf.recv_stream(method)
    for data in packets:  # one persistent stream: all fine
        out = bytearray(2 * PAGE)
        rx.decompress_into(data, out, 2, PAGE)
        assert bytes(out) == pages[:2].tobytes()
    for data in packets[1:]:  # each later packet alone refers back to earlier ones
        with pytest.raises(MultifdPacketError):
            mf.recv_stream(method).decompress_into(data, bytearray(2 * PAGE), 2, PAGE)


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_stream_too_long_and_too_short(method):
    pages = make_pages(np.random.default_rng(4), 3)
    data = mf.send_stream(method).compress_pages(pages)
    full, target = guarded(2 * PAGE)
    with pytest.raises(MultifdPacketError) as info:
        mf.recv_stream(method).decompress_into(data, target, 2, PAGE)
    assert info.value.field == "data"
    assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()
    with pytest.raises(MultifdPacketError) as info:
        mf.recv_stream(method).decompress_into(data, bytearray(4 * PAGE), 4, PAGE)
    assert info.value.field == "next_packet_size"


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_decompression_bomb_is_bounded(method):
    """1 GiB of zeros compressed into a few KiB is refused after one page's worth."""
    if method == "zlib":
        c = zlib.compressobj(9)
        data = b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush(zlib.Z_SYNC_FLUSH)
    else:
        import zstandard
        c = zstandard.ZstdCompressor(level=3).compressobj()
        data = b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush(
            zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert len(data) < 2 << 20
    full, target = guarded(PAGE)
    with pytest.raises(MultifdPacketError):
        mf.recv_stream(method).decompress_into(data, target, 1, PAGE)
    assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_stream_fails_stop_after_an_error(method):
    tx, rx = mf.send_stream(method), mf.recv_stream(method)
    pages = make_pages(np.random.default_rng(5), 2)
    with pytest.raises(MultifdPacketError):
        rx.decompress_into(b"\x01\x02\x03", bytearray(2 * PAGE), 2, PAGE)
    with pytest.raises(MultifdPacketError):
        rx.decompress_into(tx.compress_pages(pages), bytearray(2 * PAGE), 2, PAGE)


def test_stream_argument_errors():
    rx = mf.ZlibRecvStream()
    with pytest.raises(ValueError):
        rx.decompress_into(b"", bytearray(PAGE), 2, PAGE)
    with pytest.raises(TypeError):
        rx.decompress_into(b"", bytes(PAGE), 1, PAGE)
    assert rx.decompress_into(b"", bytearray(0), 0, PAGE) == 0
    with pytest.raises(MultifdPacketError):
        mf.NoneRecvStream().decompress_into(b"x", bytearray(0), 0, PAGE)
    with pytest.raises(ParameterError):
        mf.ZlibSendStream(10)
    with pytest.raises(ParameterError):
        mf.ZstdSendStream(21)
    with pytest.raises(ParameterError):
        mf.send_stream("lz4")
    with pytest.raises(ParameterError):
        mf.recv_stream("lz4")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["none", "zlib", "zstd"]), st.integers(1, 4),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**6))
def test_hostile_compressed_data(method, npages, flips, cut):
    pages = make_pages(np.random.default_rng(npages), npages)
    data = bytearray(mf.send_stream(method).compress_pages(pages))
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[:cut % (len(data) + 1)]
    full, target = guarded(npages * PAGE)
    try:
        mf.recv_stream(method).decompress_into(bytes(data), target, npages, PAGE)
    except MultifdPacketError:
        pass
    assert (full[:64] == 0xA5).all() and (full[-64:] == 0xA5).all()


def test_public_module_exports():
    for name in mf.__all__:
        assert getattr(mf, name) is not None
    for name in COMPILED.__all__:
        assert hasattr(REFERENCE, name) and name in mf.__all__
    assert mf.header_size(128) == 1344 and MULTIFD_MAGIC == 0x11223344
