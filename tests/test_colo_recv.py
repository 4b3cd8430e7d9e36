"""The compiled COLO page receiver against its plain-Python twin and a model.

Both read the same bytes from a socket. Whatever the stream holds (runs
of pages, zero pages, jumps, pages sent twice, another block's record,
the end of the RAM part, a short read, the end of the connection), a
kernel must store exactly what applying the stream's leading records in
order stores, mark those pages and no other, hand every byte it read past
them back in ``spill`` in stream order, and leave every other page of the
cache as ``ram`` has it.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx._core import colo_recv as compiled
from qmigx.errors import RamStreamError
from qmigx.reference import colo_recv as reference

PAGE = 64  # small pages: the same code paths, streams that fit in a socket buffer
NPAGES = 48
REC = PAGE + 8
SPILL = (compiled.MAX_RUN + 1) * REC + (1 << 16)


def page_record(page: int, data: bytes) -> bytes:
    return ((page * PAGE) | 0x28).to_bytes(8, "big") + data


def zero_record(page: int, fill: int = 0) -> bytes:
    return ((page * PAGE) | 0x22).to_bytes(8, "big") + bytes([fill])


def run(kernel, wire: bytes, first: int, prefix: bytes, *, close: bool = True, chunk: int = 0,
        stop: bool = False, dirty=None):
    ram = np.random.default_rng(7).integers(0, 256, NPAGES * PAGE, dtype=np.uint8)
    dest = ram.copy()
    marks = np.zeros(NPAGES, bool) if dirty is None else dirty.copy()
    received = marks.copy()
    spill = bytearray(SPILL)
    a, b = socket.socketpair()
    b.setblocking(False)
    wake = os.eventfd(0, os.EFD_NONBLOCK)

    def write() -> None:
        step = chunk or max(1, len(wire))
        try:
            for i in range(0, len(wire), step):
                a.sendall(wire[i : i + step])
            if close:
                a.shutdown(socket.SHUT_WR)
        except OSError:  # the kernel stopped reading and its end was closed
            pass

    writer = threading.Thread(target=write)
    if chunk == 0:  # all of it there before the kernel reads: the same reads for both kernels
        write()
        writer = threading.Thread(target=lambda: None)
    writer.start()
    if stop:
        threading.Timer(0.05, os.eventfd_write, (wake, 1)).start()
    try:
        out = kernel.receive_pages(b.fileno(), wake, dest, ram, marks, received, first, prefix,
                                   spill, PAGE, timeout=5.0)
    finally:
        b.close()  # a writer blocked on what the kernel left unread fails instead of waiting
        writer.join()
        a.close()
        os.close(wake)
    return out, dest, ram, marks, received, bytes(spill)


def apply_model(stream: bytes, ram: np.ndarray, count: int):
    """The first ``count`` records of ``stream`` applied in order: (cache, pages, bytes used)."""
    cache = ram.copy()
    pages = set()
    pos = 0
    for _ in range(count):
        h = int.from_bytes(stream[pos : pos + 8], "big")
        pg, flags = h // PAGE, h % PAGE
        if flags == 0x22:
            assert stream[pos + 8] == 0
            cache[pg * PAGE : (pg + 1) * PAGE] = 0
            pos += 9
        else:
            assert flags == 0x28
            cache[pg * PAGE : (pg + 1) * PAGE] = np.frombuffer(stream[pos + 8 : pos + REC],
                                                               np.uint8)
            pos += REC
        pages.add(pg)
    return cache, pages, pos


@st.composite
def streams(draw):
    first = draw(st.integers(0, NPAGES))
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    parts = []
    page = first
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["run", "run", "zero", "jump", "twice"]))
        if kind == "run":
            k = draw(st.integers(1, 20))
            for _ in range(k):
                if page < NPAGES:
                    parts.append(page_record(page, rng.integers(0, 256, PAGE, np.uint8).tobytes()))
                    page += 1
        elif kind == "zero" and page < NPAGES:
            parts.append(zero_record(page))
            page += 1
        elif kind == "jump":
            page = draw(st.integers(0, NPAGES - 1))
        elif kind == "twice" and page > 0:
            parts.append(page_record(page - 1, bytes(PAGE)))
    tail = draw(st.sampled_from(["none", "eos", "fill", "outside", "partial", "junk"]))
    if tail == "eos":
        parts.append((0x10).to_bytes(8, "big") + b"\x05\0\0\0\x02\x04")
    elif tail == "fill":
        parts.append(zero_record(page % NPAGES, 7))
    elif tail == "outside":
        parts.append(page_record(NPAGES, bytes(PAGE)))
    elif tail == "partial":
        parts.append(page_record(page % NPAGES, bytes(PAGE))[: draw(st.integers(1, REC - 1))])
    elif tail == "junk":
        parts.append(draw(st.binary(max_size=40)))
    wire = b"".join(parts)
    cut = draw(st.integers(0, min(len(wire), 4 * REC)))
    chunk = draw(st.sampled_from([0, 7, 13, REC, 4000]))
    return first, wire, cut, chunk


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_kernel_matches_twin_and_model(case):
    first, wire, cut, chunk = case
    prefix, rest = wire[:cut], wire[cut:]
    results = [run(k, rest, first, prefix, chunk=chunk) for k in (compiled, reference)]
    for (stored, used, spilled, status, err), dest, ram, marks, received, spill in results:
        assert err == 0
        cache, pages, took = apply_model(wire, ram, stored)
        assert used == took
        assert np.array_equal(dest, cache)
        assert set(np.flatnonzero(marks)) == pages and np.array_equal(marks, received)
        assert spill[:spilled] == wire[used : used + spilled]
        if status == compiled.END:
            assert used + spilled == len(wire)
        else:
            assert status == compiled.DONE
    if chunk == 0:  # what arrives when decides where a kernel stops: the twins agree here
        (c, cd, *_, cs), (r, rd, *_, rs) = results
        assert c == r and np.array_equal(cd, rd) and cs[: c[2]] == rs[: r[2]]


@pytest.mark.kernel("colo_recv")
def test_runs_and_zero_pages_are_all_taken(kernel):
    """A checkpoint's usual shape: runs of pages with zero pages among them, then EOS."""
    rng = np.random.default_rng(3)
    parts = []
    for pg in range(2, NPAGES):
        parts.append(zero_record(pg) if pg % 9 == 0 else
                     page_record(pg, rng.integers(0, 256, PAGE, np.uint8).tobytes()))
    eos = (0x10).to_bytes(8, "big") + b"\x05"
    wire = b"".join(parts) + eos
    (stored, _, spilled, status, _), dest, ram, marks, _, spill = run(kernel, wire[5:], 2, wire[:5],
                                                                   chunk=1000, close=False)
    assert (stored, status) == (NPAGES - 2, compiled.DONE)
    assert spilled >= 8 and eos.startswith(spill[:spilled])  # the EOS header ends it
    assert np.array_equal(dest, apply_model(wire, ram, stored)[0])


