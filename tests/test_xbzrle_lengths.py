"""XBZRLE on pages of every length, as QEMU's encoder and decoder take them.

QEMU's functions have no page-size limit: an empty page encodes to
nothing (the loop over the page never runs), and a 64 KiB page (a target
page size some architectures use) encodes like any other as long as each
run it has to write fits a 1- or 2-byte uleb (at most 0x3FFF). A longer
run is where QEMU's encoder stops on an assertion; qmigx returns -1
there (send the page whole). The compiled kernel scans long pages in
segments, so the properties below dwell on segment boundaries (multiples
of 16384) and on runs around 0x3FFF.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qmigx.xbzrle
from qmigx._backend import load_compiled, load_reference

compiled = load_compiled("xbzrle")
reference = load_reference("xbzrle")
PATHS = compiled._available_simd()
MAX_RUN = 0x3FFF
SEG = 16384  # the kernel's segment: boundaries at its multiples matter


@pytest.fixture(params=["python", *PATHS])
def xbz(request):
    """The reference twin, or the compiled kernel forced to one compare path."""
    if request.param == "python":
        yield reference
        return
    previous = compiled._set_simd(request.param)
    try:
        yield compiled
    finally:
        compiled._set_simd(previous)


def encode(mod, old: bytes, new: bytes, dlen: int | None = None) -> tuple[int, bytes]:
    """(result, encoded bytes); guard bytes around ``out`` must survive."""
    dlen = len(new) if dlen is None else dlen
    buf = bytearray(b"\xa5" * (dlen + 64))
    out = memoryview(buf)[32 : 32 + dlen]
    result = mod.encode_buffer(old, new, out)
    assert buf[:32] == b"\xa5" * 32 and buf[32 + dlen :] == b"\xa5" * 32
    assert -1 <= result <= dlen
    return result, bytes(out[: max(result, 0)])


def all_paths(old: bytes, new: bytes, dlen: int) -> set[tuple[int, bytes]]:
    """Every compiled compare path's result, the default path restored after."""
    previous = compiled.simd
    try:
        results = set()
        for path in PATHS:
            compiled._set_simd(path)
            results.add(encode(compiled, old, new, dlen))
        return results
    finally:
        compiled._set_simd(previous)


def uleb_size(value: int) -> int:
    return 1 if value < 0x80 else 2


def closed_form(old: bytes, new: bytes, dlen: int) -> int:
    """The encoder's result computed from the runs, not by running an encoder.

    Every overflow check of xbzrle.md §3 compares a growing d with dlen,
    and each is implied by the last literal's (d after it is the full
    cost), except the check before an unencoded unchanged tail, which
    needs 2 more bytes. A run that has no 1- or 2-byte uleb gives -1.
    """
    if not old:
        return 0
    diff = np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)
    if not diff.any():
        return 0 if dlen >= 2 else -1
    edges = np.flatnonzero(np.diff(np.concatenate(([0], diff.view(np.int8), [0]))))
    starts, ends = edges[::2], edges[1::2]
    gaps = starts - np.concatenate(([0], ends[:-1]))
    runs = ends - starts
    if gaps.max() > MAX_RUN or runs.max() > MAX_RUN:
        return -1
    cost = int(sum(uleb_size(int(g)) + uleb_size(int(m)) + int(m) for g, m in zip(gaps, runs)))
    tail = ends[-1] < len(old)
    if cost > dlen or (tail and cost + 2 > dlen):
        return -1
    return cost


def splice(page: bytearray, rnd: random.Random, lo: int, hi: int) -> None:
    """Change every byte of page[lo:hi] (clipped to the page)."""
    for i in range(max(0, lo), min(len(page), hi)):
        page[i] ^= rnd.randrange(1, 256)


