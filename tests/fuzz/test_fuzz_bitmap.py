"""Million-input fuzz of the dirty bitmap's log intake (compiled backend).

A dirty log comes from a tracker the bitmap does not control, so
``DirtyBitmap.sync`` gets hostile logs here: every length around the valid
window, junk past the range, misaligned starts, ranges past the block.
Each call must either raise ``ParameterError`` and change nothing, or
OR exactly the in-range bits into the bitmap, count exactly the newly dirty
pages, keep bits past the block clear and arm exactly the overlapping
chunks. ``take_dirty`` is fuzzed too: it must never write ``out`` past the
count it returns.

Run: ``python -m pytest tests/fuzz -m fuzz``.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled
from qmigx.errors import ParameterError

bitmap = load_compiled("bitmap")

N_SYNC = 1_000_000
N_TAKE = 200_000
BATCH = 10_000


def as_int(words: np.ndarray) -> int:
    return int.from_bytes(words.tobytes(), "little")


def draw_log(rng: np.random.Generator, n: int) -> bytes:
    """A log of a plausible or hostile length, with dense, sparse or no bits."""
    lo, hi = (n + 7) // 8, 8 * ((n + 63) // 64)
    kind = rng.integers(0, 8)
    if kind == 0:
        length = int(rng.integers(0, hi + 24))  # anything, mostly wrong
    elif kind == 1:
        length = max(0, lo - 1)  # one byte short
    elif kind == 2:
        length = hi + 1  # one byte long
    else:
        length = int(rng.integers(lo, hi + 1))
    style = rng.integers(0, 3)
    if style == 0:
        return rng.bytes(length)
    if style == 1:
        data = bytearray(length)
        for pos in rng.integers(0, max(length, 1), 3):
            if length:
                data[pos] = 1 << int(rng.integers(0, 8))
        return bytes(data)
    return bytes([0xFF]) * length


@pytest.mark.fuzz
def test_fuzz_sync_hostile_logs():
    rng = np.random.default_rng(0x5EED)
    maps: dict[tuple[int, int], object] = {}
    done = 0
    while done < N_SYNC:
        # mostly small blocks; one in eight big enough for the 16-word SIMD loop
        sizes = np.where(
            rng.integers(0, 8, BATCH) == 0,
            rng.integers(700, 5000, BATCH),
            rng.integers(0, 700, BATCH),
        )
        shifts = rng.integers(6, 9, BATCH)
        for npages, shift in zip(sizes.tolist(), shifts.tolist()):
            b = maps.get((npages, shift))
            if b is None:
                b = maps[(npages, shift)] = bitmap.DirtyBitmap(npages, clear_bitmap_shift=shift)
            if rng.integers(0, 4) == 0 and npages:
                b.clear(0, npages)
            if rng.integers(0, 4) == 0:
                start = int(rng.integers(-70, npages + 70))  # often misaligned or outside
            else:
                start = 64 * int(rng.integers(0, npages // 64 + 1))
            n = None if rng.integers(0, 2) else int(rng.integers(-2, max(npages - start, 0) + 3))
            span = (npages - start) if n is None else n
            log = draw_log(rng, max(span, 0))

            before = as_int(b.words)
            armed_before = as_int(b.clear_bmap)
            try:
                newly = b.sync(log, start=start, npages=n)
            except ParameterError:
                assert as_int(b.words) == before
                assert as_int(b.clear_bmap) == armed_before
                continue
            assert start % 64 == 0 and 0 <= start and 0 <= span <= npages - start
            mask = ((1 << span) - 1) << start
            incoming = (int.from_bytes(log, "little") << start) & mask
            after = as_int(b.words)
            assert after == before | incoming
            assert after >> npages == 0
            assert newly == bin(incoming & ~before).count("1")
            if span:
                first, last = start >> shift, (start + span - 1) >> shift
                chunks = ((1 << (last - first + 1)) - 1) << first
                assert as_int(b.clear_bmap) == armed_before | chunks
            else:
                assert as_int(b.clear_bmap) == armed_before
        done += BATCH


class CountingSource:
    def __init__(self) -> None:
        self.calls = 0

    def sync(self):
        return None

    def clear(self, start_page: int, npages: int) -> None:
        self.calls += 1


@pytest.mark.fuzz
def test_fuzz_take_dirty_stays_in_bounds():
    rng = np.random.default_rng(0xB17)
    guard = 8
    done = 0
    while done < N_TAKE:
        for _ in range(BATCH):
            npages = int(rng.integers(0, 2000))
            src = CountingSource()
            b = bitmap.DirtyBitmap(npages, clear_bitmap_shift=int(rng.integers(6, 10)), source=src)
            nwords = (npages + 63) // 64
            if nwords:
                log = rng.integers(0, 2**63, nwords, dtype=np.uint64)
                for _ in range(int(rng.integers(0, 6))):  # sparser and sparser
                    log &= rng.integers(0, 2**63, nwords, dtype=np.uint64)
                b.sync(log)
            before = as_int(b.words)
            cap = int(rng.integers(0, 64))
            backing = np.full(cap + guard, -7, np.int64)
            out = backing[:cap]
            start = int(rng.integers(-3, npages + 5))
            max_pages = int(rng.integers(-2, cap + 3))
            try:
                count = b.take_dirty(start, max_pages, out)
            except ParameterError:
                assert start < 0 or not 0 <= max_pages <= cap
                assert as_int(b.words) == before
                continue
            assert (backing[count:] == -7).all()
            pages = out[:count].tolist()
            assert pages == sorted(set(pages))
            assert all(start <= p < npages and (before >> p) & 1 for p in pages)
            assert as_int(b.words) == before & ~sum(1 << p for p in pages)
            assert src.calls == len({p >> b.clear_bitmap_shift for p in pages})
        done += BATCH
