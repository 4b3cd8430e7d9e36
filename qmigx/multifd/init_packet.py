"""Multifd init packets: the first 64 bytes of every multifd channel (spec multifd.md §2).

The source's UUID and the channel's number, once per channel: plain
Python, unlike the packet headers that come every 512 KiB of pages
(:mod:`qmigx.multifd.packet`).
"""

from __future__ import annotations

import operator
import struct
from typing import Any

from qmigx.errors import MultifdPacketError
from qmigx.wire import MULTIFD_MAGIC, MULTIFD_VERSION

__all__ = ["INIT_PACKET_SIZE", "InitPacket", "pack_init_packet", "unpack_init_packet"]

INIT_PACKET_SIZE = 64

# (field, offset, size), in wire order
_INIT_FIELDS = (
    ("magic", 0, 4),
    ("version", 4, 4),
    ("uuid", 8, 16),
    ("id", 24, 1),
    ("unused", 25, 39),
)


def _as_uint(value: Any, name: str, top: int) -> int:
    value = operator.index(value)
    if not 0 <= value <= top:
        raise OverflowError(f"{name} must be in 0..{top}, not {value}")
    return value


def _readable(obj: Any) -> memoryview:
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise TypeError("buf must be a C-contiguous buffer")
    return mv.cast("B") if (mv.format, mv.ndim) != ("B", 1) else mv


def _truncated(n: int) -> MultifdPacketError:
    for name, where, size in _INIT_FIELDS:
        if n < where + size:
            return MultifdPacketError(
                f"packet truncated: {n} bytes, the header needs {INIT_PACKET_SIZE}",
                field=name, offset=where)
    return MultifdPacketError(f"packet truncated: {n} bytes", offset=n)  # pragma: no cover




class InitPacket:
    """The first 64 bytes of a multifd channel: the source's UUID and the channel number."""

    __slots__ = ("uuid", "channel_id")

    def __init__(self, uuid: bytes, channel_id: int) -> None:
        self.uuid = bytes(uuid)
        self.channel_id = channel_id

    def to_dict(self) -> dict:
        """The fields as a plain dict (for comparisons and logging)."""
        return {"uuid": self.uuid, "channel_id": self.channel_id}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"InitPacket(uuid={self.uuid.hex()}, channel_id={self.channel_id})"


def pack_init_packet(uuid: bytes | None, channel_id: int) -> bytes:
    """The 64-byte init packet; ``uuid=None`` sends 16 zero bytes (a VM without ``-uuid``)."""
    raw = b"\0" * 16 if uuid is None else bytes(uuid)
    if len(raw) != 16:
        raise ValueError(f"uuid must be 16 bytes, not {len(raw)}")
    cid = _as_uint(channel_id, "channel_id", 255)
    return struct.pack(">II16sB", MULTIFD_MAGIC, MULTIFD_VERSION, raw, cid) + bytes(39)


def unpack_init_packet(buf: Any, *, channels: int, uuid: bytes | None = None) -> InitPacket:
    """Validate an init packet; refuses ``id >= channels`` (QEMU only ``id > channels``)."""
    nch = _as_uint(channels, "channels", 255)
    own = b"\0" * 16 if uuid is None else bytes(uuid)
    if len(own) != 16:
        raise ValueError(f"uuid must be 16 bytes, not {len(own)}")
    b = _readable(buf)
    if len(b) < INIT_PACKET_SIZE:
        raise _truncated(len(b))
    magic, version, got, cid = struct.unpack_from(">II16sB", b)
    if magic != MULTIFD_MAGIC:
        raise MultifdPacketError(
            f"init packet magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}",
            field="magic",
            offset=0,
        )
    if version != MULTIFD_VERSION:
        raise MultifdPacketError(
            f"init packet version {version}, expected {MULTIFD_VERSION}", field="version", offset=4
        )
    if got != own:
        raise MultifdPacketError(
            f"init packet uuid {got.hex()} differs from ours {own.hex()}", field="uuid", offset=8
        )
    if cid >= nch:
        raise MultifdPacketError(
            f"init packet channel id {cid} but only {nch} channels", field="id", offset=24
        )
    return InitPacket(got, cid)
