"""Return-path messages: QEMU 7.2's verified bytes, validation, chunked input."""

from __future__ import annotations

import pytest

from qmigx.errors import ReturnPathError
from qmigx.returnpath import ReturnPathParser, encode, pong, req_pages, shut, switchover_ack
from qmigx.wire import MigRpMsg


def parse(data: bytes) -> list:
    p = ReturnPathParser()
    p.feed(data)
    return list(p.messages())


def test_verified_bytes_from_qemu_7_2():
    assert pong(1) == bytes.fromhex("0002000400000001")
    assert shut(0) == bytes.fromhex("0001000400000000")
    assert req_pages(0xC0000, 0x1000, "pc.ram") == bytes.fromhex(
        "00030013" "00000000000c0000" "00001000" "06") + b"pc.ram"
    assert req_pages(0xC1000, 0x1000) == bytes.fromhex("0004000c00000000000c100000001000")


def test_round_trip_byte_by_byte():
    data = pong(7) + req_pages(4096, 4096, "mem0") + req_pages(8192, 4096) + shut(1)
    p = ReturnPathParser()
    got = []
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        got.extend(p.messages())
    assert [(m.type, m.value, m.start, m.block) for m in got] == [
        (MigRpMsg.PONG, 7, None, None), (MigRpMsg.REQ_PAGES_ID, None, 4096, "mem0"),
        (MigRpMsg.REQ_PAGES, None, 8192, None), (MigRpMsg.SHUT, 1, None, None)]
    assert [m.offset for m in got] == [0, 8, 8 + 21, 8 + 21 + 16]


@pytest.mark.parametrize("data,field", [
    (encode(0, b""), "type"),
    (encode(8, b""), "type"),
    (encode(MigRpMsg.SWITCHOVER_ACK, b"\0"), "len"),   # QEMU 10: no payload
    (bytes.fromhex("00020003000000"), "len"),           # PONG of 3 bytes
    (encode(MigRpMsg.RESUME_ACK, b"\0\0\0\2"), "value"),
    (encode(MigRpMsg.REQ_PAGES_ID, b"\0" * 12 + b"\x05ab"), "len"),
    (bytes.fromhex("00030201"), "len"),                  # longer than 512 bytes
])
def test_malformed_messages(data, field):
    with pytest.raises(ReturnPathError) as ei:
        parse(data)
    assert ei.value.field == field and ei.value.offset == 0


def test_switchover_ack_is_qemu_10s():
    """Type 7 is QEMU 10's SWITCHOVER_ACK (00 07 00 00, qemu10.md §6); a 7.2 source refuses it."""
    assert switchover_ack() == bytes.fromhex("00070000")
    assert [m.type for m in parse(switchover_ack() + pong(1))] == [MigRpMsg.SWITCHOVER_ACK,
                                                                   MigRpMsg.PONG]
    old = ReturnPathParser(max_type=MigRpMsg.RESUME_ACK)
    old.feed(switchover_ack())
    with pytest.raises(ReturnPathError) as ei:
        list(old.messages())
    assert ei.value.field == "type" and "0x0007" in str(ei.value)
