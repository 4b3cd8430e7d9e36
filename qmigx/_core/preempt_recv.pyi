"""Type stub for the compiled preempt-channel placer ``qmigx._core.preempt_recv``."""

from typing_extensions import Buffer

__all__ = ["place_records", "DONE", "END", "STOPPED", "FAILED", "PAGE_SIZE", "MIN_BUFFER"]

DONE: int
END: int
STOPPED: int
FAILED: int
PAGE_SIZE: int
MIN_BUFFER: int

def place_records(fd: int, wake: int, uffd: int, blocks: list, cur: int, buf: Buffer,
                  have: int) -> tuple[int, int, int, int, int, int, int]: ...
