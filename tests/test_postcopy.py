"""Postcopy qmigx to qmigx in one process: real userfaultfd, real faults, real page requests.

A source whose vCPU-like thread dirties its RAM migrates to a destination
with ``postcopy-ram`` (with and without ``postcopy-preempt``, over unix
and tcp); ``start_postcopy()`` switches over while pages are still dirty,
the background stream is throttled with ``max-postcopy-bandwidth``, and
on the destination the vCPU stand-in (:class:`~qmigx.migration.Toucher`)
reads random pages, each missing one a userfaultfd fault turned into a
page request. The destination's memory must equal the source's byte for
byte, the destination must have requested pages and the source served
them (on the preempt channel when it is on). Also: QEMU's refusals for
``migrate-start-postcopy``, the wire sequence (ADVISE, DISCARD, PACKAGED
with LISTEN/RUN, no vmdesc), the preempt record decoder against bad
input, and ADVISE/DISCARD checks on the destination.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time

import numpy as np
import pytest

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.errors import ChannelError, MigrationError, RamStreamError, StreamError
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.migration.postcopy_incoming import PostcopyIncoming, parse_discard
from qmigx.migration.postcopy_source import advise_payload, discard_payload
from qmigx.migration.preempt import PreemptRecords, PreemptWriter
from qmigx.ram import RAMBlock, RAMBlockList, RamLoader
from qmigx.stream import Command, StreamParser
from qmigx.wire import MigCmd
from qemu_support.proxy import Proxy

S = MigrationStatus
PAGE = 4096
WAIT = 30.0


def _uffd_or_skip():
    from qmigx import uffd

    try:
        os.close(uffd.create_uffd(user_mode_only_first=False)[0])
    except uffd.UffdUnavailable as e:
        pytest.skip(f"userfaultfd unavailable here: {e.message}")


def controls(*caps, **params):
    c = Capabilities()
    for name in caps:
        c.set(name, True)
    p = Parameters(capabilities=c)
    p.set({k.replace("_", "-"): v for k, v in params.items()})
    return c, p


class Writer(SimpleGuest):
    """A vCPU stand-in on the source: writes random pages until stopped."""

    def __init__(self, blocks, logs, seed=5):
        super().__init__()
        self.blocks, self.logs = list(blocks), logs
        self.rng = np.random.default_rng(seed)
        self._halt = threading.Event()
        self._t = threading.Thread(target=self._run, name="test-vcpu", daemon=True)
        self._t.start()

    def _run(self):
        while not self._halt.is_set():
            for b in self.blocks:
                n = b.used_length // PAGE
                for p in self.rng.integers(0, n, 16):
                    i = int(p) * PAGE + int(self.rng.integers(0, PAGE - 8))
                    b.memory[i : i + 8] = self.rng.integers(1, 256, 8, dtype=np.uint8)
                    self.logs[b.idstr].mark_dirty(i, 8)
            time.sleep(0.001)

    def stop(self):
        self._halt.set()
        self._t.join(WAIT)
        super().stop()


def _blocks(mib=16):
    rng = np.random.default_rng(3)
    out = RAMBlockList()
    for name, size in (("pc.ram", mib << 20), ("vga.vram", 1 << 20)):
        b = RAMBlock.anonymous(name, size)
        b.memory[:] = rng.integers(0, 256, size, dtype=np.uint8)
        b.memory[: 64 * PAGE] = 0  # some zero pages too
        out.add(b)
    return out


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_postcopy_qmigx_to_qmigx(transport, preempt, tmp_path):
    _uffd_or_skip()
    caps = ["postcopy-ram", "postcopy-blocktime"] + (["postcopy-preempt"] if preempt else [])
    blocks = _blocks()
    logs = {b.idstr: ExplicitDirtyLog(b) for b in blocks}
    dc, dp = controls(*caps)
    dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
    dst.touch_rate = 3000
    ran = threading.Event()
    dst.on_postcopy_run = lambda d: ran.set()
    dst.incoming(f"unix:{tmp_path / 'm.sock'}" if transport == "unix" else "tcp:127.0.0.1:0")
    guest = Writer(blocks, logs)
    sc, sp = controls(*caps, max_bandwidth=32 << 20, max_postcopy_bandwidth=4 << 20,
                      downtime_limit=1)
    src = MigrationSource(blocks, dirty_logs=logs, guest=guest, capabilities=sc, parameters=sp,
                          io_timeout=WAIT)
    try:
        src.migrate(dst.connect_uri)
        time.sleep(0.3)  # a few precopy rounds
        src.start_postcopy()
        assert src.wait(60) is S.COMPLETED, src.error
        assert dst.wait(60) is S.COMPLETED, dst.error
    finally:
        src.cancel()
        dst.cancel()
    assert ran.is_set()
    assert not guest.running, "the source guest must stay stopped after postcopy"
    for b in blocks:
        assert np.array_equal(dst.blocks[b.idstr].memory, b.memory), b.idstr
    pc = dst.postcopy_report()
    assert pc["requests"] > 0 and pc["served"] > 0 and pc["touched"] > 0, pc
    assert (pc["preempt_pages"] > 0) == preempt, pc
    sr = src.postcopy_report()["postcopy"]
    assert sr["requests"] == pc["requests"] and sr["served"] > 0, (sr, pc)
    assert (sr["preempt_pages"] > 0) == preempt
    q = dst.query()
    assert q["postcopy-blocktime"] == pc["blocktime_ms"] and q["postcopy-vcpu-blocktime"] == [
        pc["blocktime_ms"]]
    assert src.query()["ram"]["postcopy-requests"] == pc["requests"]


def test_start_postcopy_refusals():
    blocks = _blocks(1)
    src = MigrationSource(blocks)
    with pytest.raises(MigrationError, match="Enable postcopy with migrate_set_capability"):
        src.start_postcopy()
    c, p = controls("postcopy-ram")
    src = MigrationSource(blocks, capabilities=c, parameters=p)
    with pytest.raises(MigrationError, match="Postcopy must be started after migration"):
        src.start_postcopy()


def test_postcopy_stream_sequence_to_a_file(tmp_path):
    """What a postcopy source writes, read back: ADVISE, DISCARD, PACKAGED(LISTEN..RUN), no vmdesc."""
    _uffd_or_skip()
    blocks = _blocks(2)
    c, p = controls("postcopy-ram")
    dc, dp = controls("postcopy-ram")
    dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
    dst.incoming("tcp:127.0.0.1:0")
    src = MigrationSource(blocks, capabilities=c, parameters=p, io_timeout=WAIT)
    src.c.params.set({"max-bandwidth": 1 << 20})  # precopy must not finish first
    src.migrate(dst.connect_uri)
    src.start_postcopy()
    assert src.wait(WAIT) is S.COMPLETED, src.error
    assert dst.wait(WAIT) is S.COMPLETED, dst.error
    cmds = [c.cmd for c in dst.result.commands]
    assert cmds[:3] == [MigCmd.OPEN_RETURN_PATH, MigCmd.PING, MigCmd.POSTCOPY_ADVISE]
    i = cmds.index(MigCmd.PACKAGED)
    assert MigCmd.POSTCOPY_RAM_DISCARD in cmds[:i]
    assert cmds[i + 1 :] == [MigCmd.POSTCOPY_LISTEN, MigCmd.PING, MigCmd.POSTCOPY_RUN, MigCmd.PING]
    assert dst.result.vmdesc is None
    for b in blocks:
        assert np.array_equal(dst.blocks[b.idstr].memory, b.memory)


def test_advise_payload_and_checks():
    blocks = _blocks(1)
    assert advise_payload(blocks) == struct.pack(">QQ", 4096, 4096)
    huge = RAMBlockList([RAMBlock.anonymous("a", 2 << 20, page_size=2 << 20)])
    assert struct.unpack(">QQ", advise_payload(huge)) == (2 << 20, 4096)
    pc = PostcopyIncoming(RamLoader(None), None, enabled=False)
    with pytest.raises(StreamError, match="RAM postcopy is disabled but have 16 byte advise"):
        pc.advise(advise_payload(blocks), 7)
    pc.advise(b"", 7)  # dirty-bitmaps only: nothing to do
    pc = PostcopyIncoming(RamLoader(None), None, enabled=True)
    with pytest.raises(StreamError, match="RAM postcopy is enabled but have 0 byte advise"):
        pc.advise(b"", 7)
    pc = PostcopyIncoming(RamLoader(RAMBlockList(list(blocks))), None, enabled=True)
    _uffd_or_skip()
    with pytest.raises(StreamError, match="Postcopy needs matching RAM page sizes"):
        pc.advise(advise_payload(huge), 7)


def test_discard_payload_roundtrip_and_refusals():
    raw = discard_payload("pc.ram", [(0, 4096), (8192, 3 * 4096)])
    assert parse_discard(raw) == ("pc.ram", [(0, 4096), (8192, 3 * 4096)])
    p = StreamParser(header=False)  # the parser's own checks accept it
    p.feed(bytes([8]) + struct.pack(">HH", MigCmd.POSTCOPY_RAM_DISCARD, len(raw)) + raw)
    ev = next(e for e in p.events() if isinstance(e, Command))
    assert ev.payload == raw
    blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", 16 * PAGE)])
    blocks["pc.ram"].memory[:] = 7
    loader = RamLoader(blocks)
    pc = PostcopyIncoming(loader, None, enabled=True)
    pc.state = pc.ADVISE
    with pytest.raises(RamStreamError, match="unknown block 'nope'"):
        pc.discard(discard_payload("nope", [(0, 4096)]), 3)
    with pytest.raises(RamStreamError, match="outside block pc.ram"):
        pc.discard(discard_payload("pc.ram", [(15 * PAGE, 2 * PAGE)]), 3)
    with pytest.raises(RamStreamError, match="not page aligned"):
        pc.discard(discard_payload("pc.ram", [(100, PAGE)]), 3)
    loader.placement.attach(list(blocks))
    loader.placement.received["pc.ram"][:] = True  # as if every page had arrived in precopy
    pc.discard(discard_payload("pc.ram", [(PAGE, 2 * PAGE)]), 3)
    rb = loader.placement.received["pc.ram"]
    assert rb.tolist() == [True] + [False] * 2 + [True] * 13


def test_preempt_records_roundtrip_and_bad_input():
    out = io.BytesIO()
    w = PreemptWriter(out.write)
    pages = [bytes([i]) * PAGE for i in range(3)]
    w.page("pc.ram", 0, pages[0])
    w.page("pc.ram", 5 * PAGE, pages[1])
    w.page("vga.vram", PAGE, pages[2])
    w.eos()
    data = out.getvalue()
    dec = PreemptRecords()
    got = []
    for i in range(0, len(data), 1000):  # arbitrary splits
        dec.feed(data[i : i + 1000])
        got += list(dec.records())
    assert [(k, b, o) for k, b, o, _ in got] == [
        ("page", "pc.ram", 0), ("page", "pc.ram", 5 * PAGE), ("page", "vga.vram", PAGE),
        ("eos", None, 0)]
    assert [d for _, _, _, d in got[:3]] == pages
    for bad, what in [(struct.pack(">Q", 0x40), "Unknown combination of migration flags: 0x40"),
                      (struct.pack(">Q", 0x28), "CONTINUE without a block"),
                      (struct.pack(">Q", 0), "Unknown combination")]:
        dec = PreemptRecords()
        dec.feed(bad)
        with pytest.raises(RamStreamError, match=what):
            list(dec.records())


def _wait_state(side, state, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while side.c.state.state is not state:
        assert time.monotonic() < deadline, f"{side.c.state.state} instead of {state}: {side.error}"
        time.sleep(0.01)


def proxied_pair(caps, blocks, *, postcopy_bandwidth: int):
    """A destination reading pages (2000/s) behind a proxy the test can cut, and a source
    whose writer dirties ``blocks``, its postcopy stream throttled to ``postcopy_bandwidth``."""
    logs = {b.idstr: ExplicitDirtyLog(b) for b in blocks}
    dc, dp = controls(*caps)
    dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
    dst.touch_rate = 2000
    dst.incoming("tcp:127.0.0.1:0")
    proxy = Proxy(int(dst.connect_uri.rsplit(":", 1)[1]))
    sc, sp = controls(*caps, max_bandwidth=32 << 20, max_postcopy_bandwidth=postcopy_bandwidth,
                      downtime_limit=1)
    src = MigrationSource(blocks, dirty_logs=logs, guest=Writer(blocks, logs), capabilities=sc,
                          parameters=sp, io_timeout=WAIT)
    return dst, proxy, src


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_postcopy_pause_and_recovery(preempt):
    """The connection is cut mid-postcopy: both sides pause, nothing is lost, recovery completes."""
    _uffd_or_skip()
    caps = ["postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    blocks = _blocks()
    dst, proxy, src = proxied_pair(caps, blocks, postcopy_bandwidth=2 << 20)
    try:
        src.migrate(f"tcp:127.0.0.1:{proxy.port}")
        time.sleep(0.2)
        src.start_postcopy()
        _wait_state(src, S.POSTCOPY_ACTIVE)
        time.sleep(1.0)  # some of the background stream and some requests
        snapshot = {b.idstr: b.memory.copy() for b in blocks}
        proxy.cut()
        _wait_state(src, S.POSTCOPY_PAUSED)
        _wait_state(dst, S.POSTCOPY_PAUSED)
        assert not src.c.done.is_set() and not dst.c.done.is_set()
        for b in blocks:  # the source's memory is intact while paused
            assert np.array_equal(snapshot[b.idstr], b.memory)
        with pytest.raises(MigrationError, match="Cannot resume if there is no paused"):
            MigrationSource(blocks).migrate("tcp:127.0.0.1:1", resume=True)
        uri = dst.recover("tcp:127.0.0.1:0")
        src.migrate(uri, resume=True)
        assert src.wait(60) is S.COMPLETED, src.error
        assert dst.wait(60) is S.COMPLETED, dst.error
    finally:
        src.cancel()
        dst.cancel()
        proxy.cut()
    for b in blocks:
        assert np.array_equal(dst.blocks[b.idstr].memory, b.memory), b.idstr
    pc = dst.postcopy_report()
    assert pc["requests"] > 0, pc


_SENDER = """
import sys, time, os, json
import numpy as np
import qmigx
from qmigx.ram import aligned_array
size, uri, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
w = aligned_array(size)
w[:] = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)
w[: 256 * 4096] = 0
while not os.path.exists(path):
    time.sleep(0.02)
