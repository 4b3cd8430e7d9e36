"""Dirty bitmap: layout, sync counting, chunked log clearing, compiled == reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmigx.bitmap
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import ParameterError, StateError

compiled = load_compiled("bitmap")
reference = load_reference("bitmap")


def _available_paths() -> list[str]:
    previous = compiled._simd_path()
    found = []
    try:
        for name in ("avx2", "popcnt", "portable"):
            compiled._set_simd(name)
            if compiled._simd_path() == name:
                found.append(name)
    finally:
        compiled._set_simd(previous)
    return found


PATHS = _available_paths()


class each_path:
    """Run a block with the compiled sync pinned to each available path."""

    def __iter__(self):
        previous = compiled._simd_path()
        try:
            for name in PATHS:
                compiled._set_simd(name)
                yield name
        finally:
            compiled._set_simd(previous)


pytestmark = pytest.mark.kernel("bitmap", paths=PATHS)


@pytest.fixture
def bm(kernel):
    """The reference twin, or the compiled kernel pinned to one sync path (tests/conftest.py)."""
    return kernel


def test_paths():
    assert PATHS[-1] == "portable" and compiled._simd_path() == PATHS[0]
    with pytest.raises(ParameterError):
        compiled._set_simd("sse9")


class FakeSource:
    """A dirty-log source fed by the test: ``dirty(page)`` marks, ``sync`` hands over."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.pending = np.zeros((npages + 63) // 64, np.uint64)
        self.clears: list[tuple[int, int]] = []
        self.on_clear = None

    def dirty(self, *pages: int) -> None:
        for p in pages:
            self.pending[p // 64] |= np.uint64(1 << (p % 64))

    def sync(self):
        if not self.pending.any():
            return None
        log, self.pending = self.pending, np.zeros_like(self.pending)
        return log

    def clear(self, start_page: int, npages: int) -> None:
        self.clears.append((start_page, npages))
        if self.on_clear is not None:
            self.on_clear(start_page, npages)


def pages_of(b) -> list[int]:
    out, p = [], b.find_next(0)
    while p < b.npages:
        out.append(p)
        p = b.find_next(p + 1)
    return out


def test_public_module():
    assert isinstance(FakeSource(1), qmigx.bitmap.DirtyLogSource)
    assert not isinstance(object(), qmigx.bitmap.DirtyLogSource)
    assert "DirtyLogSource" in qmigx.bitmap.__all__ and "DirtyBitmap" in qmigx.bitmap.__all__
    assert (qmigx.bitmap.CLEAR_BITMAP_SHIFT_DEFAULT, qmigx.bitmap.CLEAR_BITMAP_SHIFT_MIN,
            qmigx.bitmap.CLEAR_BITMAP_SHIFT_MAX) == (18, 6, 31)


def test_layout_little_endian_bits_in_uint64_words(bm):
    b = bm.DirtyBitmap(200)
    b.set(0)
    b.set(65)
    b.set(199)
    assert b.words.dtype == np.uint64 and b.words.shape == (4,)
    assert b.words.tolist() == [1, 2, 0, 1 << (199 - 192)]
    assert b.words.tobytes()[8] == 2  # byte view is the little-endian layout
    with pytest.raises(ValueError):
        b.words[0] = 5


def test_set_all_leaves_bits_past_the_end_clear(bm):
    b = bm.DirtyBitmap(130)
    b.set_all()
    assert b.count() == 130
    assert b.words.tolist() == [2**64 - 1, 2**64 - 1, 3]


def test_bit_operations(bm):
    b = bm.DirtyBitmap(300)
    assert b.count() == 0 and b.find_next(0) == 300
    b.set(60, 10)
    assert [b.test(p) for p in (59, 60, 69, 70)] == [False, True, True, False]
    assert b.count() == 10 and b.find_next(0) == 60 and b.find_next(65) == 65
    b.clear(62, 3)
    assert pages_of(b) == [60, 61, 65, 66, 67, 68, 69]
    assert b.test_and_clear(60) is True and b.test_and_clear(60) is False
    assert b.find_next(70) == 300 and b.find_next(10_000) == 300
    b.set(0, 300)
    b.clear(1, 298)
    assert pages_of(b) == [0, 299]
    b.set(5, 0)
    b.clear(0, 0)
    assert b.count() == 2


def test_range_errors(bm):
    b = bm.DirtyBitmap(100)
    for call in (
        lambda: b.set(-1, 2), lambda: b.set(99, 2), lambda: b.set(0, -1), lambda: b.set(101, 0),
        lambda: b.clear(50, 51), lambda: b.test(100), lambda: b.test(-1),
        lambda: b.test_and_clear(100), lambda: b.find_next(-1), lambda: b.take(100),
        lambda: b.take_next(-3), lambda: b.is_armed(1),
    ):
        with pytest.raises(ParameterError):
            call()
    with pytest.raises(ParameterError):
        bm.DirtyBitmap(-1)
    assert b.count() == 0


def test_empty_block(bm):
    b = bm.DirtyBitmap(0)
    b.set_all()
    assert b.count() == 0 and b.find_next(0) == 0 and b.take_next(0) == 0
    assert b.sync(b"") == 0 and b.nchunks == 0
    assert b.take_dirty(0, 0, np.empty(0, np.int64)) == 0


@pytest.mark.parametrize(
    "shift, used, clamped",
    [(18, 18, False), (6, 6, False), (31, 31, False), (5, 6, True), (0, 6, True),
     (-3, 6, True), (32, 31, True), (255, 31, True)],
)
def test_clear_bitmap_shift_clamp(bm, caplog, shift, used, clamped):
    with caplog.at_level(logging.ERROR, logger="qmigx.bitmap"):
        b = bm.DirtyBitmap(1 << 20, clear_bitmap_shift=shift)
    assert b.clear_bitmap_shift == used
    assert b.clear_bitmap_shift_clamped is clamped
    assert b.requested_clear_bitmap_shift == shift
    assert b.chunk_pages == 1 << used
    assert b.nchunks == -(-(1 << 20) // (1 << used))
    if clamped:
        word = "big" if shift > 31 else "small"
        assert f"clear_bitmap_shift ({shift}) too {word}" in caplog.text
    else:
        assert caplog.text == ""


def test_default_shift(bm):
    b = bm.DirtyBitmap(1 << 19)
    assert b.clear_bitmap_shift == 18 and b.nchunks == 2


# -- sync -------------------------------------------------------------------


def test_sync_counts_newly_dirty_pages(bm):
    b = bm.DirtyBitmap(256)
    b.set(0, 8)
    log = np.zeros(4, np.uint64)
    log[0] = 0xFFFF  # pages 0..15, 0..7 already dirty
    log[3] = 1 << 63  # page 255
    assert b.sync(log) == 9
    assert b.count() == 17
    assert b.sync(log) == 0  # all already dirty
    assert list(log) == [0xFFFF, 0, 0, 1 << 63]  # the log is only read


def test_sync_accepts_tight_bytes_and_padded_words(bm):
    b = bm.DirtyBitmap(70)
    # 70 pages: 9 bytes tight .. 16 bytes (two words)
    tight = bytes([0x01] + [0] * 7 + [0x20])  # pages 0 and 69
    assert b.sync(tight) == 2
    padded = np.zeros(2, np.uint64)
    padded[1] = np.uint64(0xFFFF_FFFF_FFFF_FFC0) | np.uint64(1)  # page 64 + junk past 70
    assert b.sync(padded) == 1
    assert pages_of(b) == [0, 64, 69]
    assert b.words.tolist()[1] == (1 | (1 << 5))
    for bad in (bytes(8), bytes(17), np.zeros(3, np.uint64), b""):
        with pytest.raises(ParameterError) as info:
            b.sync(bad)
        assert info.value.field == "log"
    assert b.sync(memoryview(tight).tobytes()) == 0


def test_sync_sub_range(bm):
    src = FakeSource(512)
    b = bm.DirtyBitmap(512, clear_bitmap_shift=6, source=src)
    assert b.sync(np.full(1, 2**64 - 1, np.uint64), start=128, npages=64) == 64
    assert pages_of(b) == list(range(128, 192))
    assert [b.is_armed(c) for c in range(8)] == [False, False, True] + [False] * 5
    assert b.sync(b"\x01", start=448, npages=3) == 1  # partial last range
    assert b.test(448) and b.is_armed(7)
    for start, n in ((1, 8), (64, 512), (-64, 8)):
        with pytest.raises(ParameterError):
            b.sync(bytes(8), start=start, npages=n)


def test_sync_from_source(bm):
    src = FakeSource(300)
    b = bm.DirtyBitmap(300, clear_bitmap_shift=7, source=src)
    assert b.sync_from_source() == 0  # nothing dirty: still arms every chunk
    assert [b.is_armed(c) for c in range(3)] == [True, True, True]
    src.dirty(3, 299)
    assert b.sync_from_source() == 2
    assert pages_of(b) == [3, 299]
    with pytest.raises(StateError):
        bm.DirtyBitmap(10).sync_from_source()


# -- chunked clear ---------------------------------------------------------------


def test_clear_called_once_per_armed_chunk_including_partial_last(bm):
    npages = 5 * 64 + 10  # chunks of 64 pages, last one 10 pages
    src = FakeSource(npages)
    b = bm.DirtyBitmap(npages, clear_bitmap_shift=6, source=src)
    src.dirty(1, 2, 63, 200, 201, 325)
    assert b.sync_from_source() == 6
    taken = []
    p = b.take_next(0)
    while p < npages:
        taken.append(p)
        p = b.take_next(p)
    assert taken == [1, 2, 63, 200, 201, 325]
    # chunks 1, 2 and 4 had nothing to send: never cleared, still armed
    assert src.clears == [(0, 64), (192, 64), (320, 10)]
    assert b.count() == 0
    assert [b.is_armed(c) for c in range(6)] == [False, True, True, False, True, False]


def test_clear_rearmed_after_next_sync(bm):
    src = FakeSource(256)
    b = bm.DirtyBitmap(256, clear_bitmap_shift=6, source=src)
    src.dirty(10)
    b.sync_from_source()
    assert b.take_next(0) == 10 and src.clears == [(0, 64)]
    b.set(11)  # dirty again without a sync: chunk is disarmed, no new clear
    assert b.take_next(0) == 11 and src.clears == [(0, 64)]
    src.dirty(12)
    b.sync_from_source()
    assert b.take_next(0) == 12 and src.clears == [(0, 64), (0, 64)]


def test_clear_happens_before_the_bit_is_cleared_and_returned(bm):
    src = FakeSource(128)
    b = bm.DirtyBitmap(128, clear_bitmap_shift=6, source=src)
    seen = []
    src.on_clear = lambda start, n: seen.append((start, n, pages_of(b)))
    src.dirty(5, 70)
    b.sync_from_source()
    assert b.take(70) is True
    assert seen == [(64, 64, [5, 70])]  # bit still set while the log is cleared
    assert b.take(70) is False and b.take(6) is False
    assert pages_of(b) == [5]


def test_take_dirty_order_and_guard(bm):
    npages = 1000
    src = FakeSource(npages)
    b = bm.DirtyBitmap(npages, clear_bitmap_shift=7, source=src)
    seen = []
    src.on_clear = lambda start, n: seen.append((start, n, b.count()))
    dirty = [3, 4, 130, 131, 600, 999]
    src.dirty(*dirty)
    b.sync_from_source()
    backing = np.full(16, -1, np.int64)
    out = backing[:8]
    assert b.take_dirty(0, 4, out) == 4
    assert out[:4].tolist() == [3, 4, 130, 131]
    assert (backing[4:] == -1).all()  # nothing past count written
    # every callback ran before any of the taken bits was cleared
    assert seen == [(0, 128, 6), (128, 128, 6)]
    assert pages_of(b) == [600, 999]
    assert b.take_dirty(601, 8, out) == 1 and out[0] == 999
    assert seen[-1][:2] == (896, 104)
    assert b.take_dirty(0, 8, out) == 1 and out[0] == 600
    assert [s[:2] for s in seen] == [(0, 128), (128, 128), (896, 104), (512, 128)]
    assert b.take_dirty(0, 8, out) == 0
    with pytest.raises(ParameterError):
        b.take_dirty(0, 9, out)
    with pytest.raises(ParameterError):
        b.take_dirty(-1, 1, out)


def test_take_dirty_callback_failure_loses_no_page(bm):
    src = FakeSource(256)
    b = bm.DirtyBitmap(256, clear_bitmap_shift=6, source=src)
    src.dirty(1, 100, 200)
    b.sync_from_source()

    def fail_second(start, n):
        if start == 64:
            raise OSError("clear failed")

    src.on_clear = fail_second
    out = np.empty(8, np.int64)
    with pytest.raises(OSError):
        b.take_dirty(0, 8, out)
    assert pages_of(b) == [1, 100, 200]
    assert [b.is_armed(c) for c in range(4)] == [False, True, True, True]
    src.on_clear = None
    assert b.take_dirty(0, 8, out) == 3
    assert src.clears == [(0, 64), (64, 64), (64, 64), (192, 64)]


def test_without_source_chunks_still_tracked(bm):
    b = bm.DirtyBitmap(128, clear_bitmap_shift=6)
    b.sync(np.array([1, 1], np.uint64))
    assert b.is_armed(0) and b.is_armed(1)
    assert b.take_next(0) == 0 and not b.is_armed(0) and b.is_armed(1)


def test_read_only_log_buffers(bm):
    b = bm.DirtyBitmap(64)
    log = np.frombuffer(bytes([0xFF] * 8), np.uint64)
    assert not log.flags.writeable
    assert b.sync(log) == 64
    assert b.sync(memoryview(bytes(8)).cast("Q")) == 0


# -- compiled == reference -------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 400), st.integers(0, 140)),
        st.tuples(st.just("clear"), st.integers(0, 400), st.integers(0, 140)),
        st.tuples(st.just("sync"), st.binary(min_size=0, max_size=60), st.integers(0, 13)),
        st.tuples(st.just("take_next"), st.integers(0, 420), st.just(0)),
        st.tuples(st.just("take"), st.integers(0, 419), st.just(0)),
        st.tuples(st.just("take_dirty"), st.integers(0, 420), st.integers(0, 12)),
        st.tuples(st.just("tac"), st.integers(0, 419), st.just(0)),
        st.tuples(st.just("find"), st.integers(0, 420), st.just(0)),
    ),
    max_size=40,
)


