"""COLO checkpoints between a qmigx primary and a qmigx secondary, in one process.

A primary whose stand-in vCPU keeps writing into its RAM checkpoints to a
secondary; the secondary's RAM must equal the primary's at the last
complete checkpoint, byte for byte, after a failover on either side. A
checkpoint spoiled on the wire (an invalid or unexpected message, a RAM
part or device state cut short, garbage device state, an oversize
``vmstate-size``) must end in a typed error on the secondary and leave its
RAM exactly as the checkpoint before left it. The message codec and the
failover state machine are checked on their own first.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.errors import CapabilityError, ColoError, StateError, StreamError
from qmigx.migration import MigrationDestination, MigrationSource
from qmigx.migration.colo_failover import ColoStatus, FailoverState
from qmigx.migration.colo_message import (
    check_device_state_size,
    check_message,
    decode_message,
    decode_value,
    encode_message,
    encode_message_value,
)
from qmigx.synthetic import synthetic_blocks
from qmigx.wire import COLOMessage, COLOMode, FailoverStatus, SectionType

S = MigrationStatus
PAGE = 4096
WAIT = 20.0


def wait_for(pred, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


# --- the message codec ------------------------------------------------------------------------

def test_messages_are_bare_be32_and_the_size_a_be64():
    assert encode_message(COLOMessage.CHECKPOINT_REQUEST) == b"\0\0\0\x01"
    assert encode_message_value(COLOMessage.VMSTATE_SIZE, 12889) == (
        b"\0\0\0\x04" + (12889).to_bytes(8, "big"))
    for m in COLOMessage:
        assert decode_message(encode_message(m)) is m
    assert decode_value((12889).to_bytes(8, "big"), COLOMessage.VMSTATE_SIZE) == 12889
    assert [m.qapi_name for m in COLOMessage] == [
        "checkpoint-ready", "checkpoint-request", "checkpoint-reply", "vmstate-send",
        "vmstate-size", "vmstate-received", "vmstate-loaded"]


@pytest.mark.parametrize("value", [7, 8, 0x100, 0xFFFFFFFF])
def test_a_message_of_seven_or_more_is_invalid(value):
    with pytest.raises(ColoError) as ei:
        decode_message(value.to_bytes(4, "big"), offset=40)
    assert ei.value.message == "colo_receive_message: Invalid message"
    assert ei.value.offset == 40


def test_an_unexpected_message_names_both_values():
    with pytest.raises(ColoError) as ei:
        check_message(COLOMessage.VMSTATE_SIZE, COLOMessage.VMSTATE_SEND)
    assert ei.value.message == "Unexpected COLO message 4, expected 3"
    check_message(COLOMessage.VMSTATE_SEND, COLOMessage.VMSTATE_SEND)


def test_cut_messages_and_oversize_device_state_are_refused():
    with pytest.raises(ColoError, match="Can't receive COLO message"):
        decode_message(b"\0\0\0")
    with pytest.raises(ColoError, match="Failed to get value for COLO message: vmstate-size"):
        decode_value(b"\0" * 7, COLOMessage.VMSTATE_SIZE)
    with pytest.raises(ColoError) as ei:
        check_device_state_size(1 << 40, 1 << 30)
    assert ei.value.field == "vmstate-size"
    check_device_state_size(1 << 30, 1 << 30)


# --- failover state machine and query-colo-status -----------------------------------------------

def test_a_second_failover_request_is_refused():
    woken = []
    fs = FailoverState(on_request=lambda: woken.append(1))
    fs.request()
    assert fs.state is FailoverStatus.REQUIRE and woken == [1]
    with pytest.raises(StateError, match="COLO failover is already activated"):
        fs.request()
    assert fs.set_state(FailoverStatus.NONE, FailoverStatus.ACTIVE) is FailoverStatus.REQUIRE
    assert fs.state is FailoverStatus.REQUIRE  # compare-and-set: nothing moved


def test_colo_status_outside_during_and_after_colo():
    st = ColoStatus()
    assert st.query() == {"mode": "none", "last-mode": "none", "reason": "none"}
    with pytest.raises(StateError, match="The feature 'colo' is not enabled"):
        st.check_enabled()
    st.enter(COLOMode.SECONDARY)
    assert st.query() == {"mode": "secondary", "last-mode": "none", "reason": "none"}
    st.failover.request()
    assert st.query()["reason"] == "processing"
    st.failover.set_state(FailoverStatus.REQUIRE, FailoverStatus.ACTIVE)
    st.failover.set_state(FailoverStatus.ACTIVE, FailoverStatus.COMPLETED)
    from qmigx.wire import COLOExitReason

    st.leave(COLOExitReason.REQUEST)
    assert st.query() == {"mode": "none", "last-mode": "secondary", "reason": "request"}


# --- qmigx primary and secondary ----------------------------------------------------------------

class WriterGuest:
    """A stand-in vCPU writing random pages while it runs and ``writing`` is set.

    ``stop()`` waits for the batch being written, as stopping a VM stops
    its vCPUs, so nothing is written while a checkpoint is taken.
    """

    def __init__(self, blocks, logs, seed: int = 5) -> None:
        self.blocks, self.logs = list(blocks), logs
        self.rng = np.random.default_rng(seed)
        self.running = True
        self.writing = True
        self.writes = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-vcpu", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(0.0005):
            with self._lock:
                if not (self.running and self.writing):
                    continue
                for blk in self.blocks:
                    mem = blk.memory
                    for p in self.rng.integers(0, len(mem) // PAGE, 8):
                        i = int(p) * PAGE + int(self.rng.integers(0, PAGE - 8))
                        mem[i : i + 8] = self.rng.integers(0, 256, 8, dtype=np.uint8)
                        self.logs[blk.idstr].mark_dirty(i, 8)
                self.writes += 1

    def stop(self) -> None:
        with self._lock:
            self.running = False

    def start(self) -> None:
        self.running = True

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        pass

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)


def _controls(*caps, **params):
    c = Capabilities()
    for name in caps:
        c.set(name, True)
    p = Parameters(capabilities=c)
    p.set({k.replace("_", "-"): v for k, v in params.items()})
    return c, p


class ColoPair:
    """A secondary listening on a unix socket and a primary in COLO with it."""

    def __init__(self, tmp_path, *, ram: int = 4 << 20, delay_ms: int = 1, caps=()) -> None:
        self.blocks = synthetic_blocks(ram)
        self.logs = {b.idstr: ExplicitDirtyLog(b) for b in self.blocks}
        self.guest = WriterGuest(self.blocks, self.logs)
        self.events: list = []
        dc, dp = _controls("events")
        self.dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
        self.dst.events.subscribe(self.events.append)
        self.dst.incoming(f"unix:{tmp_path / 'colo.sock'}")
        sc, sp = _controls("events", "x-colo", *caps, x_checkpoint_delay=delay_ms)
        self.src = MigrationSource(self.blocks, dirty_logs=self.logs, guest=self.guest,
                                   capabilities=sc, parameters=sp, io_timeout=WAIT)
        self.src.events.subscribe(self.events.append)

    def start(self, checkpoints: int = 1) -> None:
        self.src.migrate(self.dst.connect_uri)
        # the secondary may count a checkpoint a moment before the primary's thread shows colo
        wait_for(lambda: self.src.colo is not None and self.dst.colo is not None
                 and self.dst.colo.checkpoints >= checkpoints
                 and self.src.state.state is S.COLO, f"{checkpoints} checkpoints")
        assert self.src.state.state is S.COLO and self.dst.state.state is S.COLO

    def settle(self) -> list:
        """Stop the writer, take one more checkpoint, return the primary's RAM as it now stays."""
        self.guest.writing = False
        n = self.dst.colo.checkpoints
        self.src.colo.checkpoint_now()
        wait_for(lambda: self.dst.colo.checkpoints > n, "a checkpoint after the last write")
        return [np.array(b.memory, copy=True) for b in self.blocks]

    def secondary_ram(self) -> list:
        return [np.array(self.dst.blocks[b.idstr].memory, copy=True) for b in self.blocks]

    def colo_exits(self) -> list:
        return [e["data"] for e in self.events if e["event"] == "COLO_EXIT"]

    def close(self) -> None:
        self.guest.close()
        for side in (self.src, self.dst):
            if side.colo is not None and side.colo_status.mode is not COLOMode.NONE:
                try:
                    side.colo.lost_heartbeat()
                except StateError:
                    pass
        self.src.wait(WAIT)
        self.dst.wait(WAIT)


