"""The return path: messages from destination to source (stream.md §8).

Sans-IO both ways: :func:`encode` makes a message's bytes, and
:class:`ReturnPathParser` turns received bytes into :class:`RpMessage`
values, validating them as QEMU's source does (type, length, block-name
length). Page requests (postcopy) are parsed here too, so the postcopy
engine finds them ready.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

from qmigx.errors import ReturnPathError
from qmigx.wirelock import LockedWriter
from qmigx.wire import MAX_RP_MESSAGE_LEN, MIGRATION_RESUME_ACK_VALUE, MigRpMsg

__all__ = ["RpMessage", "encode", "shut", "pong", "req_pages", "recv_bitmap", "resume_ack",
           "switchover_ack", "ReturnPathParser", "ReturnPathWriter"]

_FIXED = {MigRpMsg.SHUT: 4, MigRpMsg.PONG: 4, MigRpMsg.REQ_PAGES: 12, MigRpMsg.RESUME_ACK: 4,
          MigRpMsg.SWITCHOVER_ACK: 0}


@dataclass(frozen=True)
class RpMessage:
    """One return-path message; ``value`` for SHUT/PONG/RESUME_ACK, pages for requests."""

    type: MigRpMsg
    payload: bytes
    offset: int
    value: Optional[int] = None
    start: Optional[int] = None
    length: Optional[int] = None
    block: Optional[str] = None
    #: RECV_BITMAP: the received-page bitmap that followed it (little-endian bit order)
    bitmap: Optional[bytes] = None


def encode(msg_type: MigRpMsg, payload: bytes = b"") -> bytes:
    """A message: be16 type, be16 length, payload."""
    return struct.pack(">HH", msg_type, len(payload)) + payload


def shut(status: int = 0) -> bytes:
    """SHUT: the destination is done; non-zero means it failed."""
    return encode(MigRpMsg.SHUT, struct.pack(">I", status))


def pong(value: int) -> bytes:
    return encode(MigRpMsg.PONG, struct.pack(">I", value))


def req_pages(start: int, length: int, block: Optional[str] = None) -> bytes:
    """A postcopy page request; with ``block``, the REQ_PAGES_ID form."""
    if block is None:
        return encode(MigRpMsg.REQ_PAGES, struct.pack(">QI", start, length))
    raw = block.encode()
    return encode(MigRpMsg.REQ_PAGES_ID, struct.pack(">QIB", start, length, len(raw)) + raw)


def recv_bitmap(block: str) -> bytes:
    """RECV_BITMAP: the received-page bitmap of ``block`` follows on the main channel."""
    raw = block.encode()
    return encode(MigRpMsg.RECV_BITMAP, bytes((len(raw),)) + raw)


#: the be64 that ends a received bitmap (postcopy.md §6)
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
#: the largest bitmap a destination may announce (2 TiB of 4 KiB pages)
MAX_RECV_BITMAP = 1 << 26


def recv_bitmap_blob(received) -> bytes:
    """be64 size, the bitmap (bit p = page p, little-endian bit order, whole be64 words), marker."""
    import numpy as np

    bits = np.packbits(np.asarray(received, bool), bitorder="little").tobytes()
    bits += bytes(-len(bits) % 8)
    return struct.pack(">Q", len(bits)) + bits + struct.pack(">Q", RECV_BITMAP_ENDING)


def resume_ack(value: int = MIGRATION_RESUME_ACK_VALUE) -> bytes:
    return encode(MigRpMsg.RESUME_ACK, struct.pack(">I", value))


def switchover_ack() -> bytes:
    """SWITCHOVER_ACK (QEMU 10, ``switchover-ack``): the source may switch over."""
    return encode(MigRpMsg.SWITCHOVER_ACK)


class ReturnPathWriter(LockedWriter):
    """The destination's one writer of return-path messages (QEMU's rp_mutex).

    The load thread answers PINGs and sends SHUT, a postcopy fault thread
    sends page requests, recovery sends RECV_BITMAP and RESUME_ACK: each
    message goes out whole under one lock, so messages of different
    threads never interleave. ``write`` is the channel's (e.g.
    ``Channel.write``); after :meth:`close` messages are dropped.

    Given the channel's socket (:meth:`for_channel`), the compiled postcopy
    fault loop writes its page requests under the same lock.
    """

    what = "return-path"

    @property
    def closed(self) -> bool:
        return bool(self.lock.closed)

    @property
    def sent(self) -> int:
        """Messages written (by Python and by the compiled fault loop)."""
        return int(self.lock.sent)

    def send_locked(self, message: bytes) -> bool:
        """Write ``message`` with :attr:`lock` already held; False if closed (dropped)."""
        if self.lock.closed:
            return False
        self._write(message)
        self.lock.sent += 1
        return True

    def send(self, message: bytes) -> None:
        with self.lock:
            self.send_locked(message)

    def shut(self, status: int = 0) -> None:
        self.send(shut(status))

    def pong(self, value: int) -> None:
        self.send(pong(value))

    def req_pages(self, start: int, length: int, block: Optional[str] = None) -> None:
        self.send(req_pages(start, length, block))

    def switchover_ack(self) -> None:
        self.send(switchover_ack())

    def recv_bitmap(self, block: str, received) -> None:
        """RECV_BITMAP and the block's received bitmap right after it, as one write."""
        self.send(recv_bitmap(block) + recv_bitmap_blob(received))

    def resume_ack(self) -> None:
        self.send(resume_ack())

    def close(self) -> None:
        with self.lock:
            self.lock.closed = True


