"""The compiled postcopy fault loop against its plain-Python twin.

With a real userfaultfd, threads touching missing pages (by ``os.write``
from the registered memory, so a blocked toucher holds no GIL) make both
loops ask for those pages on the return path (a socketpair). Everything
else is checked with a fake userfaultfd: a pipe carrying 32-byte
``uffd_msg`` records, which the loops only poll and read. A run that ends
by the stop descriptor writes it once the pipe is drained: everything in
it has been read, and the batch read is handled before the stop is seen.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import struct
import termios
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx import _backend, uffd
from test_preempt_recv import _placement

PS = 4096
EVENT_PAGEFAULT, EVENT_FORK = 0x12, 0x13
KERNELS = {"cython": _backend.load_compiled("postcopy_fault"),
           "python": _backend.load_reference("postcopy_fault")}
LOCKS = {"cython": _backend.load_compiled("wirelock"),
         "python": _backend.load_reference("wirelock")}
#: fake blocks: (name, address, pages, host page size)
FAKE = (("pc.ram", 0x7F0000000000, 16, PS), ("huge", 0x7F0010000000, 16, 4 * PS))
OUTSIDE = 0x7F0020000000

pytestmark = pytest.mark.kernel("postcopy_fault")


def _which(kernel) -> str:
    return "python" if kernel.__name__.startswith("qmigx.reference") else "cython"


def _until(cond, what: str) -> None:
    """Wait for a condition another thread makes true (the limit only stops a broken run)."""
    for _ in range(10_000):
        if cond():
            return
        time.sleep(0.001)
    pytest.fail(f"never happened: {what}")


def uffd_msg(addr: int, event: int = EVENT_PAGEFAULT) -> bytes:
    m = bytearray(32)
    m[0] = event
    struct.pack_into("<Q", m, 16, addr)  # uffd_msg.arg.pagefault.address, host order
    return bytes(m)


def req_id(name: str, start: int, length: int) -> bytes:
    body = struct.pack(">QIB", start, length, len(name)) + name.encode()
    return struct.pack(">HH", 3, len(body)) + body


def req(start: int, length: int) -> bytes:
    return struct.pack(">HHQI", 4, 12, start, length)


def read_msg(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = sock.recv(n - len(got))
            assert chunk, "the return path ended"
            got += chunk
        return got

    head = exactly(4)
    return head + exactly(struct.unpack(">HH", head)[1])


def read_available(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def fill(sock: socket.socket) -> int:
    """Make ``sock`` (non-blocking) full; the bytes it took."""
    sock.setblocking(False)
    total = 0
    for size in (1 << 16, 4096, 1):
        try:
            while True:
                total += sock.send(b"\0" * size)
        except BlockingIOError:
            pass
    return total


# --- the fake userfaultfd ------------------------------------------------------------------------

class Fake:
    """A pipe for a userfaultfd, fake blocks, and the return path around one kernel."""

    def __init__(self, kernel, *, received=(), asked=(), last: int = -1, wake: bool = True):
        self.k = kernel
        wl = LOCKS[_which(kernel)]
        self.uffd_r, self.uffd_w = os.pipe()
        os.set_blocking(self.uffd_r, False)  # as a userfaultfd is opened
        self.stop_r, self.stop_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        self.rp, self.peer = socket.socketpair()
        self.lock = wl.WireLock(self.rp.fileno(), self.wake_r if wake else -1)
        self.received = [np.zeros(n, bool) for _, _, n, _ in FAKE]
        self.asked = [np.zeros(n) for _, _, n, _ in FAKE]
        for blk, page in received:
            self.received[blk][page] = True
        for blk, page in asked:
            self.asked[blk][page] = 1.0  # asked long ago
        self.state = np.array([0, 0, last], np.int64)
        self.result = None

    def table(self) -> list:
        return [(name.encode(), addr, n * PS, hps, r, a)
                for (name, addr, n, hps), r, a in zip(FAKE, self.received, self.asked)]

    def feed(self, events: list) -> None:
        data = b"".join(uffd_msg(*e) if isinstance(e, tuple) else uffd_msg(e) for e in events)
        assert len(data) <= 65536 - 4096  # all of it fits in the pipe
        os.write(self.uffd_w, data)

    def serve(self) -> tuple:
        return self.k.serve_faults(self.uffd_r, self.stop_r, self.table(), self.lock, self.state)

    def _pending(self) -> int:
        buf = array.array("i", [0])
        fcntl.ioctl(self.uffd_r, termios.FIONREAD, buf, True)
        return buf[0]

    def run(self, events: list) -> tuple:
        """Every event handled, then stopped: the result (STOPPED unless a write failed)."""
        self.feed(events)

        def go():
            self.result = self.serve()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        _until(lambda: self._pending() == 0 or not t.is_alive(), "the pipe drained")
        os.write(self.stop_w, b"x")
        t.join(10)
        assert not t.is_alive()
        return self.result

    def requests(self) -> bytes:
        return read_available(self.peer)

    def close(self) -> None:
        for fd in (self.uffd_r, self.uffd_w, self.stop_r, self.stop_w, self.wake_r, self.wake_w):
            os.close(fd)
        self.rp.close()
        self.peer.close()


@pytest.fixture
def fakes():
    made: list = []

    def make(kernel, **kw) -> Fake:
        made.append(Fake(kernel, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def addr(blk: int, page: int, within: int = 0) -> int:
    return FAKE[blk][1] + page * PS + within


def test_requests_are_asked_once_per_host_page(kernel, fakes):
    f = fakes(kernel, received=[(0, 3)], asked=[(0, 4)])
    t0 = time.monotonic()
    st_ = f.run([addr(0, 3), addr(0, 4), addr(0, 6, 100), addr(0, 6, 4095), addr(0, 7),
                 addr(1, 5, 16), addr(1, 6), addr(1, 0), (addr(0, 9), EVENT_FORK), OUTSIDE,
                 addr(0, 0)])
    t1 = time.monotonic()
    assert st_ == (kernel.STOPPED, 0)
    assert f.requests() == (req_id("pc.ram", 6 * PS, PS) + req(7 * PS, PS)
                            + req_id("huge", 4 * PS, 4 * PS) + req(0, 4 * PS)
                            + req_id("pc.ram", 0, PS))
    # faults in the blocks, requests, the last request's block
    assert f.state.tolist() == [9, 5, 0]
    assert f.lock.sent == 5
    stamped = [[int(p) for p in np.flatnonzero(a)] for a in f.asked]
    assert stamped == [[0, 4, 6, 7], [0, 4]]  # a host page at its first 4 KiB
    assert f.asked[0][4] == 1.0  # already asked: left alone
    for blk, page in [(0, 0), (0, 6), (0, 7), (1, 0), (1, 4)]:
        assert t0 <= f.asked[blk][page] <= t1  # time.monotonic()'s clock
    assert f.received[0].tolist() == [p == 3 for p in range(16)]  # only read


def test_the_previous_block_comes_from_state(kernel, fakes):
    f = fakes(kernel, last=1)
    assert f.run([addr(1, 8), addr(0, 1), addr(1, 2)]) == (kernel.STOPPED, 0)
    assert f.requests() == req(8 * PS, 4 * PS) + req_id("pc.ram", PS, PS) + req_id("huge", 0, 4 * PS)
    assert f.state.tolist() == [3, 3, 1]


def test_a_closed_return_path_drops_the_request_but_stamps_it(kernel, fakes):
    f = fakes(kernel)
    f.lock.closed = True
    f.feed([addr(0, 2), addr(0, 3), addr(0, 2)])
    assert f.serve() == (kernel.CLOSED, 0)
    assert f.requests() == b""
    assert f.state.tolist() == [3, 2, -1] and f.lock.sent == 0
    assert [int(p) for p in np.flatnonzero(f.asked[0])] == [2, 3]
    assert f.lock.acquire(False)  # not left held
    f.lock.release()


def test_the_stop_descriptor_stops_before_anything_is_read(kernel, fakes):
    f = fakes(kernel)
    f.feed([addr(0, 2)])
    os.write(f.stop_w, b"x")
    assert f.serve() == (kernel.STOPPED, 0)
    assert f.state.tolist() == [0, 0, -1] and not f.asked[0].any()


def test_a_closed_peer_fails_the_write_with_its_errno(kernel, fakes):
    f = fakes(kernel)
    f.peer.close()
    f.feed([addr(0, 2), addr(0, 3)])
    assert f.serve() == (kernel.WRITE_FAILED, errno.EPIPE)
    assert f.state.tolist() == [1, 1, -1] and f.lock.sent == 0  # page 3: not reached
    assert f.asked[0][2] > 0 and f.asked[0][3] == 0
    assert f.lock.acquire(False)
    f.lock.release()


def test_a_full_return_path_that_is_shut_down_fails_the_write(kernel, fakes):
    f = fakes(kernel)
    fill(f.rp)
    os.write(f.wake_w, b"x")
    f.feed([addr(0, 2)])
    assert f.serve() == (kernel.WRITE_FAILED, 0)  # no errno: the channel was shut down
    assert f.state.tolist() == [1, 1, -1]


def test_a_full_return_path_without_wake_descriptor_waits_for_room(kernel, fakes):
    f = fakes(kernel, wake=False)
    filler = fill(f.rp)
    f.feed([addr(0, 5)])

    def go():
        f.result = f.serve()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    _until(lambda: f.state[1] == 1 or not t.is_alive(), "the request taken")  # then blocked
    want = req_id("pc.ram", 5 * PS, PS)
    got = b""
    f.peer.settimeout(10)
    while len(got) < filler + len(want):
        got += f.peer.recv(1 << 16)
    os.write(f.stop_w, b"x")
    t.join(10)
    assert f.result == (kernel.STOPPED, 0)
    assert got[filler:] == want and f.lock.sent == 1


def test_reading_a_bad_descriptor_fails(kernel, fakes):
    f = fakes(kernel)
    st_ = kernel.serve_faults(10**6, f.stop_r, f.table(), f.lock, f.state)
    assert st_ == (kernel.READ_FAILED, errno.EBADF)


def test_bad_arguments_raise(kernel, fakes):
    f = fakes(kernel)
    wl = LOCKS[_which(kernel)]
    name, base, length, hps, rcv, ask = f.table()[0]
    cases = {
        "state short": dict(state=np.zeros(2, np.int64)),
        "lock without socket": dict(lock=wl.WireLock()),
        "empty name": dict(blocks=[(b"", base, length, hps, rcv, ask)]),
        "long name": dict(blocks=[(b"x" * 256, base, length, hps, rcv, ask)]),
        "host page 0": dict(blocks=[(name, base, length, 0, rcv, ask)]),
        "host page 2 KiB": dict(blocks=[(name, base, length, 2048, rcv, ask)]),
        "host page 6 KiB": dict(blocks=[(name, base, length, 6144, rcv, ask)]),
        "asked_at shorter": dict(blocks=[(name, base, length, hps, rcv, ask[:-1])]),
        "not covered": dict(blocks=[(name, base, length + PS, hps, rcv, ask)]),
    }
    good = dict(blocks=f.table(), lock=f.lock, state=f.state)
    for why, kw in cases.items():
        a = {**good, **kw}
        try:
            kernel.serve_faults(f.uffd_r, f.stop_r, a["blocks"], a["lock"], a["state"])
        except ValueError:
            continue
        pytest.fail(f"{why}: no ValueError")
    with pytest.raises((TypeError, AttributeError)):
        kernel.serve_faults(f.uffd_r, f.stop_r, f.table(), None, f.state)
    assert f.state.tolist() == [0, 0, -1]


# --- a real userfaultfd --------------------------------------------------------------------------

def test_real_faults_ask_for_their_pages(kernel):
    pl, blocks = _placement()
    wl = LOCKS[_which(kernel)]
    rp, peer = socket.socketpair()
    peer.settimeout(10)  # only a broken run waits that long
    stop_r, stop_w = os.pipe()
    asked = {b.idstr: np.zeros(8) for b in blocks}
    table = [(b.idstr.encode(), pl._addr[b.idstr], b.used_length, PS, pl.received[b.idstr],
              asked[b.idstr]) for b in blocks]
    lock = wl.WireLock(rp.fileno(), -1)
    state = np.array([0, 0, -1], np.int64)
    result: list = []
    touched: list = []
    errors: list = []
    sinks: list = []
    server = threading.Thread(target=lambda: result.append(
        kernel.serve_faults(pl.fd, stop_r, table, lock, state)), daemon=True)

    def touch(blk: int, page: int, byte: int = 0) -> None:
        """A read of the page in the kernel (os.write from it): blocks until it is placed.

        Each into its own pipe: a blocked write holds its pipe's lock.
        """
        view = blocks[blk].memory[page * PS + byte : page * PS + byte + 1]
        sink = os.pipe()
        sinks.extend(sink)

        def run():
            try:
                os.write(sink[1], view)
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        touched.append((blk, page, t))

    def next_request() -> bytes:
        try:
            return read_msg(peer)
        except socket.timeout:
            if any(e.errno == errno.EFAULT for e in errors):
                pytest.skip("userfaultfd here serves user-mode faults only")
            raise

    server.start()
    try:
        touch(0, 2)
        assert next_request() == req_id("pc.ram", 2 * PS, PS)
        touch(0, 2, 9)  # the same page again: asked already
        _until(lambda: state[0] == 2, "the second fault seen")
        pl.received["pc.ram"][3] = True  # as if placed just before its fault was read
        touch(0, 3)
        _until(lambda: state[0] == 3, "the third fault seen")
        touch(0, 5)
        assert next_request() == req(5 * PS, PS)  # nothing between: no page asked twice
        touch(1, 1, 100)
        assert next_request() == req_id("vga.vram", PS, PS)
        touch(0, 6)
        assert next_request() == req_id("pc.ram", 6 * PS, PS)
        os.write(stop_w, b"x")
        server.join(10)
        assert result == [(kernel.STOPPED, 0)]
        assert state.tolist() == [6, 4, 0] and lock.sent == 4
        assert [int(p) for p in np.flatnonzero(asked["pc.ram"])] == [2, 5, 6]
        assert [int(p) for p in np.flatnonzero(asked["vga.vram"])] == [1]
        assert errors == []
    finally:
        if server.is_alive():
            os.write(stop_w, b"x")
            server.join(10)
        for blk, page, _ in touched:  # place what they wait for, so they return
            try:
                uffd.zeropage(pl.fd, pl._addr[blocks[blk].idstr] + page * PS, PS)
            except OSError as e:
                assert e.errno == errno.EEXIST
        for _, _, t in touched:
            t.join(10)
        pl.close()
        for fd in (stop_r, stop_w, *sinks):
            os.close(fd)
        rp.close()
        peer.close()


# --- compiled against reference ------------------------------------------------------------------

_event = st.tuples(st.sampled_from([0, 0, 0, 1, 1, 2]), st.integers(0, 15), st.integers(0, PS - 1),
                   st.sampled_from([EVENT_PAGEFAULT] * 9 + [EVENT_FORK]))
_pages = st.sets(st.tuples(st.integers(0, 1), st.integers(0, 15)), max_size=12)


def _expected(events, received, asked, last):
    """What either loop must ask for: a model of the documented rules."""
    asked, out, faults = set(asked), b"", 0
    for blk, page, within, event in events:
        if event != EVENT_PAGEFAULT or blk == 2:
            continue
        faults += 1
        name, _, _, hps = FAKE[blk]
        host = (page * PS + within) // hps * hps
        if (blk, host // PS) in received or (blk, host // PS) in asked:
            continue
        asked.add((blk, host // PS))
        out += req(host, hps) if blk == last else req_id(name, host, hps)
        last = blk
    return out, faults, asked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_event, max_size=80), received=_pages, asked=_pages,
       last=st.integers(-1, 1))
def test_compiled_and_reference_ask_the_same(events, received, asked, last):
    fake_events = [(OUTSIDE + page * PS if blk == 2 else addr(blk, page, within), event)
                   for blk, page, within, event in events]
    got = {}
    for which, kernel in KERNELS.items():
        f = Fake(kernel, received=received, asked=asked, last=last)
        try:
            res = f.run(fake_events)
            got[which] = (res, f.requests(), f.state.tolist(), f.lock.sent,
                          [[int(p) for p in np.flatnonzero(a)] for a in f.asked])
        finally:
            f.close()
    assert got["cython"] == got["python"]
    want, faults, stamped = _expected(events, received, asked, last)
    res, out, state, sent, asked_at = got["cython"]
    assert res == (KERNELS["cython"].STOPPED, 0)
    assert out == want
    assert state[:2] == [faults, len(stamped) - len(set(asked))]
    assert asked_at == [sorted(p for b, p in stamped if b == blk) for blk in (0, 1)]