q = qmigx.migrate_memory({"weights": w}, uri, track="none", postcopy=True,
                         parameters={"max-postcopy-bandwidth": 4 << 20}, timeout=120)
print(json.dumps(q["ram"]))
"""


def test_receive_memory_postcopy_arrays_usable_at_once(tmp_path):
    """The program's arrays come back at RUN; its own threads read missing pages (GIL held,
    no deadlock: the pages are fetched by the receiving child) and see the source's bytes.
    The sender is another process, as it would be."""
    _uffd_or_skip()
    import json
    import subprocess
    import sys

    import qmigx

    size = 32 << 20
    want = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)
    want[: 256 * PAGE] = 0
    sock = tmp_path / "pc.sock"
    sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(size), f"unix:{sock}", str(sock)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        arrays = qmigx.receive_memory(f"unix:{sock}", postcopy=True, timeout=60)
        assert arrays.status == "postcopy-active"  # handed over before every page arrived
        got = arrays["weights"]
        # pages far ahead of the throttled background stream: each a fault served on request
        probe = np.arange(size // PAGE - 1, size // PAGE - 400, -7) * PAGE
        for off in probe.tolist():
            assert bytes(got[off : off + 64]) == bytes(want[off : off + 64])
        assert arrays.wait(120) == "completed"
        out, err = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, err
    assert np.array_equal(got, want)
    assert arrays.report["requests"] > 0 and arrays.report["served"] > 0, arrays.report
    assert json.loads(out)["postcopy-requests"] == arrays.report["requests"]


def _hugetlb_block(name: str, size: int) -> RAMBlock:
    """A 2 MiB-page hugetlbfs block (memfd), or a skip with the kernel's reason."""
    import mmap
    import os

    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"no hugetlbfs memfd here: {e}")
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[:1] = b"\0"  # the caller checked the free huge pages: this first touch gets one
    except OSError as e:
        os.close(fd)
        pytest.skip(f"hugetlbfs memory unavailable (vm.nr_hugepages): {e}")
    blk = RAMBlock(name, m, size, page_size=2 << 20, shared=True)
    blk.fd = fd
    return blk