class ReturnPathParser:
    """Parses the return-path byte stream, as the source reads it.

    ``max_type`` is the last message type the source's QEMU knows: QEMU
    7.2 marks the return path bad at a SWITCHOVER_ACK (type 7), which
    only QEMU 10's sources read.
    """

    def __init__(self, max_type: int = max(MigRpMsg)) -> None:
        self._buf = bytearray()
        self._base = 0
        self.max_type = max_type
        self._bitmap_of: Optional[RpMessage] = None  # a RECV_BITMAP waiting for its bitmap

    def feed(self, data) -> None:
        self._buf += data

    @property
    def idle(self) -> bool:
        """Nothing held back: no part of a message, no bitmap still to come."""
        return not self._buf and self._bitmap_of is None

    def skipped(self, n: int) -> None:
        """``n`` bytes went by decoded elsewhere (a compiled reader): offsets count them."""
        if not self.idle:
            raise ValueError("bytes can be skipped only between messages")
        self._base += n

    def messages(self) -> Iterator[RpMessage]:
        buf = self._buf
        pos = 0
        try:
            while True:
                if self._bitmap_of is not None:
                    got = self._bitmap(buf, pos)
                    if got is None:
                        break
                    msg, pos = got
                    yield msg
                    continue
                if len(buf) - pos < 4:
                    break
                at = self._base + pos
                mtype, length = struct.unpack_from(">HH", buf, pos)
                if mtype == 0 or mtype > self.max_type:
                    raise ReturnPathError(f"Received invalid message 0x{mtype:04x}",
                                          offset=at, field="type")
                t = MigRpMsg(mtype)
                if length > MAX_RP_MESSAGE_LEN:
                    raise ReturnPathError(f"Received {t.name} with bad length {length}",
                                          offset=at, field="len")
                want = _FIXED.get(t)
                if want is not None and length != want:
                    raise ReturnPathError(
                        f"Received '{t.name}' message (0x{mtype:04x}) with bad length "
                        f"{length}, expecting {want}", offset=at, field="len")
                if len(buf) - pos - 4 < length:
                    break
                payload = bytes(buf[pos + 4 : pos + 4 + length])
                pos += 4 + length
                msg = self._decode(t, payload, at)
                if t == MigRpMsg.RECV_BITMAP:
                    self._bitmap_of = msg  # yielded once its bitmap is here
                    continue
                yield msg
        finally:
            del buf[:pos]
            self._base += pos

    def _bitmap(self, buf: bytearray, pos: int):
        """The bitmap after a RECV_BITMAP, whole, or None while it is incomplete."""
        at = self._base + pos
        if len(buf) - pos < 8:
            return None
        size = struct.unpack_from(">Q", buf, pos)[0]
        if size > MAX_RECV_BITMAP or size % 8:
            raise ReturnPathError(f"received bitmap of {self._bitmap_of.block} announces "
                                  f"{size} bytes", offset=at, field="size")
        if len(buf) - pos < 16 + size:
            return None
        end = struct.unpack_from(">Q", buf, pos + 8 + size)[0]
        if end != RECV_BITMAP_ENDING:
            raise ReturnPathError(f"received bitmap of {self._bitmap_of.block} ends with "
                                  f"0x{end:016x}, not 0x{RECV_BITMAP_ENDING:016x}",
                                  offset=at + 8 + size, field="ending")
        msg = dataclasses.replace(self._bitmap_of, bitmap=bytes(buf[pos + 8 : pos + 8 + size]))
        self._bitmap_of = None
        return msg, pos + 16 + size

    @staticmethod
    def _decode(t: MigRpMsg, payload: bytes, at: int) -> RpMessage:
        if t in (MigRpMsg.SHUT, MigRpMsg.PONG, MigRpMsg.RESUME_ACK):
            value = struct.unpack(">I", payload)[0]
            if t == MigRpMsg.RESUME_ACK and value != MIGRATION_RESUME_ACK_VALUE:
                raise ReturnPathError(f"illegal resume_ack value {value}", offset=at,
                                      field="value")
            return RpMessage(t, payload, at, value=value)
        if t == MigRpMsg.REQ_PAGES:
            start, length = struct.unpack(">QI", payload)
            return RpMessage(t, payload, at, start=start, length=length)
        if t == MigRpMsg.REQ_PAGES_ID:
            if len(payload) < 13 or len(payload) != 13 + payload[12]:
                raise ReturnPathError("Received REQ_PAGES_ID with a bad block name length",
                                      offset=at, field="len")
            start, length = struct.unpack(">QI", payload[:12])
            block = payload[13:].decode("utf-8", "replace")
            return RpMessage(t, payload, at, start=start, length=length, block=block)
        if t == MigRpMsg.RECV_BITMAP:
            if not payload or len(payload) != 1 + payload[0]:
                raise ReturnPathError("Received RECV_BITMAP with a bad block name length",
                                      offset=at, field="len")
            return RpMessage(t, payload, at, block=payload[1:].decode("utf-8", "replace"))
        return RpMessage(t, payload, at)
