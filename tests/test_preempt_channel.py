"""The destination's preempt-channel reader: 7.2's and QEMU 10's conventions.

QEMU 7.2 (and QEMU 10 for machine types up to 7.2) connects the preempt
channel during setup and ends it with a RAM EOS; QEMU 10 for newer machine
types connects it when postcopy starts and never writes the EOS.
"""

from __future__ import annotations

import socket
import struct
import threading
from types import SimpleNamespace

import pytest

from qmigx.compat import migration_compat
from qmigx.errors import ChannelError
from qmigx.migration.preempt import PreemptReader, PreemptWriter
from qmigx.wire import TARGET_PAGE_SIZE, RamFlag


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def readinto_available(self, buf) -> int:
        return self.sock.recv_into(buf)

    def shutdown(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)


class _Placement:
    def __init__(self) -> None:
        self.placed: list = []

    def place(self, blk, off, data) -> None:
        self.placed.append((blk.idstr, off, bytes(data)))

    def place_zero(self, blk, off) -> None:
        self.placed.append((blk.idstr, off, None))


def _reader(expect_eos: bool):
    loader = SimpleNamespace(blocks={"pc.ram": SimpleNamespace(idstr="pc.ram")})
    errors: list = []
    reader = PreemptReader(None, loader, expect_eos=expect_eos)
    placement = _Placement()
    reader.start(placement, errors.append)
    return reader, placement, errors


@pytest.mark.parametrize(("machine", "qemu", "eos"), [
    ("pc-i440fx-7.2", "7.2", True), ("pc-q35-7.2", "10.0", True), ("pc-i440fx-7.1", "10.0", True),
    ("pc-i440fx-8.0", "10.0", False), ("pc-q35-10.0", "10.0", False), ("microvm", "10.0", False),
    ("microvm", "7.2", True)])
def test_machine_type_decides_the_preempt_convention(machine, qemu, eos):
    assert migration_compat(machine, qemu).preempt_pre_7_2 is eos


@pytest.mark.parametrize("expect_eos", [True, False])
def test_channel_attached_after_start_is_read(expect_eos):
    reader, placement, errors = _reader(expect_eos)
    a, b = socket.socketpair()
    try:
        reader.attach(_Channel(b))  # after start(): QEMU 10 connects it at postcopy start
        w = PreemptWriter(a.sendall)
        page = bytes(range(256)) * (TARGET_PAGE_SIZE // 256)
        w.page("pc.ram", 3 * TARGET_PAGE_SIZE, page)
        w.page("pc.ram", 9 * TARGET_PAGE_SIZE, page[::-1])
        w.eos()
        reader.join(5)
    finally:
        a.close()
        b.close()
    assert errors == [] and reader.pages == 2
    assert placement.placed == [("pc.ram", 3 * TARGET_PAGE_SIZE, page),
                                ("pc.ram", 9 * TARGET_PAGE_SIZE, page[::-1])]


@pytest.mark.parametrize("expect_eos", [True, False])
def test_close_without_eos(expect_eos):
    """7.2's channel must end with EOS; QEMU 10's simply closes after its last page."""
    reader, placement, errors = _reader(expect_eos)
    a, b = socket.socketpair()
    try:
        reader.attach(_Channel(b))
        PreemptWriter(a.sendall).page("pc.ram", 0, b"\x01" * TARGET_PAGE_SIZE)
        a.shutdown(socket.SHUT_WR)
        if expect_eos:
            with pytest.raises(ChannelError, match="closed before its EOS"):
                reader.join(5)
            assert len(errors) == 1
        else:
            reader.join(5)
            assert errors == []
    finally:
        a.close()
        b.close()
    assert [p[1] for p in placement.placed] == [0]


@pytest.mark.parametrize("expect_eos", [True, False])
def test_cut_inside_a_record_is_an_error_either_way(expect_eos):
    reader, placement, errors = _reader(expect_eos)
    a, b = socket.socketpair()
    try:
        reader.attach(_Channel(b))
        a.sendall(struct.pack(">QB", RamFlag.PAGE, 6) + b"pc.ram" + b"\x02" * 100)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError, match="inside a record") as e:
            reader.join(5)
    finally:
        a.close()
        b.close()
    assert e.value.offset == 0 and len(errors) == 1
    assert placement.placed == []


def test_stop_before_the_channel_arrives():
    """A migration that ends (or fails) before QEMU 10 connected the channel."""
    reader, placement, errors = _reader(False)
    t = threading.Thread(target=reader.stop)
    t.start()
    t.join(5)
    assert not t.is_alive() and errors == [] and reader.error is None
    a, b = socket.socketpair()
    try:
        reader.attach(_Channel(b))  # late: shut down at once
        assert b.recv(1) == b""
    finally:
        a.close()
        b.close()
