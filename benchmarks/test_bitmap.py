"""Dirty-bitmap speed for a 1 TiB guest: 2^28 pages, a 32 MiB bitmap.

Each figure is a ratio to a memcpy of the bitmap's 32 MiB (cold: bitmap
plus log exceed L3), so 1.0 means "as fast as copying the bitmap once".
sync: OR a dirty log into the bitmap and count newly dirty pages, with a
sparse log (one page in 4096) and a dense one (about half the pages);
after the first call those add nothing new, so the bitmap is only read.
sync_dense_new_bits clears the bitmap before each sync so that every
word changes and is written back (figure includes the 32 MiB clear).
find_next: walk every dirty page of a sparse bitmap (one in 65536) with
``find_next`` from Python. sync_then_take_dirty: one engine round on that
bitmap, a sparse sync plus a ``take_dirty`` batch walk taking every dirty
page (the take alone cannot be repeated: it consumes the bits). count: popcount of the whole bitmap.

Run: ``python -m pytest benchmarks/test_bitmap.py --benchmark-enable -q -s``
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled

bm = load_compiled("bitmap")

NPAGES = 1 << 28
NBYTES = NPAGES // 8
NWORDS = NPAGES // 64


def _popcount(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum())


def _log(kind: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    if kind == "dense":
        return np.frombuffer(rng.bytes(NBYTES), np.uint64).copy()
    log = np.zeros(NWORDS, np.uint64)
    pages = rng.choice(NPAGES, NPAGES // 4096, replace=False)
    np.bitwise_or.at(log, pages // 64, np.uint64(1) << (pages % 64).astype(np.uint64))
    return log


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_sync(vs_memcpy, kind):
    log = _log(kind)
    b = bm.DirtyBitmap(NPAGES)
    first = b.sync(log)
    assert first == _popcount(log)
    assert vs_memcpy(lambda: b.sync(log), NBYTES, cold=True) == 0  # nothing new after the first
    assert b.count() == first


def test_sync_dense_new_bits(vs_memcpy):
    log = _log("dense")
    b = bm.DirtyBitmap(NPAGES)
    want = _popcount(log)

    def clear_then_sync() -> int:
        b.clear(0, NPAGES)
        return b.sync(log)

    assert vs_memcpy(clear_then_sync, NBYTES, cold=True) == want


@pytest.fixture(scope="module")
def sparse_bitmap():
    b = bm.DirtyBitmap(NPAGES)
    log = np.zeros(NWORDS, np.uint64)
    log[:: 65536 // 64] = np.uint64(1) << np.uint64(17)
    b.sync(log)
    return b, NPAGES // 65536


def test_find_next_walk_sparse(vs_memcpy, sparse_bitmap):
    b, ndirty = sparse_bitmap

    def walk() -> int:
        n, p = 0, b.find_next(0)
        while p < NPAGES:
            n += 1
            p = b.find_next(p + 1)
        return n

    assert vs_memcpy(walk, NBYTES, cold=True) == ndirty


def test_sync_then_take_dirty_sparse(vs_memcpy, sparse_bitmap):
    b, ndirty = sparse_bitmap
    out = np.empty(ndirty, np.int64)
    log = b.words.copy()

    def walk() -> int:
        b.sync(log)
        return b.take_dirty(0, ndirty, out)

    assert vs_memcpy(walk, NBYTES, cold=True) == ndirty
    assert b.count() == 0 and (out == np.arange(ndirty) * 65536 + 17).all()
    b.sync(log)


def test_count(vs_memcpy):
    b = bm.DirtyBitmap(NPAGES)
    log = _log("dense")
    b.sync(log)
    assert vs_memcpy(b.count, NBYTES, cold=True) == _popcount(log)
