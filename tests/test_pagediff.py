"""Pages read where they lie: the compiled kernels against their twin, the page index, and diff.

``qmigx diff`` compares and digests saved streams in place
(``qmigx._core.pagediff``, ``qmigx.tools.pageindex``). The kernels must
agree with ``qmigx.reference.pagediff`` on any input, XXH64 must be the
standard one, an index must locate exactly the pages a load gives, and a
delta made from indexed files must be the delta made from loaded
streams, record for record.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx._core import pagediff as compiled
from qmigx.errors import StreamError
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.reference import pagediff as reference
from qmigx.stream.parser import find_vmdesc
from qmigx.tools.delta import DELTA_KEY, diff_streams, load_delta, ram_digest
from qmigx.tools.loaded import load_plain
from qmigx.tools.pageindex import LoadedPages, block_digests, index_stream
from qmigx.tools.streams import load_stream, save_stream

KERNELS = [compiled, reference]
PS = 4096
VECTOR = Path(__file__).resolve().parent / "data" / "qemu72-pc-paused.mig.gz"

#: XXH64 (seed 0) test values of the reference implementation (xxhash.h)
KNOWN = [(b"", 0xEF46DB3751D8E999), (bytes(range(256)) * 16, 0x0F6E64BE186AF6A4),
         (bytes(3 * PS), 0x9826D850566ED970)]


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("data, want", KNOWN)
def test_xxh64_is_the_standard_one(k, data, want):
    h = k.XXH64()
    h.update_pages(data, np.arange(len(data) // PS, dtype=np.int64) * PS, PS)
    assert h.intdigest() == want and h.hexdigest() == f"{want:016x}"


@pytest.mark.parametrize("k", KERNELS)
def test_zero_pages_digest_as_zeros_and_order_counts(k):
    a, b = k.XXH64(), k.XXH64()
    a.update_pages(b"", np.array([-1, -1, -1], np.int64), PS)
    assert a.intdigest() == KNOWN[2][1]
    data = bytes(range(256)) * 16 + bytes(reversed(range(256))) * 16
    a, b = k.XXH64(), k.XXH64()
    a.update_pages(data, np.array([0, PS], np.int64), PS)
    b.update_pages(data, np.array([PS, 0], np.int64), PS)
    assert a.intdigest() != b.intdigest()


def views(draw_pages, page):
    """Two views of one block: pages shuffled into buffers, some zero, some changed."""
    n = len(draw_pages)
    rng = np.random.default_rng(n)
    content = rng.integers(0, 256, (n, page), dtype=np.uint8)
    other = content.copy()
    offs_a, offs_b = [], []
    buf_a = np.zeros((n + 1) * page + 7, np.uint8)
    buf_b = np.zeros((n + 1) * page + 3, np.uint8)
    slots = rng.permutation(n)
    for i, kind in enumerate(draw_pages):
        if kind == 1:
            other[i, rng.integers(page)] ^= 0x5A  # one byte differs
        elif kind == 2:
            other[i] = 0  # b's page is zero, as a ZERO record
        elif kind == 3:
            content[i] = other[i] = 0  # both zero
        elif kind == 4:
            content[i] = 0  # a's page is zero, b's is not
        at_a = 7 + slots[i] * page
        buf_a[at_a : at_a + page] = content[i]
        offs_a.append(-1 if not content[i].any() and kind in (3, 4) else at_a)
        at_b = 3 + i * page
        buf_b[at_b : at_b + page] = other[i]
        offs_b.append(-1 if kind in (2, 3) else at_b)
    return (buf_a, np.array(offs_a, np.int64), buf_b, np.array(offs_b, np.int64),
            content, other)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.sampled_from([32, 64, 4096]))
def test_kernels_agree_with_the_twin_and_the_truth(kinds, page):
    buf_a, off_a, buf_b, off_b, content, other = views(kinds, page)
    truth = (content != other).any(axis=1).astype(np.uint8) if len(kinds) else np.zeros(0)
    for k in KERNELS:
        changed = np.full(len(kinds) + 2, 9, np.uint8)
        assert k.changed_pages(buf_a, off_a, buf_b, off_b, changed, page) == int(truth.sum())
        assert changed[: len(kinds)].tolist() == truth.tolist() and changed[-1] == 9
        rows = np.full((len(kinds), page), 0xEE, np.uint8)
        k.gather_pages(buf_b, off_b, rows)
        assert np.array_equal(rows, other.reshape(len(kinds), page))
        zero = np.full(len(kinds) + 2, 9, np.uint8)
        zeros = ~other.reshape(len(kinds), page).any(axis=1)
        assert k.zero_pages(buf_b, off_b, zero, page) == int(zeros.sum())
        assert zero[: len(kinds)].tolist() == zeros.astype(np.uint8).tolist() and zero[-1] == 9
    hc, hr = compiled.XXH64(), reference.XXH64()
    hc.update_pages(buf_a, off_a, page)
    hr.update_pages(buf_a, off_a, page)
    assert hc.intdigest() == hr.intdigest() and hc.length == hr.length == len(kinds) * page


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 40) - 1), st.integers(1, 64)), max_size=30))
def test_xbzrle_records_are_the_wire_records(recs):
    """Each record as ram.md lays it out: be64(offset | XBZRLE | CONTINUE), 0x01, be16, delta."""
    rng = np.random.default_rng(len(recs))
    offs = np.array([o * PS for o, _ in recs], np.uint64)
    lengths = np.array([k for _, k in recs], np.int32)
    deltas = rng.integers(0, 256, (len(recs), 64), dtype=np.uint8)
    want = b"".join(struct.pack(">QBH", int(o) | 0x40 | 0x20, 1, int(k)) + deltas[i, :k].tobytes()
                    for i, (o, k) in enumerate(zip(offs, lengths)))
    for k in KERNELS:
        out = np.full(len(want) + 5, 0xEE, np.uint8)
        assert k.xbzrle_records(offs, deltas, lengths, out) == len(want)
        assert out[: len(want)].tobytes() == want and (out[len(want):] == 0xEE).all()


@pytest.mark.parametrize("k", KERNELS)
def test_bad_xbzrle_records_are_refused(k):
    offs, deltas = np.zeros(2, np.uint64), np.zeros((2, 64), np.uint8)
    out = np.zeros(1000, np.uint8)
    for bad in ([1, 0], [1, 65]):
        with pytest.raises(ValueError, match="record 1: delta length"):
            k.xbzrle_records(offs, deltas, np.array(bad, np.int32), out)
    with pytest.raises(ValueError, match="differ in length"):
        k.xbzrle_records(offs, deltas, np.array([1], np.int32), out)
    with pytest.raises(ValueError, match="out has 20 bytes; the records need 24"):
        k.xbzrle_records(offs, deltas, np.array([1, 1], np.int32), np.zeros(20, np.uint8))


@pytest.mark.parametrize("k", KERNELS)
def test_bad_views_are_refused_before_any_work(k):
    buf = np.zeros(3 * PS, np.uint8)
    ok = np.array([0, PS], np.int64)
    changed = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="page 1 at 8193 lies outside"):
        k.changed_pages(buf, ok, buf, np.array([0, 2 * PS + 1], np.int64), changed, PS)
    with pytest.raises(ValueError, match="page count"):
        k.changed_pages(buf, ok, buf, np.array([0], np.int64), changed, PS)
    with pytest.raises(ValueError, match="changed holds 1"):
        k.changed_pages(buf, ok, buf, ok, np.zeros(1, np.uint8), PS)
    with pytest.raises(ValueError, match="multiple of 32"):
        k.changed_pages(buf, ok, buf, ok, changed, 100)
    with pytest.raises(ValueError, match="zero holds 1"):
        k.zero_pages(buf, ok, np.zeros(1, np.uint8), PS)
    with pytest.raises(ValueError, match="page 0 at 12288 lies outside"):
        k.zero_pages(buf, np.array([3 * PS], np.int64), changed, PS)
    with pytest.raises(ValueError, match="out holds 1 rows"):
        k.gather_pages(buf, ok, np.zeros((1, PS), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        k.XXH64().update_pages(buf, np.array([3 * PS], np.int64), PS)


# --- the page index and diff ----------------------------------------------------------


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """BASE: the stored QEMU 7.2 vector's devices and ROMs, ``mem0`` random with zero pages
    (ZERO records); NEW: some pages changed, every page a PAGE record."""
    d = tmp_path_factory.mktemp("pageindex")
    vec = load_stream(gzip.decompress(VECTOR.read_bytes()))
    rng = np.random.default_rng(2)
    before = rng.integers(0, 256, vec.blocks["mem0"].used_length, dtype=np.uint8)
    before.reshape(-1, PS)[::3] = 0
    mem = before.copy()
    pages = mem.reshape(-1, PS)
    pages[1] = 0  # a page that becomes zero
    pages[2, 17] ^= 1  # one bit: XBZRLE's case
    pages[5:9] = 0x33
    pages[200:210] = rng.integers(0, 256, (10, PS), dtype=np.uint8)
    paths = []
    for name, ram, encoding in (("base", before, "zero"), ("new", mem, "page")):
        blocks = RAMBlockList([RAMBlock(b.idstr, ram.copy() if b.idstr == "mem0"
                                        else np.array(b.memory)) for b in vec.blocks])
        path = d / f"{name}.mig"
        with open(path, "wb") as f:
            save_stream(f.write, blocks, vec.sections, vmdesc=vec.vmdesc,
                        configuration=vec.configuration, encoding=encoding)
        paths.append(path)
    return d, paths[0], paths[1], before, mem


def test_an_index_locates_what_a_load_gives(streams):
    _, base, new, before, mem = streams
    for path in (base, new):
        loaded = load_plain(str(path))
        with index_stream(str(path)) as ix:
            assert ix.loaded.ram_setup == loaded.ram_setup
            assert [s.payload for s in ix.loaded.sections] == [s.payload for s in loaded.sections]
            assert ix.loaded.vmdesc == loaded.vmdesc and ix.loaded.configuration.raw == \
                loaded.configuration.raw
            for b in loaded.blocks:
                assert ix.length(b.idstr) == b.used_length
                assert bytes(ix.block(b.idstr)) == bytes(b.memory), b.idstr
            assert block_digests(ix, ["mem0"]) == block_digests(LoadedPages(loaded), ["mem0"])
    with index_stream(str(new)) as ix:
        assert ix.offsets["mem0"][1] >= 0  # written as a PAGE record of zeros
        assert bytes(ix.pages("mem0", np.array([1, 5]))) == bytes(PS) + b"\x33" * PS
    with index_stream(str(base)) as ix:  # zero pages as ZERO records, as QEMU sends them
        assert ix.offsets["mem0"][3] == -1 and ix.offsets["mem0"][1] >= 0
        got = bytes(ix.pages("mem0", np.array([3, 1])))
        assert got == bytes(PS) + before[PS : 2 * PS].tobytes()


def test_streams_that_need_decoding_have_no_index(streams, tmp_path):
    _, base, new, _, _ = streams
    xbz = tmp_path / "x.mig"  # an XBZRLE delta: its pages need BASE's to decode
    with open(xbz, "wb") as f:
        assert diff_streams(str(base), str(new), f.write, encoding="xbzrle").xbzrle_pages == 1
    comp = tmp_path / "c.mig"
    lo = load_stream(str(new))
    with open(comp, "wb") as f:
        save_stream(f.write, lo.blocks, lo.sections, vmdesc=lo.vmdesc,
                    configuration=lo.configuration, encoding="compress")
    assert index_stream(str(xbz)) is None and index_stream(str(comp)) is None
    assert index_stream(str(tmp_path)) is None and index_stream(b"QEVM") is None


@pytest.mark.parametrize("encoding", ["page", "xbzrle"])
def test_a_delta_from_indexed_files_is_the_delta_from_loaded_streams(streams, tmp_path,
                                                                     encoding):
    _, base, new, before, mem = streams
    changed = (before.reshape(-1, PS) != mem.reshape(-1, PS)).any(axis=1)
    assert changed.sum() == 16  # what the fixture changed
    outs = []
    for b, n in ((str(base), str(new)), (load_plain(str(base)), load_plain(str(new)))):
        out = tmp_path / f"d{len(outs)}.mig"
        with open(out, "wb") as f:
            stats = diff_streams(b, n, f.write, encoding=encoding)
        assert stats.changed_pages == int(changed.sum()) and stats.zero_pages == 1
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    got = load_delta(str(tmp_path / "d0.mig"), str(base))
    assert bytes(got.blocks["mem0"].memory) == mem.tobytes()


def test_a_delta_recorded_with_sha256_still_checks_its_base(streams, tmp_path):
    """Deltas made before the digest became XXH64 name their base by SHA-256."""
    _, base, new, _, mem = streams
    out = tmp_path / "d.mig"
    with open(out, "wb") as f:
        diff_streams(str(base), str(new), f.write)
    data = out.read_bytes()
    at, text = find_vmdesc(data)
    doc = json.loads(text)
    meta = doc[DELTA_KEY]
    del meta["base-xxh64"]
    meta["base-sha256"] = ram_digest(load_plain(str(base)).blocks, ["mem0"])
    body = json.dumps(doc).encode()
    old = tmp_path / "old.mig"
    old.write_bytes(data[:at] + b"\x06" + len(body).to_bytes(4, "big") + body)
    assert bytes(load_delta(str(old), str(base)).blocks["mem0"].memory) == mem.tobytes()
    with pytest.raises(StreamError, match="another base"):
        load_delta(str(old), str(new))
