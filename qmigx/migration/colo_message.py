"""COLO's messages as bytes, both ways (QEMU's colo_send_message / colo_receive_message).

Sans-IO: the functions here make and check bytes; the COLO threads
(:mod:`qmigx.migration.colo`) move them. A message is a bare be32 (no
type/length framing: the two sides only ever expect one message at a
time); ``vmstate-size`` is followed by a be64 byte count, then that many
bytes of device state, which a secondary must hold in memory before it
applies a checkpoint, hence the cap :data:`MAX_DEVICE_STATE`.
"""

from __future__ import annotations

import struct

from qmigx.errors import ColoError
from qmigx.wire import COLOMessage

__all__ = [
    "MAX_DEVICE_STATE",
    "check_device_state_size",
    "check_message",
    "decode_message",
    "decode_value",
    "encode_message",
    "encode_message_value",
]

#: the largest device-state blob a secondary accepts (QEMU has no cap; a
#: corrupted size would otherwise make it allocate whatever the be64 says)
MAX_DEVICE_STATE = 1 << 30

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def encode_message(msg: COLOMessage) -> bytes:
    """The be32 of one message."""
    return _BE32.pack(COLOMessage(msg))


def encode_message_value(msg: COLOMessage, value: int) -> bytes:
    """A message followed by its be64 value (``vmstate-size``)."""
    return _BE32.pack(COLOMessage(msg)) + _BE64.pack(value)


def decode_message(raw: bytes, *, offset: int | None = None) -> COLOMessage:
    """Four bytes as a message; 7 and more: QEMU's "Invalid message"."""
    if len(raw) != 4:
        raise ColoError(f"Can't receive COLO message: {len(raw)} of 4 bytes", offset=offset,
                        field="colo-message")
    value = _BE32.unpack(raw)[0]
    try:
        return COLOMessage(value)
    except ValueError:
        raise ColoError("colo_receive_message: Invalid message", offset=offset,
                        field="colo-message") from None


def check_message(msg: COLOMessage, expected: COLOMessage, *,
                  offset: int | None = None) -> None:
    """A valid message other than the one the protocol is at: QEMU's "Unexpected" error."""
    if msg != expected:
        raise ColoError(f"Unexpected COLO message {int(msg)}, expected {int(expected)}",
                        offset=offset, field="colo-message")


def decode_value(raw: bytes, msg: COLOMessage, *, offset: int | None = None) -> int:
    """The be64 that follows ``msg``."""
    if len(raw) != 8:
        raise ColoError(f"Failed to get value for COLO message: {msg.qapi_name}",
                        offset=offset, field="colo-value")
    return _BE64.unpack(raw)[0]


def check_device_state_size(size: int, limit: int = MAX_DEVICE_STATE, *,
                            offset: int | None = None) -> None:
    """A ``vmstate-size`` larger than the secondary will hold is refused before any allocation."""
    if size > limit:
        raise ColoError(f"COLO device state of {size} bytes is larger than the {limit} bytes "
                        "accepted", offset=offset, field="vmstate-size")
