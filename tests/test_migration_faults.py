"""Fault handling of the live migration engine (qmigx.migration).

Every test runs an in-process migration and breaks it on purpose: a proxy
between source and destination cuts a connection after N bytes (main
channel or one multifd channel, at landmarks of a recorded reference
stream: header, configuration, RAM setup, iteration pages, END section,
device state, EOF, vmdesc), the migration is cancelled in each state, the
destination is fed garbage, a peer stalls. Each test checks the outcome
on both sides: final state and error, the source guest running again
with its memory intact, and nothing left behind (threads, descriptors,
the listener's socket file). Every wait is bounded.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.errors import (
    BadHeaderError,
    ChannelError,
    MigrationCancelled,
    MigrationError,
    RamStreamError,
    StreamError,
    TruncatedStreamError,
)
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.ram import RAMBlock, RAMBlockList, RamWriter
from qmigx.stream import (
    Command,
    Configuration,
    EndOfState,
    EndOfStream,
    RamEOS,
    RamSetup,
    Section,
    SectionData,
    SectionStart,
    StreamParser,
    StreamWriter,
    RamBlockInfo,
    VMDescription,
)
from qmigx.synthetic import fill_pages
from qmigx.wire import SectionType

S = MigrationStatus
PAGE = 4096
RAM = 1 << 20  # one block of 256 pages: one PART batch, so the stream is reproducible
WAIT = 10.0  # upper bound of any wait: a hang fails the test instead of blocking the run

SOURCE_THREADS = ("migration", "return-path", "multifd-send-")
MIG_THREADS = SOURCE_THREADS + ("incoming", "multifd-recv-")


# -- helpers ------------------------------------------------------------------------

#: things a failing test may leave running (vCPU threads, proxies, migrations);
#: closed after every test so that one failure does not starve the next tests
_LEFTOVERS: list = []


@pytest.fixture(autouse=True)
def _close_leftovers():
    yield
    while _LEFTOVERS:
        try:
            _LEFTOVERS.pop().close()
        except Exception:  # noqa: BLE001 - best effort: the test already reported
            pass


class _Ending:
    """close() cancels a migration pair still running when its test ended."""

    def __init__(self, *sides) -> None:
        self.sides = sides

    def close(self) -> None:
        for side in self.sides:
            side.cancel()
        for side in self.sides:
            side.wait(WAIT)


def migration_threads(names=MIG_THREADS) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(names)]


def assert_no_migration_threads(names=MIG_THREADS) -> None:
    """The engine's threads end with the migration (polls briefly: a thread
    object may outlive the last line it ran by a moment)."""
    deadline = time.monotonic() + 5
    while migration_threads(names) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert migration_threads(names) == []


def open_fds() -> set:
    """(fd, what it refers to) for every open descriptor of this process."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:
            pass  # the listing's own descriptor, already closed
    return out


def assert_no_new_fds(before: set) -> None:
    assert open_fds() - before == set()


def controls(*caps, **params):
    c = Capabilities()
    for name in caps:
        c.set(name, True)
    p = Parameters(capabilities=c)
    if params:
        p.set({k.replace("_", "-"): v for k, v in params.items()})
    return c, p


def make_ram(size: int = RAM, seed: int = 3) -> RAMBlockList:
    blk = RAMBlock.anonymous("pc.ram", size)
    fill_pages(blk.memory, seed)
    return RAMBlockList([blk])


class MarkingGuest(SimpleGuest):
    """A guest whose last writes before it stops re-dirty ``pages`` (same bytes),
    so the END section carries pages and the stream stays reproducible."""

    def __init__(self, log: ExplicitDirtyLog, pages=(0, 1, 2, 3, 4, 100)) -> None:
        super().__init__()
        self.log = log
        self.pages = pages
        self.stops = 0

    def stop(self) -> None:
        super().stop()
        self.stops += 1
        for p in self.pages:
            self.log.mark_dirty(p * PAGE, PAGE)


class Dirtier:
    """A guest vCPU: writes random bytes into random pages (marking them) and
    mirrors every write into ``ref``, until the guest stops."""

    def __init__(self, block: RAMBlock, log: ExplicitDirtyLog, seed: int = 7) -> None:
        self.block, self.log = block, log
        self.ref = block.memory.copy()
        self.rng = np.random.default_rng(seed)
        self.halt = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self._run, name="test-dirtier", daemon=True)

    def _run(self) -> None:
        mem = self.block.memory
        npages = len(mem) // PAGE
        while not self.halt.is_set():
            for p in self.rng.integers(0, npages, 16):
                i = int(p) * PAGE + int(self.rng.integers(0, PAGE))
                v = int(self.rng.integers(0, 256))
                mem[i] = v
                self.ref[i] = v
                self.log.mark_dirty(i, 1)
                self.writes += 1
            time.sleep(0.002)

    def start(self) -> "Dirtier":
        _LEFTOVERS.append(self)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.close()
        assert not self.thread.is_alive()

    def close(self) -> None:
        self.halt.set()
        self.thread.join(WAIT)