@st.composite
def long_pairs(draw):
    """(old, new) of 0..65536 bytes: sparse and dense changes, runs crossing
    segment boundaries, unchanged gaps and changed runs around 0x3FFF."""
    slen = draw(st.one_of(
        st.sampled_from([0, 1, 7, 8, 63, 64, 65, 4096, SEG - 1, SEG, SEG + 1, SEG + 64,
                         2 * SEG, 3 * SEG + 5, 65535, 65536]),
        st.integers(0, 65536),
    ))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    old = bytes(slen) if draw(st.booleans()) else rnd.randbytes(slen)
    new = bytearray(old)
    if slen:
        near_boundary = st.sampled_from(
            [b + d for b in range(0, slen + 1, SEG) for d in (-65, -64, -1, 0, 1, 63, 64)
             if 0 <= b + d < slen] or [0])
        anywhere = st.integers(0, slen - 1)
        lengths = st.one_of(st.integers(1, 70), st.integers(MAX_RUN - 2, MAX_RUN + 2),
                            st.integers(1, 3 * SEG))
        for pos, length in draw(st.lists(st.tuples(st.one_of(near_boundary, anywhere), lengths),
                                         max_size=8)):
            splice(new, rnd, pos, pos + length)
        if draw(st.booleans()):  # a sprinkle of single bytes: many short runs
            for _ in range(draw(st.integers(0, 400))):
                splice(new, rnd, p := rnd.randrange(slen), p + 1)
        if draw(st.booleans()):  # a grid: every gap and run below 0x80, so the
            # encoding costs exactly changed bytes + 2 per run
            step = draw(st.integers(2, 127))
            width = draw(st.integers(1, step - 1))
            for p in range(draw(st.integers(0, step - 1)), slen, step):
                splice(new, rnd, p, p + width)
    return old, bytes(new)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=long_pairs(), extra=st.integers(-6, 6), small=st.integers(0, 20))
@example(pair=(b"", b""), extra=0, small=0)
@example(pair=(b"\x00", b"\x01"), extra=0, small=0)
@example(pair=(bytes(SEG), b"\x01" * SEG), extra=0, small=3)
@example(pair=(bytes(SEG + 1), b"\x00" + b"\x01" * SEG), extra=0, small=3)
@example(pair=(bytes(65536), bytes(65535) + b"\x01"), extra=0, small=4)
@example(pair=(bytes(65536), bytes(SEG - 1) + b"\x07" * 2 + bytes(65536 - SEG - 1)),
         extra=1, small=5)
def test_kernel_matches_twin_for_every_length(pair, extra, small):
    old, new = pair
    full, _ = encode(reference, old, new, len(new) + 8)
    dlens = {len(new), small, max(0, (full if full > 0 else len(new)) + extra), len(new) + 8}
    for dlen in sorted(dlens):
        expected = encode(reference, old, new, dlen)
        assert all_paths(old, new, dlen) == {expected}, dlen
        assert expected[0] == closed_form(old, new, dlen), dlen
        if expected[0] > 0:
            for mod in (reference, compiled):
                page = bytearray(old)
                d = mod.decode_buffer(expected[1], page)
                assert page == new and new[d:] == old[d:]


@pytest.mark.parametrize("size", [SEG + 1, 2 * SEG, 65536])
@pytest.mark.parametrize("crossing", [(-3, 3), (-1, 1), (0, 5), (-5, 0), (-70, 70)])
def test_runs_across_segments_near_dlen(size, crossing):
    """Short runs everywhere and one across each segment boundary, out sized
    around the encoding: the segments must neither lose nor double a run."""
    old = bytes(size)
    new = bytearray(size)
    for p in range(5, size, 50):
        new[p : p + 3] = b"\x11\x22\x33"
    lo, hi = crossing
    for b in range(SEG, size, SEG):
        end = min(size, b + hi)
        new[b + lo : end] = b"\x44" * (end - b - lo)
    new = bytes(new)
    cost = closed_form(old, new, 2 * size)
    assert cost > 0
    for dlen in range(cost - 2, cost + 4):
        expected = encode(reference, old, new, dlen)
        assert expected[0] == closed_form(old, new, dlen)
        assert all_paths(old, new, dlen) == {expected}, dlen


# --- the lengths the old limit refused ------------------------------------------------------


def test_empty_page_encodes_to_nothing(xbz):
    for dlen in (0, 1, 2, 64):
        assert encode(xbz, b"", b"", dlen) == (0, b"")
    assert xbz.decode_buffer(b"", bytearray()) == 0


