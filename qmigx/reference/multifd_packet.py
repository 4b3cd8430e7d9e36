"""Plain-Python twin of :mod:`qmigx._core.multifd_packet` (the test oracle).

Same public names, same results, same exceptions, written for reading:
the header is decoded field by field with :mod:`struct` in wire order
(spec multifd.md §3-4), then each rule of the receiver is applied in the
order the compiled kernel applies it.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from qmigx.errors import MultifdPacketError, printable_name
from qmigx.wire import MULTIFD_MAGIC, MULTIFD_VERSION

__all__ = [
    "HEADER_FIXED_SIZE",
    "DEFAULT_MAX_PAGES",
    "LAYOUTS",
    "header_size",
    "PacketHeader",
    "PacketHeader41",
    "PacketHeader10",
    "pack_packet_header",
    "pack_packet",
    "unpack_packet_header",
    "place_pages",
    "gather_pages",
]

HEADER_FIXED_SIZE = 320
DEFAULT_MAX_PAGES = 128
LAYOUTS = ("7.2", "4.1", "10.0")

_NAME_OFF = 64
_NAME_LEN = 256
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

#: magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num
_FIXED_FIELDS = struct.Struct(">IIIIIIQ")

_FIELDS = (
    ("magic", 0, 4),
    ("version", 4, 4),
    ("flags", 8, 4),
    ("pages_alloc", 12, 4),
    ("normal_pages", 16, 4),
    ("next_packet_size", 20, 4),
    ("packet_num", 24, 8),
    ("unused", 32, 32),
    ("ramblock", 64, 256),
)
_COMPRESSION_BITS = {"none": 0, "zlib": 0x2, "zstd": 0x4}
#: compression bits of the flags: 7.2 (zlib, zstd) and 10.0 (+ qpl, uadk, qatzip)
_MASK_72 = 0xE
_MASK_10 = 0x3E


# ---------------------------------------------------------------------------
# argument helpers


def _as_uint(value: Any, name: str, top: int) -> int:
    value = operator.index(value)
    if not 0 <= value <= top:
        raise OverflowError(f"{name} must be in 0..{top}, not {value}")
    return value


def _check_page_size(page_size: Any) -> int:
    ps = _as_uint(page_size, "page_size", 1 << 30)
    if ps == 0 or ps & (ps - 1):
        raise ValueError(f"page_size must be a power of two up to 1 GiB, not {ps}")
    return ps


def _compression_bits(compression: Any) -> int:
    if isinstance(compression, str):
        if compression in _COMPRESSION_BITS:
            return _COMPRESSION_BITS[compression]
    elif isinstance(compression, int) and not isinstance(compression, bool):
        if compression in (0, 0x2, 0x4):
            return compression
    raise ValueError(f"unknown multifd compression {compression!r}")


def _readable(obj: Any, name: str) -> memoryview:
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous buffer")
    return mv.cast("B") if (mv.format, mv.ndim) != ("B", 1) else mv


def _writable(obj: Any, name: str) -> memoryview:
    mv = memoryview(obj)
    if mv.readonly or not mv.c_contiguous:
        raise TypeError(f"{name} must be a writable C-contiguous buffer")
    return mv.cast("B") if (mv.format, mv.ndim) != ("B", 1) else mv


def _offsets_array(offsets: Any) -> np.ndarray:
    return np.ascontiguousarray(offsets, dtype=np.uint64).reshape(-1)


def _truncated(n: int, fields: tuple, need: int) -> MultifdPacketError:
    for name, where, size in fields:
        if n < where + size:
            return MultifdPacketError(
                f"packet truncated: {n} bytes, the header needs {need}",
                field=name,
                offset=where,
            )
    return MultifdPacketError(f"packet truncated: {n} bytes", offset=n)


def _offset_error(
    misaligned: bool, i: int, cls: type, value: int, page_size: int, length: int, what: str
) -> Exception:
    field = f"offsets[{i}]"
    if misaligned:
        msg = f"page offset 0x{value:x} is not a multiple of the page size {page_size}"
    else:
        msg = f"page offset 0x{value:x} + {page_size} lies beyond the {length}-byte {what}"
    if cls is MultifdPacketError:
        return MultifdPacketError(msg, field=field, offset=HEADER_FIXED_SIZE + 8 * i)
    return cls(f"{msg} ({field})")


def _first_bad_offset(offsets: list[int], page_size: int, length: int) -> tuple[int, bool] | None:
    """Index of the first page not aligned or not inside ``length`` bytes, and whether misaligned."""
    for i, off in enumerate(offsets):
        if off % page_size:
            return i, True
        if off + page_size > length:
            return i, False
    return None


def header_size(pages_alloc: int) -> int:
    """Bytes of a packet's header area: ``320 + 8 * pages_alloc`` (1344 for 128 pages)."""
    return HEADER_FIXED_SIZE + 8 * _as_uint(pages_alloc, "pages_alloc", _U32)