class DirtyingGuest(SimpleGuest):
    """stop() stops the vCPU thread and waits for it; start() runs a new one."""

    def __init__(self, block, log) -> None:
        super().__init__()
        self.block, self.log = block, log
        self.dirtier = Dirtier(block, log).start()

    def stop(self) -> None:
        self.dirtier.stop()
        super().stop()

    def start(self) -> None:
        super().start()
        ref = self.dirtier.ref
        self.dirtier = Dirtier(self.block, self.log, seed=len(ref) + self.dirtier.writes)
        self.dirtier.ref = ref
        self.dirtier.start()


class Proxy:
    """Forwards every connection a source opens to the destination.

    Connection ``cut_conn`` (0 = main channel, 1.. = multifd channels in
    connect order) is cut after exactly ``cut_at`` source->destination
    bytes: both sockets are shut down and closed. ``stall`` stops the
    source->destination direction while set (the peer looks stalled).
    ``recorded[i]`` holds what connection i forwarded.
    """

    def __init__(self, target: str, tmp_path, *, transport: str = "unix",
                 cut_conn: int = 0, cut_at=None) -> None:
        self.target = target
        self.cut_conn, self.cut_at = cut_conn, cut_at
        self.stall = threading.Event()
        self.stopping = threading.Event()
        self.cut_done = threading.Event()
        self.recorded: dict[int, bytearray] = {}
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        if transport == "unix":
            self.path = str(tmp_path / "proxy.sock")
            self.ls = socket.socket(socket.AF_UNIX)
            self.ls.bind(self.path)
            self.uri = f"unix:{self.path}"
        else:
            self.path = None
            self.ls = socket.socket(socket.AF_INET)
            self.ls.bind(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self.ls.getsockname()[1]}"
        self.ls.listen(16)
        self.ls.settimeout(0.05)
        _LEFTOVERS.append(self)
        self._spawn(self._accept, "proxy-accept")

    def _spawn(self, fn, name, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _dial(self) -> socket.socket:
        scheme, _, rest = self.target.partition(":")
        if scheme == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(rest)
            return s
        host, _, port = rest.rpartition(":")
        return socket.create_connection((host, int(port)))

    def _accept(self) -> None:
        idx = 0
        while not self.stopping.is_set():
            try:
                a, _ = self.ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            b = self._dial()
            for s in (a, b):
                s.settimeout(0.05)
                self.socks.append(s)
            self.recorded[idx] = bytearray()
            limit = self.cut_at if idx == self.cut_conn else None
            self._spawn(self._pump, f"proxy-{idx}-fwd", idx, a, b, limit)
            self._spawn(self._pump, f"proxy-{idx}-back", None, b, a, None)
            idx += 1

    def _pump(self, idx, src: socket.socket, dst: socket.socket, limit) -> None:
        sent = 0
        try:
            while not self.stopping.is_set():
                if limit is not None and sent >= limit:
                    self.cut_done.set()
                    break
                if idx is not None and self.stall.is_set():
                    time.sleep(0.01)
                    continue
                want = 65536 if limit is None else min(65536, limit - sent)
                try:
                    data = src.recv(want)
                except socket.timeout:
                    continue
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                while idx is not None and self.stall.is_set():  # hold what was in flight
                    time.sleep(0.01)
                dst.sendall(data)
                sent += len(data)
                if idx is not None:
                    self.recorded[idx] += data
        except OSError:
            pass
        for s in (src, dst):  # cut (or a side failed): both ends see it at once
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping.set()
        self.stall.clear()
        self.ls.close()
        for t in self.threads:
            t.join(WAIT)
        for s in self.socks:
            s.close()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


class Run:
    """A source and a destination wired through a :class:`Proxy`."""

    def __init__(self, tmp_path, *caps, transport="unix", cut_conn=0, cut_at=None,
                 blocks=None, log=None, guest=None, src_io_timeout=WAIT, dst_io_timeout=WAIT,
                 **params) -> None:
        self.blocks = blocks if blocks is not None else make_ram()
        blk = next(iter(self.blocks))
        self.log = log if log is not None else ExplicitDirtyLog(blk)
        self.ref = {b.idstr: b.memory.copy() for b in self.blocks}
        self.guest = guest if guest is not None else MarkingGuest(self.log)
        dc, dp = controls("events", *caps, **params)
        self.dst = MigrationDestination(capabilities=dc, parameters=dp, io_timeout=dst_io_timeout)
        if transport == "unix":
            self.dst_path = str(tmp_path / "dst.sock")
            self.dst.incoming(f"unix:{self.dst_path}")
        else:
            self.dst_path = None
            self.dst.incoming("tcp:127.0.0.1:0")
        self.proxy = Proxy(self.dst.connect_uri, tmp_path, transport=transport,
                           cut_conn=cut_conn, cut_at=cut_at)
        sc, sp = controls("events", *caps, **params)
        self.src = MigrationSource(self.blocks, dirty_logs={blk.idstr: self.log},
                                   guest=self.guest, capabilities=sc, parameters=sp,
                                   io_timeout=src_io_timeout)
        _LEFTOVERS.append(_Ending(self.src, self.dst))
        self.src_events: list[str] = []
        self.dst_events: list[str] = []
        self.src.events.subscribe(lambda e: self._ev(self.src_events, e))
        self.dst.events.subscribe(lambda e: self._ev(self.dst_events, e))

    @staticmethod
    def _ev(out, e) -> None:
        if e["event"] == "MIGRATION":
            out.append(e["data"]["status"])

    def start(self) -> "Run":
        self.src.migrate(self.proxy.uri)
        return self

    def finish(self):
        s = self.src.wait(WAIT)
        d = self.dst.wait(WAIT)
        self.proxy.close()
        return s, d

    def memory_intact(self) -> bool:
        return all(np.array_equal(self.ref[b.idstr], b.memory) for b in self.blocks)


def assert_source_failed(run: Run, *, was_running: bool = True) -> None:
    src = run.src
    assert src.state.state is S.FAILED, (src.state.state, src.error)
    assert isinstance(src.error, MigrationError), repr(src.error)
    q = src.query()
    assert q["status"] == "failed"
    assert q["error-desc"] == str(src.error) and q["error-desc"]
    assert run.src_events[0] == "setup" and run.src_events[-1] == "failed"
    assert "completed" not in run.src_events
    assert run.guest.running is was_running


def assert_destination_failed(run: Run) -> None:
    dst = run.dst
    assert dst.state.state is S.FAILED, (dst.state.state, dst.error)
    assert isinstance(dst.error, MigrationError), repr(dst.error)
    assert dst.query()["status"] == "failed"
    assert run.dst_events[-1] == "failed" and "completed" not in run.dst_events
    if run.dst_path is not None:
        assert not os.path.exists(run.dst_path)  # the listener removed its socket file


def wait_for(pred, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


# -- the reference streams and their landmarks ----------------------------------------


@functools.lru_cache(maxsize=None)
def reference(rp: bool) -> tuple[bytes, dict]:
    """A whole stream as the default configuration sends it, and named cut points."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run = Run(Path(d), *(("return-path",) if rp else ())).start()
        s, dst_state = run.finish()
        assert (s, dst_state) == (S.COMPLETED, S.COMPLETED), (run.src.error, run.dst.error)
        data = bytes(run.proxy.recorded[0])
    p = StreamParser()
    p.feed(data)
    p.feed_eof()
    parts, pages, eos, sec_start = [], [], [], []
    marks = {"magic": 2, "version": 6}
    for ev in p.events():
        t = type(ev)
        if t is Configuration:
            marks["configuration"] = ev.offset + 5
        elif t is Command and "command" not in marks:
            marks["command"] = ev.offset + 3
        elif t is RamSetup:
            marks["ram-setup"] = ev.offset + 12
        elif t is SectionStart and ev.section.idstr == "ram":
            sec_start.append((ev.type, ev.offset))
        elif t is RamEOS:
            eos.append(ev.offset)
        elif t is SectionData and "device" not in marks:
            marks["device"] = ev.offset + 12
        elif t is EndOfState:
            marks["before-eof"] = ev.offset
        elif t is VMDescription:
            marks["vmdesc"] = ev.offset + 40
        elif t is EndOfStream:
            marks["vmdesc-last-byte"] = ev.offset - 1
    kinds = [k for k, _ in sec_start]
    assert kinds == [SectionType.SECTION_START, SectionType.SECTION_PART, SectionType.SECTION_END]
    part_at, end_at = sec_start[1][1], sec_start[2][1]
    marks["ram-setup-eos"] = eos[0] + 3
    marks["part-header"] = part_at + 3
    marks["part-pages"] = (part_at + eos[1]) // 2
    marks["part-eos"] = eos[1] + 4
    marks["end-header"] = end_at + 2
    marks["end-pages"] = (end_at + eos[2]) // 2
    marks["end-eos"] = eos[2] + 2
    return data, marks


MAIN_POINTS = ["magic", "version", "configuration", "ram-setup", "ram-setup-eos", "part-header",
               "part-pages", "part-eos", "end-header", "end-pages", "end-eos", "device",
               "before-eof", "vmdesc", "vmdesc-last-byte"]


# -- connection cut on the main channel -------------------------------------------------


@pytest.mark.parametrize("point", MAIN_POINTS + ["command"])
def test_cut_main_channel_with_return_path(tmp_path, point):
    """With the return path the source learns of every cut, even after it wrote
    everything: it fails instead of completing, and its guest runs again."""
    data, marks = reference(True)
    cut = marks[point]
    fds = open_fds()
    run = Run(tmp_path, "return-path", cut_at=cut).start()
    run.finish()
    assert bytes(run.proxy.recorded[0]) == data[:cut]  # the cut is where it was meant to be
    assert_source_failed(run)
    assert run.memory_intact()
    assert_destination_failed(run)
    assert isinstance(run.dst.error, (StreamError, ChannelError))
    assert_no_migration_threads()
    assert_no_new_fds(fds)


@pytest.mark.parametrize("point", ["magic", "configuration", "ram-setup", "part-header",
                                   "part-pages"])
def test_cut_main_channel_without_return_path(tmp_path, point):
    """Cut while the source still has most of the stream to write (unix
    buffers hold far less): its next write fails."""
    data, marks = reference(False)
    cut = marks[point]
    assert len(data) - cut > 320 * 1024  # more than a unix socket buffers
    fds = open_fds()
    run = Run(tmp_path, cut_at=cut).start()
    run.finish()
    assert bytes(run.proxy.recorded[0]) == data[:cut]
    assert_source_failed(run)
    assert isinstance(run.src.error, ChannelError)
    assert run.memory_intact()
    assert_destination_failed(run)
    # the stream ended early: the parser says where
    assert isinstance(run.dst.error, StreamError) and run.dst.error.offset is not None
    assert run.dst.error.offset <= cut
    assert_no_migration_threads()
    assert_no_new_fds(fds)


@pytest.mark.parametrize("point", ["magic", "ram-setup", "part-pages", "end-pages", "vmdesc"])
def test_cut_main_channel_tcp(tmp_path, point):
    _, marks = reference(True)
    run = Run(tmp_path, "return-path", transport="tcp", cut_at=marks[point]).start()
    run.finish()
    assert_source_failed(run)
    assert run.memory_intact()
    assert_destination_failed(run)
    assert_no_migration_threads()


def test_cut_late_without_return_path_cannot_fail_the_source(tmp_path):
    """Without a return path a source that wrote everything completes (as
    QEMU's does) while the destination, cut short, fails: the reason the
    return path exists."""
    data, marks = reference(False)
    run = Run(tmp_path, cut_at=marks["vmdesc"]).start()
    run.finish()
    assert run.src.state.state in (S.COMPLETED, S.FAILED)
    assert_destination_failed(run)
    assert isinstance(run.dst.error, TruncatedStreamError)
    assert_no_migration_threads()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_cut_during_iterations_with_dirtying_guest(tmp_path, transport):
    """Rate-limited iterations over a RAM a vCPU thread keeps writing; the
    cut lands mid-iteration. The memory is what the vCPU wrote, nothing else."""
    blocks = make_ram(4 << 20)
    blk = next(iter(blocks))
    log = ExplicitDirtyLog(blk)
    guest = DirtyingGuest(blk, log)
    run = Run(tmp_path, "return-path", transport=transport, cut_at=1_500_000, blocks=blocks,
              log=log, guest=guest, max_bandwidth=8 << 20, downtime_limit=1).start()
    run.finish()
    assert run.proxy.cut_done.is_set()
    assert_source_failed(run)
    assert "active" in run.src_events
    assert len(run.src.iterations) >= 2  # it was iterating when the cut came
    guest.dirtier.stop()
    assert guest.dirtier.writes > 0
    assert np.array_equal(blk.memory, guest.dirtier.ref)
    assert_destination_failed(run)
    assert_no_migration_threads()


# -- multifd -----------------------------------------------------------------------------

#: (connection, bytes): inside the init packet, right after it (a clean end
#: between packets), inside a packet header, among the pages.
MULTIFD_CUTS = {
    "init-packet": (1, 10),
    "after-init": (1, 64),
    "packet-header": (1, 64 + 100),
    "pages": (1, 64 + 1344 + 200_000),
    "second-channel-pages": (2, 64 + 1344 + 100_000),
    "main-setup": (0, 50),
    "main-end": (0, 150),
}


@pytest.mark.parametrize("where", list(MULTIFD_CUTS))
def test_multifd_channel_dies(tmp_path, where):
    conn, cut = MULTIFD_CUTS[where]
    fds = open_fds()
    run = Run(tmp_path, "multifd", "return-path", cut_conn=conn, cut_at=cut,
              multifd_channels=2).start()
    run.finish()
    assert run.proxy.cut_done.is_set()
    assert len(run.proxy.recorded[conn]) == cut
    assert_source_failed(run)
    assert run.memory_intact()
    assert_destination_failed(run)
    assert_no_migration_threads()
    assert_no_new_fds(fds)


def test_multifd_early_cuts_repeatedly(tmp_path):
    """Cuts in the first bytes of a multifd channel race the source's SYNC
    writes: a sender thread failing while it writes a SYNC must still release
    the waiting engine (it used to hang in sync())."""
    for i, cut in enumerate([2, 10, 40, 64, 70, 200] * 3):
        d = tmp_path / str(i)
        d.mkdir()
        run = Run(d, "multifd", cut_conn=1 + i % 2, cut_at=cut, multifd_channels=2).start()
        run.finish()
        assert run.src.state.state in (S.FAILED, S.COMPLETED), run.src.state.state
        assert run.guest.running is (run.src.state.state is S.FAILED)
        assert_destination_failed(run)
        assert run.memory_intact()
    assert_no_migration_threads()


def test_multifd_clean_close_between_packets_fails_the_sync(tmp_path):
    """A multifd channel that ends cleanly before its sync point must not leave
    the destination waiting for that sync (for io_timeout) but fail at once."""
    run = Run(tmp_path, "multifd", cut_conn=1, cut_at=64, multifd_channels=2,
              dst_io_timeout=60, src_io_timeout=60).start()
    t0 = time.monotonic()
    assert run.dst.wait(WAIT) is S.FAILED
    assert time.monotonic() - t0 < WAIT
    run.finish()
    # the channel's clean end, or the main stream the failing source closed
    assert isinstance(run.dst.error, (ChannelError, StreamError)), repr(run.dst.error)
    assert_no_migration_threads()


def test_multifd_receiver_channel_ending_before_sync():
    """Unit level: channel 0 delivers its SYNC packet, channel 1 ends cleanly
    between packets; wait_sync fails at once, naming the channel."""
    from qmigx.transport import Channel
    from qmigx.multifd import DEFAULT_MAX_PAGES, pack_packet
    from qmigx.multifd.channels import MultifdReceiver
    from qmigx.wire import MultifdFlag

    pairs = [socket.socketpair() for _ in range(2)]
    chans = [Channel(f"test-{i}", sock=b) for i, (_, b) in enumerate(pairs)]
    rx = MultifdReceiver(chans, make_ram())
    sync = pack_packet(flags=int(MultifdFlag.SYNC), pages_alloc=DEFAULT_MAX_PAGES, packet_num=1,
                       ramblock="", offsets=np.zeros(0, np.uint64))
    pairs[0][0].sendall(sync)
    pairs[1][0].shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError, match="multifd channel 1 closed before its sync point"):
        rx.wait_sync(WAIT)
    rx.close(timeout=WAIT)
    assert_no_migration_threads()
    for a, _ in pairs:
        a.close()
    for ch in chans:
        ch.close()


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_compressed_channel_dies(tmp_path, compression, channels):
    run = Run(tmp_path, "multifd", "return-path", cut_conn=1, cut_at=64 + 1344 + 5000,
              multifd_channels=channels, multifd_compression=compression).start()
    run.finish()
    assert run.proxy.cut_done.is_set()
    assert_source_failed(run)
    assert run.memory_intact()
    assert_destination_failed(run)
    assert_no_migration_threads()


# -- cancel in each state ----------------------------------------------------------------


class GatedLog(ExplicitDirtyLog):
    """A dirty log whose first sync takes as long as the test says (a huge
    guest's setup): it holds the source in ``setup``."""

    def __init__(self, block) -> None:
        super().__init__(block)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def sync(self):
        if not self.entered.is_set():
            self.entered.set()
            self.gate.wait(WAIT)
        return super().sync()


class StalledDestination:
    """Accepts connections and never reads them."""

    def __init__(self, tmp_path) -> None:
        self.path = str(tmp_path / "stalled.sock")
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(self.path)
        self.ls.listen(8)
        self.uri = f"unix:{self.path}"
        self.conns: list[socket.socket] = []
        self.ls.settimeout(0.05)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="test-stalled", daemon=True)
        _LEFTOVERS.append(self)
        self.thread.start()

    def _accept(self) -> None:
        while not self.halt.is_set():
            try:
                self.conns.append(self.ls.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.halt.set()
        self.thread.join(WAIT)
        self.ls.close()
        for c in self.conns:
            c.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def second_migration_works(tmp_path, src: MigrationSource) -> None:
    """The state machine lets a new migration start from cancelled/failed."""
    dst = MigrationDestination(io_timeout=WAIT)
    path = str(tmp_path / "again.sock")
    dst.incoming(f"unix:{path}")
    src.capabilities.set("pause-before-switchover", False)
    src.parameters.set({"max-bandwidth": 1 << 40, "downtime-limit": 300})
    src.migrate(f"unix:{path}")
    assert src.wait(WAIT) is S.COMPLETED, src.error
    assert dst.wait(WAIT) is S.COMPLETED, dst.error
    for b in src.blocks:
        assert np.array_equal(dst.blocks[b.idstr].memory, b.memory)
    assert_no_migration_threads()


def cancel_and_check(src: MigrationSource, states: list) -> None:
    src.cancel()
    assert src.state.state in (S.CANCELLING, S.CANCELLED)
    assert src.wait(WAIT) is S.CANCELLED
    assert states[-2:] == [S.CANCELLING, S.CANCELLED]
    assert src.error is None
    assert "error-desc" not in src.query()
    assert src.query()["status"] == "cancelled"
    assert src.guest.running
    assert_no_migration_threads(SOURCE_THREADS)


def record_states(src: MigrationSource) -> list:
    states: list = []
    src.state.add_listener(lambda old, new: states.append(new))
    return states


def test_cancel_in_setup(tmp_path):
    """Cancel while the setup is still going (a slow first bitmap sync) to a
    destination that accepts and never reads."""
    stalled = StalledDestination(tmp_path)
    blocks = make_ram()
    blk = next(iter(blocks))
    log = GatedLog(blk)
    src = MigrationSource(blocks, dirty_logs={"pc.ram": log}, io_timeout=None)
    states = record_states(src)
    src.migrate(stalled.uri)
    assert log.entered.wait(WAIT)
    assert src.state.state is S.SETUP
    src.cancel()
    assert src.state.state is S.CANCELLING
    log.gate.set()
    assert src.wait(WAIT) is S.CANCELLED
    assert states == [S.SETUP, S.CANCELLING, S.CANCELLED]
    assert src.guest.running and src.error is None
    assert_no_migration_threads()
    stalled.close()
    second_migration_works(tmp_path, src)


def test_cancel_while_blocked_writing_to_a_stalled_destination(tmp_path):
    """No io_timeout: only cancel can end it, and it must do so at once."""
    stalled = StalledDestination(tmp_path)
    blocks = make_ram(4 << 20)
    src = MigrationSource(blocks, io_timeout=None)
    states = record_states(src)
    src.migrate(stalled.uri)
    wait_for(lambda: src.state.state is S.ACTIVE, what="active")
    time.sleep(0.1)  # let it fill the socket buffers and block
    assert src.state.state is S.ACTIVE
    cancel_and_check(src, states)
    stalled.close()


def test_cancel_active(tmp_path):
    """Iterations go on (slow rate limit, a vCPU dirtying pages): cancel."""
    blocks = make_ram(4 << 20)
    blk = next(iter(blocks))
    log = ExplicitDirtyLog(blk)
    guest = DirtyingGuest(blk, log)
    run = Run(tmp_path, blocks=blocks, log=log, guest=guest, max_bandwidth=16 << 20,
              downtime_limit=1)
    states = record_states(run.src)
    run.start()
    wait_for(lambda: len(run.src.iterations) >= 3, what="three iterations")
    assert run.src.state.state is S.ACTIVE
    cancel_and_check(run.src, states)
    assert run.src_events == ["setup", "active", "cancelling", "cancelled"]
    guest.dirtier.stop()  # the cancelled migration never touched the memory
    assert np.array_equal(blk.memory, guest.dirtier.ref)
    assert run.dst.wait(WAIT) is S.FAILED  # the cancel shut the stream down
    run.proxy.close()
    assert_no_migration_threads()
    second_migration_works(tmp_path, run.src)


def test_cancel_pre_switchover(tmp_path):
    run = Run(tmp_path, "pause-before-switchover")
    states = record_states(run.src)
    run.start()
    wait_for(lambda: run.src.state.state is S.PRE_SWITCHOVER, what="pre-switchover")
    assert not run.guest.running  # stopped for the switchover
    cancel_and_check(run.src, states)
    assert run.src_events == ["setup", "active", "pre-switchover", "cancelling", "cancelled"]
    assert run.memory_intact()
    assert run.dst.wait(WAIT) is S.FAILED
    run.proxy.close()
    second_migration_works(tmp_path, run.src)


def test_cancel_device(tmp_path):
    """migrate-continue, then the destination stalls while the END section
    (every page re-dirtied by the guest's last writes) is written: cancel."""
    blocks = make_ram(4 << 20)
    blk = next(iter(blocks))
    log = ExplicitDirtyLog(blk)
    guest = MarkingGuest(log, pages=range(1024))
    run = Run(tmp_path, "pause-before-switchover", blocks=blocks, log=log, guest=guest)
    states = record_states(run.src)
    run.start()
    wait_for(lambda: run.src.state.state is S.PRE_SWITCHOVER, what="pre-switchover")
    run.proxy.stall.set()
    run.src.migrate_continue("pre-switchover")
    wait_for(lambda: run.src.state.state is S.DEVICE, what="device")
    time.sleep(0.1)
    assert run.src.state.state is S.DEVICE  # blocked writing
    cancel_and_check(run.src, states)
    assert run.src_events == ["setup", "active", "pre-switchover", "device", "cancelling",
                              "cancelled"]
    assert run.memory_intact()
    run.proxy.stall.clear()
    assert run.dst.wait(WAIT) is S.FAILED
    run.proxy.close()
    second_migration_works(tmp_path, run.src)


def test_cancel_waiting_for_shut(tmp_path):
    """Everything sent, the return path's SHUT withheld: the source waits in
    ``device``; cancel ends the wait."""
    run = Run(tmp_path, "return-path", "pause-before-switchover")
    states = record_states(run.src)
    run.start()
    wait_for(lambda: run.src.state.state is S.PRE_SWITCHOVER, what="pre-switchover")
    run.proxy.stall.set()
    run.src.migrate_continue("pre-switchover")
    wait_for(lambda: run.src.state.state is S.DEVICE, what="device")
    time.sleep(0.05)
    cancel_and_check(run.src, states)
    run.proxy.stall.clear()
    assert run.dst.wait(WAIT) in (S.FAILED, S.COMPLETED)
    run.proxy.close()
    assert_no_migration_threads()


def test_cancel_racing_completion(tmp_path):
    """Cancel at random moments around the switchover: the source always ends
    completed or cancelled (never stuck in cancelling), never hangs, and runs
    its guest again exactly when it was cancelled."""
    rng = random.Random(5)
    outcomes = set()
    for i in range(12):
        d = tmp_path / str(i)
        d.mkdir()
        run = Run(d, *(("return-path",) if i % 2 else ())).start()
        time.sleep(rng.uniform(0, 0.03))
        run.src.cancel()
        s, dstate = run.finish()
        assert s in (S.CANCELLED, S.COMPLETED)
        assert run.guest.running is (s is S.CANCELLED)
        assert dstate in (S.FAILED, S.COMPLETED)
        assert run.memory_intact()
        outcomes.add(s)
    assert_no_migration_threads()
    assert S.CANCELLED in outcomes


def test_migrate_while_running_is_refused_and_cancel_after_end_is_a_noop(tmp_path):
    run = Run(tmp_path, "pause-before-switchover").start()
    wait_for(lambda: run.src.state.state is S.PRE_SWITCHOVER, what="pre-switchover")
    with pytest.raises(MigrationError, match="There's a migration process in progress"):
        run.src.migrate(run.proxy.uri)
    run.src.migrate_continue("pre-switchover")
    assert run.finish() == (S.COMPLETED, S.COMPLETED)
    run.src.cancel()
    assert run.src.state.state is S.COMPLETED
    assert_no_migration_threads()


# -- garbage ---------------------------------------------------------------------------


def feed_destination(tmp_path, data: bytes, *, multifd: bool = False, blocks=None,
                     valid_ok: bool = False, **kw) -> MigrationDestination:
    """Send ``data`` as a source would and wait for the destination's verdict:
    failed (or, with ``valid_ok``, completed when ``data`` is a whole valid stream)."""
    caps = ("multifd",) if multifd else ()
    c, p = controls(*caps)
    dst = MigrationDestination(blocks, capabilities=c, parameters=p, io_timeout=WAIT, **kw)
    path = str(tmp_path / f"g{random.random()}.sock")
    dst.incoming(f"unix:{path}")
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the destination may fail (and close) before reading it all
    state = dst.wait(WAIT)
    s.close()
    assert not os.path.exists(path)
    if valid_ok and state is S.COMPLETED:
        assert is_valid_stream(data)
        return dst
    assert state is S.FAILED
    return dst


def is_valid_stream(data: bytes) -> bool:
    p = StreamParser()
    p.feed(data)
    p.feed_eof()
    try:
        for _ in p.events():
            pass
    except StreamError:
        return False
    return True


def stream_prefix(build) -> bytes:
    sink = BytesSink()
    f = QEMUFile(sink)
    w = StreamWriter(f)
    w.header()
    build(w, f)
    f.flush()
    return bytes(sink.data)


def assert_names_offset(err, limit: int) -> None:
    assert isinstance(err, StreamError), repr(err)
    assert err.offset is not None and 0 <= err.offset <= limit
    assert f"offset 0x{err.offset:x}" in str(err)


def test_garbage_wrong_magic(tmp_path):
    dst = feed_destination(tmp_path, b"QEMU\x00\x00\x00\x03" + bytes(100))
    assert isinstance(dst.error, BadHeaderError)
    assert dst.error.offset == 0 and dst.error.field == "magic"
    assert "offset 0x0" in str(dst.error)
    assert_no_migration_threads()


def test_garbage_wrong_version(tmp_path):
    dst = feed_destination(tmp_path, struct.pack(">II", 0x5145564D, 7))
    assert isinstance(dst.error, BadHeaderError)
    assert dst.error.offset == 4 and dst.error.field == "version"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2000))
def test_garbage_random_bytes(tmp_path, data):
    dst = feed_destination(tmp_path, data)
    assert_names_offset(dst.error, len(data))
    if len(data) >= 4 and data[:4] != b"QEVM":
        assert isinstance(dst.error, BadHeaderError) and dst.error.offset == 0
    assert_no_migration_threads()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["header", "configuration", "ram-setup", "ram-setup-eos", "part-pages",
                        "end-eos", "device"]),
       st.binary(min_size=1, max_size=600))
