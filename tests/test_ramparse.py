"""The RAM record scanner: compiled kernel and Python twin agree exactly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import errors
from qmigx._backend import load_compiled, load_reference

BACKENDS = [load_compiled("ramparse"), load_reference("ramparse")]
NAMES = [b"pc.ram", b"pc.rom", b"/rom@etc/acpi/tables"]
LENGTHS = [16 * 4096, 2 * 4096, 4096]


def record(kind: int, block: int | None, page: int, body: bytes = b"", fill: int = 0) -> bytes:
    flags = {0: 0x02, 1: 0x08, 2: 0x40, 3: 0x100}[kind]
    out = b""
    if block is None:
        out = struct.pack(">Q", page * 4096 | flags | 0x20)
    else:
        out = struct.pack(">Q", page * 4096 | flags) + bytes((len(NAMES[block]),)) + NAMES[block]
    if kind == 0:
        return out + bytes((fill,))
    if kind == 1:
        return out + body.ljust(4096, b"\x01")[:4096]
    if kind == 2:
        return out + b"\x01" + struct.pack(">H", len(body)) + body
    return out + struct.pack(">I", len(body)) + body


records = st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 2)),
                    st.integers(0, 17), st.binary(max_size=40), st.integers(0, 255))


def scan_all(mod, data: bytes, capacity: int):
    sc = mod.RamScanner(4096, NAMES, LENGTHS)
    out = mod.RamRecords(capacity)
    rows, pos, statuses = [], 0, []
    try:
        while True:
            out.clear()
            pos, status = sc.scan(data, pos, len(data), out, 1000)
            for i in range(out.count):
                rows.append((int(out.kind[i]), int(out.block[i]), int(out.offset[i]),
                             int(out.pos[i]), int(out.length[i]), int(out.fill[i]),
                             int(out.start[i])))
            statuses.append(status)
            if status != mod.FULL:
                return rows, pos, statuses, None
    except errors.RamStreamError as exc:
        return rows, pos, statuses, (str(exc), exc.offset, exc.field)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=12), st.integers(1, 5), st.booleans(), st.integers(0, 80))
def test_backends_agree(recs, capacity, eos, cut):
    data = b"".join(record(*r) for r in recs)
    if eos:
        data += struct.pack(">Q", 0x10)
    if cut:
        data = data[: max(0, len(data) - cut)]
    a = scan_all(BACKENDS[0], data, capacity)
    b = scan_all(BACKENDS[1], data, capacity)
    assert a == b


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_typed_errors(data):
    for mod in BACKENDS:
        sc = mod.RamScanner(4096, NAMES, LENGTHS)
        out = mod.RamRecords(8)
        try:
            pos, status = sc.scan(data, 0, len(data), out)
        except errors.RamStreamError:
            continue
        assert 0 <= pos <= len(data)
        for i in range(out.count):
            assert out.pos[i] + out.length[i] <= len(data)
            assert out.offset[i] < LENGTHS[out.block[i]]


@pytest.mark.kernel("ramparse")
def test_apply_records_writes_only_inside_blocks(kernel):
    mod = kernel
    page = bytes(range(256)) * 16
    data = record(1, 0, 3, page) + record(0, None, 4, fill=7) + record(2, None, 5, b"\0\1\xaa")
    sc = mod.RamScanner(4096, NAMES, LENGTHS)
    out = mod.RamRecords(16)
    sc.scan(data, 0, len(data), out)
    blocks = [np.zeros(n + 64, np.uint8) for n in LENGTHS]
    stop = mod.apply_records(out, 0, data, blocks, 4096)
    assert stop == 2  # the XBZRLE record is left to the caller
    assert bytes(blocks[0][3 * 4096 : 4 * 4096]) == page
    assert (blocks[0][4 * 4096 : 5 * 4096] == 7).all()
    assert not blocks[0][5 * 4096 :].any()
    short = [np.zeros(4096, np.uint8), blocks[1], blocks[2]]
    with pytest.raises(errors.RamStreamError):
        mod.apply_records(out, 0, data, short, 4096)


def _note(mod, recs, splits, shifts):
    """``note_runs`` over the PAGE/ZERO records ``recs`` cut into runs at ``splits``."""
    data = b"".join(record(*r) for r in recs)
    sc = mod.RamScanner(4096, NAMES, LENGTHS)
    out = mod.RamRecords(64)
    sc.scan(data, 0, len(data), out)
    cuts = sorted({0, out.count, *(s % (out.count + 1) for s in splits)})
    runs = [(out, a, b, shifts[i % len(shifts)]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    tables = [np.full(n // 4096, -7, np.int64) for n in LENGTHS]
    got = [np.zeros(n // 4096, bool) for n in LENGTHS]
    mod.note_runs(runs, tables, got, 4096)
    return [t.tolist() for t in tables], [g.tolist() for g in got], out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.one_of(st.none(), st.integers(0, 2)),
                          st.integers(0, 17), st.just(b""), st.integers(0, 255)),
                min_size=1, max_size=30),
       st.lists(st.integers(0, 40), max_size=4), st.lists(st.integers(0, 1 << 20), min_size=1,
                                                           max_size=3))
def test_note_runs_backends_agree_and_the_last_record_wins(recs, splits, shifts):
    fixed, cur = [], 0
    for i, (k, b, p, body, f) in enumerate(recs):  # the first names a block; pages inside it
        b = 0 if i == 0 and b is None else b
        cur = cur if b is None else b
        fixed.append((k, b, p % (LENGTHS[cur] // 4096), body, f))
    recs = fixed
    want_t, want_g, out = _note(BACKENDS[1], recs, splits, shifts)
    assert _note(BACKENDS[0], recs, splits, shifts)[:2] == (want_t, want_g)
    # the truth, record by record: the last record for a page is what its entry says
    last = {}
    for i in range(out.count):
        last[(out.block[i], out.offset[i] // 4096)] = i
    for (b, p), i in last.items():
        assert want_g[b][p]
        if out.kind[i] == 0:
            assert want_t[b][p] == -1 - out.fill[i]
        else:
            assert want_t[b][p] - out.pos[i] in shifts
    assert sum(map(sum, want_g)) == len(last)


@pytest.mark.kernel("ramparse")
def test_note_runs_refuses_what_is_not_a_page_of_its_table(kernel):
    data = record(1, 0, 3) + record(2, None, 4, b"\0\1\xaa")
    sc = kernel.RamScanner(4096, NAMES, LENGTHS)
    out = kernel.RamRecords(8)
    sc.scan(data, 0, len(data), out)
    tables = [np.full(n // 4096, -1, np.int64) for n in LENGTHS]
    got = [np.zeros(n // 4096, bool) for n in LENGTHS]
    with pytest.raises(errors.RamStreamError):  # an XBZRLE record in the run
        kernel.note_runs([(out, 0, 2, 0)], tables, got, 4096)
    short = [np.full(2, -1, np.int64)] + tables[1:]
    with pytest.raises(errors.RamStreamError):  # page 3 outside a 2-page table
        kernel.note_runs([(out, 0, 1, 0)], short, got, 4096)
    with pytest.raises(ValueError):
        kernel.note_runs([(out, 0, 9, 0)], tables, got, 4096)
