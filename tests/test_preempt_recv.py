"""The compiled preempt-channel placer against its plain-Python twin, and inside PreemptReader.

Both kernels read the same byte stream from a socket into memory
registered with a real userfaultfd; they must place the same pages with
the same content, stop at the same record and leave the same bytes.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx import _backend
from qmigx.errors import CapabilityError, ChannelError, RamStreamError
from qmigx.migration.preempt import PreemptReader
from qmigx.placement import UffdPlacement
from qmigx.ram import RAMBlock
from qmigx.transport.channel import Channel
from qmigx.wire import RamFlag

PS = 4096
NPAGES = 8
KERNELS = {"cython": _backend.load_compiled("preempt_recv"),
           "python": _backend.load_reference("preempt_recv")}


def _placement(npages=NPAGES, names=("pc.ram", "vga.vram")) -> tuple[UffdPlacement, list]:
    blocks = [RAMBlock.anonymous(n, npages * PS) for n in names]
    pl = UffdPlacement(blocks)
    try:
        pl.register()
    except CapabilityError as e:
        pytest.skip(f"userfaultfd missing mode unavailable: {e}")
    return pl, blocks


def _table(pl: UffdPlacement, blocks) -> list:
    out = []
    for b in blocks:
        pa = pl.placed_at.setdefault(b.idstr, np.zeros(len(pl.received[b.idstr])))
        out.append((b.idstr.encode(), pl._addr[b.idstr], b.used_length, pl.received[b.idstr], pa))
    return out


def _rec(offset: int, flags: int, name: str | None = None, payload: bytes = b"") -> bytes:
    head = struct.pack(">Q", offset | flags)
    if name is not None:
        head += bytes([len(name)]) + name.encode()
    return head + payload


def _page(seed: int) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(256)) * (PS // 256)


def _run(kernel, data: bytes, pl, blocks, *, chunk: int, cur: int = -1):
    a, b = socket.socketpair()
    b.setblocking(False)

    def feed():
        try:
            for i in range(0, len(data), chunk):
                a.sendall(data[i : i + chunk])
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the kernel stopped at a record and the reading end is closed

    t = threading.Thread(target=feed)
    t.start()
    wake_r, wake_w = socket.socketpair()
    try:
        buf = bytearray(kernel.MIN_BUFFER)
        out = kernel.place_records(b.fileno(), wake_r.fileno(), pl.fd, _table(pl, blocks), cur,
                                   buf, 0)
        st_, pos, have = out[:3]
        return out, bytes(buf[pos:have])
    finally:
        b.close()  # a feeder still writing fails at once instead of blocking
        t.join(10)
        for s in (a, wake_r, wake_w):
            s.close()


# one record each: (block 0/1/2=unknown, page, kind, named?, seed)
_records = st.lists(st.tuples(st.integers(0, 2), st.integers(0, NPAGES), st.sampled_from(
    ["page", "zero", "fill", "eos", "compressed"]), st.booleans(), st.integers(0, 255)),
    max_size=24)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=_records, chunk=st.sampled_from([1, 7, 4104, 9000, 1 << 20]),
       cut=st.integers(0, 5000))
def test_compiled_and_reference_place_the_same(recs, chunk, cut):
    names = ["pc.ram", "vga.vram", "nowhere"]
    data = b""
    last = None
    for blk, page, kind, named, seed in recs:
        name = names[blk]
        cont = not named and last == name
        flags = RamFlag.CONTINUE if cont else 0
        nm = None if cont else name
        if kind == "eos":
            data += _rec(0, RamFlag.EOS)
        elif kind == "compressed":
            data += _rec(page * PS, RamFlag.COMPRESS_PAGE | flags, nm, b"\0\0\0\x04abcd")
        elif kind == "page":
            data += _rec(page * PS, RamFlag.PAGE | flags, nm, _page(seed))
        else:
            data += _rec(page * PS, RamFlag.ZERO | flags, nm, bytes([0 if kind == "zero" else seed]))
        last = name
    data = data[: max(0, len(data) - cut)] if cut < 200 else data
    results = {}
    for which, kernel in KERNELS.items():
        pl, blocks = _placement()
        try:
            out, rest = _run(kernel, data, pl, blocks, chunk=chunk)
            mem = [bytes(b.memory[np.repeat(pl.received[b.idstr], PS)]) for b in blocks]
            placed = [pl.placed_at[b.idstr] > 0 for b in blocks]
            consumed = out[5] - len(rest)  # stream offset where the kernel stopped decoding
            assert rest == data[consumed : consumed + len(rest)]
            if out[0] == kernel.END:
                assert consumed + len(rest) == len(data)
            results[which] = (out[0], out[3], out[4], consumed, mem,
                              [r.copy() for r in pl.received.values()])
            for r, p in zip(pl.received.values(), placed):
                assert np.array_equal(r, p)  # every page placed is stamped, no other
        finally:
            pl.close()
    c, p = results["cython"], results["python"]
    assert c[:5] == p[:5]
    assert all(np.array_equal(x, y) for x, y in zip(c[5], p[5]))
    assert c[0] in (KERNELS["cython"].DONE, KERNELS["cython"].END)


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_stops_at_each_record_it_leaves_to_python(which):
    kernel = KERNELS[which]
    pl, blocks = _placement()
    try:
        ok = _rec(PS, RamFlag.PAGE, "pc.ram", _page(1))
        for bad, why in [(_rec(PS, RamFlag.PAGE | RamFlag.CONTINUE, None, _page(2)), "twice"),
                         (_rec(NPAGES * PS, RamFlag.PAGE | RamFlag.CONTINUE, None, _page(2)), "range"),
                         (_rec(0, RamFlag.PAGE, "nowhere", _page(2)), "unknown block"),
                         (_rec(0, RamFlag.EOS), "eos")]:
            out, rest = _run(kernel, ok + bad + _rec(0, RamFlag.EOS), pl, blocks, chunk=4096, cur=0)
            assert out[0] == kernel.DONE, why
            assert len(rest) >= 8 and rest[: len(bad)] == bad[: len(rest)], why  # left at its start
            ok = b""  # page 1 is placed now: only the first round brings it
        assert bytes(blocks[0].memory[PS : 2 * PS]) == _page(1)
        assert pl.received["pc.ram"].sum() == 1
    finally:
        pl.close()


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_continue_without_a_block_is_left_to_python(which):
    kernel = KERNELS[which]
    pl, blocks = _placement()
    try:
        bad = _rec(0, RamFlag.PAGE | RamFlag.CONTINUE, None, _page(3))
        out, rest = _run(kernel, bad, pl, blocks, chunk=8)
        assert out[0] == kernel.DONE and out[4] == 0
        assert bad.startswith(rest) and len(rest) >= 8
        out, rest = _run(kernel, bad, pl, blocks, chunk=8, cur=1)  # the block is known: placed
        assert out[0] == kernel.END and out[4] == 1 and rest == b""
        assert bytes(blocks[1].memory[:PS]) == _page(3)
    finally:
        pl.close()


def _reader_over(pl, blocks, data: bytes):
    a, b = socket.socketpair()
    loader = type("L", (), {"blocks": {blk.idstr: blk for blk in blocks}})()
    errors: list = []
    reader = PreemptReader(Channel("preempt", sock=b), loader)
    reader.start(pl, errors.append)
    a.sendall(data)
    _open.append(b)
    return reader, errors, a


_open: list = []


@pytest.fixture(autouse=True)
def _close_reader_sockets():
    yield
    while _open:
        _open.pop().close()


def test_reader_places_through_the_compiled_loop_and_python_reports_its_errors():
    pl, blocks = _placement(names=("pc.ram",))
    first = _rec(2 * PS, RamFlag.PAGE, "pc.ram", _page(5)) + _rec(3 * PS, RamFlag.ZERO
                                                                 | RamFlag.CONTINUE, None, b"\x11")
    bad = _rec(0, RamFlag.PAGE, "missing", _page(6))
    reader, errors, a = _reader_over(pl, blocks, first + bad)
    try:
        reader._thread.join(10)
        assert not reader._thread.is_alive()
        assert reader.pages == 2 and pl.placed_host_pages == 2
        assert bytes(blocks[0].memory[2 * PS : 3 * PS]) == _page(5)
        assert bytes(blocks[0].memory[3 * PS : 4 * PS]) == b"\x11" * PS
        assert (pl.placed_at["pc.ram"] > 0).sum() == 2
        assert len(errors) == 1 and isinstance(errors[0], RamStreamError)
        assert 'Unknown ramblock "missing"' in str(errors[0])
        assert errors[0].offset == len(first)  # where the record starts on the channel
    finally:
        a.close()
        pl.close()


def test_reader_ends_at_eos_and_a_cut_record_is_an_error():
    pl, blocks = _placement(names=("pc.ram",))
    data = _rec(0, RamFlag.PAGE, "pc.ram", _page(7)) + _rec(0, RamFlag.EOS)
    reader, errors, a = _reader_over(pl, blocks, data)
    try:
        reader.join(10)
        assert errors == [] and reader.pages == 1
    finally:
        a.close()
        pl.close()
    pl, blocks = _placement(names=("pc.ram",))
    reader, errors, a = _reader_over(pl, blocks, _rec(0, RamFlag.PAGE, "pc.ram", _page(7))[:100])
    a.close()
    try:
        with pytest.raises(ChannelError, match="inside a record"):
            reader.join(10)
    finally:
        pl.close()