def test_garbage_after_a_valid_prefix(tmp_path, point, tail):
    """A valid stream up to a landmark, then random bytes. (Right after the
    header a 0x00 tail is the EOF of a valid empty stream, which completes.)"""
    data, marks = reference(False)
    cut = 8 if point == "header" else marks[point]
    stream = data[:cut] + tail
    dst = feed_destination(tmp_path, stream, valid_ok=True)
    if dst.state.state is S.FAILED:
        assert_names_offset(dst.error, len(stream))
    assert_no_migration_threads()


def test_garbage_setup_record_with_huge_block(tmp_path):
    """A destination with no RAM configured must not try to allocate what a
    hostile setup record asks for beyond reason (typed error, offset)."""
    def build(w, f):
        w.configuration("pc-i440fx-7.2")
        w.section_header(SectionType.SECTION_START, Section(2, "ram", 0, 4))
        RamWriter(f).setup([RamBlockInfo("pc.ram", 1 << 62)])
    data = stream_prefix(build)
    dst = feed_destination(tmp_path, data)
    assert isinstance(dst.error, RamStreamError), repr(dst.error)
    assert_names_offset(dst.error, len(data))
    assert dst.error.offset == data.index(b"\x06pc.ram") - 8  # the setup record


def test_garbage_block_name_mismatch(tmp_path):
    def build(w, f):
        w.configuration("pc-i440fx-7.2")
        w.section_header(SectionType.SECTION_START, Section(2, "ram", 0, 4))
        RamWriter(f).setup([RamBlockInfo("nope", RAM)])
    dst = feed_destination(tmp_path, stream_prefix(build), blocks=make_ram())
    assert_names_offset(dst.error, 100)
    assert "nope" in str(dst.error)


