"""XBZRLE kernel: spec examples, QEMU's overflow rule, twins agreeing, safety.

Every test runs on the plain-Python twin and on the compiled kernel with
each compare path this CPU has (``avx512``, ``avx2``, ``portable``), since
the paths share the emit code but not the scans.
"""

from __future__ import annotations

import mmap
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qmigx.xbzrle
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import XbzrleError

compiled = load_compiled("xbzrle")
reference = load_reference("xbzrle")
PATHS = compiled._available_simd()


pytestmark = pytest.mark.kernel("xbzrle", paths=PATHS)


@pytest.fixture
def xbz(kernel):
    """The reference twin, or the compiled kernel forced to one compare path (tests/conftest.py)."""
    return kernel


def each_path():
    """Iterate over the compiled paths, leaving the default one selected."""
    previous = compiled.simd
    try:
        for path in PATHS:
            compiled._set_simd(path)
            yield path
    finally:
        compiled._set_simd(previous)


def encode(mod, old, new, dlen=None) -> tuple[int, bytes]:
    """(result, encoded bytes); out sits between guard bytes that must survive."""
    dlen = len(new) if dlen is None else dlen
    buf = bytearray(b"\xa5" * (dlen + 64))
    out = memoryview(buf)[32 : 32 + dlen]
    result = mod.encode_buffer(old, new, out)
    assert buf[:32] == b"\xa5" * 32 and buf[32 + dlen :] == b"\xa5" * 32
    assert -1 <= result <= dlen
    return result, bytes(out[: max(result, 0)])


def decode(mod, src, page: bytes):
    """Outcome of decoding src onto a copy of page, checked for safety.

    ("ok", d, page after) or ("error", offset, field, message); on error the
    page must be untouched, and the guard bytes around it always.
    """
    buf = bytearray(b"\x5a" * 32 + page + b"\x5a" * 32)
    dst = memoryview(buf)[32 : 32 + len(page)]
    try:
        d = mod.decode_buffer(src, dst)
    except XbzrleError as err:
        assert bytes(dst) == page
        outcome = ("error", err.offset, err.field, str(err))
    else:
        assert 0 <= d <= len(page)
        outcome = ("ok", d, bytes(dst))
    assert buf[:32] == b"\x5a" * 32 and buf[32 + len(page) :] == b"\x5a" * 32
    return outcome


def changed(page: bytes, *edits: tuple[int, bytes]) -> bytes:
    out = bytearray(page)
    for pos, data in edits:
        out[pos : pos + len(data)] = data
    return bytes(out)


# --- spec §5: worked examples -------------------------------------------------

ZERO = bytes(4096)

EXAMPLES = [
    ("none", ZERO, 0, b""),
    ("byte 0", changed(ZERO, (0, b"\xaa")), 3, bytes.fromhex("0001aa")),
    ("bytes 100..102", changed(ZERO, (100, b"\x01\x02\x03")), 5, bytes.fromhex("6403010203")),
    ("byte 4095", changed(ZERO, (4095, b"\x55")), 4, bytes.fromhex("ff1f0155")),
    (
        "gap at 201",
        changed(ZERO, (200, b"\x09"), (202, b"\x09")),
        7,
        bytes.fromhex("c8010109010109"),
    ),
    ("bytes 10..309", changed(ZERO, (10, b"\x11" * 300)), 303, bytes.fromhex("0aac02") + b"\x11" * 300),
    (
        "200..399 and 904",
        changed(ZERO, (200, b"\x07" * 200), (904, b"\x01")),
        208,
        bytes.fromhex("c801c801") + b"\x07" * 200 + bytes.fromhex("f8030101"),
    ),
    (
        "every 64th byte",
        bytes(0xCE if i % 64 == 0 else 0 for i in range(4096)),
        192,
        bytes.fromhex("0001ce") + bytes.fromhex("3f01ce") * 63,
    ),
    ("bytes 1..4090", changed(ZERO, (1, b"\x01" * 4090)), 4093, bytes.fromhex("01fa1f") + b"\x01" * 4090),
    ("bytes 0..4092", changed(ZERO, (0, b"\x01" * 4093)), -1, b""),
    ("bytes 3..4095", changed(ZERO, (3, b"\x01" * 4093)), 4096, bytes.fromhex("03fd1f") + b"\x01" * 4093),
    ("all bytes", b"\x01" * 4096, -1, b""),
    ("every 2nd", bytes(i % 2 for i in range(4096)), -1, b""),
    ("every 3rd", bytes(int(i % 3 == 0) for i in range(4096)), -1, b""),
]