@pytest.fixture
def pair(tmp_path):
    pairs = []

    def make(**kw) -> ColoPair:
        p = ColoPair(tmp_path, **kw)
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        p.close()


def test_a_hundred_checkpoints_under_a_dirtying_writer_then_secondary_failover(pair):
    p = pair()
    p.start(checkpoints=100)
    rows = p.src.colo.log.rows
    assert sum(r["dirty_pages"] for r in rows) > 0  # the writer's pages went over
    assert p.guest.writes > 0
    want = p.settle()
    p.dst.colo.lost_heartbeat()
    assert p.dst.wait(WAIT) is S.COMPLETED
    assert p.dst.colo_status.query() == {"mode": "none", "last-mode": "secondary",
                                          "reason": "request"}
    for got, exp in zip(p.secondary_ram(), want):
        assert np.array_equal(got, exp)
    assert {"mode": "secondary", "reason": "request"} in p.colo_exits()
    assert p.dst.capabilities.get("x-colo")  # as QEMU: still on after failover
    # the primary lost its secondary: it goes on alone, running
    assert p.src.wait(WAIT) is S.COMPLETED
    assert p.guest.running
    assert {"mode": "primary", "reason": "error"} in p.colo_exits()


def test_primary_failover_continues_alone_and_the_secondary_holds_the_last_checkpoint(pair):
    p = pair()
    p.start(checkpoints=5)
    want = p.settle()
    p.src.colo.lost_heartbeat()
    assert p.src.wait(WAIT) is S.COMPLETED
    assert p.src.colo_status.query() == {"mode": "none", "last-mode": "primary",
                                          "reason": "request"}
    assert {"mode": "primary", "reason": "request"} in p.colo_exits()
    assert p.guest.running
    with pytest.raises(StateError, match="The feature 'colo' is not enabled"):
        p.src.colo.lost_heartbeat()
    assert p.dst.wait(WAIT) is S.COMPLETED  # the primary's connection ended: failover
    for got, exp in zip(p.secondary_ram(), want):
        assert np.array_equal(got, exp)


