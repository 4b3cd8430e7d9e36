"""``file:PATH[,offset=N]``: a stream written to or read from a file (QEMU 10's ``file:``).

As QEMU 10 does, the source creates the file (mode 0600), truncates it
to N bytes and writes the stream from offset N; the destination reads
from N (qemu10.md §5.1). QEMU 4.1 and 7.2 have no ``file:`` transport
(use ``exec:cat > FILE`` / ``exec:cat FILE`` with them). A file channel
has no return path; it can seek (mapped-ram writes pages in place).
"""

from __future__ import annotations

import os

from qmigx.errors import ChannelError
from qmigx.transport.channel import Channel

__all__ = ["open_write", "open_read"]


def open_write(path: str, offset: int = 0) -> Channel:
    """Create ``path`` (0600), truncate it to ``offset`` bytes; the stream starts there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as e:
        raise ChannelError(f"cannot open {path!r} for writing: {e.strerror}", field="uri") from None
    ch = Channel(f"file:{path}", wfd=fd)
    ch.file_offset = offset
    return ch


def open_read(path: str, offset: int = 0) -> Channel:
    """Open ``path`` for the destination's stream, which starts at ``offset``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as e:
        raise ChannelError(f"cannot open {path!r}: {e.strerror}", field="uri") from None
    ch = Channel(f"file:{path}", rfd=fd)
    ch.file_offset = offset
    return ch