# ---------------------------------------------------------------------------
# page packets


class _PacketHeaderBase:
    __slots__ = (
        "flags",
        "pages_alloc",
        "_npages",
        "next_packet_size",
        "packet_num",
        "ramblock",
        "offsets",
        "data_size",
    )

    def _set(self, flags, pages_alloc, npages, next_packet_size, packet_num, ramblock, offsets, data_size):
        arr = np.array(offsets, dtype=np.uint64).reshape(-1)
        arr.flags.writeable = False
        self.flags = flags
        self.pages_alloc = pages_alloc
        self._npages = npages
        self.next_packet_size = next_packet_size
        self.packet_num = packet_num
        self.ramblock = str(ramblock)
        self.offsets = arr
        self.data_size = data_size

    @property
    def sync(self) -> bool:
        """True if the packet carries ``MULTIFD_FLAG_SYNC``."""
        return bool(self.flags & 0x1)

    @property
    def compression_bits(self) -> int:
        """``flags & 0x0E``: 0 none, 0x2 zlib, 0x4 zstd (only meaningful with pages)."""
        return self.flags & 0xE

    @property
    def header_size(self) -> int:
        """Bytes of the header area on the wire: ``320 + 8 * pages_alloc``."""
        return HEADER_FIXED_SIZE + 8 * self.pages_alloc

    def _fields(self, count_name: str) -> dict:
        return {
            "flags": self.flags,
            "pages_alloc": self.pages_alloc,
            count_name: self._npages,
            "next_packet_size": self.next_packet_size,
            "packet_num": self.packet_num,
            "ramblock": self.ramblock,
            "offsets": self.offsets.tolist(),
            "data_size": self.data_size,
        }

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        d = self.to_dict()  # type: ignore[attr-defined]
        d["offsets"] = f"<{len(d['offsets'])} offsets>"
        inner = ", ".join(f"{k}={v!r}" for k, v in d.items())
        return f"{type(self).__name__}({inner})"


class PacketHeader(_PacketHeaderBase):
    """An unpacked, validated packet header with QEMU 7.2's field names (see the kernel)."""

    __slots__ = ()

    def __init__(self, *, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
                 ramblock, offsets, data_size):
        self._set(flags, pages_alloc, normal_pages, next_packet_size, packet_num, ramblock,
                  offsets, data_size)

    @property
    def normal_pages(self) -> int:
        """Number of pages the packet carries (4.1 called it ``pages_used``)."""
        return self._npages

    def to_dict(self) -> dict:
        """The fields as a plain dict, ``offsets`` as a list of ints."""
        return self._fields("normal_pages")


class PacketHeader41(_PacketHeaderBase):
    """The same header with QEMU 4.1's name ``pages_used`` for the page count."""

    __slots__ = ()

    def __init__(self, *, flags, pages_alloc, pages_used, next_packet_size, packet_num,
                 ramblock, offsets, data_size):
        self._set(flags, pages_alloc, pages_used, next_packet_size, packet_num, ramblock,
                  offsets, data_size)

    @property
    def pages_used(self) -> int:
        """Number of pages the packet carries (7.2 calls it ``normal_pages``)."""
        return self._npages

    def to_dict(self) -> dict:
        """The fields as a plain dict, ``offsets`` as a list of ints."""
        return self._fields("pages_used")


