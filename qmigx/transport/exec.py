"""``exec:`` transports: a shell command on the other end of two pipes (QEMU's exec.c)."""

from __future__ import annotations

import os
import subprocess

from qmigx.errors import ChannelError
from qmigx.transport.channel import Channel

__all__ = ["spawn"]


def spawn(command: str, producer: bool) -> Channel:
    """Run ``/bin/sh -c command`` with a pipe on its stdin and one on its stdout."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=in_r, stdout=out_w,
                                close_fds=True)
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise ChannelError(f"cannot run /bin/sh -c {command!r}: {e.strerror}", field="uri") from None
    os.close(in_r)
    os.close(out_w)
    return Channel(f"exec:{command}", rfd=out_r, wfd=in_w, process=proc, producer=producer)