def test_a_checkpoint_restarts_a_primary_the_user_stopped(pair):
    p = pair(delay_ms=60000)
    p.start(checkpoints=0)
    wait_for(lambda: p.guest.running, "the primary running after checkpoint-ready")
    p.guest.stop()
    n = p.dst.colo.checkpoints
    p.src.colo.checkpoint_now()
    wait_for(lambda: p.src.colo.log.count > n, "a checkpoint on demand")
    assert p.guest.running


def test_changing_the_delay_in_colo_checkpoints_at_once(pair):
    p = pair(delay_ms=60000)
    p.start(checkpoints=0)
    time.sleep(0.2)
    assert p.src.colo.log.count == 0  # a minute to the first one
    p.src.parameters.set({"x-checkpoint-delay": 50000})
    wait_for(lambda: p.src.colo.log.count >= 1, "a checkpoint after the change")


@pytest.mark.parametrize("cap", ["multifd", "return-path"])
def test_colo_with_what_it_cannot_checkpoint_is_refused(tmp_path, cap):
    sc, sp = _controls("x-colo", cap)
    src = MigrationSource(synthetic_blocks(1 << 20), capabilities=sc, parameters=sp)
    with pytest.raises(CapabilityError, match=f"COLO is not supported with {cap}"):
        src.migrate(f"unix:{tmp_path / 'none.sock'}")
    assert src.state.state is S.NONE


