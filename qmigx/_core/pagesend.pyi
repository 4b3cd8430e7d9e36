"""Type stub for the compiled page sender ``qmigx._core.pagesend``."""

from typing import Optional

from typing_extensions import Buffer

__all__ = ["send_pages", "CHUNK", "DONE", "STOPPED", "TIMEOUT", "FAILED"]

CHUNK: int
DONE: int
STOPPED: int
TIMEOUT: int
FAILED: int

def send_pages(fd: int, wake: int, mem: Buffer, pages: Buffer, page_size: int = 4096,
               timeout: Optional[float] = None) -> tuple[int, int, int, int, int]: ...
