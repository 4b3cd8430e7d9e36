"""Zero-page detection: every SIMD path and the reference twin agree."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmigx.zeropage
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import ParameterError

compiled = load_compiled("zeropage")
reference = load_reference("zeropage")

PATHS = compiled._available_simd()


pytestmark = pytest.mark.kernel("zeropage", paths=PATHS)


@pytest.fixture
def zp(kernel):
    """The reference twin, or the compiled kernel pinned to one SIMD path (tests/conftest.py)."""
    return kernel


def expected_map(data: bytes, page_size: int) -> list[bool]:
    return [
        not any(data[i : i + page_size]) for i in range(0, len(data), page_size)
    ]


# Offsets where a vector or word loop changes: block edges of every path,
# the quick-look words (first, middle, last) and the overlapping tail.
INTERESTING = sorted(
    {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
     511, 512, 1023, 1024, 2040, 2047, 2048, 2049, 2055, 2056, 3839, 3840, 3967, 3968,
     4031, 4032, 4087, 4088, 4089, 4094, 4095}
)


def test_simd_attribute_names_the_path():
    assert compiled.simd in ("avx2", "sse2", "portable")
    assert PATHS[-1] == "portable"
    assert reference.simd == "python"
    assert qmigx.zeropage.simd in ("avx2", "sse2", "portable", "python")
    assert set(qmigx.zeropage.__all__) == {"is_zero", "zero_page_map", "simd"}


def test_set_simd_rejects_unknown_path():
    with pytest.raises(ParameterError):
        compiled._set_simd("avx512")
    assert compiled.simd in PATHS


def test_empty_buffer(zp):
    assert zp.is_zero(b"") is True
    m = zp.zero_page_map(b"")
    assert m.shape == (0,) and m.dtype == np.bool_


@pytest.mark.parametrize("value", [1, 0x80, 0xFF])
def test_single_byte_at_interesting_offsets(zp, value):
    page = bytearray(4096)
    assert zp.is_zero(page)
    for pos in INTERESTING:
        page[pos] = value
        assert zp.is_zero(page) is False, pos
        assert zp.zero_page_map(page).tolist() == [False], pos
        page[pos] = 0
    assert zp.is_zero(page)


def test_every_length_and_position_up_to_300(zp):
    buf = bytearray(300)
    for n in range(301):
        assert zp.is_zero(memoryview(buf)[:n]), n
        for pos in range(n):
            buf[pos] = 0x40
            assert not zp.is_zero(memoryview(buf)[:n]), (n, pos)
            buf[pos] = 0


def test_partial_last_page(zp):
    data = bytearray(3 * 4096 + 5)
    assert zp.zero_page_map(data).tolist() == [True] * 4
    data[-1] = 1
    assert zp.zero_page_map(data).tolist() == [True, True, True, False]
    data[-1] = 0
    data[3 * 4096 - 1] = 1
    assert zp.zero_page_map(data).tolist() == [True, True, False, True]


@pytest.mark.parametrize("page_size", [1, 3, 7, 8, 100, 1000, 4096, 65536])
def test_page_sizes(zp, page_size):
    rng = np.random.default_rng(page_size)
    data = np.zeros(20000, np.uint8)
    data[rng.integers(0, data.size, 12)] = rng.integers(1, 256, 12, dtype=np.uint8)
    assert zp.zero_page_map(data, page_size).tolist() == expected_map(data.tobytes(), page_size)


def test_bad_page_size(zp):
    for bad in (0, -1, -4096):
        with pytest.raises(ParameterError):
            zp.zero_page_map(b"\0" * 10, bad)


def test_accepts_any_buffer(zp, tmp_path):
    raw = bytearray(3 * 4096)
    raw[4096 + 17] = 9
    want = [True, False, True]
    ro = np.frombuffer(bytes(raw), np.uint8)
    assert not ro.flags.writeable
    path = tmp_path / "ram"
    path.write_bytes(raw)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        assert zp.zero_page_map(mm).tolist() == want
        assert zp.is_zero(mm) is False
    for buf in (
        bytes(raw),
        raw,
        memoryview(raw),
        ro,
        np.frombuffer(raw, np.uint64),
        np.frombuffer(raw, np.uint8).reshape(3, 4096),
        np.frombuffer(raw, np.float64).reshape(-1, 8),
        memoryview(raw).cast("I"),
    ):
        assert zp.zero_page_map(buf).tolist() == want
        assert zp.is_zero(buf) is False


def test_non_contiguous_buffer_is_refused(zp):
    arr = np.zeros((8, 8), np.uint8)[:, ::2]
    with pytest.raises(TypeError):
        zp.is_zero(arr)
    with pytest.raises(TypeError):
        zp.zero_page_map(arr)


def test_out_is_filled_in_place_inside_guards(zp):
    data = bytearray(5 * 100)
    data[250] = 1
    backing = np.ones(5 + 16, np.bool_)
    backing[:8] = [True, False] * 4
    backing[-8:] = [False, True] * 4
    before = backing.copy()
    out = backing[8:-8]
    got = zp.zero_page_map(data, 100, out=out)
    assert got is out
    assert out.tolist() == [True, True, False, True, True]
    assert (backing[:8] == before[:8]).all() and (backing[-8:] == before[-8:]).all()


def test_bad_out_is_refused(zp):
    data = bytes(4096 * 2)
    ro = np.zeros(2, np.bool_)
    ro.flags.writeable = False
    for bad in (
        np.zeros(2, np.uint8),
        np.zeros(3, np.bool_),
        np.zeros(1, np.bool_),
        np.zeros((2, 1), np.bool_),
        np.zeros(4, np.bool_)[::2],
        ro,
        [False, False],
        bytearray(2),
    ):
        with pytest.raises(ParameterError):
            zp.zero_page_map(data, out=bad)


sparse_buffers = st.builds(
    lambda n, hits: (n, [(p % n, v) for p, v in hits] if n else []),
    st.integers(0, 20000),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(sparse_buffers, st.sampled_from([1, 8, 64, 511, 512, 4096, 5000]))
def test_paths_agree_with_reference(spec, page_size):
    n, hits = spec
    data = bytearray(n)
    for pos, value in hits:
        data[pos] = value
    want = expected_map(bytes(data), page_size)
    assert reference.zero_page_map(data, page_size).tolist() == want
    assert reference.is_zero(data) == (not any(data))
    previous = compiled.simd
    try:
        for path in PATHS:
            compiled._set_simd(path)
            assert compiled.zero_page_map(data, page_size).tolist() == want, path
            assert compiled.is_zero(data) == (not any(data)), path
    finally:
        compiled._set_simd(previous)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700))
def test_random_bytes_agree(data, page_size):
    want = reference.zero_page_map(data, page_size).tolist()
    previous = compiled.simd
    try:
        for path in PATHS:
            compiled._set_simd(path)
            assert compiled.zero_page_map(data, page_size).tolist() == want
    finally:
        compiled._set_simd(previous)


def test_large_block_with_scattered_pages():
    rng = np.random.default_rng(7)
    block = np.zeros(4096 * 1024, np.uint8)
    dirty = rng.choice(1024, 100, replace=False)
    offsets = rng.integers(0, 4096, 100)
    block[dirty * 4096 + offsets] = 0xA5
    want = np.ones(1024, np.bool_)
    want[dirty] = False
    previous = compiled.simd
    try:
        for path in PATHS:
            compiled._set_simd(path)
            assert (compiled.zero_page_map(block) == want).all(), path
    finally:
        compiled._set_simd(previous)
    assert (reference.zero_page_map(block) == want).all()