def test_garbage_multifd_init_packet(tmp_path):
    """A multifd channel whose init packet is garbage fails the destination."""
    c, p = controls("multifd", multifd_channels=2)
    dst = MigrationDestination(capabilities=c, parameters=p, io_timeout=WAIT)
    path = str(tmp_path / "m.sock")
    dst.incoming(f"unix:{path}")
    socks = []
    for payload in (b"", bytes(range(64)), bytes(64)):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(payload)
        socks.append(s)
    assert dst.wait(WAIT) is S.FAILED
    for s in socks:
        s.close()
    assert isinstance(dst.error, MigrationError), repr(dst.error)
    assert not os.path.exists(path)
    assert_no_migration_threads()


# -- stalled peers -----------------------------------------------------------------------


def test_source_times_out_on_a_stalled_destination(tmp_path):
    stalled = StalledDestination(tmp_path)
    fds = open_fds()
    src = MigrationSource(make_ram(4 << 20), io_timeout=0.5)
    src.migrate(stalled.uri)
    assert src.wait(WAIT) is S.FAILED
    assert isinstance(src.error, ChannelError) and "timed out" in str(src.error)
    assert src.query()["error-desc"] == str(src.error)
    assert src.guest.running
    assert_no_migration_threads()
    stalled.close()
    assert_no_new_fds(fds)


