"""Multifd packet framing and per-channel compression (QEMU 7.2's multifd.c, formats).

This is the public face of multifd's byte formats (spec multifd.md). The
framing (init packet, packet headers, placing pages into a RAM block)
comes from the selected backend of the ``multifd_packet`` kernel, since
a header is parsed for every 512 KiB of pages. The per-channel
compression streams of QEMU 7.2 are plain Python over :mod:`zlib` and
:mod:`zstandard`, whose C code does the real work.

QEMU keeps **one compression stream per channel for the whole
migration**: packets are never independently decodable (spec §6). Make
one send stream per outgoing channel and one receive stream per incoming
channel, and feed them every packet of that channel, in order::

    hdr = unpack_packet_header(buf, blocks=sizes, compression="zlib")
    stream.decompress_into(data, pages, hdr.normal_pages, page_size)
    place_pages(pages, hdr.offsets, block, page_size)

Everything here is sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import zlib
from typing import Any

import zstandard

from qmigx._backend import load
from qmigx.errors import MultifdPacketError, ParameterError
from qmigx.multifd.init_packet import (INIT_PACKET_SIZE, InitPacket, pack_init_packet,
                                       unpack_init_packet)
from qmigx.wire import MULTIFD_PACKET_SIZE, MultifdFlag

_kernel = load("multifd_packet")

HEADER_FIXED_SIZE: int = _kernel.HEADER_FIXED_SIZE
DEFAULT_MAX_PAGES: int = _kernel.DEFAULT_MAX_PAGES
LAYOUTS: tuple[str, ...] = _kernel.LAYOUTS
header_size = _kernel.header_size
PacketHeader = _kernel.PacketHeader
PacketHeader41 = _kernel.PacketHeader41
PacketHeader10 = _kernel.PacketHeader10
pack_packet_header = _kernel.pack_packet_header
pack_packet = _kernel.pack_packet
unpack_packet_header = _kernel.unpack_packet_header
place_pages = _kernel.place_pages
gather_pages = _kernel.gather_pages

__all__ = [
    "HEADER_FIXED_SIZE",
    "INIT_PACKET_SIZE",
    "DEFAULT_MAX_PAGES",
    "LAYOUTS",
    "header_size",
    "InitPacket",
    "PacketHeader",
    "PacketHeader41",
    "PacketHeader10",
    "pack_init_packet",
    "unpack_init_packet",
    "pack_packet_header",
    "pack_packet",
    "unpack_packet_header",
    "place_pages",
    "gather_pages",
    "COMPRESSION_METHODS",
    "NoneSendStream",
    "NoneRecvStream",
    "ZlibSendStream",
    "ZlibRecvStream",
    "ZstdSendStream",
    "ZstdRecvStream",
    "send_stream",
    "recv_stream",
]

#: ``multifd-compression`` values (7.2) in QAPI order: none=0, zlib=1, zstd=2.
COMPRESSION_METHODS = ("none", "zlib", "zstd")


def _iter_pages(pages: Any) -> list:
    """The pages of a list/tuple of buffers or of a 2-D ``(n, page_size)`` buffer."""
    if isinstance(pages, (list, tuple)):
        return list(pages)
    mv = memoryview(pages)
    if mv.ndim != 2 or not mv.c_contiguous:
        raise TypeError("pages must be a list of buffers or a C-contiguous (n, page_size) buffer")
    flat = mv.cast("B")
    row = mv.shape[1] * mv.itemsize
    return [flat[i * row:(i + 1) * row] for i in range(mv.shape[0])]


def _pages_target(out: Any, npages: int, page_size: int) -> memoryview:
    """The first ``npages * page_size`` bytes of ``out``, checked before any stream is touched."""
    if npages < 0 or page_size <= 0:
        raise ValueError(f"bad page count {npages} or page size {page_size}")
    mv = memoryview(out)
    if mv.readonly or not mv.c_contiguous:
        raise TypeError("out must be a writable C-contiguous buffer")
    mv = mv.cast("B")
    need = npages * page_size
    if len(mv) < need:
        raise ValueError(f"out has {len(mv)} bytes; {npages} pages need {need}")
    return mv[:need]


class _RecvStream:
    """Shared rules of the receive streams: bounded output and fail-stop."""

    method = ""
    flag = 0

    def __init__(self) -> None:
        self._broken = False

    def decompress_into(self, data: Any, out: Any, npages: int, page_size: int) -> int:
        """Decode one packet's ``data`` into ``out[:npages * page_size]``; return that size.

        Never writes past ``npages * page_size`` bytes of ``out`` and never
        produces more than that in memory, whatever ``data`` holds. After a
        :class:`MultifdPacketError` the stream's state is lost, so every
        later call fails too (a migration cannot go on after one).

        Raises:
            MultifdPacketError: ``field="next_packet_size"`` when the data
                ends before ``npages`` pages are complete, ``field="data"``
                when it is corrupt or holds more than ``npages`` pages.
            ValueError / TypeError: ``out`` is too small or not writable.
        """
        target = _pages_target(out, npages, page_size)
        if self._broken:
            raise MultifdPacketError(
                f"{self.method} stream unusable after an earlier error", field="data"
            )
        src = memoryview(data).cast("B")
        if npages == 0:
            if len(src):
                self._broken = True
                raise MultifdPacketError(
                    f"{len(src)} bytes of data in a packet without pages", field="data"
                )
            return 0
        try:
            self._decode(src, target)
        except MultifdPacketError:
            self._broken = True
            raise
        return len(target)

    def _decode(self, src: memoryview, target: memoryview) -> None:
        raise NotImplementedError

    @staticmethod
    def _short(got: int, want: int, nbytes: int) -> MultifdPacketError:
        return MultifdPacketError(
            f"{nbytes} bytes of data produce only {got} of the {want} bytes of the pages",
            field="next_packet_size",
        )

    @staticmethod
    def _long(want: int) -> MultifdPacketError:
        return MultifdPacketError(f"data holds more than the {want} bytes of the pages", field="data")


class NoneSendStream:
    """Uncompressed pages: the data is the pages, concatenated."""

    method = "none"
    flag = 0

    def compress_pages(self, pages: Any) -> bytes:
        """The data of one packet: its pages, in order."""
        return b"".join(bytes(memoryview(p).cast("B")) for p in _iter_pages(pages))


class NoneRecvStream(_RecvStream):
    """Uncompressed pages: the data must be exactly the pages."""

    method = "none"
    flag = 0

    def _decode(self, src: memoryview, target: memoryview) -> None:
        if len(src) < len(target):
            raise self._short(len(src), len(target), len(src))
        if len(src) > len(target):
            raise self._long(len(target))
        target[:] = src


class ZlibSendStream:
    """QEMU 7.2's zlib sender: one deflate stream (zlib wrapper) for the channel's life.

    Each page is deflated without flushing and the packet's last page with
    ``Z_SYNC_FLUSH``, so every packet's data ends on a byte boundary with
    ``00 00 ff ff`` and the receiver can inflate it completely, while the
    dictionary carries over to the next packet.
    """

    method = "zlib"
    flag = int(MultifdFlag.ZLIB)

    def __init__(self, level: int = 1) -> None:
        if not isinstance(level, int) or not 0 <= level <= 9:
            raise ParameterError(
                f"zlib level must be 0..9, not {level!r}", field="multifd-zlib-level"
            )
        self.level = level
        self._c = zlib.compressobj(level)

    def compress_pages(self, pages: Any) -> bytes:
        """The compressed data of one packet (``b""`` for no pages)."""
        parts = [self._c.compress(p) for p in _iter_pages(pages)]
        if not parts:
            return b""
        parts.append(self._c.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(parts)


class ZlibRecvStream(_RecvStream):
    """QEMU 7.2's zlib receiver: one inflate stream for the channel's life."""

    method = "zlib"
    flag = int(MultifdFlag.ZLIB)

    def __init__(self) -> None:
        super().__init__()
        self._d = zlib.decompressobj()

    def _decode(self, src: memoryview, target: memoryview) -> None:
        want = len(target)
        try:
            # max_length bounds what a hostile packet can make us hold
            got = self._d.decompress(src, want)
            if len(got) == want and not self._d.eof:
                # whatever follows (the sync-flush marker) must not produce a byte
                extra = self._d.decompress(self._d.unconsumed_tail, 1)
            else:
                extra = b""
        except zlib.error as exc:
            raise MultifdPacketError(f"corrupt zlib data: {exc}", field="data") from None
        if self._d.eof:
            raise MultifdPacketError("the zlib stream ended, QEMU never ends it", field="data")
        if len(got) < want:
            raise self._short(len(got), want, len(src))
        if extra or self._d.unconsumed_tail:
            raise self._long(want)
        target[:] = got


class ZstdSendStream:
    """QEMU 7.2's zstd sender: one frame for the channel's life, flushed per packet.

    Pages go in with ``ZSTD_e_continue`` and each packet ends with a block
    flush (``ZSTD_e_flush``); the frame is never ended, so its header
    (``28 b5 2f fd``) appears only in the channel's first data.
    """

    method = "zstd"
    flag = int(MultifdFlag.ZSTD)

    def __init__(self, level: int = 1) -> None:
        if not isinstance(level, int) or not 0 <= level <= 20:
            raise ParameterError(
                f"zstd level must be 0..20, not {level!r}", field="multifd-zstd-level"
            )
        self.level = level
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def compress_pages(self, pages: Any) -> bytes:
        """The compressed data of one packet (``b""`` for no pages)."""
        parts = [self._c.compress(p) for p in _iter_pages(pages)]
        if not parts:
            return b""
        parts.append(self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return b"".join(parts)


class _BoundedSink:
    """Writes decompressed chunks into the pages buffer; refuses to overflow it."""

    __slots__ = ("target", "pos")

    def __init__(self) -> None:
        self.target = memoryview(bytearray(0))
        self.pos = 0

    def write(self, chunk: bytes) -> int:
        end = self.pos + len(chunk)
        if end > len(self.target):
            raise _ZstdOverflow
        self.target[self.pos:end] = chunk
        self.pos = end
        return len(chunk)


class _ZstdOverflow(Exception):
    pass


class ZstdRecvStream(_RecvStream):
    """QEMU 7.2's zstd receiver: one decompression context for the channel's life.

    ``max_packet_bytes`` is the most page data one packet may carry
    (512 KiB in QEMU). The decoder writes straight into the pages buffer
    through a sink that raises as soon as a packet would exceed its
    pages, so a hostile packet costs at most one chunk of memory. The
    chunk size is larger than any packet so that no decoded byte is left
    waiting inside the decoder at the end of a packet.
    """

    method = "zstd"
    flag = int(MultifdFlag.ZSTD)

    def __init__(self, max_packet_bytes: int = MULTIFD_PACKET_SIZE) -> None:
        super().__init__()
        if max_packet_bytes <= 0:
            raise ValueError("max_packet_bytes must be positive")
        self.max_packet_bytes = max_packet_bytes
        self._sink = _BoundedSink()
        self._w = zstandard.ZstdDecompressor().stream_writer(
            self._sink,
            write_size=max_packet_bytes + zstandard.DECOMPRESSION_RECOMMENDED_OUTPUT_SIZE,
            write_return_read=True,
            closefd=False,
        )

    def _decode(self, src: memoryview, target: memoryview) -> None:
        if len(target) > self.max_packet_bytes:
            raise ValueError(f"a packet of {len(target)} bytes exceeds max_packet_bytes")
        self._sink.target = target
        self._sink.pos = 0
        try:
            self._w.write(src)
        except _ZstdOverflow:
            raise self._long(len(target)) from None
        except zstandard.ZstdError as exc:
            raise MultifdPacketError(f"corrupt zstd data: {exc}", field="data") from None
        finally:
            got = self._sink.pos
            self._sink.target = memoryview(bytearray(0))
        if got < len(target):
            raise self._short(got, len(target), len(src))


def send_stream(method: str, level: int | None = None):
    """A new send stream for ``multifd-compression`` ``method`` (level: QEMU's default 1)."""
    if method == "none":
        return NoneSendStream()
    if method == "zlib":
        return ZlibSendStream(1 if level is None else level)
    if method == "zstd":
        return ZstdSendStream(1 if level is None else level)
    raise ParameterError(f"unknown multifd compression {method!r}", field="multifd-compression")


def recv_stream(method: str):
    """A new receive stream for ``multifd-compression`` ``method``."""
    if method == "none":
        return NoneRecvStream()
    if method == "zlib":
        return ZlibRecvStream()
    if method == "zstd":
        return ZstdRecvStream()
    raise ParameterError(f"unknown multifd compression {method!r}", field="multifd-compression")