@pytest.mark.parametrize("name,new,result,data", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_spec_encoder_examples(xbz, name, new, result, data):
    assert encode(xbz, ZERO, new) == (result, data)


def test_real_stream_delta_decodes():
    """The 192-byte delta of a real QEMU 7.2 stream (ram.md §4.3) rebuilds its page."""
    delta = bytes.fromhex("0001ce") + bytes.fromhex("3f01ce") * 63
    for mod in (reference, compiled):
        page = bytearray(4096)
        assert mod.decode_buffer(delta, page) == 4033
        assert page == bytes(0xCE if i % 64 == 0 else 0 for i in range(4096))


DECODER_VECTORS = [
    ("0001aa", ("ok", 1, changed(ZERO, (0, b"\xaa")))),
    ("ff1f01aa", ("ok", 4096, changed(ZERO, (4095, b"\xaa")))),
    # "00 00": the 2-bytes-left check comes before the literal length is read
    ("0000", ("error", 1, "nzrun", "fewer than 2 bytes left for a literal-run length")),
    ("05", ("error", 0, "zrun", "fewer than 2 bytes left for a zero-run length")),
    ("0501aa0001bb", ("error", 3, "zrun", "zero-run length 0 after the first pair")),
    ("802001aa", ("error", 3, "literal", "literal run ends past the end of the page")),
    ("808001 01aa", ("error", 0, "zrun", "zero-run length is not a 1- or 2-byte uleb")),
    ("0003aabb", ("error", 2, "literal", "literal run ends past the end of the delta")),
    ("0001aa00", ("error", 3, "zrun", "fewer than 2 bytes left for a zero-run length")),
]


@pytest.mark.parametrize("hexsrc,expected", DECODER_VECTORS, ids=[v[0] for v in DECODER_VECTORS])
def test_spec_decoder_vectors(xbz, hexsrc, expected):
    page = bytes(range(256)) * 16 if expected[0] == "error" else ZERO
    outcome = decode(xbz, bytes.fromhex(hexsrc), page)
    if expected[0] == "ok":
        assert outcome == expected
    else:
        kind, offset, field, message = outcome
        assert (kind, offset, field) == expected[:3]
        assert str(message).startswith(expected[3])


@pytest.mark.parametrize(
    "hexsrc,offset,field,message",
    [
        ("0001", 1, "nzrun", "fewer than 2 bytes left for a literal-run length"),
        ("000000", 1, "nzrun", "literal-run length 0"),
        ("0080800001", 1, "nzrun", "literal-run length is not a 1- or 2-byte uleb"),
        ("00ff01", 3, "literal", "literal run ends past the end of the delta"),  # 255 bytes
        ("00ff7f", 3, "literal", "literal run ends past the end of the page"),  # 0x3fff bytes
        ("ff1f02aabb", 3, "literal", "literal run ends past the end of the page"),
        ("812001aa", 0, "zrun", "zero run ends past the end of the page"),  # 4097
        ("0001aa8180", 3, "zrun", "zero-run length is not a 1- or 2-byte uleb"),
    ],
)
def test_decoder_error_locations(xbz, hexsrc, offset, field, message):
    where = f"(at offset 0x{offset:x}, field {field})"
    expected = ("error", offset, field, f"{message} {where}")
    assert decode(xbz, bytes.fromhex(hexsrc), ZERO) == expected


def test_uleb_examples():
    for value, encoded in [(63, "3f"), (200, "c801"), (4095, "ff1f"), (4096, "8020"), (300, "ac02")]:
        assert reference.uleb_encode(value).hex() == encoded
        assert reference.uleb_decode(bytes.fromhex(encoded) + b"\x00", 0) == (value, len(encoded) // 2)
    with pytest.raises(ValueError):
        reference.uleb_encode(0x4000)
    with pytest.raises(ValueError):
        reference.uleb_decode(b"\x80\x80", 0)


# --- QEMU's overflow rule -------------------------------------------------------


def test_dlen_below_two_overflows_even_when_unchanged(xbz):
    page = bytes(range(64))
    for dlen in (0, 1):
        assert encode(xbz, page, page, dlen) == (-1, b"")
    assert encode(xbz, page, page, 2) == (0, b"")


def test_top_check_fires_before_trailing_unchanged_run(xbz):
    """Encoding exactly dlen long is refused when unchanged bytes follow it."""
    new = changed(ZERO, (0, b"\x01" * 4093))  # 00 fd 1f + 4093 bytes = 4096
    assert encode(xbz, ZERO, new, 4096) == (-1, b"")
    assert encode(xbz, ZERO, new, 4097) == (-1, b"")  # d + 2 = 4098 > 4097
    assert encode(xbz, ZERO, new, 4098)[0] == 4096
    end = changed(ZERO, (3, b"\x01" * 4093))  # reaches the page end: may fill dlen
    assert encode(xbz, ZERO, end, 4096)[0] == 4096
    assert encode(xbz, ZERO, end, 4095) == (-1, b"")


@pytest.mark.parametrize("dlen", range(0, 12))
def test_every_overflow_branch_small_dlen(xbz, dlen):
    # zrun 200 (2 bytes) + literal 3 (1 byte) + 3 bytes, then tail: d = 6
    new = changed(bytes(256), (200, b"\x01\x02\x03"))
    expected = (6, bytes.fromhex("c80103010203")) if dlen >= 8 else (-1, b"")
    assert encode(xbz, bytes(256), new, dlen) == expected
    # literal of 130 bytes: 2-byte literal length
    new = changed(bytes(256), (126, b"\x07" * 130))
    if dlen < 12:
        assert encode(xbz, bytes(256), new, dlen) == (-1, b"")


def test_longest_run(xbz):
    run = compiled.MAX_RUN
    assert run == reference.MAX_RUN == qmigx.xbzrle.MAX_RUN == 0x3FFF
    size = run + 1  # 16 KiB
    old = bytes(size)
    # a fully changed 16 KiB page needs a literal of 0x4000 bytes: cannot be encoded
    assert encode(xbz, old, b"\x01" * size, size + 16) == (-1, b"")
    result, data = encode(xbz, old, changed(old, (1, b"\x01" * (size - 1))), size + 16)
    assert result == 3 + size - 1 and data[:3] == bytes.fromhex("01ff7f")


# --- twins agree on crafted page pairs -------------------------------------------


@st.composite
def page_pairs(draw, max_len: int = 4096):
    """Mostly-equal pages with runs and single changed or equal bytes, often
    crossing 8- and 64-byte boundaries and near the page end; or dense."""
    slen = draw(
        st.one_of(
            st.sampled_from([1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 192, 1000, 4095, 4096]),
            st.integers(1, min(max_len, 300)),
        )
    )
    slen = min(slen, max_len)
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    old = bytearray(rnd.randbytes(slen) if draw(st.booleans()) else bytes(slen))
    new = bytearray(old)
    density = draw(st.sampled_from([None, None, None, 0.02, 0.1, 0.5, 0.9, 1.0]))
    if density is not None:
        for i in range(slen):
            if rnd.random() < density:
                new[i] ^= rnd.randrange(1, 256)
    position = st.one_of(
        st.integers(0, slen - 1),
        st.integers(max(0, slen - 12), slen - 1),
        st.integers(0, (slen - 1) // 64).map(lambda w: min(slen - 1, w * 64 + 63)),
    )
    changes = draw(st.lists(st.tuples(position, st.integers(1, 140), st.booleans()), max_size=12))
    # runs that end exactly at a 64-byte boundary, often followed by unchanged windows
    ends = draw(st.lists(st.tuples(st.integers(1, max(1, slen // 64)), st.integers(1, 70)), max_size=3))
    changes += [(max(0, w * 64 - n), n, False) for w, n in ends if w * 64 <= slen]
    for pos, length, hole in changes:
        for i in range(pos, min(slen, pos + length)):
            new[i] = old[i] ^ rnd.randrange(1, 256)
        if hole and pos + 1 < min(slen, pos + length) - 1:
            new[pos + 1] = old[pos + 1]  # a single equal byte inside the run
    return bytes(old), bytes(new)


BOUNDARY_CASES = [
    # (page size, changed ranges): runs that end or start exactly on 8- and
    # 64-byte boundaries, runs left open at a window's end followed by an
    # unchanged window, a changed final window, single equal bytes
    (4096, [(60, 64), (300, 302)]),
    (4096, [(63, 64), (200, 201)]),
    (4096, [(0, 64), (256, 320), (4032, 4096)]),
    (4096, [(64, 128), (129, 192), (4095, 4096)]),
    (4096, [(56, 72), (120, 136), (1000, 1001)]),
    (4096, [(0, 1), (2, 3), (4, 5), (127, 129)]),
    (200, [(120, 128), (190, 200)]),
    (200, [(128, 192), (199, 200)]),
    (130, [(0, 130)]),
    (130, [(1, 130)]),
    (65, [(63, 64)]),
    (65, [(64, 65)]),
    (63, [(0, 31), (32, 63)]),
    (16384, [(16320, 16384), (100, 200)]),
    (16384, [(8191, 8193)]),
]


@pytest.mark.parametrize("slen,ranges", BOUNDARY_CASES)
def test_compiled_matches_reference_at_window_boundaries(slen, ranges):
    old = bytes((i * 131 + 7) & 0xFF for i in range(slen))
    new = bytearray(old)
    for lo, hi in ranges:
        for i in range(lo, hi):
            new[i] ^= 0x5A
    for dlen in (slen, slen + 8, 9, 3):
        expected = encode(reference, old, bytes(new), dlen)
        for _ in each_path():
            assert encode(compiled, old, bytes(new), dlen) == expected, (dlen, compiled.simd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=page_pairs(), extra=st.integers(-6, 6), small=st.integers(0, 20))
def test_compiled_matches_reference_near_every_dlen(pair, extra, small):
    """Same result and bytes at the encoding's own length +-6 (every overflow
    check fires somewhere there), at the page size and at tiny dlen."""
    old, new = pair
    full, _ = encode(reference, old, new, len(new) + 8)
    dlens = {len(new), small, max(0, (full if full > 0 else len(new)) + extra)}
    for dlen in sorted(dlens):
        expected = encode(reference, old, new, dlen)
        for _ in each_path():
            assert encode(compiled, old, new, dlen) == expected, (dlen, compiled.simd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=page_pairs())
def test_round_trip(pair):
    old, new = pair
    result, data = encode(compiled, old, new, len(new) + 8)
    assert (result == 0) == (old == new)
    if result > 0:
        for mod in (compiled, reference):
            page = bytearray(old)
            d = mod.decode_buffer(data, page)
            assert page == new
            assert d <= len(new) and new[d:] == old[d:]


# --- decoder: random and corrupted input ------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    src=st.binary(max_size=48),
    page_len=st.sampled_from([0, 1, 2, 5, 64, 130, 4096]),
)
def test_decode_random_input_twins_agree(src, page_len):
    page = bytes((i * 7 + 3) & 0xFF for i in range(page_len))
    assert decode(compiled, src, page) == decode(reference, src, page)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=page_pairs(max_len=600),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "delete"]),
            st.integers(0, 10**6),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=3,
    ),
    page_len=st.sampled_from([None, 1, 63, 64, 700]),
)
def test_decode_corrupted_deltas_twins_agree(pair, edits, page_len):
    old, new = pair
    result, data = encode(compiled, old, new, len(new) + 8)
    assume(result > 0)
    src = bytearray(data)
    for kind, where, value in edits:
        if not src:
            break
        pos = where % len(src)
        if kind == "flip":
            src[pos] ^= value or 0x80
        elif kind == "cut":
            del src[pos:]
        elif kind == "insert":
            src.insert(pos, value)
        else:
            del src[pos]
    page = old if page_len is None else (old * 2)[:page_len].ljust(page_len, b"\x00")
    assert decode(compiled, bytes(src), page) == decode(reference, bytes(src), page)


def test_failure_is_atomic_after_valid_pairs(xbz):
    """A delta whose first pairs are fine but whose last one is bad changes nothing."""
    src = bytes.fromhex("0001aa" "0501bb" "00")
    page = bytes(range(64))
    assert decode(xbz, src, page)[:3] == ("error", 6, "zrun")


def test_decode_keeps_bytes_outside_literals(xbz):
    page = bytes(range(200))
    kind, d, after = decode(xbz, bytes.fromhex("0a02eeff"), page)
    assert (kind, d) == ("ok", 12)
    assert after == page[:10] + b"\xee\xff" + page[12:]


def test_decode_empty_delta(xbz):
    assert decode(xbz, b"", bytes(16)) == ("ok", 0, bytes(16))


# --- batch forms ----------------------------------------------------------------------


def batch(n: int, slen: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, (n, slen), dtype=np.uint8)
    new = old.copy()
    for k in range(n):
        p = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0][k % 6]
        flip = rng.random(slen) < p
        new[k, flip] ^= rng.integers(1, 256, int(flip.sum()), dtype=np.uint8)
    return old, new


@pytest.mark.parametrize("slen,dlen", [(4096, 4096), (200, 64), (4096, 300), (100, 0)])
def test_encode_pages_matches_encode_buffer(xbz, slen, dlen):
    old, new = batch(12, slen, seed=slen + dlen)
    out = np.full((12, dlen), 0xEE, dtype=np.uint8)
    lengths = np.full(12, 99, dtype=np.int32)
    assert xbz.encode_pages(old, new, out, lengths) is None
    for k in range(12):
        result, data = encode(xbz, old[k].tobytes(), new[k].tobytes(), dlen)
        assert lengths[k] == result
        assert out[k, : max(result, 0)].tobytes() == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 9), slen=st.sampled_from([64, 200, 4096]), dlen=st.sampled_from([0, 60, 4092]),
       seed=st.integers(0, 2**16), zeros=st.integers(0, 3))