def test_source_times_out_waiting_for_shut(tmp_path):
    """The destination reads everything but never answers on the return path."""
    stalled = StalledDestination(tmp_path)
    drained = threading.Event()

    def drain():
        wait_for(lambda: stalled.conns, what="a connection")
        c = stalled.conns[0]
        c.settimeout(0.05)
        while not drained.is_set():
            try:
                if not c.recv(1 << 16):
                    return
            except socket.timeout:
                pass
            except OSError:
                return

    t = threading.Thread(target=drain, name="test-drain")
    t.start()
    c, p = controls("return-path")
    src = MigrationSource(make_ram(), capabilities=c, parameters=p, io_timeout=0.5)
    src.migrate(stalled.uri)
    assert src.wait(WAIT) is S.FAILED
    assert isinstance(src.error, ChannelError) and "SHUT" in str(src.error)
    assert src.guest.running
    drained.set()
    t.join(WAIT)
    assert_no_migration_threads()
    stalled.close()


def test_an_idle_return_path_is_not_a_stalled_peer(tmp_path):
    """The return path carries nothing between PONG and SHUT: iterations that
    last longer than the I/O timeout must not fail the source."""
    blocks = make_ram(4 << 20)
    blk = next(iter(blocks))
    log = ExplicitDirtyLog(blk)
    guest = DirtyingGuest(blk, log)
    run = Run(tmp_path, "return-path", blocks=blocks, log=log, guest=guest, src_io_timeout=0.2,
              max_bandwidth=16 << 20, downtime_limit=1)
    run.start()
    wait_for(lambda: len(run.src.iterations) >= 12, what="a second of iterations")
    assert run.src.state.state is S.ACTIVE, run.src.error
    run.src.parameters.set({"downtime-limit": 2000, "max-bandwidth": 1 << 40})
    assert run.finish() == (S.COMPLETED, S.COMPLETED), (run.src.error, run.dst.error)
    for b in blocks:
        assert np.array_equal(run.dst.blocks[b.idstr].memory, b.memory)
    assert_no_migration_threads()