class PacketHeader10(_PacketHeaderBase):
    """QEMU 10's header: ``normal_pages`` and ``zero_pages`` (see the kernel)."""

    __slots__ = ("zero_pages", "zero_offsets")

    def __init__(self, *, flags, pages_alloc, normal_pages, zero_pages, next_packet_size,
                 packet_num, ramblock, offsets, zero_offsets, data_size):
        self._set(flags, pages_alloc, normal_pages, next_packet_size, packet_num, ramblock,
                  offsets, data_size)
        arr = np.array(zero_offsets, dtype=np.uint64).reshape(-1)
        arr.flags.writeable = False
        self.zero_pages = zero_pages
        self.zero_offsets = arr

    @property
    def normal_pages(self) -> int:
        """Number of pages whose data follow the header."""
        return self._npages

    @property
    def compression_bits(self) -> int:
        """``flags & 0x3E``: QEMU 10's wider compression mask."""
        return self.flags & _MASK_10

    def to_dict(self) -> dict:
        """The fields as a plain dict, offsets as lists of ints."""
        d = self._fields("normal_pages")
        d["zero_pages"] = self.zero_pages
        d["zero_offsets"] = self.zero_offsets.tolist()
        return d


def pack_packet_header(out, *, flags, pages_alloc, next_packet_size, packet_num, ramblock,
                       offsets, normal_pages=None, pages_used=None, zero_offsets=None) -> int:
    """Write a packet's header area into ``out`` and return its size (see the kernel)."""
    if normal_pages is None:
        if pages_used is None:
            raise TypeError("give normal_pages (or its 4.1 name pages_used)")
        normal_pages = pages_used
    elif pages_used is not None:
        raise TypeError("give normal_pages or pages_used, not both")
    flags = _as_uint(flags, "flags", _U32)
    pages_alloc = _as_uint(pages_alloc, "pages_alloc", _U32)
    normal_pages = _as_uint(normal_pages, "normal_pages", _U32)
    next_packet_size = _as_uint(next_packet_size, "next_packet_size", _U32)
    packet_num = _as_uint(packet_num, "packet_num", _U64)
    if normal_pages > pages_alloc:
        raise ValueError(f"normal_pages {normal_pages} exceeds pages_alloc {pages_alloc}")
    if isinstance(ramblock, str):
        name = ramblock.encode("utf-8", "surrogateescape")
    elif isinstance(ramblock, bytes):
        name = bytes(ramblock)
    else:
        raise TypeError("ramblock must be str or bytes")
    if len(name) >= _NAME_LEN:
        raise ValueError(f"ramblock name is {len(name)} bytes; at most 255 fit")
    if b"\0" in name:
        raise ValueError("ramblock name contains a NUL byte")
    offs = _offsets_array(offsets)
    zero_pages = 0
    if zero_offsets is not None:
        zoffs = _offsets_array(zero_offsets)
        zero_pages = len(zoffs)
        if len(offs) != normal_pages:
            raise ValueError(f"offsets has {len(offs)} entries; with zero_offsets it holds "
                             f"exactly the {normal_pages} normal pages")
        if normal_pages + zero_pages > pages_alloc:
            raise ValueError(f"{normal_pages} normal and {zero_pages} zero pages exceed "
                             f"pages_alloc {pages_alloc}")
        offs = np.concatenate([offs, zoffs])
    if not normal_pages <= len(offs) <= pages_alloc:
        raise ValueError(f"offsets has {len(offs)} entries; need {normal_pages}..{pages_alloc}")
    size = HEADER_FIXED_SIZE + 8 * pages_alloc
    o = _writable(out, "out")
    if len(o) < size:
        raise ValueError(f"out has {len(o)} bytes; the header needs {size}")
    header = bytearray(size)
    _FIXED_FIELDS.pack_into(header, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, pages_alloc,
                            normal_pages, next_packet_size, packet_num)
    struct.pack_into(">I", header, 32, zero_pages)
    header[_NAME_OFF:_NAME_OFF + len(name)] = name
    for i, off in enumerate(offs.tolist()):
        struct.pack_into(">Q", header, HEADER_FIXED_SIZE + 8 * i, off)
    o[:size] = header
    return size


