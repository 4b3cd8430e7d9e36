"""Page placement: plain copy, the COLO RAM cache, and userfaultfd (postcopy)."""

from __future__ import annotations

import io
import os
import select
import struct
import threading

import numpy as np
import pytest

from qmigx import RAMBlock, RAMBlockList, xbzrle
from qmigx.errors import CapabilityError, RamStreamError
from qmigx.placement import ColoCachePlacement, CopyPlacement, UffdPlacement
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamLoader, RamWriter
from qmigx.stream import RamBlockInfo, RamPages, RamSetup, Section, StreamReader, StreamWriter
from qmigx.tools.streams import save_stream
from qmigx.wire import SectionType

PS = 4096


def _blocks(seed: int = 1, npages: int = 64) -> RAMBlockList:
    rng = np.random.default_rng(seed)
    blk = RAMBlock.anonymous("pc.ram", npages * PS)
    mem = blk.memory
    mem[:] = rng.integers(0, 256, mem.size, dtype=np.uint8)
    mem[5 * PS : 9 * PS] = 0  # zero pages
    return RAMBlockList([blk])


def _stream(blocks, encoding="zero") -> bytes:
    out = io.BytesIO()
    save_stream(out.write, blocks, encoding=encoding)
    return out.getvalue()


def _load(data: bytes, loader: RamLoader) -> None:
    for ev in StreamReader(data).events():
        if isinstance(ev, RamSetup):
            loader.on_setup(ev)
        elif isinstance(ev, RamPages):
            loader.on_pages(ev)


def test_copy_placement_is_the_default_and_fills_the_blocks():
    src = _blocks()
    loader = RamLoader(None)
    assert isinstance(loader.placement, CopyPlacement)
    _load(_stream(src), loader)
    assert np.array_equal(loader.blocks["pc.ram"].memory, src["pc.ram"].memory)


def test_colo_cache_leaves_ram_alone_until_flush():
    src = _blocks(seed=2)
    dst = RAMBlockList([RAMBlock.anonymous("pc.ram", src["pc.ram"].used_length)])
    before = dst["pc.ram"].memory.copy()
    cache = ColoCachePlacement()
    loader = RamLoader(dst, placement=cache)
    _load(_stream(src), loader)
    assert np.array_equal(dst["pc.ram"].memory, before)  # nothing applied yet
    assert np.array_equal(cache.cache["pc.ram"], src["pc.ram"].memory)
    changed = cache.flush(dst)
    assert changed == 64  # every page was in the checkpoint
    assert np.array_equal(dst["pc.ram"].memory, src["pc.ram"].memory)
    assert cache.flush(dst) == 0


def test_colo_cache_discards_an_incomplete_checkpoint_and_decodes_xbzrle_against_the_cache():
    src = _blocks(seed=3)
    dst = RAMBlockList([RAMBlock.anonymous("pc.ram", src["pc.ram"].used_length)])
    cache = ColoCachePlacement()
    loader = RamLoader(dst, placement=cache)
    _load(_stream(src), loader)
    cache.flush(dst)
    # a second checkpoint: page 3 as an XBZRLE delta against the first one's content
    old = src["pc.ram"].memory[3 * PS : 4 * PS].copy()
    src["pc.ram"].memory[3 * PS + 10 : 3 * PS + 20] ^= 0xFF
    new = src["pc.ram"].memory[3 * PS : 4 * PS]
    delta = np.empty(PS, np.uint8)
    n = xbzrle.encode_buffer(old, new, delta)
    out = io.BytesIO()
    f = QEMUFile(out.write)
    w, rw = StreamWriter(f), RamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2")
    sec = Section(2, "ram", 0, 4)
    w.section_header(SectionType.SECTION_FULL, sec)
    rw.setup([RamBlockInfo("pc.ram", src["pc.ram"].used_length, None, None)])
    rw.xbzrle("pc.ram", 3 * PS, delta[:n])
    rw.eos()
    w.footer(sec)
    w.eof()
    f.flush()
    _load(out.getvalue(), loader)
    assert list(np.flatnonzero(cache.dirty["pc.ram"])) == [3]
    assert np.array_equal(cache.cache["pc.ram"][3 * PS : 4 * PS], new)
    assert not np.array_equal(dst["pc.ram"].memory[3 * PS : 4 * PS], new)
    cache.discard(dst)
    assert not cache.dirty["pc.ram"].any()
    assert np.array_equal(cache.cache["pc.ram"], dst["pc.ram"].memory)


def _uffd_or_skip(blocks) -> UffdPlacement:
    pl = UffdPlacement(list(blocks))
    try:
        pl.register()
    except CapabilityError as e:
        pytest.skip(f"userfaultfd missing mode unavailable: {e}")
    return pl


def test_uffd_placement_places_each_page_once():
    blk = RAMBlock.anonymous("pc.ram", 16 * PS)
    pl = _uffd_or_skip([blk])
    try:
        page = np.full(PS, 0xAB, np.uint8)
        pl.place(blk, 2 * PS, page)
        pl.place_zero(blk, 3 * PS)
        assert bytes(blk.memory[2 * PS : 3 * PS]) == bytes(page)
        assert not blk.memory[3 * PS : 4 * PS].any()
        assert list(np.flatnonzero(pl.received["pc.ram"])) == [2, 3]
        with pytest.raises(RamStreamError, match="placed twice"):
            pl.place(blk, 2 * PS, page)
        with pytest.raises(RamStreamError, match="outside"):
            pl.place(blk, 16 * PS, page)
        with pytest.raises(RamStreamError, match="outside"):
            pl.place(blk, 100, page)
    finally:
        pl.close()


def test_uffd_placement_wakes_a_thread_blocked_on_a_missing_page():
    blk = RAMBlock.anonymous("pc.ram", 8 * PS)
    pl = _uffd_or_skip([blk])
    got = []
    r, w = os.pipe()

    def touch():  # the kernel reads the page: the GIL is released while it waits
        os.write(w, memoryview(blk.memory[5 * PS : 5 * PS + 8]))
        got.append(os.read(r, 8))

    try:
        reader = threading.Thread(target=touch)
        reader.start()
        ready, _, _ = select.select([pl.fd], [], [], 10)
        assert ready, "no fault reported for the missing page"
        msg = os.read(pl.fd, 32)
        event, addr = msg[0], struct.unpack_from("=Q", msg, 16)[0]
        base = blk.memory.ctypes.data
        assert event == 0x12 and addr - addr % PS == base + 5 * PS
        assert reader.is_alive()  # still waiting for its page
        pl.place(blk, 5 * PS, np.full(PS, 42, np.uint8))
        reader.join(10)
        assert got == [bytes([42]) * 8]
    finally:
        pl.close()
        os.close(r)
        os.close(w)


def test_a_loader_places_a_whole_stream_through_userfaultfd():
    src = _blocks(seed=4, npages=32)
    dst = RAMBlockList([RAMBlock.anonymous("pc.ram", src["pc.ram"].used_length)])
    pl = _uffd_or_skip(dst)
    try:
        _load(_stream(src), RamLoader(dst, placement=pl))
        assert pl.received["pc.ram"].all()
        assert np.array_equal(dst["pc.ram"].memory, src["pc.ram"].memory)
    finally:
        pl.close()