@pytest.mark.parametrize("size", [1, 9, SEG - 1, SEG, SEG + 1, 65535, 65536])
def test_last_byte_changed(xbz, size):
    old = bytes(size)
    new = bytes(size - 1) + b"\x5a"
    result, data = encode(xbz, old, new, size + 8)
    if size - 1 > MAX_RUN:  # an unchanged run of 0x4000 or more before it
        assert result == -1
    else:
        zrun = bytes([size - 1]) if size - 1 < 0x80 else bytes([0x80 | (size - 1) & 0x7F,
                                                                (size - 1) >> 7])
        assert data == zrun + b"\x01\x5a" and result == len(data)


def test_64k_page_with_short_runs_encodes_normally(xbz):
    size = 65536
    rnd = random.Random(64)
    old = rnd.randbytes(size)
    new = bytearray(old)
    for pos in range(100, size, 5000):  # gaps below 0x3FFF, one run across 16384
        splice(new, rnd, pos, pos + 37)
    splice(new, rnd, SEG - 10, SEG + 10)
    result, data = encode(xbz, old, bytes(new))
    assert 0 < result < size
    page = bytearray(old)
    xbz.decode_buffer(data, page)
    assert page == new
    # a change only at the start: the long unchanged tail is never encoded
    first = bytes([old[0] ^ 0xFF])
    assert encode(xbz, old, first + old[1:]) == (3, b"\x00\x01" + first)
    assert encode(xbz, old, old) == (0, b"")


def test_run_without_a_uleb_is_not_encoded(xbz):
    size = 65536
    old = bytes(size)
    # an unchanged gap of 0x4000 before a change
    assert encode(xbz, old, changed_at(old, [MAX_RUN + 1]))[0] == -1
    assert encode(xbz, old, changed_at(old, [MAX_RUN]))[0] == 4
    # a changed run of 0x4000 bytes, room to spare in out
    new = bytearray(old)
    new[10 : 10 + MAX_RUN + 1] = b"\x01" * (MAX_RUN + 1)
    assert encode(xbz, old, bytes(new), 2 * size)[0] == -1
    new[10 + MAX_RUN] = 0
    assert encode(xbz, old, bytes(new), 2 * size)[0] == 1 + 2 + MAX_RUN


def changed_at(page: bytes, positions: list[int]) -> bytes:
    out = bytearray(page)
    for p in positions:
        out[p] ^= 0x3C
    return bytes(out)


# --- QEMU's unit-test vectors (tests/unit/test-xbzrle.c), 4096-byte pages --------------------
# Restated from what each test checks.

PAGE = 4096


def test_qemu_uleb_vectors():
    for value in range(MAX_RUN + 1):
        enc = reference.uleb_encode(value)
        assert reference.uleb_decode(enc + b"\x00", 0) == (value, len(enc))
    with pytest.raises(ValueError):
        reference.uleb_decode(b"\x80\x80", 0)


def qemu_patterns(diff_len: int) -> tuple[bytearray, bytearray]:
    """Two pages that differ from offset 1001 on for diff_len bytes, then in
    two single bytes 3 and 5 past that stretch."""
    a, b = bytearray(PAGE), bytearray(PAGE)
    for i in range(diff_len, 0, -1):
        a[1000 + i] = i & 0xFF
        b[1000 + i] = (i + 4) & 0xFF
    a[1000 + diff_len + 3], b[1000 + diff_len + 3] = 103, 107
    a[1000 + diff_len + 5], b[1000 + diff_len + 5] = 105, 109
    return a, b


@pytest.mark.parametrize("diff_len", [0, 1, 7, 100, 1500, PAGE - 1007])
def test_qemu_identical_pages_encode_to_zero(xbz, diff_len):
    a, b = qemu_patterns(diff_len)
    assert encode(xbz, bytes(a), bytes(a)) == (0, b"")
    assert encode(xbz, bytes(b), bytes(b)) == (0, b"")


def test_qemu_one_byte(xbz):
    new = bytes(PAGE - 1) + b"\x01"
    result, data = encode(xbz, bytes(PAGE), new)
    assert result == len(reference.uleb_encode(PAGE - 1)) + 2
    page = bytearray(PAGE)
    assert xbz.decode_buffer(data, page) == PAGE
    assert page == new