def test_encode_at_matches_encode_pages_on_gathered_pages(xbz, n, slen, dlen, seed, zeros):
    """Pages read in place at shuffled offsets (some negative: zero pages) encode as
    the same pages gathered into rows do."""
    old, new = batch(max(n, 1), slen, seed=seed)
    old, new = old[:n], new[:n]
    rng = np.random.default_rng(seed)
    perm_a, perm_b = rng.permutation(n), rng.permutation(n)
    # each side as one buffer with its pages in another order and a gap in front
    a = np.zeros((n + 1) * slen + 3, np.uint8)
    b = np.zeros((n + 1) * slen + 5, np.uint8)
    a_off = np.empty(n, np.int64)
    b_off = np.empty(n, np.int64)
    for k in range(n):
        a_off[k], b_off[k] = 3 + perm_a[k] * slen, 5 + perm_b[k] * slen
        a[a_off[k] : a_off[k] + slen] = old[k]
        b[b_off[k] : b_off[k] + slen] = new[k]
    for k in range(min(zeros, n)):  # a ZERO record on one side or both
        (a_off if k % 2 else b_off)[k] = -1
        (old if k % 2 else new)[k] = 0
        if k == 2:
            a_off[k], b_off[k], old[k], new[k] = -1, -1, 0, 0
    out = np.full((n, dlen), 0xEE, np.uint8)
    lengths = np.full(n, 99, np.int32)
    assert xbz.encode_at(a, a_off, b, b_off, slen, out, lengths) is None
    want_out = np.full((n, dlen), 0xEE, np.uint8)
    want = np.full(n, 99, np.int32)
    xbz.encode_pages(np.ascontiguousarray(old), np.ascontiguousarray(new), want_out, want)
    assert lengths.tolist() == want.tolist()
    for k in range(n):
        assert out[k, : max(want[k], 0)].tobytes() == want_out[k, : max(want[k], 0)].tobytes()