@pytest.mark.kernel("colo_recv")
def test_a_received_page_ends_the_prediction(kernel):
    dirty = np.zeros(NPAGES, bool)
    dirty[5] = True
    wire = b"".join(page_record(pg, bytes([pg]) * PAGE) for pg in range(3, 8))
    (stored, _, spilled, status, _), dest, ram, marks, _, spill = run(kernel, wire, 3, b"",
                                                                   dirty=dirty, close=False)
    # pages 3 and 4 read into place; the record of page 5 is left to the parser
    assert (stored, status) == (2, compiled.DONE)
    assert spill[:spilled] == wire[2 * REC : 2 * REC + spilled]
    assert np.array_equal(dest[5 * PAGE :], ram[5 * PAGE :])


@pytest.mark.kernel("colo_recv")
def test_stop_while_waiting(kernel):
    wire = page_record(3, bytes(range(PAGE)))[:20]
    (stored, _, spilled, status, _), dest, ram, marks, _, spill = run(kernel, wire, 3, b"",
                                                                   close=False, stop=True)
    assert (stored, status) == (0, compiled.STOPPED)
    assert spill[:spilled] == wire
    assert np.array_equal(dest, ram) and not marks.any()  # the page it reached is back


@pytest.mark.kernel("colo_recv")
@pytest.mark.parametrize("args", [dict(first=-1), dict(first=NPAGES + 1), dict(spill=10),
                                  dict(page=12), dict(page=0), dict(cache=NPAGES * PAGE - 1),
                                  dict(prefix=(1 << 16) + 1)])
def test_bad_arguments_are_refused_before_reading(kernel, args):
    ram = np.zeros(NPAGES * PAGE, np.uint8)
    dest = np.zeros(args.get("cache", NPAGES * PAGE), np.uint8)
    marks = np.zeros(NPAGES, bool)
    spill = bytearray(args.get("spill", SPILL + (1 << 16)))
    with pytest.raises(RamStreamError):
        kernel.receive_pages(-1, -1, dest, ram, marks, marks.copy(), args.get("first", 0),
                             bytes(args.get("prefix", 0)), spill, args.get("page", PAGE))
    assert not dest.any() and not marks.any()
