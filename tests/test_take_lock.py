"""``DirtyBitmap.take_dirty`` under a WireLock shared with another taker (postcopy preempt).

The background stream takes batches of dirty pages under the lock the
compiled request server clears bits under; every page must go out once,
armed chunks must still have their dirty log cleared first, and only the
pages still dirty after those callbacks are returned.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qmigx import _backend

BACKENDS = ["compiled", "reference"]


def _mods(which: str):
    load = _backend.load_compiled if which == "compiled" else _backend.load_reference
    return load("bitmap"), load("wirelock")


class _Source:
    def __init__(self) -> None:
        self.cleared: list = []
        self.on_clear = None

    def clear(self, start: int, npages: int) -> None:
        self.cleared.append((start, npages))
        if self.on_clear is not None:
            self.on_clear(start, npages)


@pytest.mark.parametrize("which", BACKENDS)
def test_with_a_lock_it_takes_what_it_takes_without(which):
    bm_mod, wl_mod = _mods(which)
    a, b = bm_mod.DirtyBitmap(1000), bm_mod.DirtyBitmap(1000)
    rng = np.random.default_rng(3)
    for p in rng.choice(1000, 300, replace=False).tolist():
        a.set(p)
        b.set(p)
    lock = wl_mod.WireLock()
    out_a, out_b = np.zeros(64, np.int64), np.zeros(64, np.int64)
    start = 0
    while True:
        n = a.take_dirty(start, 64, out_a, lock)
        m = b.take_dirty(start, 64, out_b)
        assert n == m and out_a[:n].tolist() == out_b[:m].tolist()
        if n == 0:
            break
        start = int(out_a[n - 1]) + 1
    assert a.count() == b.count() == 0
    assert lock.acquire(False)  # released again
    lock.release()


@pytest.mark.parametrize("which", BACKENDS)
def test_pages_taken_by_the_other_taker_during_the_callbacks_are_not_returned(which):
    bm_mod, wl_mod = _mods(which)
    src = _Source()
    bm = bm_mod.DirtyBitmap(256, clear_bitmap_shift=6, source=src)
    bm.sync(np.full(256 // 8, 0xFF, np.uint8).tobytes())  # dirty, and every chunk armed
    lock = wl_mod.WireLock()
    assert np.asarray(bm.clear_bmap).any()
    words = bm.words_to_take()

    def other_takes(start: int, npages: int) -> None:
        # runs without the lock held by take_dirty: take page 5 as the request server would
        assert lock.acquire(False)
        words[0] &= ~np.uint64(1 << 5)
        lock.release()

    src.on_clear = other_takes
    out = np.zeros(128, np.int64)
    n = bm.take_dirty(0, 128, out, lock)
    assert src.cleared  # the dirty log of the chunks was cleared first
    got = out[:n].tolist()
    assert 5 not in got and got == [p for p in range(128) if p != 5]
    assert not any(bm.test(p) for p in range(128))


@pytest.mark.parametrize("which", BACKENDS)
def test_two_takers_never_take_a_page_twice(which):
    bm_mod, wl_mod = _mods(which)
    bm = bm_mod.DirtyBitmap(1 << 14)
    bm.set(0, 1 << 14)
    lock = wl_mod.WireLock()
    words = bm.words_to_take()
    taken_by_other: list = []

    def other() -> None:
        for p in range((1 << 14) - 1, -1, -7):
            with lock:
                w, bit = p >> 6, np.uint64(1 << (p & 63))
                if words[w] & bit:
                    words[w] &= ~bit
                    taken_by_other.append(p)

    t = threading.Thread(target=other)
    t.start()
    mine: list = []
    out = np.zeros(97, np.int64)
    start = 0
    while True:
        n = bm.take_dirty(start, 97, out, lock)
        if n == 0:
            break
        mine.extend(out[:n].tolist())
        start = int(out[n - 1]) + 1
    t.join()
    assert not set(mine) & set(taken_by_other)
    assert sorted(mine + taken_by_other) == list(range(1 << 14))