def _free_huge_pages() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("backing", ["memfd", "hugetlbfs"])
def test_postcopy_into_shared_and_huge_page_memory(backing, tmp_path):
    """The destination's RAM is a memfd (shmem) or hugetlbfs with 2 MiB host pages: setup
    entries carry the page size, huge pages are placed whole, each exactly once."""
    _uffd_or_skip()
    size = 8 << 20
    if backing == "hugetlbfs" and _free_huge_pages() < size >> 21:
        pytest.skip(f"{_free_huge_pages()} free 2 MiB huge pages (vm.nr_hugepages), "
                    f"{size >> 21} needed")
    page = (2 << 20) if backing == "hugetlbfs" else PAGE
    rng = np.random.default_rng(4)
    src_blocks = RAMBlockList([RAMBlock.anonymous("pc.ram", size, page_size=page)])
    src_blocks["pc.ram"].memory[:] = rng.integers(0, 256, size, dtype=np.uint8)
    src_blocks["pc.ram"].memory[: 2 << 20] = 0
    dblk = (_hugetlb_block("pc.ram", size) if backing == "hugetlbfs"
            else RAMBlock.memfd("pc.ram", size))
    if backing == "hugetlbfs":
        dblk.memory[:1] = 0
    logs = {b.idstr: ExplicitDirtyLog(b) for b in src_blocks}
    dc, dp = controls("postcopy-ram")
    dst = MigrationDestination(RAMBlockList([dblk]), capabilities=dc, parameters=dp,
                               io_timeout=WAIT)
    dst.touch_rate = 500
    dst.incoming(f"unix:{tmp_path / 'h.sock'}")
    sc, sp = controls("postcopy-ram", max_postcopy_bandwidth=8 << 20)
    src = MigrationSource(src_blocks, dirty_logs=logs, capabilities=sc, parameters=sp,
                          io_timeout=WAIT)
    try:
        src.migrate(dst.connect_uri)
        src.start_postcopy()
        assert src.wait(60) is S.COMPLETED, src.error
        assert dst.wait(60) is S.COMPLETED, dst.error
    finally:
        src.cancel()
        dst.cancel()
    assert dst.result.setup.blocks[0].page_size == (page if backing == "hugetlbfs" else None)
    assert np.array_equal(dblk.memory, src_blocks["pc.ram"].memory)
    assert dst.postcopy.placement.placed_host_pages <= size // page


