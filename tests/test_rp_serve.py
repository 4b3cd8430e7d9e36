"""The compiled return-path page-request server against its plain-Python twin.

Both kernels read QEMU return-path messages from a socket, take the dirty
bits of the pages REQ_PAGES / REQ_PAGES_ID ask for from a real
:class:`~qmigx.bitmap.DirtyBitmap` and write each page taken as a bare
record on the preempt channel (another socket). Anything else is left at
``pos`` with DONE. Every run here ends on its own (the peer closes, the
wake descriptor is readable, or a zero timeout on an idle socket); what
goes out on the preempt channel is read by a thread until its end.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx import _backend
from qmigx.bitmap import DirtyBitmap

PS = 4096
PAGE, CONTINUE = 0x08, 0x20
SHIFT = 6  # 64 pages per clear chunk
BLOCKS = (("pc.ram", 128), ("vga.vram", 16))
KERNELS = {"cython": _backend.load_compiled("rp_serve"),
           "python": _backend.load_reference("rp_serve")}
LOCKS = {"cython": _backend.load_compiled("wirelock"),
         "python": _backend.load_reference("wirelock")}
BIG_TIMEOUT = 60_000  # never reached: every run ends by itself

pytestmark = pytest.mark.kernel("rp_serve")


def _which(kernel) -> str:
    return "python" if kernel.__name__.startswith("qmigx.reference") else "cython"


# --- messages ------------------------------------------------------------------------------------

def req_id(name: str, start: int, length: int) -> bytes:
    body = struct.pack(">QIB", start, length, len(name)) + name.encode()
    return struct.pack(">HH", 3, len(body)) + body


def req(start: int, length: int) -> bytes:
    return struct.pack(">HHQI", 4, 12, start, length)


def pong(value: int = 7) -> bytes:
    return struct.pack(">HHI", 2, 4, value)


def parse_records(data: bytes, name: str | None = None) -> list:
    """``(block, offset, continued, page)`` per record; ``name``: the block before the first."""
    out, pos = [], 0
    while pos < len(data):
        (h,) = struct.unpack_from(">Q", data, pos)
        flags, off = h & 0xFFF, h & ~0xFFF
        assert flags in (PAGE, PAGE | CONTINUE), hex(flags)
        pos += 8
        if not flags & CONTINUE:
            k = data[pos]
            name = data[pos + 1 : pos + 1 + k].decode(errors="replace")
            pos += 1 + k
        assert name is not None
        page = data[pos : pos + PS]
        assert len(page) == PS, "a record cut short"
        out.append((name, off, bool(flags & CONTINUE), page))
        pos += PS
    return out


# --- a source with two blocks, its return path and its preempt channel ---------------------------

class Rig:
    """RAM blocks with random content and dirty bitmaps, and the sockets around one kernel."""

    def __init__(self, kernel, *, dirty=None, armed=(), state=(-1, -1), drain=True) -> None:
        self.k = kernel
        wl = LOCKS[_which(kernel)]
        rng = np.random.default_rng(1)
        self.names = [n for n, _ in BLOCKS]
        self.ram = [rng.integers(0, 256, n * PS, dtype=np.uint8) for _, n in BLOCKS]
        self.bm = [DirtyBitmap(n, SHIFT) for _, n in BLOCKS]
        for (blk, page) in (dirty if dirty is not None else []):
            self.bm[blk].set(page)
        for blk, chunk in armed:  # a sync of an empty log arms the chunks it covers
            first = chunk << SHIFT
            n = min(1 << SHIFT, self.bm[blk].npages - first)
            self.bm[blk].sync(bytes(8 * ((n + 63) // 64)), first, n)
        self.peer, self.rp = socket.socketpair()  # the test writes requests on `peer`
        self.out_end, self.reader = socket.socketpair()  # records come out on `reader`
        self.wake_r, self.wake_w = socket.socketpair()
        self.pre_wake_r, self.pre_wake_w = socket.socketpair()
        self.take_lock = wl.WireLock()
        self.out = wl.WireLock(self.out_end.fileno(), self.pre_wake_r.fileno())
        self.state = np.array([state[0], state[1], 0, 0, 0], np.int64)
        self.first = self.names[state[1]] if state[1] >= 0 else None  # the writer's last block
        self.buf = bytearray(kernel.MIN_BUFFER)
        self.received = bytearray()
        self._drain = None
        if drain:
            self._drain = threading.Thread(target=self._read_all, daemon=True)
            self._drain.start()

    def _read_all(self) -> None:
        while True:
            try:
                got = self.reader.recv(1 << 16)
            except OSError:
                return
            if not got:
                return
            self.received += got

    def table(self) -> list:
        return [(n.encode(), bm.words_to_take(), bm.clear_bmap, bm.clear_bitmap_shift, r)
                for n, bm, r in zip(self.names, self.bm, self.ram)]

    def serve(self, have: int = 0, timeout_ms: int = BIG_TIMEOUT) -> tuple:
        return self.k.serve_requests(self.rp.fileno(), self.wake_r.fileno(), self.buf, have,
                                     self.table(), self.take_lock, self.out, self.state,
                                     timeout_ms)

    def records(self) -> list:
        """Everything written on the preempt channel (ends it); each page checked against RAM."""
        self.out_end.shutdown(socket.SHUT_WR)
        self._drain.join(10)
        assert not self._drain.is_alive()
        recs = parse_records(bytes(self.received), self.first)
        for name, off, _cont, page in recs:
            blk = self.names.index(name)
            assert page == self.ram[blk][off : off + PS].tobytes()
        return [(name, off // PS, cont) for name, off, cont, _ in recs]

    def dirty(self, blk: int) -> list:
        bm = self.bm[blk]
        return [p for p in range(bm.npages) if bm.test(p)]

    def close(self) -> None:
        for s in (self.peer, self.rp, self.out_end, self.reader, self.wake_r, self.wake_w,
                  self.pre_wake_r, self.pre_wake_w):
            s.close()
        if self._drain is not None:
            self._drain.join(10)


@pytest.fixture
def rigs():
    made: list = []

    def make(kernel, **kw) -> Rig:
        made.append(Rig(kernel, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


# --- served requests -----------------------------------------------------------------------------

def test_requests_send_dirty_pages_as_records_and_clear_their_bits(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 1), (0, 2), (0, 5), (0, 7), (1, 0), (1, 3)])
    msgs = [req_id("pc.ram", PS, 2 * PS), req(5 * PS, PS), req_id("vga.vram", 0, PS),
            req(0, PS), req_id("pc.ram", 7 * PS, PS)]
    data = b"".join(msgs)
    rig.peer.sendall(data)
    rig.peer.close()
    assert rig.serve() == (kernel.END, 0, 0, 0)
    assert rig.records() == [("pc.ram", 1, False), ("pc.ram", 2, True), ("pc.ram", 5, True),
                             ("vga.vram", 0, False), ("pc.ram", 7, False)]
    assert rig.dirty(0) == [] and rig.dirty(1) == [3]  # vga.vram page 3 was not asked for
    # last request's block, last record's block, pages, requests served, bytes read
    assert rig.state.tolist() == [0, 0, 5, 5, len(data)]
    assert rig.out.sent == 5
    assert rig.take_lock.acquire(False) and rig.out.acquire(False)  # neither left held
    rig.take_lock.release()
    rig.out.release()


def test_clean_pages_are_not_sent_and_the_request_still_counts(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 2)])
    rig.peer.sendall(req_id("pc.ram", 0, 4 * PS) + req_id("pc.ram", 0, 4 * PS))
    rig.peer.close()
    assert rig.serve() == (kernel.END, 0, 0, 0)
    assert rig.records() == [("pc.ram", 2, False)]  # once: the bit is gone after the first
    assert rig.state[:4].tolist() == [0, 0, 1, 2]


def test_the_blocks_of_state_carry_over_from_python(kernel, rigs):
    # Python's writer sent vga.vram's last record and the last request named vga.vram
    rig = rigs(kernel, dirty=[(1, 4), (1, 5), (0, 9)], state=(1, 1))
    rig.peer.sendall(req(4 * PS, PS) + req_id("vga.vram", 5 * PS, PS) + req_id("pc.ram", 9 * PS, PS))
    rig.peer.close()
    assert rig.serve()[0] == kernel.END
    assert rig.records() == [("vga.vram", 4, True), ("vga.vram", 5, True), ("pc.ram", 9, False)]
    assert rig.state[:4].tolist() == [0, 0, 3, 3]


def test_a_huge_request_takes_every_dirty_page_of_its_range(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, p) for p in range(60, 70)] + [(0, 127)])
    rig.peer.sendall(req_id("pc.ram", 56 * PS, 16 * PS))  # over two clear chunks, none armed
    rig.peer.close()
    assert rig.serve()[0] == kernel.END
    assert [p for _, p, _ in rig.records()] == list(range(60, 70))
    assert rig.dirty(0) == [127]
    assert rig.state[:4].tolist() == [0, 0, 10, 1]


def test_a_closed_preempt_channel_drops_the_pages_taken(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 3), (0, 4)])
    rig.out.closed = True
    rig.peer.sendall(req_id("pc.ram", 3 * PS, 2 * PS))
    rig.peer.close()
    assert rig.serve() == (kernel.END, 0, 0, 0)
    assert rig.records() == []
    assert rig.dirty(0) == []  # taken, then dropped as the Python writer drops them
    assert rig.state[:4].tolist() == [0, -1, 0, 1] and rig.out.sent == 0


# --- what is left to Python ----------------------------------------------------------------------

HANDED_BACK = {
    "pong": (pong(), ()),
    "unknown block": (req_id("nowhere", 0, PS), ()),
    "misaligned": (req_id("pc.ram", 3 * PS + 512, PS), ()),
    "zero length": (req_id("pc.ram", 3 * PS, 0), ()),
    "past the end": (req_id("pc.ram", 127 * PS, 2 * PS), ()),
    "wrapping around 2^64": (req(2**64 - PS, 2 * PS), ()),
    "REQ_PAGES of a bad length": (struct.pack(">HHQ", 4, 8, 3 * PS), ()),
    "REQ_PAGES_ID whose name length disagrees":
        (struct.pack(">HHQIB", 3, 13 + 6, 3 * PS, PS, 5) + b"pc.ram", ()),
    "REQ_PAGES_ID with an empty name": (struct.pack(">HHQIB", 3, 13, 3 * PS, PS, 0), ()),
    "armed chunk": (req_id("pc.ram", 70 * PS, PS), ((0, 1),)),
    "partly in an armed chunk": (req_id("pc.ram", 63 * PS, 2 * PS), ((0, 1),)),
}


@pytest.mark.parametrize("case", sorted(HANDED_BACK))
def test_other_messages_and_refused_requests_are_left_at_pos(kernel, rigs, case):
    bad, armed = HANDED_BACK[case]
    rig = rigs(kernel, dirty=[(0, 1), (0, 3), (0, 63), (0, 64), (0, 70), (0, 90), (1, 2)],
               armed=armed)
    first, last = req_id("pc.ram", PS, PS), req_id("vga.vram", 2 * PS, PS)
    data = first + bad + last
    rig.peer.sendall(data)
    st_, pos, have, err = rig.serve()
    assert (st_, pos, have, err) == (kernel.DONE, len(first), len(data), 0)
    assert bytes(rig.buf[pos:have]) == bad + last
    assert rig.state.tolist() == [0, 0, 1, 1, len(data)]
    assert rig.dirty(0) == [3, 63, 64, 70, 90] and rig.dirty(1) == [2]  # the bad one took none
    # Python decodes `bad`, then hands the rest back
    rest = bytes(rig.buf[pos + len(bad) : have])
    rig.buf[: len(rest)] = rest
    rig.peer.close()
    assert rig.serve(len(rest)) == (kernel.END, 0, 0, 0)
    assert rig.records() == [("pc.ram", 1, False), ("vga.vram", 2, False)]


def test_req_pages_without_a_previous_block_is_left_to_python(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 0)])
    rig.peer.sendall(req(0, PS))
    assert rig.serve() == (kernel.DONE, 0, 16, 0)
    assert rig.dirty(0) == [0] and rig.state[3] == 0


# --- how a run ends ------------------------------------------------------------------------------

def test_end_keeps_a_partial_message(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 4)])
    msg = req_id("pc.ram", 4 * PS, PS)
    rig.peer.sendall(msg + msg[:10])
    rig.peer.close()
    assert rig.serve() == (kernel.END, len(msg), len(msg) + 10, 0)
    assert bytes(rig.buf[len(msg) : len(msg) + 10]) == msg[:10]
    assert rig.records() == [("pc.ram", 4, False)]


def test_a_readable_wake_descriptor_stops_once_nothing_is_left_to_read(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 4)])
    rig.peer.sendall(req_id("pc.ram", 4 * PS, PS) + b"\0\x04")
    rig.wake_w.send(b"x")
    st_, pos, have, err = rig.serve()
    assert (st_, err) == (kernel.STOPPED, 0)
    assert bytes(rig.buf[pos:have]) == b"\0\x04"  # the request before it was served
    assert rig.records() == [("pc.ram", 4, False)]


def test_an_idle_return_path_times_out_and_a_split_message_goes_on(kernel, rigs):
    rig = rigs(kernel, dirty=[(1, 1)])
    assert rig.serve(timeout_ms=0) == (kernel.TIMEOUT, 0, 0, 0)
    msg = req_id("vga.vram", PS, PS)
    rig.peer.sendall(msg[:6])
    assert rig.serve(timeout_ms=1) == (kernel.TIMEOUT, 0, 6, 0)
    rig.peer.sendall(msg[6:])
    rig.peer.close()
    assert rig.serve(have=6) == (kernel.END, 0, 0, 0)
    assert rig.records() == [("vga.vram", 1, False)]
    assert rig.state.tolist() == [1, 1, 1, 1, len(msg)]


def test_a_zero_timeout_returns_after_the_first_request(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 1), (0, 2)])
    first = req_id("pc.ram", PS, PS)
    rig.peer.sendall(first + req(2 * PS, PS))
    assert rig.serve(timeout_ms=0) == (kernel.TIMEOUT, len(first), len(first) + 16, 0)
    assert rig.state[3] == 1 and rig.dirty(0) == [2]


def test_a_closed_preempt_peer_fails_the_write_with_its_errno(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 1), (0, 2)], drain=False)
    rig.reader.close()
    msg = req_id("pc.ram", PS, 2 * PS)
    rig.peer.sendall(msg)
    assert rig.serve() == (kernel.WRITE_FAILED, 0, len(msg), errno.EPIPE)
    assert rig.state[1:4].tolist() == [-1, 0, 0] and rig.out.sent == 0
    assert rig.out.acquire(False)  # not left held
    rig.out.release()


def test_a_full_preempt_channel_that_is_shut_down_fails_the_write(kernel, rigs):
    rig = rigs(kernel, dirty=[(0, 1)], drain=False)
    rig.out_end.setblocking(False)
    for size in (1 << 16, 4096, 1):
        try:
            while True:
                rig.out_end.send(b"\0" * size)
        except BlockingIOError:
            pass
    rig.pre_wake_w.send(b"x")
    msg = req_id("pc.ram", PS, PS)
    rig.peer.sendall(msg)
    assert rig.serve() == (kernel.WRITE_FAILED, 0, len(msg), 0)


def test_reading_a_bad_descriptor_fails(kernel, rigs):
    rig = rigs(kernel)
    r, w = os.pipe()
    try:
        args = (rig.buf, 0, rig.table(), rig.take_lock, rig.out, rig.state, 0)
        assert kernel.serve_requests(r, -1, *args) == (kernel.FAILED, 0, 0, errno.ENOTSOCK)
        assert kernel.serve_requests(-1, -1, *args) == (kernel.FAILED, 0, 0, errno.EBADF)
    finally:
        os.close(r)
        os.close(w)


# --- partial messages ----------------------------------------------------------------------------

def test_a_message_cut_at_the_end_of_the_buffer_is_moved_to_its_start(kernel, rigs):
    rig = rigs(kernel, dirty=[(1, 3)])
    cap = len(rig.buf)
    last = req_id("vga.vram", 3 * PS, PS)
    head = req_id("pc.ram", 0, PS)  # clean pages: served, nothing sent
    n = (cap - len(head) - 5) // 16
    pre = head + req(0, PS) * n
    cut = cap - len(pre)  # `last` starts in the buffer and ends on the socket
    assert 0 < cut < len(last)
    rig.buf[:] = pre + last[:cut]
    rig.peer.sendall(last[cut:])
    rig.peer.close()
    assert rig.serve(have=cap) == (kernel.END, 0, 0, 0)
    assert rig.records() == [("vga.vram", 3, False)]
    assert rig.state.tolist() == [1, 1, 1, n + 2, len(last) - cut]


@pytest.mark.parametrize("chunk", [1, 5, 23])
def test_messages_split_across_reads(kernel, rigs, chunk):
    rig = rigs(kernel, dirty=[(0, p) for p in range(8)] + [(1, 1)])
    msgs = [req_id("pc.ram", 0, 2 * PS), req(2 * PS, 3 * PS), req_id("vga.vram", PS, PS),
            req_id("pc.ram", 5 * PS, 3 * PS)]
    data = b"".join(msgs)

    def feed():
        for i in range(0, len(data), chunk):
            rig.peer.sendall(data[i : i + chunk])
        rig.peer.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=feed)
    t.start()
    try:
        assert rig.serve() == (kernel.END, 0, 0, 0)
    finally:
        t.join(10)
    assert rig.records() == ([("pc.ram", p, p > 0) for p in range(5)] + [("vga.vram", 1, False)]
                             + [("pc.ram", p, p > 5) for p in range(5, 8)])
    assert rig.state.tolist() == [0, 0, 9, 4, len(data)]


# --- arguments -----------------------------------------------------------------------------------

def test_bad_arguments_raise(kernel, rigs):
    rig = rigs(kernel)
    wl = LOCKS[_which(kernel)]
    fd, wake = rig.rp.fileno(), rig.wake_r.fileno()
    good = dict(buf=rig.buf, have=0, blocks=rig.table(), take_lock=rig.take_lock, out=rig.out,
                state=rig.state, timeout_ms=0)

    def call(**kw):
        a = {**good, **kw}
        return kernel.serve_requests(fd, wake, a["buf"], a["have"], a["blocks"], a["take_lock"],
                                     a["out"], a["state"], a["timeout_ms"])

    assert call()[0] == kernel.TIMEOUT
    name, words, armed, shift, ram = rig.table()[0]
    cases = {
        "buf": dict(buf=bytearray(kernel.MIN_BUFFER - 1)),
        "have<0": dict(have=-1),
        "have>cap": dict(have=kernel.MIN_BUFFER + 1),
        "state short": dict(state=np.full(kernel.STATE_SLOTS - 1, -1, np.int64)),
        "state dtype": dict(state=np.full(kernel.STATE_SLOTS, -1, np.int32)),
        "state block": dict(state=np.array([2, -1, 0, 0, 0], np.int64)),
        "state record block": dict(state=np.array([-1, -2, 0, 0, 0], np.int64)),
        "out without socket": dict(out=wl.WireLock()),
        "empty name": dict(blocks=[(b"", words, armed, shift, ram)]),
        "long name": dict(blocks=[(b"x" * 256, words, armed, shift, ram)]),
        "words short": dict(blocks=[(name, words[:1], armed, shift, ram)]),
        "armed short": dict(blocks=[(name, words, armed[:0], shift, ram)]),
        "shift": dict(blocks=[(name, words, armed, 63, ram)]),
        "negative shift": dict(blocks=[(name, words, armed, -1, ram)]),
        "words dtype": dict(blocks=[(name, words.view(np.int64), armed, shift, ram)]),
        "words read-only": dict(blocks=[(name, rig.bm[0].words, armed, shift, ram)]),
    }
    for why, kw in cases.items():
        try:
            call(**kw)
        except ValueError:
            continue
        pytest.fail(f"{why}: no ValueError")
    with pytest.raises((TypeError, AttributeError)):
        call(take_lock=None)
    with pytest.raises((TypeError, AttributeError)):
        call(out=None)
    with pytest.raises(TypeError):
        call(blocks=tuple(rig.table()))
    with pytest.raises((TypeError, BufferError)):
        call(buf=bytes(kernel.MIN_BUFFER))
    assert rig.state.tolist() == [-1, -1, 0, 0, 0]


def test_a_block_of_whole_chunks_is_covered_by_its_clear_bitmap(kernel, rigs):
    """A block of exactly 64 clear chunks has a one-word clear bitmap: that covers it."""
    rig = rigs(kernel)
    bm = DirtyBitmap(64 << SHIFT, SHIFT)  # 4096 pages: a 16 MiB block
    bm.set(4095)
    ram = np.zeros(4096 * PS, np.uint8)
    table = [(b"vga.vram", bm.words_to_take(), bm.clear_bmap, SHIFT, ram),
             (b"empty", np.zeros(0, np.uint64), np.zeros(0, np.uint64), SHIFT, b"")]
    assert len(bm.clear_bmap) == 1
    first, empty = req_id("vga.vram", 4095 * PS, PS), req_id("empty", 0, PS)
    rig.peer.sendall(first + empty)
    out = kernel.serve_requests(rig.rp.fileno(), -1, rig.buf, 0, table, rig.take_lock, rig.out,
                                rig.state, BIG_TIMEOUT)
    assert out == (kernel.DONE, len(first), len(first) + len(empty), 0)  # `empty` has no page
    assert not bm.test(4095) and rig.state[2] == 1


# --- compiled against reference ------------------------------------------------------------------

_names = ["pc.ram", "vga.vram", "nowhere"]
_page = st.one_of(st.integers(0, 17), st.integers(0, 130))  # mostly in both blocks
_message = st.tuples(st.sampled_from(["id"] * 4 + ["req"] * 4 + ["pong"]),
                     st.sampled_from([0, 0, 1, 1, 2]), _page,
                     st.sampled_from([1, 1, 1, 2, 3, 4, 0]), st.sampled_from([0] * 7 + [512]))


def _bytes_of(m) -> bytes:
    kind, blk, page, n, skew = m
    if kind == "id":
        return req_id(_names[blk], page * PS + skew, n * PS)
    if kind == "req":
        return req(page * PS + skew, n * PS)
    return pong(page)


def _drive(kernel, dirty, armed, state, data: bytes, split: int):
    """Serve ``data`` (its first ``split`` bytes already in ``buf``) as the Python side
    would: each DONE message skipped, until the peer's end."""
    rig = Rig(kernel, dirty=dirty, armed=armed, state=state)
    try:
        split = min(split, len(data))
        rig.buf[:split] = data[:split]
        rig.peer.sendall(data[split:])
        rig.peer.close()
        results, have = [], split
        for _ in range(len(data) + 2):
            st_, pos, have, err = rig.serve(have)
            results.append((st_, pos, have, err))
            if st_ != kernel.DONE:
                break
            (ln,) = struct.unpack_from(">H", rig.buf, pos + 2)
            rest = bytes(rig.buf[pos + 4 + ln : have])
            rig.buf[: len(rest)] = rest
            have = len(rest)
        recs = rig.records()
        out = bytes(rig.received)
        return dict(results=results, state=rig.state.tolist(), out=out, recs=recs,
                    words=[bm.words.tolist() for bm in rig.bm], sent=rig.out.sent)
    finally:
        rig.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(_message, max_size=30),
       dirty=st.sets(st.one_of(st.tuples(st.just(0), _page.map(lambda p: p % 128)),
                               st.tuples(st.just(1), st.integers(0, 15))), max_size=60),
       armed=st.sets(st.sampled_from([(0, 0), (0, 1), (1, 0)]), max_size=2),
       state=st.tuples(st.integers(-1, 1), st.integers(-1, 1)),
       split=st.integers(0, 40), invert=st.booleans())
def test_compiled_and_reference_serve_the_same(msgs, dirty, armed, state, split, invert):
    if invert:  # mostly dirty: many records
        dirty = {(b, p) for b, (_, n) in enumerate(BLOCKS) for p in range(n)} - dirty
    data = b"".join(_bytes_of(m) for m in msgs)
    got = {w: _drive(KERNELS[w], sorted(dirty), sorted(armed), state, data, split)
           for w in KERNELS}
    assert got["cython"] == got["python"]
    c = got["cython"]
    assert c["results"][-1][0] == KERNELS["cython"].END
    sent = [(n, p) for n, p, _ in c["recs"]]
    assert len(set(sent)) == len(sent)  # a page goes out once
    assert set(sent) <= {(BLOCKS[b][0], p) for b, p in dirty}  # and only a dirty one
    assert c["state"][2] == len(sent) == c["sent"]
    assert c["state"][4] == len(data) - min(split, len(data))
