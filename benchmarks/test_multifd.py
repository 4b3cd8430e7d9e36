"""Multifd framing cost, as a ratio to copying the packet's pages.

A packet carries up to 128 pages (512 KiB); its header is packed by the
sender and unpacked and validated by the receiver once per packet. The
target is that both together cost under 2% of copying those 512 KiB,
i.e. a ratio to memcpy above 50. The copy baseline is measured cold
(pages not in cache, as when they come from guest RAM or a socket) and
warm; both are recorded.

Run: ``python -m pytest benchmarks/test_multifd.py --benchmark-enable -q -s``.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled

K = load_compiled("multifd_packet")
PAGE = 4096
NPAGES = 128
PAYLOAD = NPAGES * PAGE
BLOCK = 64 << 20
BLOCKS = {"pc.ram": BLOCK}


@pytest.fixture(scope="module")
def header_case():
    rng = np.random.default_rng(0)
    offsets = np.sort(rng.choice(BLOCK // PAGE, NPAGES, replace=False)).astype(np.uint64) * PAGE
    out = bytearray(K.header_size(NPAGES))
    return offsets, out


def _pack_unpack(offsets, out):
    def run():
        K.pack_packet_header(out, flags=1, pages_alloc=NPAGES, normal_pages=NPAGES,
                             next_packet_size=PAYLOAD, packet_num=42, ramblock="pc.ram",
                             offsets=offsets)
        return K.unpack_packet_header(out, blocks=BLOCKS)
    return run


def _record_percent(benchmark):
    ratio = benchmark.extra_info.get("ratio_to_memcpy")
    if ratio:
        benchmark.extra_info["percent_of_copy"] = round(100.0 / ratio, 3)
        print(f"header pack+unpack = {100.0 / ratio:.2f}% of copying the pages")


def test_header_pack_unpack_vs_cold_copy(vs_memcpy, benchmark, header_case):
    offsets, out = header_case
    hdr = vs_memcpy(_pack_unpack(offsets, out), PAYLOAD, cold=True)
    assert hdr.normal_pages == NPAGES and np.array_equal(hdr.offsets, offsets)
    _record_percent(benchmark)


def test_header_pack_unpack_vs_warm_copy(vs_memcpy, benchmark, header_case):
    offsets, out = header_case
    hdr = vs_memcpy(_pack_unpack(offsets, out), PAYLOAD, cold=False)
    assert hdr.ramblock == "pc.ram" and hdr.data_size == PAYLOAD
    _record_percent(benchmark)


@pytest.fixture(scope="module")
def block_case():
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256, BLOCK, dtype=np.uint8)
    # 64 packets' worth of scattered pages, walked in turn so the block stays out of cache
    offsets = [np.sort(rng.choice(BLOCK // PAGE, NPAGES, replace=False)).astype(np.uint64) * PAGE
               for _ in range(64)]
    data = rng.integers(0, 256, PAYLOAD, dtype=np.uint8)
    return block, offsets, data


def test_place_pages_vs_cold_copy(vs_memcpy, block_case):
    block, offsets, data = block_case
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(offsets)
        return K.place_pages(data, offsets[i], block, PAGE)

    assert vs_memcpy(run, PAYLOAD, cold=True) == PAYLOAD
    off = int(offsets[state["i"]][5])
    assert np.array_equal(block[off:off + PAGE], data[5 * PAGE:6 * PAGE])


def test_gather_pages_vs_cold_copy(vs_memcpy, block_case):
    block, offsets, _ = block_case
    out = np.empty(PAYLOAD, np.uint8)
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(offsets)
        return K.gather_pages(block, offsets[i], out, PAGE)

    assert vs_memcpy(run, PAYLOAD, cold=True) == PAYLOAD
    off = int(offsets[state["i"]][7])
    assert np.array_equal(out[7 * PAGE:8 * PAGE], block[off:off + PAGE])