def run_ops(mod, npages, shift, script):
    src = FakeSource(npages)
    b = mod.DirtyBitmap(npages, clear_bitmap_shift=shift, source=src)
    results = []
    for op, x, y in script:
        try:
            if op == "set":
                b.set(x, y)
            elif op == "clear":
                b.clear(x, y)
            elif op == "sync":
                start = 64 * (y // 2)
                if y % 2:  # mostly a log of the right size, else whatever was drawn
                    x = (x + bytes(60))[: (max(npages - start, 0) + 7) // 8]
                results.append(b.sync(x, start=start))
            elif op == "take_next":
                results.append(b.take_next(x))
            elif op == "take":
                results.append(b.take(x))
            elif op == "tac":
                results.append(b.test_and_clear(x))
            elif op == "find":
                results.append(b.find_next(x))
            else:
                out = np.full(13, -1, np.int64)
                results.append((b.take_dirty(x, y, out), out.tolist()))
        except ParameterError as e:
            results.append(("error", e.field))
    return (results, b.words.tolist(), b.clear_bmap.tolist(), src.clears, b.count())


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 420), st.integers(6, 9), ops)
def test_compiled_agrees_with_reference(npages, shift, script):
    want = run_ops(reference, npages, shift, script)
    for _ in each_path():
        assert run_ops(compiled, npages, shift, script) == want