def pack_packet(*, flags, pages_alloc, packet_num, ramblock, offsets, data=b"",
                next_packet_size=None, normal_pages=None, pages_used=None,
                zero_offsets=None) -> bytes:
    """A whole packet as bytes: the header area followed by ``data``."""
    if normal_pages is None and pages_used is None:
        normal_pages = len(_offsets_array(offsets))
    payload = _readable(data, "data")
    if next_packet_size is None:
        next_packet_size = len(payload)
    size = header_size(pages_alloc)
    out = bytearray(size + len(payload))
    pack_packet_header(out, flags=flags, pages_alloc=pages_alloc, normal_pages=normal_pages,
                       pages_used=pages_used, next_packet_size=next_packet_size,
                       packet_num=packet_num, ramblock=ramblock, offsets=offsets,
                       zero_offsets=zero_offsets)
    out[size:] = payload
    return bytes(out)


def unpack_packet_header(buf, *, blocks: Mapping[str, int] | None = None, page_size=4096,
                         max_pages=DEFAULT_MAX_PAGES, compression="none", version="7.2"):
    """Unpack and validate a packet header (see the kernel for every rule)."""
    page_size = _check_page_size(page_size)
    max_pages = _as_uint(max_pages, "max_pages", _U32)
    want_bits = _compression_bits(compression)
    if version not in LAYOUTS:
        raise ValueError(f"version must be one of {LAYOUTS}, not {version!r}")
    b = _readable(buf, "buf")
    n = len(b)

    def check_magic() -> None:
        (magic,) = struct.unpack_from(">I", b, 0)
        if magic != MULTIFD_MAGIC:
            raise MultifdPacketError(
                f"packet magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}",
                field="magic",
                offset=0,
            )

    def check_version() -> None:
        (ver,) = struct.unpack_from(">I", b, 4)
        if ver != MULTIFD_VERSION:
            raise MultifdPacketError(
                f"packet version {ver}, expected {MULTIFD_VERSION}", field="version", offset=4
            )

    if n < HEADER_FIXED_SIZE:
        if n >= 4:
            check_magic()
        if n >= 8:
            check_version()
        raise _truncated(n, _FIELDS, HEADER_FIXED_SIZE)
    check_magic()
    check_version()
    _, _, flags, alloc, npages, next_size, num = _FIXED_FIELDS.unpack_from(b, 0)
    if alloc > max_pages:
        raise MultifdPacketError(
            f"packet has room for {alloc} pages; at most {max_pages} accepted",
            field="pages_alloc",
            offset=12,
        )
    if npages > alloc:
        raise MultifdPacketError(
            f"packet carries {npages} pages but has room for {alloc}",
            field="normal_pages",
            offset=16,
        )
    need = HEADER_FIXED_SIZE + 8 * alloc
    if n < need:
        i = (n - HEADER_FIXED_SIZE) // 8
        raise MultifdPacketError(
            f"packet truncated: {n} bytes, the header needs {need}",
            field=f"offsets[{i}]",
            offset=HEADER_FIXED_SIZE + 8 * i,
        )
    v10 = version == "10.0"
    zero = struct.unpack_from(">I", b, 32)[0] if v10 else 0
    if zero > alloc - npages:
        raise MultifdPacketError(
            f"packet carries {npages} normal and {zero} zero pages but has room for {alloc}",
            field="zero_pages",
            offset=32,
        )
    count_name = "pages_used" if version == "4.1" else "normal_pages"

    def result(ramblock: str, offsets: list[int], data_size: int):
        fields = {
            "flags": flags,
            "pages_alloc": alloc,
            count_name: npages,
            "next_packet_size": next_size,
            "packet_num": num,
            "ramblock": ramblock,
            "offsets": offsets[:npages],
            "data_size": data_size,
        }
        if v10:
            return PacketHeader10(**fields, zero_pages=zero, zero_offsets=offsets[npages:])
        return (PacketHeader if version == "7.2" else PacketHeader41)(**fields)

    listed = npages + zero
    if listed == 0:
        # ramblock, trailing offsets and next_packet_size may be stale here
        return result("", [], 0)
    bits = flags & (_MASK_10 if v10 else _MASK_72)
    if bits != want_bits:
        raise MultifdPacketError(
            f"compression flags 0x{bits:x}, negotiated 0x{want_bits:x}", field="flags", offset=8
        )
    if npages == 0:
        data_size = 0
    elif want_bits:
        data_limit = 2 * max_pages * page_size
        if next_size > data_limit:
            raise MultifdPacketError(
                f"{next_size} bytes of compressed data declared; at most {data_limit} accepted",
                field="next_packet_size",
                offset=20,
            )
        data_size = next_size
    else:
        data_size = npages * page_size
    raw_name = bytes(b[_NAME_OFF:_NAME_OFF + _NAME_LEN])
    if b"\0" not in raw_name:
        raise MultifdPacketError(
            "ramblock name is not NUL-terminated", field="ramblock", offset=_NAME_OFF
        )
    name = raw_name[: raw_name.index(b"\0")].decode("utf-8", "surrogateescape")
    offsets = list(struct.unpack_from(f">{listed}Q", b, HEADER_FIXED_SIZE))
    used_length = None
    if blocks is not None:
        try:
            used = blocks[name]
        except KeyError:
            raise MultifdPacketError(
                f"unknown RAM block '{printable_name(name)}'", field="ramblock", offset=_NAME_OFF
            ) from None
        used_length = _as_uint(used, "a block's used length", _U64)
    for i, off in enumerate(offsets):
        misaligned = off % page_size != 0
        beyond = used_length is not None and off + page_size > used_length
        if misaligned or beyond:
            raise _offset_error(misaligned, i, MultifdPacketError, off, page_size,
                                used_length if used_length is not None else 0,
                                f"RAM block {name!r}")
    return result(name, offsets, data_size)


