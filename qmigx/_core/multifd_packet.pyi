"""Types of the multifd framing kernel (same API as qmigx.reference.multifd_packet)."""

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from typing_extensions import Buffer

HEADER_FIXED_SIZE: Final[int]
DEFAULT_MAX_PAGES: Final[int]
LAYOUTS: Final[tuple[str, ...]]

_Offsets = npt.NDArray[np.uint64] | Sequence[int]
_Compression = Literal["none", "zlib", "zstd", 0, 2, 4]

def header_size(pages_alloc: int) -> int: ...

class _PacketHeaderBase:
    @property
    def flags(self) -> int: ...
    @property
    def pages_alloc(self) -> int: ...
    @property
    def next_packet_size(self) -> int: ...
    @property
    def packet_num(self) -> int: ...
    @property
    def ramblock(self) -> str: ...
    @property
    def offsets(self) -> npt.NDArray[np.uint64]: ...
    @property
    def data_size(self) -> int: ...
    @property
    def sync(self) -> bool: ...
    @property
    def compression_bits(self) -> int: ...
    @property
    def header_size(self) -> int: ...
    def to_dict(self) -> dict[str, Any]: ...

class PacketHeader(_PacketHeaderBase):
    def __init__(
        self,
        *,
        flags: int,
        pages_alloc: int,
        normal_pages: int,
        next_packet_size: int,
        packet_num: int,
        ramblock: str,
        offsets: _Offsets,
        data_size: int,
    ) -> None: ...
    @property
    def normal_pages(self) -> int: ...

class PacketHeader10(_PacketHeaderBase):
    def __init__(
        self,
        *,
        flags: int,
        pages_alloc: int,
        normal_pages: int,
        zero_pages: int,
        next_packet_size: int,
        packet_num: int,
        ramblock: str,
        offsets: _Offsets,
        zero_offsets: _Offsets,
        data_size: int,
    ) -> None: ...
    @property
    def normal_pages(self) -> int: ...
    @property
    def zero_pages(self) -> int: ...
    @property
    def zero_offsets(self) -> npt.NDArray[np.uint64]: ...

class PacketHeader41(_PacketHeaderBase):
    def __init__(
        self,
        *,
        flags: int,
        pages_alloc: int,
        pages_used: int,
        next_packet_size: int,
        packet_num: int,
        ramblock: str,
        offsets: _Offsets,
        data_size: int,
    ) -> None: ...
    @property
    def pages_used(self) -> int: ...

def pack_packet_header(
    out: Buffer,
    *,
    flags: int,
    pages_alloc: int,
    next_packet_size: int,
    packet_num: int,
    ramblock: str | bytes,
    offsets: _Offsets,
    normal_pages: int | None = None,
    pages_used: int | None = None,
    zero_offsets: _Offsets | None = None,
) -> int: ...
def pack_packet(
    *,
    flags: int,
    pages_alloc: int,
    packet_num: int,
    ramblock: str | bytes,
    offsets: _Offsets,
    data: Buffer = b"",
    next_packet_size: int | None = None,
    normal_pages: int | None = None,
    pages_used: int | None = None,
    zero_offsets: _Offsets | None = None,
) -> bytes: ...
def unpack_packet_header(
    buf: Buffer,
    *,
    blocks: Mapping[str, int] | None = None,
    page_size: int = 4096,
    max_pages: int = 128,
    compression: _Compression = "none",
    version: Literal["7.2", "4.1", "10.0"] = "7.2",
) -> PacketHeader | PacketHeader41 | PacketHeader10: ...
def place_pages(packet_data: Buffer, offsets: _Offsets, block_buffer: Buffer, page_size: int) -> int: ...
def gather_pages(block_buffer: Buffer, offsets: _Offsets, out: Buffer, page_size: int) -> int: ...
