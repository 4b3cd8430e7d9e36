"""Type stub for the compiled XBZRLE kernel ``qmigx._core.xbzrle``."""

from typing import Final

from typing_extensions import Buffer

__all__ = [
    "MAX_RUN",
    "encode_buffer",
    "decode_buffer",
    "encode_pages",
    "encode_at",
    "decode_pages",
    "simd",
]

MAX_RUN: Final[int]
simd: str

def encode_buffer(old: Buffer, new: Buffer, out: Buffer) -> int: ...
def decode_buffer(src: Buffer, dst: Buffer) -> int: ...
def encode_pages(old: Buffer, new: Buffer, out: Buffer, lengths: Buffer) -> None: ...
def encode_at(old: Buffer, old_off: Buffer, new: Buffer, new_off: Buffer, page_size: int,
              out: Buffer, lengths: Buffer) -> None: ...
def decode_pages(deltas: Buffer, lengths: Buffer, pages: Buffer) -> None: ...
def _encode_pages_baseline(old: Buffer, new: Buffer, out: Buffer, lengths: Buffer) -> None: ...
def _available_simd() -> tuple[str, ...]: ...
def _set_simd(name: str) -> str: ...