# --- spoiled checkpoints -----------------------------------------------------------------------

def _spoiled_checkpoint(colo, fault: str) -> None:
    """One checkpoint as the primary would send it, spoiled by ``fault``."""
    f, w = colo.f, colo.w
    colo._send(COLOMessage.CHECKPOINT_REQUEST)
    colo._expect(COLOMessage.CHECKPOINT_REPLY)
    colo.side.guest.stop()
    if fault == "invalid-message":
        f.write(b"\0\0\0\x09")
        f.flush()
        return
    if fault == "unexpected-message":
        colo._send(COLOMessage.VMSTATE_LOADED)
        return
    colo._send(COLOMessage.VMSTATE_SEND)
    w.section_header(SectionType.SECTION_END, colo.ram_section)
    colo.ram.complete(colo.rw, last_stage=False)
    colo.rw.eos()
    w.footer(colo.ram_section)
    if fault == "ram-cut":  # the pages went, the primary died before EOF
        f.flush()
        colo.channel.shutdown()
        return
    w.eof()
    blob = colo.device_state()
    if fault == "oversize":
        f.write(encode_message_value(COLOMessage.VMSTATE_SIZE, 1 << 40))
    elif fault == "devices-cut":
        f.write(encode_message_value(COLOMessage.VMSTATE_SIZE, len(blob) + 100))
        f.write(blob)
        f.flush()
        colo.channel.shutdown()
        return
    elif fault == "garbage-devices":
        junk = b"\x09garbage" + bytes(range(256))
        f.write(encode_message_value(COLOMessage.VMSTATE_SIZE, len(junk)))
        f.write(junk)
    elif fault == "bytes-after-eof":
        f.write(encode_message_value(COLOMessage.VMSTATE_SIZE, len(blob) + 3))
        f.write(blob + b"\x00\x00\x00")
    f.flush()


