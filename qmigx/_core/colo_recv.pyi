"""Type stub for the compiled COLO run receiver ``qmigx._core.colo_recv``."""

from typing import Optional

from typing_extensions import Buffer

__all__ = ["receive_pages", "MAX_RUN", "DONE", "END", "STOPPED", "TIMEOUT", "FAILED"]

MAX_RUN: int
DONE: int
END: int
STOPPED: int
TIMEOUT: int
FAILED: int

def receive_pages(fd: int, wake: int, dest: Buffer, ram: Buffer, dirty: Buffer, received: Buffer,
                  first_page: int, prefix: Buffer, spill: Buffer, page_size: int = 4096,
                  timeout: Optional[float] = None) -> tuple[int, int, int, int, int]: ...
