"""The source's page walk serves queued page requests first and reports discard ranges."""

from __future__ import annotations

import io

import numpy as np
import pytest

from qmigx import RAMBlock, RAMBlockList
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.errors import ReturnPathError
from qmigx.precopy import RamSaveState
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamLoader, RamWriter
from qmigx.stream import RamPages, StreamParser

PS = 4096


def _state(npages=64):
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", npages * PS),
                           RAMBlock.anonymous("vga.vram", 16 * PS)])
    for b in blocks:
        b.memory[:] = np.arange(b.memory.size, dtype=np.uint64).astype(np.uint8) | 1
    logs = {b.idstr: ExplicitDirtyLog(b) for b in blocks}
    ram = RamSaveState(blocks, dirty_logs=logs)
    out = io.BytesIO()
    rw = RamWriter(QEMUFile(out.write))
    ram.setup(rw)
    return blocks, ram, rw, out


def _sent_offsets(data: bytes) -> list[tuple[str, int]]:
    p = StreamParser(header=False)
    p.feed(b"\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x04" + data + b"\0\0\0\0\0\0\0\x10\x7e\0\0\0\x02")
    p.feed_eof()
    loader = RamLoader(None)
    out = []
    for ev in p.events():
        if type(ev).__name__ == "RamSetup":
            loader.on_setup(ev)
        if isinstance(ev, RamPages):
            for i in range(ev.records.count):
                out.append((loader.block_of(ev, i).idstr, int(ev.records.offset[i])))
    return out


def test_requested_pages_go_out_before_the_walk():
    blocks, ram, rw, out = _state()
    ram.request_pages("vga.vram", 5 * PS, 2 * PS)
    ram.request_pages(None, 9 * PS, 1)  # same block as before, a partial page rounds up
    budget = iter([False] * 3 + [True] * 1000)
    ram.iterate(rw, over_budget=lambda: next(budget))
    rw.f.flush()
    sent = _sent_offsets(out.getvalue())
    assert sent[:3] == [("vga.vram", 5 * PS), ("vga.vram", 6 * PS), ("vga.vram", 9 * PS)]
    assert ram.requests_served == 2 and ram.requests_pending == 0
    # a page already sent is not sent again when requested
    ram.request_pages("vga.vram", 5 * PS, PS)
    ram.iterate(rw, over_budget=lambda: True)
    rw.f.flush()
    assert _sent_offsets(out.getvalue()) == sent
    assert ram.requests_served == 3


@pytest.mark.parametrize("idstr,start,length,field", [
    ("nope", 0, PS, "rbname"),
    ("pc.ram", 64 * PS, PS, "start"),
    ("pc.ram", 63 * PS, 2 * PS, "start"),
    ("pc.ram", 100, PS, "start"),
    ("pc.ram", 0, 0, "start"),
    (None, 0, PS, "rbname"),
])
def test_malformed_requests_are_refused(idstr, start, length, field):
    _, ram, _, _ = _state()
    with pytest.raises(ReturnPathError) as ei:
        ram.request_pages(idstr, start, length)
    assert ei.value.field == field
    assert ram.requests_pending == 0


def test_discard_ranges_are_the_runs_still_dirty():
    blocks, ram, rw, _ = _state()
    # send everything, then dirty two runs again
    while not ram.iterate(rw):
        pass
    assert list(ram.discard_ranges()) == []
    ram._states[0].bitmap.set(3, 4)
    ram._states[0].bitmap.set(20)
    ram._states[1].bitmap.set(15)
    assert list(ram.discard_ranges()) == [("pc.ram", [(3, 4), (20, 1)]), ("vga.vram", [(15, 1)])]
