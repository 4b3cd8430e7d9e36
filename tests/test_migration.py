"""Functional tests of live migration, qmigx to qmigx, in one process.

A source with a vCPU-like thread dirtying its RAM migrates to a
destination over unix and tcp sockets with each RAM encoding (default,
xbzrle, compress, multifd none/zlib/zstd on 2 and 4 channels) and with
the return path, x-ignore-shared, pause-before-switchover. Iterations
are forced (a tiny downtime limit keeps the migration from converging
until the test lets it), so every path of the iteration loop runs; after
completion the destination's memory must equal the source's byte for
byte. Also: a destination creating its blocks from the setup record,
block name/length mismatches, the MIGRATION / MIGRATION_PASS events and
the query-migrate replies on both sides.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.errors import MigrationError, RamStreamError, StreamError
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.synthetic import fill_pages, synthetic_blocks

S = MigrationStatus
PAGE = 4096
RAM = 4 << 20
WAIT = 10.0
MIG_THREADS = ("migration", "incoming", "return-path", "multifd-send-", "multifd-recv-")


#: vCPU threads and migrations a failing test may leave running, ended after every
#: test so that one failure does not starve the next tests of the GIL
_LEFTOVERS: list = []


@pytest.fixture(autouse=True)
def _close_leftovers():
    yield
    while _LEFTOVERS:
        fn = _LEFTOVERS.pop()
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort: the test already reported
            pass


def controls(*caps, **params):
    c = Capabilities()
    for name in caps:
        c.set(name, True)
    p = Parameters(capabilities=c)
    if params:
        p.set({k.replace("_", "-"): v for k, v in params.items()})
    return c, p


def wait_for(pred, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def assert_no_migration_threads() -> None:
    deadline = time.monotonic() + 5
    left = lambda: [t.name for t in threading.enumerate() if t.name.startswith(MIG_THREADS)]  # noqa: E731
    while left() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert left() == []


class DirtyingGuest(SimpleGuest):
    """A guest whose vCPU thread writes into a hot set of pages of every
    block (marking them dirty) while it runs; stop() stops the thread and
    waits for it, as stopping a VM stops its vCPUs."""

    def __init__(self, blocks: RAMBlockList, logs: dict, hot_pages: int = 192, seed: int = 11):
        super().__init__()
        self.blocks, self.logs = list(blocks), logs
        self.hot_pages = hot_pages
        self.rng = np.random.default_rng(seed)
        self.writes = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-vcpu", daemon=True)
        _LEFTOVERS.append(self._halt.set)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            for blk in self.blocks:
                mem = blk.memory
                n = min(self.hot_pages, len(mem) // PAGE)
                for p in self.rng.integers(0, n, 4):
                    i = int(p) * PAGE + int(self.rng.integers(0, PAGE - 8))
                    mem[i : i + 8] = self.rng.integers(0, 256, 8, dtype=np.uint8)
                    self.logs[blk.idstr].mark_dirty(i, 8)
                    self.writes += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()
        super().stop()


class Pair:
    """A destination listening on ``transport`` and a source ready to migrate to it."""

    def __init__(self, tmp_path, *caps, transport: str = "unix", blocks=None, dst_blocks=None,
                 dirty: bool = True, events: bool = True, **params) -> None:
        self.blocks = blocks if blocks is not None else synthetic_blocks(RAM)
        self.logs = {b.idstr: ExplicitDirtyLog(b) for b in self.blocks}
        extra = ("events",) if events else ()
        dc, dp = controls(*extra, *caps, **params)
        self.dst = MigrationDestination(dst_blocks, capabilities=dc, parameters=dp,
                                        io_timeout=WAIT)
        self.src_events: list = []
        self.dst_events: list = []
        self.dst.events.subscribe(self.dst_events.append)
        if transport == "unix":
            self.path = str(tmp_path / "mig.sock")
            self.dst.incoming(f"unix:{self.path}")
        else:
            self.path = None
            self.dst.incoming("tcp:127.0.0.1:0")
        self.guest = DirtyingGuest(self.blocks, self.logs) if dirty else SimpleGuest()
        sc, sp = controls(*extra, *caps, **params)
        self.src = MigrationSource(self.blocks, dirty_logs=self.logs, guest=self.guest,
                                   capabilities=sc, parameters=sp, io_timeout=WAIT)
        self.src.events.subscribe(self.src_events.append)
        _LEFTOVERS.append(self.src.cancel)
        _LEFTOVERS.append(self.dst.cancel)

    def migrate(self, *, iterations: int = 0, until=None) -> None:
        """Migrate; with ``iterations``, keep it from converging until that many ran
        (and ``until()`` holds, when given)."""
        if iterations:
            # Hold convergence: a 1 ms downtime limit, and after every
            # iteration (in the migration thread, so however loaded the
            # machine) 64 pages of the hot set written again, far more than
            # 1 ms of bandwidth could send; the vCPU thread writes besides.
            self.src.parameters.set({"downtime-limit": 1})
            self.src.on_iteration = lambda row: self._rewrite_hot(64)
        self.src.migrate(self.dst.connect_uri)
        if iterations:
            wait_for(lambda: (len(self.src.iterations) >= iterations
                              and (until is None or until()))
                     or self.src.c.done.is_set(), "iterations")
            self.src.on_iteration = None
            self.src.parameters.set({"downtime-limit": 2000})
        assert self.src.wait(WAIT) is S.COMPLETED, self.src.error
        assert self.dst.wait(WAIT) is S.COMPLETED, self.dst.error

    def _rewrite_hot(self, npages: int) -> None:
        for b in self.blocks:
            mem = b.memory
            for p in range(min(npages, len(mem) // PAGE)):
                mem[p * PAGE + (self.guest.writes % (PAGE - 8))] ^= 0x5A
                self.logs[b.idstr].mark_dirty(p * PAGE, PAGE)

    def assert_equal_memory(self) -> None:
        for b in self.blocks:
            d = self.dst.blocks[b.idstr]
            assert d.used_length == b.used_length
            assert np.array_equal(d.memory, b.memory), b.idstr


CONFIGS = {
    "default": ((), {}),
    "xbzrle": (("xbzrle",), {"xbzrle_cache_size": 1 << 20}),
    "compress": (("compress",), {}),
    "multifd-none-2": (("multifd",), {"multifd_channels": 2}),
    "multifd-zlib-2": (("multifd",), {"multifd_channels": 2, "multifd_compression": "zlib"}),
    "multifd-zlib-4": (("multifd",), {"multifd_channels": 4, "multifd_compression": "zlib"}),
    "multifd-zstd-2": (("multifd",), {"multifd_channels": 2, "multifd_compression": "zstd"}),
    "multifd-zstd-4": (("multifd",), {"multifd_channels": 4, "multifd_compression": "zstd"}),
    "multifd-none-4-return-path": (("multifd", "return-path"), {"multifd_channels": 4}),
    "return-path": (("return-path",), {}),
}


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_live_migration(tmp_path, config, transport):
    caps, params = CONFIGS[config]
    pair = Pair(tmp_path, *caps, transport=transport, max_bandwidth=16 << 20, **params)

    def xbzrle_sent() -> bool:  # a re-dirtied page must have gone out as a delta
        ram = pair.src.ram
        return ram is not None and ram.xbzrle_pages > 0

    pair.migrate(iterations=5, until=xbzrle_sent if "xbzrle" in caps else None)
    assert pair.guest.writes > 0 and not pair.guest.running
    pair.assert_equal_memory()
    src = pair.src
    assert len(src.iterations) >= 5
    q = src.query()
    assert q["status"] == "completed"
    ram = q["ram"]
    assert ram["total"] == sum(b.used_length for b in pair.blocks)
    assert ram["remaining"] == 0
    assert ram["dirty-sync-count"] >= 3  # setup, at least one while iterating, completion
    assert ram["transferred"] >= ram["normal"] * PAGE // 8  # loose: compression shrinks it
    assert ram["duplicate"] > 0  # synthetic RAM has zero pages
    assert ("xbzrle-cache" in q) is ("xbzrle" in caps)
    assert ("compression" in q) is ("compress" in caps)
    if "xbzrle" in caps:
        assert q["xbzrle-cache"]["pages"] > 0 and q["xbzrle-cache"]["bytes"] > 0
        assert q["xbzrle-cache"]["cache-size"] == 1 << 20
    if "compress" in caps:
        assert q["compression"]["pages"] > 0
    if "multifd" in caps:
        assert ram["multifd-bytes"] > 0
        assert ram["normal"] > 0
    else:
        assert ram["multifd-bytes"] == 0
    for key in ("total-time", "downtime", "setup-time"):
        assert q[key] >= 0
    assert "expected-downtime" not in q and "error-desc" not in q
    assert pair.dst.query()["status"] == "completed"
    if transport == "unix":
        assert not os.path.exists(pair.path)
    assert_no_migration_threads()


def test_events_and_passes(tmp_path):
    pair = Pair(tmp_path, max_bandwidth=16 << 20)
    pair.migrate(iterations=3)
    migration = [e["data"]["status"] for e in pair.src_events if e["event"] == "MIGRATION"]
    assert migration == ["setup", "active", "completed"]
    passes = [e["data"]["pass"] for e in pair.src_events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1))  # one per bitmap sync, counted from 1
    assert passes[-1] == pair.src.query()["ram"]["dirty-sync-count"]
    # QEMU's order: the first pass comes before active
    names = [(e["event"], e["data"].get("status")) for e in pair.src_events]
    assert names.index(("MIGRATION_PASS", None)) < names.index(("MIGRATION", "active"))
    dst = [e["data"]["status"] for e in pair.dst_events if e["event"] == "MIGRATION"]
    assert dst == ["setup", "active", "completed"]
    for e in pair.src_events:
        assert set(e) == {"event", "data", "timestamp"}
    pair.assert_equal_memory()


def test_no_events_without_the_capability(tmp_path):
    pair = Pair(tmp_path, events=False, dirty=False)
    pair.migrate()
    assert pair.src_events == []
    # the destination announces setup at migrate-incoming whatever its capabilities
    assert [e["data"] for e in pair.dst_events] == [{"status": "setup"}]


def test_query_while_active_and_on_the_destination(tmp_path):
    pair = Pair(tmp_path, max_bandwidth=16 << 20)
    pair.src.parameters.set({"downtime-limit": 1})
    pair.src.migrate(pair.dst.connect_uri)
    wait_for(lambda: len(pair.src.iterations) >= 2, "iterations")
    q = pair.src.query()
    assert q["status"] == "active"
    assert q["ram"]["total"] == sum(b.used_length for b in pair.blocks)
    assert q["ram"]["transferred"] > 0
    assert "remaining" in q["ram"] and "expected-downtime" in q and "downtime" not in q
    assert q["total-time"] >= q["setup-time"] >= 0
    dq = pair.dst.query()
    assert dq["status"] == "active"
    assert dq["socket-address"] == [{"type": "unix", "path": pair.path}]
    pair.src.parameters.set({"downtime-limit": 2000})
    assert pair.src.wait(WAIT) is S.COMPLETED
    assert pair.dst.wait(WAIT) is S.COMPLETED
    assert pair.dst.query()["status"] == "completed"
    pair.assert_equal_memory()


def test_tcp_port_zero_reports_the_bound_port(tmp_path):
    pair = Pair(tmp_path, transport="tcp", dirty=False)
    (addr,) = pair.dst.query()["socket-address"]
    assert addr["type"] == "inet" and int(addr["port"]) > 0
    assert pair.dst.connect_uri == f"tcp:127.0.0.1:{addr['port']}"
    pair.migrate()
    pair.assert_equal_memory()


def test_pause_before_switchover(tmp_path):
    pair = Pair(tmp_path, "pause-before-switchover", max_bandwidth=16 << 20)
    states: list = []
    pair.src.state.add_listener(lambda old, new: states.append(new.value))
    pair.src.migrate(pair.dst.connect_uri)
    wait_for(lambda: pair.src.state.state is S.PRE_SWITCHOVER, "pre-switchover")
    assert not pair.guest.running  # stopped before the switchover
    assert pair.src.query()["status"] == "pre-switchover"
    time.sleep(0.05)
    assert pair.src.state.state is S.PRE_SWITCHOVER  # it waits for us
    with pytest.raises(MigrationError, match="Migration not in expected state: pre-switchover"):
        pair.src.migrate_continue("active")
    pair.src.migrate_continue("pre-switchover")
    assert pair.src.wait(WAIT) is S.COMPLETED
    assert pair.dst.wait(WAIT) is S.COMPLETED
    assert states == ["setup", "active", "pre-switchover", "device", "completed"]
    pair.assert_equal_memory()


def test_destination_without_ram_creates_blocks_from_the_setup_record(tmp_path):
    pair = Pair(tmp_path, dst_blocks=None)
    pair.migrate(iterations=2)
    assert pair.dst.blocks.names() == pair.blocks.names() == ["pc.ram", "pc.rom"]
    assert pair.dst.result.setup is not None
    assert [b.idstr for b in pair.dst.result.setup.blocks] == ["pc.ram", "pc.rom"]
    pair.assert_equal_memory()


def test_destination_with_its_own_blocks(tmp_path):
    own = RAMBlockList([RAMBlock.anonymous("pc.ram", RAM), RAMBlock.anonymous("pc.rom", 128 << 10)])
    before = {b.idstr: b for b in own}
    pair = Pair(tmp_path, dst_blocks=own)
    pair.migrate(iterations=2)
    for b in pair.dst.blocks:
        assert b is before[b.idstr]  # loaded in place
    pair.assert_equal_memory()


@pytest.mark.parametrize("case", ["unknown-name", "shorter"])
def test_block_mismatch_fails_the_destination(tmp_path, case):
    rom = RAMBlock.anonymous("pc.rom", 128 << 10)
    size = {"unknown-name": RAM, "shorter": RAM // 2}[case]
    name = "ram0" if case == "unknown-name" else "pc.ram"
    own = RAMBlockList([RAMBlock.anonymous(name, size), rom])
    pair = Pair(tmp_path, "return-path", dst_blocks=own, dirty=False)
    pair.src.migrate(pair.dst.connect_uri)
    assert pair.dst.wait(WAIT) is S.FAILED
    assert pair.src.wait(WAIT) is S.FAILED  # told by SHUT, or by the closed stream
    err = pair.dst.error
    assert isinstance(err, RamStreamError)
    if case == "unknown-name":
        assert err.message == 'Unknown ramblock "pc.ram", cannot accept migration'
        assert err.field == "idstr"
    elif case == "shorter":
        assert err.message.startswith(f"Length mismatch: pc.ram: 0x{RAM:x} in != 0x{RAM // 2:x}")
        assert err.field == "used_length"
    assert err.offset is not None and f"offset 0x{err.offset:x}" in str(err)
    assert pair.src.guest.running
    assert_no_migration_threads()


def test_resizable_destination_block_takes_the_source_length(tmp_path):
    """A block whose max_length allows it is resized to the source's length."""
    own = RAMBlockList([RAMBlock("pc.ram", np.zeros(2 * RAM, np.uint8), RAM // 2,
                                 max_length=2 * RAM),
                        RAMBlock.anonymous("pc.rom", 128 << 10)])
    pair = Pair(tmp_path, dst_blocks=own, dirty=False)
    pair.migrate()
    assert pair.dst.blocks["pc.ram"].used_length == RAM
    pair.assert_equal_memory()


