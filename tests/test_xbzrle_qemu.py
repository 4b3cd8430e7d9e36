"""XBZRLE compatibility vectors taken from a real QEMU 7.2 stream.

A live QEMU 7.2 migration with ``xbzrle`` on carries QEMU's own
encodings. Replaying the stream page by page gives, for every XBZRLE
record, the page's previous content in the stream (``old``, what QEMU's
cache held) and its content after the record (``new``). qmigx's encoder
must reproduce QEMU's bytes exactly from (old, new), both backends and
the batch form, and decoding must give the final RAM.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmigx._backend import load_compiled
from qmigx.ram import RamLoader
from qmigx.tools.streams import StreamReader
from qmigx.stream import RamPages, RamSetup

from qemu_support.streams import get_stream, set_default_cache_dir

pytestmark = pytest.mark.qemu

PS = 4096


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """(old, new, qemu_delta) triples and the stream's final RAM and memory file."""
    set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")
    info = get_stream("pc-xbzrle")
    reader = StreamReader(info.stream)
    loader = RamLoader(None)
    triples = []
    for ev in reader.events():
        if isinstance(ev, RamSetup):
            loader.on_setup(ev)
        elif isinstance(ev, RamPages):
            rec = ev.records
            for i in range(rec.count):
                if rec.kind[i] == 2:
                    blk = loader.block_of(ev, i)
                    off = int(rec.offset[i])
                    old = blk.buffer[off : off + PS].copy()
                    loader.apply_range(ev, i, i + 1)
                    new = blk.buffer[off : off + PS].copy()
                    p, n = int(rec.pos[i]), int(rec.length[i])
                    triples.append((old, new, bytes(ev.data[p : p + n])))
                else:
                    loader.apply_range(ev, i, i + 1)
    return triples, loader, info


def test_the_stream_really_has_xbzrle_records(vectors):
    triples, _, _ = vectors
    assert len(triples) > 0


@pytest.mark.kernel("xbzrle")
def test_encoder_reproduces_qemus_bytes(vectors, kernel):
    triples, _, _ = vectors
    out = np.zeros(PS, np.uint8)
    for k, (old, new, delta) in enumerate(triples):
        n = kernel.encode_buffer(old, new, out)
        assert n == len(delta), k
        assert bytes(out[:n]) == delta, k


def test_batch_encoder_reproduces_qemus_bytes(vectors):
    triples, _, _ = vectors
    xb = load_compiled("xbzrle")
    old = np.stack([t[0] for t in triples])
    new = np.stack([t[1] for t in triples])
    out = np.zeros_like(old)
    lengths = np.zeros(len(triples), np.int32)
    xb.encode_pages(old, new, out, lengths)
    for k, (_, _, delta) in enumerate(triples):
        assert bytes(out[k, : lengths[k]]) == delta, k


def test_decoding_gives_the_final_ram(vectors):
    _, loader, info = vectors
    with open(info.mem, "rb") as f:
        assert bytes(loader.blocks["mem0"].memory) == f.read()
