"""Shared harness: every benchmark reports its speed as a ratio to memcpy.

The baseline is measured in the same run, on the same machine, over the
same number of bytes, so the ratio holds across machines and loads far
better than an absolute figure would. ``ratio > 1`` means faster than a
plain copy of those bytes.

Run with ``python -m pytest benchmarks --benchmark-enable``; ratios are
printed and stored in each benchmark's ``extra_info``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest


def best_seconds(fn: Callable[[], object], *, repeat: int = 5, min_time: float = 0.02) -> float:
    """Best time of one call of ``fn``, calibrated so each sample lasts >= min_time."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or loops >= 1 << 20:
            break
        loops *= 2
    best = dt / loops
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


_memcpy_cache: dict[tuple[int, bool], float] = {}


def memcpy_seconds(nbytes: int, *, cold: bool) -> float:
    """Seconds to copy ``nbytes`` with numpy (a memcpy).

    ``cold``: copy between buffers of at least 64 MiB, walking through them
    so the data is not in cache; otherwise the same small buffers each time.
    """
    key = (nbytes, cold)
    if key not in _memcpy_cache:
        if cold:
            span = max(nbytes, 64 << 20)
            src = np.random.default_rng(1).integers(0, 256, span, dtype=np.uint8)
            dst = np.empty_like(src)
            dst[:] = 1
            chunks = span // nbytes
            state = {"i": 0}

            def copy() -> None:
                i = state["i"]
                lo = (i % chunks) * nbytes
                np.copyto(dst[lo : lo + nbytes], src[lo : lo + nbytes])
                state["i"] = i + 1

        else:
            src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
            dst = np.empty_like(src)

            def copy() -> None:
                np.copyto(dst, src)

        _memcpy_cache[key] = best_seconds(copy)
    return _memcpy_cache[key]


@pytest.fixture
def vs_memcpy(benchmark):
    """Run ``fn`` under pytest-benchmark and record its ratio to memcpy.

    Usage: ``result = vs_memcpy(fn, nbytes, cold=True)``; ``nbytes`` is the
    number of payload bytes one call of ``fn`` processes.
    """

    def run(fn: Callable[[], object], nbytes: int, *, cold: bool, rounds: int = 0):
        if rounds:  # slow cases: a fixed number of rounds instead of calibration
            result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        else:
            result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            kernel = stats.stats.median
            base = memcpy_seconds(nbytes, cold=cold)
            ratio = base / kernel if kernel > 0 else float("inf")
            benchmark.extra_info.update(
                nbytes=nbytes,
                cold=cold,
                memcpy_seconds=base,
                kernel_seconds=kernel,
                ratio_to_memcpy=round(ratio, 4),
            )
            print(f"\n{benchmark.name}: {ratio:.3f}x memcpy ({nbytes} bytes)")
        return result

    return run