def test_qemu_overflow(xbz):
    new = bytearray(PAGE)
    for i in range(PAGE // 2 - 1):
        new[2 * i] = 1
    assert encode(xbz, bytes(PAGE), bytes(new))[0] == -1


@pytest.mark.parametrize("seed", range(40))
def test_qemu_encode_decode_range(xbz, seed):
    diff_len = random.Random(seed).randrange(0, PAGE - 1006)
    target, base = qemu_patterns(diff_len)  # encode base -> target, decode onto base
    _, data = encode(xbz, bytes(base), bytes(target))
    page = bytearray(base)
    assert xbz.decode_buffer(data, page) < PAGE
    assert page == target


# --- batch forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("slen,dlen", [(0, 0), (0, 16), (1, 4), (SEG + 1, SEG + 1),
                                       (65536, 65536), (65536, 300), (40000, 40008)])
def test_batch_forms_take_every_length(xbz, slen, dlen):
    rng = np.random.default_rng(slen + dlen)
    n = 7
    old = rng.integers(0, 256, (n, slen), dtype=np.uint8)
    new = old.copy()
    for k in range(n):
        if slen:
            for _ in range(k * 3):
                p = int(rng.integers(0, slen))
                new[k, p : p + int(rng.integers(1, 50))] ^= 0x21
    if slen > MAX_RUN + 1:
        new[n - 1, :] = old[n - 1, :]
        new[n - 1, -1] ^= 1  # a gap of more than 0x3FFF before the change
    out = np.zeros((n, dlen), np.uint8)
    lengths = np.full(n, 99, np.int32)
    xbz.encode_pages(old, new, out, lengths)
    for k in range(n):
        assert (lengths[k], out[k, : max(lengths[k], 0)].tobytes()) == encode(
            xbz, old[k].tobytes(), new[k].tobytes(), dlen)
    if slen > MAX_RUN + 1:
        assert lengths[n - 1] == -1
    ok = np.where(lengths > 0, lengths, 0).astype(np.int32)
    pages = old.copy()
    xbz.decode_pages(out, ok, pages)
    for k in range(n):
        assert pages[k].tobytes() == (new[k] if lengths[k] >= 0 else old[k]).tobytes()


def test_public_module_takes_every_length():
    """The selected backend (compiled normally) behaves as above."""
    assert qmigx.xbzrle.encode_buffer(b"", b"", bytearray()) == 0
    old = bytes(65536)
    new = changed_at(old, [0, SEG, 2 * SEG, 3 * SEG, 65535])  # gaps of at most 0x3FFF
    out = bytearray(65536)
    n = qmigx.xbzrle.encode_buffer(old, new, out)
    page = bytearray(old)
    assert n > 0 and qmigx.xbzrle.decode_buffer(out[:n], page) == 65536 and page == new


@pytest.mark.parametrize("slen,dlen", [(0, 8), (SEG + 1, SEG + 1), (65536, 65536), (65536, 900)])
def test_benchmark_baseline_takes_every_length(slen, dlen):
    """The scalar baseline the benchmarks time agrees with the kernel on long pages too."""
    rng = np.random.default_rng(slen * 7 + dlen)
    n = 6
    old = rng.integers(0, 256, (n, slen), dtype=np.uint8)
    new = old.copy()
    if slen:
        new[1, ::40] ^= 0x10  # short gaps everywhere
        new[2, -1] ^= 1  # one change after a long unchanged run
        new[3, 5 : 5 + MAX_RUN + 1] ^= 0x55  # a changed run of 0x4000 when it fits
        new[4, SEG - 2 : SEG + 2] ^= 0x66  # a run across the first segment boundary
    results = []
    for fn in (compiled.encode_pages, compiled._encode_pages_baseline):
        out = np.zeros((n, dlen), np.uint8)
        lengths = np.zeros(n, np.int32)
        fn(old, new, out, lengths)
        results.append([(int(m), out[k, : max(m, 0)].tobytes()) for k, m in enumerate(lengths)])
    assert results[0] == results[1]
    assert results[0] == [encode(reference, old[k].tobytes(), new[k].tobytes(), dlen)
                          for k in range(n)]