def test_destination_waiting_for_a_source_is_cancellable(tmp_path):
    path = str(tmp_path / "d.sock")
    dst = MigrationDestination()
    dst.incoming(f"unix:{path}")
    time.sleep(0.05)
    dst.cancel()
    assert dst.wait(WAIT) is S.FAILED
    assert isinstance(dst.error, MigrationCancelled)
    assert not os.path.exists(path)
    assert_no_migration_threads()


@pytest.mark.parametrize("sent", ["nothing", "header", "mid-stream"])
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_destination_with_a_stalled_source(tmp_path, sent, how):
    data, marks = reference(False)
    prefix = {"nothing": b"", "header": data[:8], "mid-stream": data[:marks["part-pages"]]}[sent]
    path = str(tmp_path / "d.sock")
    fds = open_fds()
    dst = MigrationDestination(io_timeout=0.5 if how == "timeout" else None)
    dst.incoming(f"unix:{path}")
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(prefix)
    if how == "cancel":
        wait_for(lambda: dst.state.state is S.ACTIVE, what="active")
        time.sleep(0.05)
        assert dst.state.state is S.ACTIVE
        dst.cancel()
    assert dst.wait(WAIT) is S.FAILED
    if how == "cancel":
        assert isinstance(dst.error, MigrationCancelled)
    else:
        assert isinstance(dst.error, ChannelError) and "timed out" in str(dst.error)
    assert not os.path.exists(path)
    assert_no_migration_threads()
    s.close()
    assert_no_new_fds(fds)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_destination_waiting_for_multifd_channels(tmp_path, how):
    """The main channel arrives, the multifd channels never do."""
    c, p = controls("multifd", multifd_channels=2)
    dst = MigrationDestination(capabilities=c, parameters=p,
                               io_timeout=0.5 if how == "timeout" else None)
    path = str(tmp_path / "d.sock")
    dst.incoming(f"unix:{path}")
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if how == "cancel":
        time.sleep(0.1)
        dst.cancel()
    assert dst.wait(WAIT) is S.FAILED
    assert isinstance(dst.error, MigrationCancelled if how == "cancel" else ChannelError)
    s.close()
    assert not os.path.exists(path)
    assert_no_migration_threads()


def test_destination_failure_is_reported_on_the_return_path(tmp_path):
    """A destination that fails sends SHUT(1): the source fails on it, naming it."""
    blocks = make_ram()
    c, p = controls("return-path")
    dst = MigrationDestination(RAMBlockList([RAMBlock.anonymous("pc.ram", RAM // 2)]),
                               capabilities=c, parameters=p, io_timeout=WAIT)
    path = str(tmp_path / "d.sock")
    dst.incoming(f"unix:{path}")
    c, p = controls("return-path")
    src = MigrationSource(blocks, capabilities=c, parameters=p, io_timeout=WAIT)
    src.migrate(f"unix:{path}")
    assert src.wait(WAIT) is S.FAILED
    assert dst.wait(WAIT) is S.FAILED
    assert "Length mismatch" in str(dst.error)
    assert isinstance(src.error, MigrationError)
    assert src.guest.running
    assert_no_migration_threads()
