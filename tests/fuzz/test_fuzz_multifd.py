"""A million hostile inputs through each multifd decoder of the compiled kernel.

Run with ``python -m pytest tests/fuzz -m fuzz`` (deselected by default).
Inputs are made in numpy batches: valid packets with random byte
overwrites and truncations, and plain random bytes. Every input must
either raise :class:`MultifdPacketError` or unpack to a header that obeys
every receiver rule; ``place_pages`` must never write outside its block.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx import multifd as mf
from qmigx._backend import load_compiled
from qmigx.errors import MultifdPacketError
from qmigx.multifd.init_packet import pack_init_packet, unpack_init_packet

K = load_compiled("multifd_packet")
N = 1_000_000
BATCH = 10_000
PAGE = 4096
BLOCKS = {"pc.ram": 64 << 20, "pc.bios": 256 << 10, "tiny": 100}

pytestmark = pytest.mark.fuzz


def base_packets():
    """A few valid headers to mutate: none/zlib, page-less, small pages_alloc."""
    out = []
    for flags, alloc, offs, name in (
        (0x0, 128, [i * 3 * PAGE for i in range(40)], "pc.ram"),
        (0x3, 128, [0, PAGE, 60 * PAGE], "pc.bios"),
        (0x1, 128, [], "pc.ram"),
        (0x2, 16, [((64 << 20) - PAGE)] * 16, "pc.ram"),
    ):
        buf = bytearray(K.header_size(alloc))
        K.pack_packet_header(buf, flags=flags, pages_alloc=alloc, normal_pages=len(offs),
                             next_packet_size=len(offs) * 1000, packet_num=7, ramblock=name,
                             offsets=np.array(offs, np.uint64))
        out.append((bytes(buf), "zlib" if flags & 0x2 else "none"))
    return out


def check_header(hdr, compression_bits):
    n = hdr.normal_pages
    assert hdr.pages_alloc <= 128 and n <= hdr.pages_alloc and hdr.offsets.size == n
    if n:
        assert hdr.flags & 0xE == compression_bits
        used = BLOCKS[hdr.ramblock]
        offs = hdr.offsets
        assert not (offs % PAGE).any() and (offs <= used - PAGE).all()


def mutated_batch(rng, base: bytes):
    """BATCH copies of ``base`` with 1-8 random bytes overwritten, and a random length each."""
    arr = np.tile(np.frombuffer(base, np.uint8), (BATCH, 1))
    nflips = rng.integers(1, 9, BATCH)
    for j in range(8):
        rows = np.nonzero(nflips > j)[0]
        # bias positions toward the fixed fields where most rules live
        pos = np.where(rng.random(rows.size) < 0.5, rng.integers(0, 64, rows.size),
                       rng.integers(0, len(base), rows.size))
        arr[rows, pos] = rng.integers(0, 256, rows.size, dtype=np.uint8)
    lengths = np.where(rng.random(BATCH) < 0.2, rng.integers(0, len(base) + 1, BATCH), len(base))
    return arr, lengths


def test_fuzz_unpack_packet_header():
    rng = np.random.default_rng(20240601)
    bases = base_packets()
    ok = errors = 0
    for b in range(N // BATCH):
        base, compression = bases[b % len(bases)]
        if b % 10 == 9:
            arr = rng.integers(0, 256, (BATCH, len(base)), dtype=np.uint8)
            arr[: BATCH // 2, :8] = np.frombuffer(bytes.fromhex("1122334400000001"), np.uint8)
            lengths = np.full(BATCH, len(base))
        else:
            arr, lengths = mutated_batch(rng, base)
        bits = 0x2 if compression == "zlib" else 0
        for i in range(BATCH):
            row = arr[i, : lengths[i]]
            try:
                hdr = K.unpack_packet_header(row, blocks=BLOCKS, compression=compression)
            except MultifdPacketError as exc:
                assert exc.field is not None
                errors += 1
                continue
            check_header(hdr, bits)
            ok += 1
    assert ok + errors == N and ok > 0 and errors > 0


def test_fuzz_unpack_init_packet():
    rng = np.random.default_rng(7)
    base = np.frombuffer(pack_init_packet(None, 1), np.uint8)
    ok = 0
    for _ in range(N // BATCH):
        arr = np.tile(base, (BATCH, 1))
        rows = np.arange(BATCH)
        arr[rows, rng.integers(0, 32, BATCH)] = rng.integers(0, 256, BATCH, dtype=np.uint8)
        lengths = np.where(rng.random(BATCH) < 0.1, rng.integers(0, 65, BATCH), 64)
        for i in range(BATCH):
            try:
                init = unpack_init_packet(arr[i, : lengths[i]], channels=4)
            except MultifdPacketError:
                continue
            assert init.channel_id < 4 and init.uuid == bytes(16)
            ok += 1
    assert ok > 0


def test_fuzz_place_pages():
    rng = np.random.default_rng(11)
    page = 512
    guard = 256
    full = np.full(16 * page + 2 * guard, 0xA5, np.uint8)
    block = full[guard:-guard]
    data = (np.arange(8 * page) % 251).astype(np.uint8)  # never 0xA5 after the first 0xA5 page byte
    data[data == 0xA5] = 0
    done = 0
    for _ in range(N // BATCH):
        counts = rng.integers(0, 9, BATCH)
        raw = rng.integers(0, 20 * page, (BATCH, 8)).astype(np.uint64)
        raw[rng.random((BATCH, 8)) < 0.7] //= page
        raw[rng.random((BATCH, 8)) < 0.7] *= page
        raw[rng.random((BATCH, 8)) < 0.02] = np.uint64(2**64 - page)
        for i in range(BATCH):
            try:
                K.place_pages(data, raw[i, : counts[i]], block, page)
            except MultifdPacketError as exc:
                assert exc.field.startswith("offsets[")
            done += 1
        assert (full[:guard] == 0xA5).all() and (full[-guard:] == 0xA5).all()
    assert done == N


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_fuzz_compression_streams(method):
    """100,000 mutated packets per method (pure Python streams: slower per input)."""
    rng = np.random.default_rng(3)
    pages = np.zeros((4, PAGE), np.uint8)
    pages[:, :300] = rng.integers(0, 256, (4, 300))
    data = np.frombuffer(mf.send_stream(method).compress_pages(pages), np.uint8)
    guard = 64
    full = np.full(4 * PAGE + 2 * guard, 0xA5, np.uint8)
    target = full[guard:-guard]
    for _ in range(10):
        arr = np.tile(data, (BATCH, 1))
        for _ in range(3):
            arr[np.arange(BATCH), rng.integers(0, data.size, BATCH)] = rng.integers(
                0, 256, BATCH, dtype=np.uint8)
        lengths = np.where(rng.random(BATCH) < 0.2, rng.integers(0, data.size + 1, BATCH), data.size)
        for i in range(BATCH):
            try:
                mf.recv_stream(method).decompress_into(arr[i, : lengths[i]], target, 4, PAGE)
            except MultifdPacketError:
                pass
        assert (full[:guard] == 0xA5).all() and (full[-guard:] == 0xA5).all()