def test_x_ignore_shared(tmp_path):
    """A shared file-backed block is listed but never sent: the destination
    maps the same file and sees the source's writes through it."""
    path = str(tmp_path / "shared.mem")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    shared = RAMBlock.from_file("mem-shared", path, 1 << 20, shared=True)
    fill_pages(shared.memory, 9)
    blocks = synthetic_blocks(RAM)
    blocks.add(shared)
    dst_shared = RAMBlock.from_file("mem-shared", path, 1 << 20, shared=True)
    own = RAMBlockList([RAMBlock.anonymous("pc.ram", RAM), RAMBlock.anonymous("pc.rom", 128 << 10),
                        dst_shared])
    pair = Pair(tmp_path, "x-ignore-shared", blocks=blocks, dst_blocks=own,
                max_bandwidth=16 << 20)
    pair.migrate(iterations=3)
    q = pair.src.query()
    assert q["ram"]["total"] == RAM + (128 << 10)  # the shared block does not migrate
    # all pages ever sent belong to the private blocks
    sent = q["ram"]["normal"] + q["ram"]["duplicate"]
    assert sent >= (RAM + (128 << 10)) // PAGE
    pair.assert_equal_memory()  # shared: the same file
    assert pair.guest.writes > 0
    setup = pair.dst.result.setup
    assert [b.idstr for b in setup.blocks] == ["pc.ram", "pc.rom", "mem-shared"]


def test_x_ignore_shared_must_match(tmp_path):
    pair = Pair(tmp_path, dirty=False)
    pair.src.capabilities.set("x-ignore-shared", True)
    pair.src.migrate(pair.dst.connect_uri)
    assert pair.dst.wait(WAIT) is S.FAILED
    assert isinstance(pair.dst.error, StreamError)
    assert pair.dst.error.message == (
        "Capability x-ignore-shared is off, but received capability is on")
    pair.src.wait(WAIT)
    assert_no_migration_threads()


def test_migrate_again_after_completion(tmp_path):
    """The same source migrates twice (completed -> setup is allowed)."""
    first = Pair(tmp_path, dirty=False)
    first.migrate()
    d2 = MigrationDestination(io_timeout=WAIT)
    path = str(tmp_path / "second.sock")
    d2.incoming(f"unix:{path}")
    first.src.migrate(f"unix:{path}")
    assert first.src.wait(WAIT) is S.COMPLETED
    assert d2.wait(WAIT) is S.COMPLETED
    for b in first.blocks:
        assert np.array_equal(d2.blocks[b.idstr].memory, b.memory)
    assert_no_migration_threads()
