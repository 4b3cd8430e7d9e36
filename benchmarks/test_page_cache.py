"""XBZRLE page-cache speed through the batch interface (compiled kernel).

A 64 MiB cache (16384 slots of 4 KiB, QEMU's default size). Lookups: one
``lookup_batch`` of 65536 addresses, half of them cached, spread over the
whole table; ``extra_info["lookups_per_second"]`` is the figure that
matters (``nbytes`` = the 8-byte addresses read; that memcpy ratio is
only there for the harness's convention, a lookup copies no page).
Inserts: one ``insert_batch`` of 256 pages (1 MiB) into random slots, each
accepted; ``nbytes`` = the page bytes copied, so 1.0 means memcpy speed
(hot: the same 1 MiB of pages into the same 256 slots each time, so it
is compared with a hot memcpy).

Run: ``python -m pytest benchmarks/test_page_cache.py --benchmark-enable -q -s``
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled

pc = load_compiled("page_cache")

PAGE = 4096
SIZE = 64 << 20
ENTRIES = SIZE // PAGE


@pytest.fixture(scope="module")
def filled():
    cache = pc.PageCache(SIZE)
    addrs = np.arange(ENTRIES, dtype=np.uint64) * PAGE
    pages = np.zeros((ENTRIES, PAGE), np.uint8)
    out = np.empty(ENTRIES, np.int64)
    assert cache.insert_batch(addrs, pages, 0, out) == ENTRIES
    return cache


def _rate(benchmark, n: int, name: str) -> None:
    seconds = benchmark.extra_info.get("kernel_seconds")
    if seconds:
        benchmark.extra_info[name] = round(n / seconds)
        print(f"  {n / seconds / 1e6:.0f} M {name.replace('_', ' ')}")


def test_lookup_batch(vs_memcpy, benchmark, filled):
    n = 1 << 16
    rng = np.random.default_rng(1)
    slots = rng.integers(0, ENTRIES, n, dtype=np.uint64)
    hit = rng.integers(0, 2, n, dtype=np.uint64).astype(bool)
    # a hit is the cached address; a miss maps to the same slot but another page
    addrs = (slots + np.where(hit, 0, ENTRIES).astype(np.uint64)) * np.uint64(PAGE)
    out = np.empty(n, np.int64)
    hits = vs_memcpy(lambda: filled.lookup_batch(addrs, 1, out), 8 * n, cold=False)
    assert hits == int(hit.sum())
    assert (out[hit] == slots[hit].astype(np.int64)).all() and (out[~hit] == -1).all()
    _rate(benchmark, n, "lookups_per_second")


def test_insert_batch(vs_memcpy, benchmark):
    cache = pc.PageCache(SIZE)
    n = 256
    rng = np.random.default_rng(2)
    addrs = rng.choice(ENTRIES, n, replace=False).astype(np.uint64) * np.uint64(PAGE)
    pages = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    out = np.empty(n, np.int64)
    state = {"gen": 0}

    def insert() -> int:
        state["gen"] += 2  # every slot is old enough to be replaced
        return cache.insert_batch(addrs, pages, state["gen"], out)

    assert vs_memcpy(insert, n * PAGE, cold=False) == n
    assert (cache.data[out] == pages).all()
    _rate(benchmark, n, "inserts_per_second")


def test_is_cached_single(vs_memcpy, benchmark, filled):
    # the per-page Python call, for comparison with the batch
    assert vs_memcpy(lambda: filled.is_cached(PAGE * 5, 1), 8, cold=False) is True
    _rate(benchmark, 1, "lookups_per_second")