def log_bytes(nbytes: int):
    """Random, sparse or full logs: runs of 0x00/0xff and random bytes."""
    piece = st.one_of(
        st.binary(min_size=1, max_size=40),
        st.builds(lambda n: bytes(n), st.integers(1, 300)),
        st.builds(lambda n: b"\xff" * n, st.integers(1, 300)),
    )
    return st.lists(piece, max_size=12).map(
        lambda parts: (b"".join(parts) + bytes(nbytes))[:nbytes]
    )


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2), st.data())
def test_sync_newly_dirty_matches_reference(npages, startw, data):
    start = 64 * startw if 64 * startw < npages else 0
    n = npages - start
    nbytes = data.draw(st.integers((n + 7) // 8, 8 * ((n + 63) // 64)))
    pre = data.draw(log_bytes(8 * ((npages + 63) // 64)))
    log = data.draw(log_bytes(nbytes))
    r = reference.DirtyBitmap(npages)
    r.sync(pre)
    want_new = r.sync(log, start=start)
    mask = ((1 << n) - 1) << start
    before = int.from_bytes(pre, "little") & ((1 << npages) - 1)
    incoming = (int.from_bytes(log, "little") << start) & mask
    assert want_new == bin(incoming & ~before).count("1")
    for path in each_path():
        c = compiled.DirtyBitmap(npages)
        c.sync(pre)
        assert c.sync(log, start=start) == want_new, path
        assert c.words.tolist() == r.words.tolist(), path
        assert c.count() == bin(before | incoming).count("1")


@pytest.mark.parametrize("path", PATHS)
def test_large_bitmap_sync_find_count(path):
    npages = (1 << 22) - 5
    rng = np.random.default_rng(3)
    log = rng.integers(0, 2**63, (npages + 63) // 64, dtype=np.uint64) & rng.integers(
        0, 2**63, (npages + 63) // 64, dtype=np.uint64
    )
    bits = np.unpackbits(log.view(np.uint8), bitorder="little")[:npages]
    previous = compiled._set_simd(path)
    try:
        b = compiled.DirtyBitmap(npages)
        b.set(0, 1000)
        want_new = int(bits.sum()) - int(bits[:1000].sum())
        assert b.sync(log) == want_new
        assert b.sync(log) == 0
    finally:
        compiled._set_simd(previous)
    assert b.count() == want_new + 1000
    got = np.unpackbits(b.words.view(np.uint8), bitorder="little")
    assert (got[npages:] == 0).all()
    first = int(np.flatnonzero(got[5000:])[0]) + 5000
    assert b.find_next(5000) == first


def test_empty_sync_at_the_block_end_arms_nothing():
    """A sync of zero pages overlaps no chunk (found by the twins disagreeing)."""
    for mod in (compiled, reference):
        b = mod.DirtyBitmap(64, 7)
        assert b.sync(b"", start=64) == 0
        assert not b.is_armed(0)