FAULTS = {
    "invalid-message": "colo_receive_message: Invalid message",
    "unexpected-message": "Unexpected COLO message 6, expected 3",
    "ram-cut": "",
    "oversize": "larger than",
    "devices-cut": "VMState data, less than expected",
    "garbage-devices": "Unknown savevm section type 9",
    "bytes-after-eof": "bytes after the EOF of COLO device state",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_spoiled_checkpoint_is_a_typed_error_and_leaves_the_secondary_ram_alone(pair, fault):
    p = pair(delay_ms=60000)
    p.start(checkpoints=0)
    want = p.settle()
    # new content in many pages, then a checkpoint that carries it but goes wrong
    for b in p.blocks:
        n = min(64, len(b.memory) // PAGE) * PAGE
        b.memory[:n] ^= 0xA5
        p.logs[b.idstr].mark_dirty(0, n)
    spoiled = threading.Event()
    colo = p.src.colo

    def once():
        colo.checkpoint = real
        spoiled.set()
        _spoiled_checkpoint(colo, fault)
        colo._expect(COLOMessage.VMSTATE_LOADED)  # never comes: the secondary failed over
        return {}

    real = colo.checkpoint
    colo.checkpoint = once
    colo.checkpoint_now()
    assert p.dst.wait(WAIT) is S.COMPLETED
    assert spoiled.is_set()
    err = p.dst.colo.error
    assert isinstance(err, StreamError), err  # ColoError and the stream's errors alike
    if fault != "ram-cut":
        assert FAULTS[fault] in str(err)
    assert p.dst.colo_status.query()["reason"] == "error"
    assert {"mode": "secondary", "reason": "error"} in p.colo_exits()
    for got, exp in zip(p.secondary_ram(), want):
        assert np.array_equal(got, exp)
    assert not np.array_equal(p.secondary_ram()[0], list(p.blocks)[0].memory)
    assert p.src.wait(WAIT) is S.COMPLETED


def test_xbzrle_pages_in_checkpoints_decode_against_the_secondary_cache(pair):
    p = pair(caps=("xbzrle",))
    p.src.parameters.set({"xbzrle-cache-size": 1 << 20})
    p.start(checkpoints=30)
    assert p.src.ram.xbzrle_pages > 0  # pages went as deltas against the last checkpoint's
    want = p.settle()
    p.dst.colo.lost_heartbeat()
    assert p.dst.wait(WAIT) is S.COMPLETED
    for got, exp in zip(p.secondary_ram(), want):
        assert np.array_equal(got, exp)


def test_a_checkpoint_on_the_wire_is_what_qemu_sends(pair):
    """The bytes of one checkpoint, as verified between two QEMU 7.2 (END of ram, a
    CONTINUE page, EOS, footer, EOF, then vmstate-size and a blob ending in EOF)."""
    p = pair(delay_ms=60000)
    p.start(checkpoints=0)
    p.settle()
    ram = p.blocks["pc.ram"]
    log = p.logs["pc.ram"]
    colo = p.dst.colo
    for page in (0x3000, 0x10000):  # the first leaves pc.ram the block of the last record
        ram.memory[page : page + 8] ^= 0xFF
        log.mark_dirty(page, 8)
        if page == 0x3000:
            n = colo.checkpoints
            p.src.colo.checkpoint_now()
            wait_for(lambda: colo.checkpoints > n, "a checkpoint")
    seen = bytearray()
    waiting = threading.Event()
    real = colo.channel.readinto_available

    def tee(buf):
        waiting.set()
        k = real(buf)
        seen.extend(bytes(buf[:k]))
        return k

    colo.channel.readinto_available = tee
    colo._direct_possible = lambda: False  # pages read straight off the socket would bypass the tee
    # the secondary polls for the next request: once it reads through the tee, ask
    assert waiting.wait(WAIT)
    n = colo.checkpoints
    p.src.colo.checkpoint_now()
    wait_for(lambda: colo.checkpoints > n, "the recorded checkpoint")
    sid = p.src.ram_section_id
    head = (b"\0\0\0\x01" + b"\0\0\0\x03" + bytes([SectionType.SECTION_END]) + sid.to_bytes(4, "big")
            + (0x10000 | 0x28).to_bytes(8, "big"))
    assert bytes(seen[: len(head)]) == head
    at = len(head)
    assert bytes(seen[at : at + 4096]) == bytes(ram.memory[0x10000:0x11000])
    at += 4096
    tail = (0x10).to_bytes(8, "big") + b"\x7e" + sid.to_bytes(4, "big") + b"\x00" + b"\0\0\0\x04"
    assert bytes(seen[at : at + len(tail)]) == tail
    at += len(tail)
    size = int.from_bytes(seen[at : at + 8], "big")
    blob = bytes(seen[at + 8 : at + 8 + size])
    assert len(blob) == size and blob[0] == SectionType.SECTION_FULL and blob[-1] == 0
    assert len(seen) == at + 8 + size  # nothing else: the rest goes the other way


def test_the_secondary_guest_writes_are_put_back_by_each_checkpoint(pair):
    p = pair(delay_ms=5)
    p.start(checkpoints=1)
    own = [p.dst.blocks[b.idstr] for b in p.blocks]
    logs = {b.idstr: ExplicitDirtyLog(b) for b in own}
    svm = WriterGuest(own, logs, seed=9)  # the secondary's guest runs between checkpoints
    try:
        p.dst.colo.dirty_logs = logs
        p.dst.colo.guest = svm
        n = p.dst.colo.checkpoints
        wait_for(lambda: p.dst.colo.checkpoints >= n + 20 and svm.writes > 0, "20 checkpoints")
        rows = p.dst.colo.log.rows[n:]
        assert any(r["flushed_pages"] > r["dirty_pages"] for r in rows)  # own pages put back
        svm.writing = False
        want = p.settle()  # this checkpoint also puts back what the secondary wrote last
        p.dst.colo.lost_heartbeat()
        assert p.dst.wait(WAIT) is S.COMPLETED
        assert svm.running  # the secondary goes on as the new primary
    finally:
        svm.close()
    for got, exp in zip(p.secondary_ram(), want):
        assert np.array_equal(got, exp)