def test_a_source_that_dies_in_postcopy_leaves_the_destination_paused(tmp_path):
    """SIGKILL of the source process mid-postcopy: the destination pauses (never fails), says
    why, and every page it placed stays placed and correct."""
    _uffd_or_skip()
    import signal
    import subprocess
    import sys

    size = 32 << 20
    want = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)
    want[: 256 * PAGE] = 0
    sock = tmp_path / "pc.sock"
    dc, dp = controls("postcopy-ram")
    dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
    dst.touch_rate = 1000
    ran = threading.Event()
    dst.on_postcopy_run = lambda d: ran.set()
    dst.incoming(f"unix:{sock}")
    code = _SENDER.replace('{"max-postcopy-bandwidth": 4 << 20}', '{"max-postcopy-bandwidth": 1 << 20}')
    sender = subprocess.Popen([sys.executable, "-c", code, str(size), f"unix:{sock}", str(sock)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ran.wait(60), "postcopy never ran"
        time.sleep(1.0)
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
        _wait_state(dst, S.POSTCOPY_PAUSED)
        assert not dst.c.done.is_set()
        assert dst.query()["status"] == "postcopy-paused"
        assert isinstance(dst.pause_reason, (StreamError, ChannelError)), repr(dst.pause_reason)
        got = dst.blocks["weights"].memory
        rb = dst.postcopy.placement.received["weights"]
        placed = np.flatnonzero(rb)
        assert 0 < len(placed) < len(rb)
        for p in placed[:: max(1, len(placed) // 500)].tolist():  # placed pages: no fault
            assert bytes(got[p * PAGE : (p + 1) * PAGE]) == bytes(want[p * PAGE : (p + 1) * PAGE])
    finally:
        if sender.poll() is None:
            sender.kill()
        dst.cancel()
    assert dst.wait(10) is S.POSTCOPY_PAUSED  # cancelled while paused: still not "failed"


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "memfd"])
def test_dropped_runs_read_as_zeros_and_nothing_else_moves(shared):
    """LISTEN's drop of stale pages: exactly the runs given become missing (zeros)."""
    import mmap

    from qmigx._core import uffd as kernel

    n = 64 * 4096
    fd = os.memfd_create("qmigx-drop") if shared else -1
    try:
        if shared:
            os.ftruncate(fd, n)
            m = mmap.mmap(fd, n, mmap.MAP_SHARED)
        else:
            m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem = np.frombuffer(m, np.uint8)
        mem[:] = 0x5A
        starts = np.array([0, 5 * 4096, 40 * 4096], np.int64)
        lengths = np.array([4096, 3 * 4096, 0], np.int64)
        assert kernel.drop_runs(int(mem.ctypes.data), fd, starts, lengths) == 0
        pages = mem.reshape(-1, 4096)
        gone = {0, 5, 6, 7}
        for i in range(64):
            assert (pages[i] == (0 if i in gone else 0x5A)).all(), i
        if shared:  # the file's pages are gone too, not only this mapping's
            assert os.pread(fd, 4096, 5 * 4096) == bytes(4096)
            assert os.pread(fd, 1, 4 * 4096) == b"\x5a"
        with pytest.raises(ValueError):
            kernel.drop_runs(int(mem.ctypes.data), fd, starts, lengths[:2])
        del mem, pages
        m.close()
    finally:
        if shared:
            os.close(fd)
