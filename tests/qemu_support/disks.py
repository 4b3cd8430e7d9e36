"""Disk images in interop tests: waiting for a chunk to arrive, writing from another process.

A write meant for the dirty phase of block migration must land after the
chunk it changes was sent. The tests watch the destination image until
that chunk arrived there, then have a separate process write the
source image (as a guest's disk is written by something other than the
migration).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

__all__ = ["MIB", "wait_until", "chunk_arrived", "run_writer"]

MIB = 1 << 20


def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def chunk_arrived(path: Path, want: bytes, index: int = 0):
    """True once chunk ``index`` of the image at ``path`` starts like ``want``'s."""
    def check() -> bool:
        with open(path, "rb") as f:
            f.seek(index * MIB)
            return f.read(4096) == want[index * MIB : index * MIB + 4096]
    return check


#: a separate process writing the source image: 64 KiB of 0x5a at 0, 4 KiB of 0xa5 at argv[2]
_WRITER = ("import os, sys\n"
           "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
           "os.pwrite(fd, b'\\x5a' * 65536, 0)\n"
           "os.pwrite(fd, b'\\xa5' * 4096, int(sys.argv[2]))\n"
           "os.close(fd)\n")


def run_writer(image: Path, offset: int) -> None:
    r = subprocess.run([sys.executable, "-c", _WRITER, str(image), str(offset)], timeout=30)
    assert r.returncode == 0
