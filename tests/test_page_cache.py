"""XBZRLE page cache: QEMU's rules, statistics, batches, compiled == reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmigx.page_cache
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import ParameterError

compiled = load_compiled("page_cache")
reference = load_reference("page_cache")

EMPTY = 2**64 - 1
PS = 4096


pytestmark = pytest.mark.kernel("page_cache")


@pytest.fixture
def pc(kernel):
    """The compiled kernel, then its reference twin (tests/conftest.py)."""
    return kernel


def page(fill: int, ps: int = PS) -> np.ndarray:
    return np.full(ps, fill, np.uint8)


def test_public_module_exports():
    assert set(qmigx.page_cache.__all__) == {
        "PageCache", "CACHED_PAGE_LIFETIME", "EMPTY_KEY", "SIZE_ERROR"
    }
    assert qmigx.page_cache.CACHED_PAGE_LIFETIME == 2
    assert qmigx.page_cache.EMPTY_KEY == EMPTY


@pytest.mark.parametrize("size", [0, 1, 4095, 3 * 4096, 4096 + 1, 65536 - 4096, -4096, 1 << 63])
def test_size_must_be_power_of_two_no_less_than_page(pc, size):
    with pytest.raises(ParameterError) as info:
        pc.PageCache(size)
    assert info.value.message == (
        "Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size"
    )
    assert info.value.field == "xbzrle-cache-size"


@pytest.mark.parametrize("page_size", [0, -4096, 3000, 4097])
def test_page_size_must_be_power_of_two(pc, page_size):
    with pytest.raises(ParameterError):
        pc.PageCache(1 << 20, page_size)


def test_fresh_cache(pc):
    c = pc.PageCache(64 << 20)
    assert c.entries == 16384 and c.cache_size == 64 << 20 and c.page_size == PS
    assert len(c) == 0 and c.num_items == 0
    assert (c.keys == EMPTY).all() and (c.ages == 0).all()
    assert c.data.shape == (16384, PS)
    assert c.stats() == {
        "cache-size": 64 << 20, "bytes": 0, "pages": 0, "cache-miss": 0,
        "cache-miss-rate": 0.0, "encoding-rate": 0.0, "overflow": 0,
    }
    with pytest.raises(ValueError):
        c.keys[0] = 0  # read-only views


def test_slot_index_is_page_number_modulo_entries(pc):
    c = pc.PageCache(8 * PS)
    assert [c.slot_of(a) for a in (0, 4095, 4096, 7 * 4096, 8 * 4096, 9 * 4096 + 5)] == [
        0, 0, 1, 7, 0, 1
    ]
    assert c.slot_of(EMPTY) == 7


def test_lookup_counts_hits_and_misses_and_refreshes_age(pc):
    c = pc.PageCache(8 * PS)
    assert not c.is_cached(0x3000, 1)
    assert c.cache_miss == 1 and c.pages == 0
    assert c.insert(0x3000, page(7), 1)
    assert c.ages[3] == 1 and c.keys[3] == 0x3000 and len(c) == 1
    assert c.is_cached(0x3000, 5)
    assert c.ages[3] == 5 and c.pages == 1 and c.cache_miss == 1
    # same slot, different page: a miss, age untouched
    assert not c.is_cached(0x3000 + 8 * PS, 9)
    assert c.ages[3] == 5 and c.cache_miss == 2


def test_empty_key_is_never_a_hit(pc):
    c = pc.PageCache(8 * PS)
    assert not c.is_cached(EMPTY, 0)
    assert c.get(EMPTY) is None
    with pytest.raises(ParameterError):
        c.insert(EMPTY, page(1), 0)
    with pytest.raises(ParameterError):
        c.insert_zero(EMPTY, 0)


def test_cached_page_lifetime(pc):
    c = pc.PageCache(4 * PS)
    a, b = 0x1000, 0x1000 + 4 * PS  # same slot
    assert c.insert(a, page(1), 10)
    # a different page may not evict it while age + 2 > generation
    assert not c.insert(b, page(2), 10)
    assert not c.insert(b, page(2), 11)
    assert (c.get(a) == 1).all() and c.get(b) is None
    # the same page is always overwritten
    assert c.insert(a, page(3), 11)
    assert (c.get(a) == 3).all() and c.ages[1] == 11
    assert not c.insert(b, page(2), 12)
    assert c.insert(b, page(2), 13)
    assert c.get(a) is None and (c.get(b) == 2).all() and len(c) == 1


def test_hit_keeps_page_alive(pc):
    c = pc.PageCache(4 * PS)
    a, b = 0, 4 * PS
    c.insert(a, page(1), 0)
    assert c.is_cached(a, 5)
    assert not c.insert(b, page(2), 6)
    assert c.insert(b, page(2), 7)


def test_get_is_a_view_not_a_copy(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x2000, page(4), 0)
    v = c.get(0x2000)
    assert v.shape == (PS,) and np.shares_memory(v, c.data)
    v[0] = 99
    assert c.get(0x2000)[0] == 99
    assert c.pages == 0 and c.cache_miss == 0  # get is not a lookup


def test_insert_accepts_any_buffer_of_page_size(pc):
    c = pc.PageCache(8 * PS)
    raw = bytes(range(256)) * 16
    for i, buf in enumerate(
        [raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, np.uint64),
         np.frombuffer(raw, np.uint8).reshape(64, 64)]
    ):
        assert c.insert(i * PS, buf, 0)
        assert c.get(i * PS).tobytes() == raw
    for bad in (b"", raw[:-1], raw + b"\0"):
        with pytest.raises(ParameterError):
            c.insert(0, bad, 0)


def test_insert_zero(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x1000, page(5), 0)
    assert c.insert_zero(0x1000, 1)
    assert not c.get(0x1000).any()
    assert not c.insert_zero(0x1000 + 4 * PS, 2)


def test_small_page_size(pc):
    c = pc.PageCache(64, page_size=16)
    assert c.entries == 4
    assert c.insert(48, bytes(range(16)), 0)
    assert c.slot_of(48) == 3 and c.get(48).tolist() == list(range(16))


def test_lookup_batch_matches_single_lookups(pc):
    c = pc.PageCache(8 * PS)
    for a in (0, 0x1000, 0x5000):
        c.insert(a, page(a >> 12), 0)
    addrs = np.array([0, 0x2000, 0x5000, 0x9000, 0x1000], np.uint64)
    backing = np.full(len(addrs) + 4, -7, np.int64)
    out = backing[: len(addrs) + 2]
    assert c.lookup_batch(addrs, 3, out) == 3
    assert out[: len(addrs)].tolist() == [0, -1, 5, -1, 1]
    assert (backing[len(addrs):] == -7).all()  # past n: untouched
    assert c.pages == 3 and c.cache_miss == 2
    assert c.ages.tolist() == [3, 3, 0, 0, 0, 3, 0, 0]


def test_batch_argument_checks(pc):
    c = pc.PageCache(8 * PS)
    addrs = np.array([0, 0x1000], np.uint64)
    with pytest.raises(ParameterError):
        c.lookup_batch(addrs, 0, np.empty(1, np.int64))
    with pytest.raises(ParameterError):
        c.insert_batch(addrs, np.zeros((1, PS), np.uint8), 0, np.empty(2, np.int64))
    with pytest.raises(ParameterError):
        c.insert_batch(addrs, np.zeros((2, PS), np.uint8), 0, np.empty(1, np.int64))
    with pytest.raises(ValueError):
        c.lookup_batch(addrs.astype(np.int32), 0, np.empty(2, np.int64))
    ro = np.empty(2, np.int64)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        c.lookup_batch(addrs, 0, ro)
    assert c.cache_miss == 0


def test_insert_batch_is_all_or_nothing_on_bad_address(pc):
    c = pc.PageCache(8 * PS)
    addrs = np.array([0, 0x1000, EMPTY, 0x3000], np.uint64)
    with pytest.raises(ParameterError) as info:
        c.insert_batch(addrs, np.ones((4, PS), np.uint8), 0, np.empty(4, np.int64))
    assert info.value.offset == 2
    assert len(c) == 0 and (c.keys == EMPTY).all()


def test_insert_batch_sequential_semantics(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x0, page(1), 5)
    addrs = np.array([4 * PS, 0x1000, 0x1000, 8 * PS + 0x1000], np.uint64)
    pages = np.stack([page(10), page(11), page(12), page(13)])
    out = np.full(6, -9, np.int64)
    assert c.insert_batch(addrs, pages, 6, out) == 2
    assert out.tolist() == [-1, 1, 1, -1, -9, -9]
    assert (c.get(0x1000) == 12).all() and (c.get(0) == 1).all()


def test_resize_moves_entries_and_keeps_most_recent(pc):
    c = pc.PageCache(8 * PS)
    # slots 1 and 5 both fold onto slot 1 of a 4-entry table
    c.insert(0x1000, page(1), 3)
    c.insert(0x5000, page(5), 7)
    c.insert(0x2000, page(2), 4)
    c.insert(0x6000, page(6), 4)  # tie with 0x2000: the one already moved stays
    c.insert(0x7000, page(7), 1)
    c.resize(4 * PS)
    assert c.entries == 4 and c.cache_size == 4 * PS
    assert c.keys.tolist() == [EMPTY, 0x5000, 0x2000, 0x7000]
    assert c.ages.tolist() == [0, 7, 4, 1]
    assert (c.get(0x5000) == 5).all() and (c.get(0x2000) == 2).all()
    assert (c.get(0x7000) == 7).all() and c.get(0x1000) is None and len(c) == 3
    c.resize(16 * PS)  # grow: everything fits
    assert c.entries == 16 and len(c) == 3
    assert c.slot_of(0x5000) == 5 and (c.get(0x5000) == 5).all()


def test_resize_keeps_existing_on_tie_or_older_newcomer(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x0000, page(1), 2)
    c.insert(0x2000, page(2), 9)  # moves second, newer: replaces
    c.resize(2 * PS)
    assert c.keys.tolist() == [0x2000, EMPTY] and len(c) == 1
    c = pc.PageCache(4 * PS)
    c.insert(0x0000, page(1), 9)
    c.insert(0x2000, page(2), 2)  # moves second, older: dropped
    c.resize(2 * PS)
    assert c.keys.tolist() == [0x0000, EMPTY] and (c.get(0) == 1).all()


def test_resize_same_size_is_noop_and_validates(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x1000, page(1), 0)
    data = c.data
    c.resize(4 * PS)
    assert c.data is data and len(c) == 1
    with pytest.raises(ParameterError):
        c.resize(3 * PS)
    assert c.entries == 4


def test_reset(pc):
    c = pc.PageCache(4 * PS)
    c.insert(0x1000, page(1), 0)
    c.is_cached(0x1000, 1)
    c.count_overflow()
    c.reset()
    assert len(c) == 0 and (c.keys == EMPTY).all() and (c.ages == 0).all()
    assert c.get(0x1000) is None
    assert c.stats()["pages"] == 0 and c.stats()["bytes"] == 0 and c.overflow == 0


def test_statistics_qemu_72(pc):
    c = pc.PageCache(4 * PS)
    # the spec's run: 56 XBZRLE records of 192 bytes, all with CONTINUE
    for _ in range(56):
        c.count_encoded(192)
    assert c.bytes == 10920
    c.count_encoded(10, name_len=4)  # record that carried "mem0"
    assert c.bytes == 10920 + 10 + 3 + 1 + 4
    c.count_overflow()
    assert c.overflow == 1 and c.bytes == 10920 + 18 + PS
    with pytest.raises(ParameterError):
        c.count_encoded(-1)
    with pytest.raises(ParameterError):
        c.count_encoded(1, name_len=256)


def test_rates(pc):
    c = pc.PageCache(4 * PS)
    c.update_rates(100)
    assert c.cache_miss_rate == 0.0 and c.encoding_rate == 0.0
    c.insert(0, page(1), 0)
    for _ in range(3):
        c.is_cached(0, 1)  # 3 hits
    c.is_cached(PS, 1)  # 1 miss
    c.count_encoded(1021)  # 1024 bytes
    c.update_rates(0)  # no pages handled: nothing changes
    assert c.encoding_rate == 0.0
    c.update_rates(8)
    assert c.cache_miss_rate == 1 / 8
    assert c.encoding_rate == 3 * PS / 1024
    # next period: only misses, no bytes
    c.is_cached(PS, 2)
    c.update_rates(2)
    assert c.cache_miss_rate == 0.5 and c.encoding_rate == 0.0
    assert c.stats()["cache-miss-rate"] == 0.5


# -- compiled == reference ----------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("lookup"), st.lists(st.integers(0, 40), max_size=8)),
        st.tuples(st.just("insert"), st.lists(st.integers(0, 40), max_size=8)),
        st.tuples(st.just("zero"), st.integers(0, 40)),
        st.tuples(st.just("gen"), st.integers(0, 3)),
        st.tuples(st.just("resize"), st.integers(0, 4)),
        st.tuples(st.just("stats"), st.integers(0, 50)),
    ),
    max_size=40,
)


def run_ops(mod, script, ps):
    c = mod.PageCache(4 * ps, ps)
    gen = 0
    trace = []
    for op, arg in script:
        if op == "gen":
            gen += arg
        elif op == "lookup":
            addrs = np.array([p * ps for p in arg], np.uint64)
            out = np.full(len(addrs) + 1, -5, np.int64)
            trace.append((c.lookup_batch(addrs, gen, out), out.tolist()))
        elif op == "insert":
            addrs = np.array([p * ps for p in arg], np.uint64)
            pages = (np.arange(len(arg) * ps, dtype=np.uint64) * 7 + gen).astype(np.uint8)
            out = np.full(len(addrs), -5, np.int64)
            trace.append((c.insert_batch(addrs, pages, gen, out), out.tolist()))
        elif op == "zero":
            trace.append(c.insert_zero(arg * ps, gen))
        elif op == "resize":
            c.resize(ps << arg)
        else:
            c.count_encoded(arg)
            c.update_rates(arg)
    keys = c.keys.tolist()
    data = [c.data[i].tobytes() for i in range(c.entries) if keys[i] != EMPTY]
    return trace, keys, c.ages.tolist(), data, c.stats(), len(c)


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([16, 64, 4096]))
def test_compiled_agrees_with_reference(script, ps):
    assert run_ops(compiled, script, ps) == run_ops(reference, script, ps)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3)), max_size=30))
def test_batches_equal_single_calls(steps):
    batch = compiled.PageCache(4 * 64, 64)
    single = compiled.PageCache(4 * 64, 64)
    gen = 0
    for p, dg in steps:
        gen += dg
        data = np.full(64, p, np.uint8)
        out = np.empty(1, np.int64)
        batch.insert_batch(np.array([p * 64], np.uint64), data, gen, out)
        assert (out[0] >= 0) == single.insert(p * 64, data, gen)
        assert batch.lookup_batch(np.array([p * 64 + 64], np.uint64), gen, out) == int(
            single.is_cached(p * 64 + 64, gen)
        )
    assert batch.keys.tolist() == single.keys.tolist()
    assert batch.ages.tolist() == single.ages.tolist()
    assert batch.stats() == single.stats()
