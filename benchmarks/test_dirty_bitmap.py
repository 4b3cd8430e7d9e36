"""Dirty-bitmap migration speed: a 16 MiB bitmap (512-byte granules of a 64 GiB disk).

Each figure is a ratio to a memcpy of the bitmap's 16 MiB in the same run
(cold), so 1.0 means "as fast as copying the bitmap once". encode: the
source's END payload (every 1 KiB chunk as a BITS or ZEROES record, then
COMPLETE) written through a QEMUFile; decode: the destination reading and
applying that payload record by record. ``dense``: random bits in every
chunk (16384 BITS records); ``sparse``: one chunk in 64 has bits, the
rest travel as ZEROES records. Both paths cost a few microseconds per
1 KiB record; the bits themselves move as whole numpy words.

Run: ``python -m pytest benchmarks/test_dirty_bitmap.py --benchmark-enable -q -s``
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx.block_bitmaps import CHUNK_WORDS, BlockDirtyBitmap, DirtyBitmapSet
from qmigx.block_dirty_bitmap import (
    DirtyBitmapDestination,
    DirtyBitmapHandler,
    DirtyBitmapSource,
)
from qmigx.qemufile import BytesSink, Cursor, QEMUFile
from qmigx.savevm import Section

GRANULARITY = 512
DISK = 64 << 30
NBYTES = DISK // GRANULARITY // 8
SECTION = Section(3, "dirty-bitmap", 0, 1)


def _bitmap(kind: str) -> DirtyBitmapSet:
    bm = BlockDirtyBitmap("bench", GRANULARITY, DISK)
    rng = np.random.default_rng(5)
    words = rng.integers(0, 1 << 63, NBYTES // 8, dtype=np.uint64)
    if kind == "sparse":
        words.reshape(-1, CHUNK_WORDS)[np.arange(words.size // CHUNK_WORDS) % 64 != 0] = 0
    bm.write_words(0, words)
    out = DirtyBitmapSet()
    out.add("disk0", bm)
    return out


def _encode(bitmaps: DirtyBitmapSet) -> tuple[bytes, bytes]:
    src = DirtyBitmapSource(bitmaps)
    sink = BytesSink()
    f = QEMUFile(sink)
    src.save_setup(f)
    f.flush()
    start = bytes(sink.data)
    sink.data.clear()
    src.save_complete_precopy(f)
    f.flush()
    return start, bytes(sink.data)


def _decode(start: bytes, end: bytes) -> DirtyBitmapDestination:
    dst = DirtyBitmapDestination()
    grammar = DirtyBitmapHandler()
    for payload in (start, end):
        cur = Cursor(payload)
        while cur.remaining():
            rec, _ = grammar.read_record(cur, SECTION)
            dst.load_record(rec, SECTION)
    return dst


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_encode(vs_memcpy, kind):
    bitmaps = _bitmap(kind)
    _, end = vs_memcpy(lambda: _encode(bitmaps), NBYTES, cold=True, rounds=5)
    records = 16384 if kind == "dense" else 256
    assert len(end) > records * 1024  # every non-zero chunk travels whole


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_decode(vs_memcpy, kind):
    bitmaps = _bitmap(kind)
    start, end = _encode(bitmaps)
    dst = vs_memcpy(lambda: _decode(start, end), NBYTES, cold=True, rounds=5)
    got = dst.result.get("disk0", "bench")
    want = bitmaps.get("disk0", "bench")
    assert got.dirty_granules() == want.dirty_granules() and got.sha256() == want.sha256()
