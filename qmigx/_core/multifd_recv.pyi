"""Type stub for the compiled multifd receive loop ``qmigx._core.multifd_recv``."""

from typing import Optional, Sequence

from typing_extensions import Buffer

__all__ = ["receive_packets", "HEADER", "END", "STOPPED", "TIMEOUT", "TRUNCATED", "FAILED"]

HEADER: int
END: int
STOPPED: int
TIMEOUT: int
TRUNCATED: int
FAILED: int

def receive_packets(fd: int, wake: int, header: Buffer,
                    blocks: Sequence[tuple[bytes, Buffer, int]], page_size: int, max_pages: int,
                    timeout: Optional[float]) -> tuple[int, int, int, int, int, int, int, int]: ...
