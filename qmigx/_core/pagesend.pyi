"""Type stub for the compiled page sender ``qmigx._core.pagesend``."""

from typing import Optional

from typing_extensions import Buffer

__all__ = ["send_pages", "send_file", "CHUNK", "DONE", "STOPPED", "TIMEOUT", "FAILED", "SHORT"]

CHUNK: int
DONE: int
STOPPED: int
TIMEOUT: int
FAILED: int
SHORT: int

def send_pages(fd: int, wake: int, mem: Buffer, pages: Buffer, page_size: int = 4096,
               timeout: Optional[float] = None) -> tuple[int, int, int, int, int]: ...
def send_file(fd: int, wake: int, head: Buffer, src_fd: int, offset: int, count: int,
              timeout: Optional[float] = None) -> tuple[int, int, int]: ...
