"""``file:PATH``: a stream written to or read from a file (a qmigx extension to 7.2).

QEMU 4.1 and 7.2 have no ``file:`` transport (use ``exec:cat > FILE`` /
``exec:cat FILE`` with them); a file channel has no return path.
"""

from __future__ import annotations

import os

from qmigx.errors import ChannelError
from qmigx.transport.channel import Channel

__all__ = ["open_write", "open_read"]


def open_write(path: str) -> Channel:
    """Create or truncate ``path`` for the source's stream."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ChannelError(f"cannot open {path!r} for writing: {e.strerror}", field="uri") from None
    return Channel(f"file:{path}", wfd=fd)


def open_read(path: str) -> Channel:
    """Open ``path`` for the destination's stream."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ChannelError(f"cannot open {path!r}: {e.strerror}", field="uri") from None
    return Channel(f"file:{path}", rfd=fd)
