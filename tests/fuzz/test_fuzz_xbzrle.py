"""Million-input fuzz of the XBZRLE decoders (compiled backend), and the encoder.

A delta comes from the peer, so the decoders get hostile input here:
random bytes, and real deltas with flipped, inserted, deleted or cut
bytes, applied to pages of the right size and of wrong ones. Every call
must either raise ``XbzrleError`` with an offset inside the delta and
leave the page untouched, or return an end position inside the page;
guard bytes (``decode_buffer``) or guard rows (``decode_pages``) around
the destination must never change. A sample is compared with the
plain-Python twin, and ``decode_pages`` with one ``decode_buffer`` per
page. The encoder gets a million random page pairs at random output
sizes: results must round-trip and never touch the guard rows.

Run: ``python -m pytest tests/fuzz -m fuzz``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from qmigx._backend import load_compiled, load_reference
from qmigx.errors import XbzrleError

xbz = load_compiled("xbzrle")
ref = load_reference("xbzrle")

N = 1_000_000
FIELDS = {"zrun", "nzrun", "literal"}
GUARD = 32


def delta_pool(rng: np.random.Generator, count: int, page: int) -> list[bytes]:
    """Valid deltas of page-size pages with sparse to dense changes."""
    old = rng.integers(0, 256, (count, page), dtype=np.uint8)
    new = old.copy()
    density = rng.choice([0.002, 0.01, 0.05, 0.2, 0.5], count)
    flips = rng.random((count, page)) < density[:, None]
    new[flips] ^= rng.integers(1, 256, int(flips.sum()), dtype=np.uint8)
    out = np.zeros((count, page + 8), dtype=np.uint8)
    lengths = np.zeros(count, dtype=np.int32)
    xbz.encode_pages(old, new, out, lengths)
    return [out[k, :n].tobytes() for k, n in enumerate(lengths) if n > 0]


def mutate(rng: np.random.Generator, delta: bytes) -> bytes:
    data = bytearray(delta)
    for _ in range(int(rng.integers(1, 4))):
        if not data:
            break
        pos = int(rng.integers(0, len(data)))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del data[pos:]
        elif kind == 2:
            data.insert(pos, int(rng.integers(0, 256)))
        elif kind == 3:
            del data[pos]
        else:
            data[pos] = 0x80 | int(rng.integers(0, 128))  # uleb continuation
    return bytes(data)


def draw_delta(rng: np.random.Generator, pool: list[bytes]) -> bytes:
    kind = rng.integers(0, 4)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 40)))
    delta = pool[int(rng.integers(0, len(pool)))]
    return delta if kind == 1 else mutate(rng, delta)


def outcome(mod, src: bytes, page: bytes):
    dst = bytearray(page)
    try:
        d = mod.decode_buffer(src, dst)
    except XbzrleError as err:
        return ("error", err.offset, err.field, str(err))
    return ("ok", d, bytes(dst))


@pytest.mark.fuzz
def test_fuzz_decode_buffer():
    rng = np.random.default_rng(0xB2E1)
    sizes = [4096, 4096, 256, 64, 7, 1, 0]
    pools = {size: delta_pool(rng, 2000, max(size, 64)) for size in set(sizes)}
    base = rng.bytes(4096)
    guard = b"\xc3" * GUARD
    initial = guard + base + guard
    buf = bytearray(initial)
    checked = errors = 0
    for i in range(N):
        size = sizes[i % len(sizes)]
        src = draw_delta(rng, pools[size])
        dst = memoryview(buf)[GUARD : GUARD + size]
        try:
            d = xbz.decode_buffer(src, dst)
        except XbzrleError as err:
            errors += 1
            assert 0 <= err.offset <= len(src) and err.field in FIELDS, (src, err)
            assert bytes(dst) == base[:size], src
        else:
            assert 0 <= d <= size, src
        dst.release()
        # nothing outside the destination moved
        assert buf[:GUARD] == guard and buf[GUARD + size :] == initial[GUARD + size :], src
        buf[GUARD : GUARD + size] = base[:size]
        if i % 250 == 0:
            checked += 1
            page = base[:size]
            assert outcome(xbz, src, page) == outcome(ref, src, page), src
    assert checked >= N // 250 and 0 < errors < N


def fill_batch(rng, pool, deltas: np.ndarray, lengths: np.ndarray) -> None:
    for k in range(len(lengths)):
        src = draw_delta(rng, pool)[: deltas.shape[1]]
        deltas[k, : len(src)] = np.frombuffer(src, dtype=np.uint8)
        lengths[k] = len(src)


@pytest.mark.fuzz
def test_fuzz_decode_pages():
    rng = np.random.default_rng(0xDECE)
    n, page, dlen = 500, 256, 320
    pool = delta_pool(rng, 2000, page)
    deltas = np.zeros((n, dlen), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int32)
    fed = failures = 0
    while fed < N:
        fill_batch(rng, pool, deltas, lengths)
        start = rng.integers(0, 256, (n + 2, page), dtype=np.uint8)  # rows 0 and n+1 guard
        arr = start.copy()
        valid_from = 0  # deltas before this index are known to be valid
        while True:
            try:
                xbz.decode_pages(deltas, lengths, arr[1 : n + 1])
            except XbzrleError as err:
                failures += 1
                bad = int(re.match(r"page (\d+): ", str(err)).group(1))
                assert (arr == start).all()
                scratch = bytearray(page)
                with pytest.raises(XbzrleError) as single:
                    xbz.decode_buffer(deltas[bad, : lengths[bad]], scratch)
                assert (single.value.offset, single.value.field) == (err.offset, err.field)
                for k in range(valid_from, bad):
                    if lengths[k]:
                        xbz.decode_buffer(deltas[k, : lengths[k]], bytearray(page))
                valid_from = bad + 1
                lengths[bad] = 0
                fed += 1
                continue
            break
        fed += int((lengths > 0).sum())
        expected = start.copy()
        for k in range(n):
            if lengths[k]:
                xbz.decode_buffer(deltas[k, : lengths[k]], expected[k + 1])
        assert (arr == expected).all()
    assert failures > 0


@pytest.mark.fuzz
def test_fuzz_encode_pages():
    rng = np.random.default_rng(0xE1C0)
    n, page = 2000, 256
    done = 0
    while done < N:
        old = rng.integers(0, 256, (n, page), dtype=np.uint8)
        if rng.integers(0, 2):
            old[:] = 0
        new = old.copy()
        density = rng.choice([0.0, 0.003, 0.03, 0.2, 0.6, 1.0], n)
        flips = rng.random((n, page)) < density[:, None]
        new[flips] ^= rng.integers(1, 256, int(flips.sum()), dtype=np.uint8)
        dlen = int(rng.choice([0, 1, 2, 3, 5, 17, 64, 200, 255, 256, 260]))
        rows = np.full((n + 2, dlen), 0x77, dtype=np.uint8)  # rows 0 and n+1 guard
        lengths = np.zeros(n, dtype=np.int32)
        xbz.encode_pages(old, new, rows[1 : n + 1], lengths)
        assert (rows[0] == 0x77).all() and (rows[n + 1] == 0x77).all()
        same = (old == new).all(axis=1)
        assert ((lengths == 0) == (same & (dlen >= 2))).all()
        assert ((lengths >= -1) & (lengths <= dlen)).all()
        pages = old.copy()
        ok = lengths > 0
        xbz.decode_pages(rows[1 : n + 1], np.where(ok, lengths, 0).astype(np.int32), pages)
        assert (pages[ok] == new[ok]).all()
        for k in rng.integers(0, n, 4):
            out = bytearray(dlen)
            assert ref.encode_buffer(old[k], new[k], out) == lengths[k]
        done += n