@pytest.mark.parametrize("case", ["past-end", "short-lengths", "page-size"])
def test_encode_at_refuses_bad_offsets_before_reading(case):
    """An offset past a buffer, mismatched lengths or a bad page size: the same
    ValueError from kernel and twin, nothing written."""
    errors = []
    for mod in (compiled, reference):
        a, b = np.zeros(8192, np.uint8), np.ones(8192, np.uint8)
        off = np.array([0, 4096], np.int64)
        bad = np.array([0, 4097], np.int64)
        out = np.full((2, 64), 7, np.uint8)
        lengths = np.full(2, 5, np.int32)
        args = {"past-end": (a, off, b, bad, 4096, out, lengths),
                "short-lengths": (a, off, b, off, 4096, out, lengths[:1]),
                "page-size": (a, off, b, off, 0, out, lengths)}[case]
        with pytest.raises(ValueError) as info:
            mod.encode_at(*args)
        errors.append(str(info.value))
        assert (out == 7).all() and (lengths == 5).all()
    assert errors[0] == errors[1]


@pytest.mark.parametrize("slen,dlen", [(4096, 4096), (200, 64), (4096, 300), (100, 0), (77, 80)])
def test_benchmark_baseline_matches_kernel(slen, dlen):
    """The scalar baseline the benchmarks compare with gives the same results."""
    old, new = batch(30, slen, seed=slen * 3 + dlen)
    new[5, -1] ^= 1  # a change in the last byte
    new[6, :] = old[6, :]
    new[6, slen // 2 :] ^= 0x11  # a run reaching the page end
    outs, lens = [], []
    for fn in (compiled.encode_pages, compiled._encode_pages_baseline):
        out = np.zeros((30, dlen), dtype=np.uint8)
        lengths = np.zeros(30, dtype=np.int32)
        fn(old, new, out, lengths)
        outs.append([out[k, : max(n, 0)].tobytes() for k, n in enumerate(lengths)])
        lens.append(list(lengths))
    assert lens[0] == lens[1] and outs[0] == outs[1]


def test_decode_pages_applies_each_delta(xbz):
    old, new = batch(12, 512, seed=5)
    deltas = np.zeros((12, 520), dtype=np.uint8)
    lengths = np.zeros(12, dtype=np.int32)
    compiled.encode_pages(old, new, deltas, lengths)
    lengths = np.maximum(lengths, 0).astype(np.int32)
    pages = old.copy()
    assert xbz.decode_pages(deltas, lengths, pages) is None
    for k in range(12):
        assert (pages[k] == (new[k] if lengths[k] else old[k])).all()


def test_decode_pages_failure_names_page_and_changes_nothing(xbz):
    pages = np.arange(4 * 64, dtype=np.uint8).reshape(4, 64)
    before = pages.copy()
    deltas = np.zeros((4, 8), dtype=np.uint8)
    deltas[0, :3] = [0, 1, 0xAA]  # valid
    deltas[1, :3] = [0, 1, 0xBB]  # valid
    deltas[2, :4] = [0, 1, 0xCC, 0]  # dangling byte
    deltas[3, :2] = [0, 0]  # also bad, but later
    lengths = np.array([3, 3, 4, 2], dtype=np.int32)
    with pytest.raises(XbzrleError) as info:
        xbz.decode_pages(deltas, lengths, pages)
    assert str(info.value).startswith("page 2: ")
    assert (info.value.offset, info.value.field) == (3, "zrun")
    assert (pages == before).all()
    lengths[2] = lengths[3] = 0  # 0 = leave the page alone
    xbz.decode_pages(deltas, lengths, pages)
    assert pages[0, 0] == 0xAA and pages[1, 0] == 0xBB
    assert (pages[2:] == before[2:]).all()


def test_decode_pages_rejects_bad_lengths(xbz):
    deltas = np.zeros((2, 8), dtype=np.uint8)
    pages = np.zeros((2, 64), dtype=np.uint8)
    for bad in ([0, 9], [-1, 0]):
        with pytest.raises(ValueError, match="lengths"):
            xbz.decode_pages(deltas, np.array(bad, dtype=np.int32), pages)
    with pytest.raises(TypeError, match="int32"):
        xbz.decode_pages(deltas, np.zeros(2, dtype=np.int64), pages)
    with pytest.raises(ValueError, match="expected 2"):
        xbz.decode_pages(deltas, np.zeros(3, dtype=np.int32), pages)


def test_batch_shapes(xbz):
    old = np.zeros((3, 64), dtype=np.uint8)
    out = np.zeros((3, 64), dtype=np.uint8)
    lengths = np.zeros(3, dtype=np.int32)
    with pytest.raises(ValueError, match="2-dimensional"):
        xbz.encode_pages(old.ravel(), old.ravel(), out, lengths)
    with pytest.raises(ValueError, match="differ in shape"):
        xbz.encode_pages(old, old[:2], out, lengths)
    with pytest.raises(ValueError, match="expected 3"):
        xbz.encode_pages(old, old, out[:2], lengths)
    with pytest.raises(TypeError, match="writable"):
        ro = out.copy()
        ro.flags.writeable = False
        xbz.encode_pages(old, old, ro, lengths)
    empty = np.zeros((0, 64), dtype=np.uint8)
    xbz.encode_pages(empty, empty, empty, np.zeros(0, dtype=np.int32))
    xbz.decode_pages(empty, np.zeros(0, dtype=np.int32), empty)
    # pages of any dtype are taken as their bytes
    wide = np.zeros((3, 16), dtype=np.uint32)
    wide_new = wide.copy()
    wide_new[1, 3] = 0x01020304
    xbz.encode_pages(wide, wide_new, out, lengths)
    assert list(lengths) == [0, 6, 0]
    assert out[1, :6].tobytes() == bytes.fromhex("0c0404030201")  # little-endian words
    page = wide.copy()
    xbz.decode_pages(out, lengths, page)
    assert (page == wide_new).all()


# --- arguments -------------------------------------------------------------------------


def test_accepts_any_buffer(xbz, tmp_path):
    old = bytes(range(256)) * 2
    new = changed(old, (5, b"\x00\x00"), (300, b"zz"))
    expected = encode(xbz, old, new)
    assert expected[0] > 0
    path = tmp_path / "pages"
    path.write_bytes(old + new)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        views = [
            (bytearray(old), memoryview(new)),
            (np.frombuffer(old, dtype=np.uint8), np.frombuffer(new, dtype=np.uint8)),
            (np.frombuffer(old, dtype=np.uint32), np.frombuffer(new, dtype=np.uint64)),
            (np.frombuffer(old, dtype=np.uint8).reshape(8, 64), np.frombuffer(new, dtype=np.int8)),
            (memoryview(m)[:512], memoryview(m)[512:]),
        ]
        for a, b in views:
            assert encode(xbz, a, b) == expected
        del views, a, b
    out = np.zeros(512, dtype=np.uint8)
    assert xbz.encode_buffer(old, new, out) == expected[0]
    page = np.frombuffer(old, dtype=np.uint32).copy()
    xbz.decode_buffer(out[: expected[0]], page)
    assert page.tobytes() == new


def test_argument_errors(xbz):
    page = bytes(64)
    with pytest.raises(ValueError, match="differ in length"):
        xbz.encode_buffer(page, page[:-1], bytearray(64))
    with pytest.raises(TypeError, match="writable"):
        xbz.encode_buffer(page, page, bytes(64))
    with pytest.raises(TypeError, match="writable"):
        xbz.decode_buffer(b"\x00\x01\xaa", b"\x00" * 8)
    with pytest.raises(TypeError, match="buffer"):
        xbz.encode_buffer([0] * 64, page, bytearray(64))
    with pytest.raises(ValueError, match="contiguous"):
        xbz.encode_buffer(np.zeros(128, dtype=np.uint8)[::2], page, bytearray(64))


def test_twins_raise_identical_errors():
    cases = [
        lambda m: m.encode_buffer(bytes(64), bytes(63), bytearray(64)),
        lambda m: m.encode_buffer(bytes(0), bytes(1), bytearray(64)),
        lambda m: m.encode_buffer(bytes(64), bytes(64), b""),
        lambda m: m.encode_buffer(1, bytes(64), bytearray(64)),
        lambda m: m.decode_buffer(b"\x05", bytearray(8)),
        lambda m: m.decode_pages(
            np.zeros((2, 4), np.uint8), np.array([2, 0], np.int32), np.zeros((2, 8), np.uint8)
        ),
        lambda m: m.encode_pages(
            np.zeros((2, 4), np.uint8),
            np.zeros((2, 4), np.uint8),
            np.zeros((2, 4), np.uint8),
            np.zeros(2, np.int16),
        ),
    ]
    for case in cases:
        errors = []
        for mod in (compiled, reference):
            with pytest.raises(Exception) as info:
                case(mod)
            err = info.value
            errors.append((type(err), str(err), getattr(err, "offset", None), getattr(err, "field", None)))
        assert errors[0] == errors[1]


def test_public_module():
    assert set(qmigx.xbzrle.__all__) == {
        "MAX_RUN",
        "encode_buffer",
        "decode_buffer",
        "encode_pages",
        "encode_at",
        "decode_pages",
        "simd",
    }
    for name in qmigx.xbzrle.__all__:
        assert hasattr(compiled, name) and hasattr(reference, name)
    assert qmigx.xbzrle.simd in (*PATHS, "python")
    assert qmigx.xbzrle.__doc__


def test_set_simd_refuses_unknown_path():
    from qmigx.errors import ParameterError

    with pytest.raises(ParameterError):
        compiled._set_simd("sse9")
    assert compiled.simd in PATHS