def place_pages(packet_data, offsets, block_buffer, page_size) -> int:
    """Copy page ``i`` of ``packet_data`` to ``block_buffer[offsets[i]:]`` (all checked first)."""
    page_size = _check_page_size(page_size)
    offs = _offsets_array(offsets).tolist()
    src = _readable(packet_data, "packet_data")
    dst = _writable(block_buffer, "block_buffer")
    if not offs:
        return 0
    if len(src) // page_size < len(offs):
        raise MultifdPacketError(
            f"{len(src)} bytes of page data for {len(offs)} pages of {page_size}", field="data"
        )
    bad = _first_bad_offset(offs, page_size, len(dst))
    if bad is not None:
        i, misaligned = bad
        raise _offset_error(misaligned, i, MultifdPacketError, offs[i], page_size, len(dst),
                            "block buffer")
    for i, off in enumerate(offs):
        dst[off:off + page_size] = src[i * page_size:(i + 1) * page_size]
    return len(offs) * page_size


def gather_pages(block_buffer, offsets, out, page_size) -> int:
    """Copy the pages at ``offsets`` of ``block_buffer``, in order, into ``out``."""
    page_size = _check_page_size(page_size)
    offs = _offsets_array(offsets).tolist()
    src = _readable(block_buffer, "block_buffer")
    dst = _writable(out, "out")
    if not offs:
        return 0
    if len(dst) // page_size < len(offs):
        raise ValueError(
            f"out has {len(dst)} bytes; {len(offs)} pages need {len(offs) * page_size}"
        )
    bad = _first_bad_offset(offs, page_size, len(src))
    if bad is not None:
        i, misaligned = bad
        raise _offset_error(misaligned, i, ValueError, offs[i], page_size, len(src),
                            "block buffer")
    for i, off in enumerate(offs):
        dst[i * page_size:(i + 1) * page_size] = src[off:off + page_size]
    return len(offs) * page_size
