"""Zero-page detection speed as ratios to memcpy (compiled kernel, best SIMD path).

Cold: one ``zero_page_map`` call over a 1 GiB block (far beyond L3) of
zero pages, then of random pages. Hot: a 64 KiB block (16 pages) scanned
again and again. ``nbytes`` is the block size, so a ratio of 1.0 means "as
fast as copying the block once"; ``extra_info["gbytes_per_second"]`` gives
the scan rate. Zero pages are the expensive case (every byte is read);
random pages stop at the first word.

Run: ``python -m pytest benchmarks/test_zeropage.py --benchmark-enable -q -s``
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled

zp = load_compiled("zeropage")

PAGE = 4096
COLD = 1 << 30
HOT = 64 << 10


def _block(size: int, kind: str) -> np.ndarray:
    buf = np.empty(size, np.uint8)
    if kind == "zero":
        buf.fill(0)  # really backed: not the kernel's shared zero page
    else:
        buf[:] = np.frombuffer(np.random.default_rng(5).bytes(size), np.uint8)
        buf[::PAGE] |= 1  # every page non-zero for sure
    return buf


@pytest.fixture(scope="module")
def cold_zero():
    return _block(COLD, "zero")


@pytest.fixture(scope="module")
def cold_random():
    return _block(COLD, "random")


def _run(vs_memcpy, benchmark, block: np.ndarray, cold: bool, want_zero: bool) -> None:
    out = np.empty(block.size // PAGE, np.bool_)
    result = vs_memcpy(lambda: zp.zero_page_map(block, PAGE, out=out), block.size, cold=cold)
    assert result is out
    assert out.all() if want_zero else not out.any()
    benchmark.extra_info["simd"] = zp.simd
    seconds = benchmark.extra_info.get("kernel_seconds")
    if seconds:
        benchmark.extra_info["gbytes_per_second"] = round(block.size / seconds / 1e9, 2)
        print(f"  {zp.simd}: {block.size / seconds / 1e9:.1f} GB/s")


def test_zero_page_map_cold_zero(vs_memcpy, benchmark, cold_zero):
    _run(vs_memcpy, benchmark, cold_zero, True, True)


def test_zero_page_map_cold_random(vs_memcpy, benchmark, cold_random):
    _run(vs_memcpy, benchmark, cold_random, True, False)


def test_zero_page_map_hot_zero(vs_memcpy, benchmark):
    _run(vs_memcpy, benchmark, _block(HOT, "zero"), False, True)


def test_zero_page_map_hot_random(vs_memcpy, benchmark):
    _run(vs_memcpy, benchmark, _block(HOT, "random"), False, False)


def test_is_zero_hot_page(vs_memcpy, benchmark):
    page = _block(PAGE, "zero")
    assert vs_memcpy(lambda: zp.is_zero(page), PAGE, cold=False) is True
