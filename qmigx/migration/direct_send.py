"""Page records written from guest memory straight to a socket.

With no XBZRLE, compression or multifd, a page goes out as it is in
guest memory: the compiled sender (``qmigx._core.pagesend``) finds the
zero pages and hands the others to the kernel in gathering writes, so a
page is copied once, by the kernel, instead of into a record buffer first.
A page the guest writes meanwhile is dirty again and goes again, as QEMU
sends from guest memory too. Only a plain socket has the descriptors it
needs (not TLS, a pipe or a file).
"""

from __future__ import annotations

from typing import Callable, Optional

from qmigx import _backend
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["direct_page_writer", "latch_failure"]

_pagesend = _backend.load("pagesend")


def direct_page_writer(channel, f) -> Optional[Callable]:
    """``direct_pages(mem, pages)`` for :class:`~qmigx.precopy.RamSaveState`, or None.

    Writes on ``channel`` behind the QEMU file ``f`` (flushed first by the
    engine); returns ``(nbytes, zeros, normal)``, or None after latching
    the channel's error on ``f``.
    """
    if channel.socket_fds() is None:
        return None

    def send(mem, pages) -> Optional[tuple[int, int, int]]:
        fds = channel.socket_fds()
        if fds is None:
            f.set_error(channel.failure("stopped", writing=True))
            return None
        nbytes, zeros, normal, status, err = _pagesend.send_pages(
            fds[0], fds[1], mem, pages, TARGET_PAGE_SIZE, channel.timeout)
        channel.bytes_written += nbytes
        f.wrote_directly(nbytes)
        if status != _pagesend.DONE:
            latch_failure(channel, f, status, err)
            return None
        return nbytes, zeros, normal
    return send


def latch_failure(channel, f, status: int, err: int) -> None:
    """Latch on ``f`` the channel's error for a compiled writer's ``status`` (not DONE)."""
    what = {_pagesend.STOPPED: "stopped", _pagesend.TIMEOUT: "timeout"}.get(status, "failed")
    f.set_error(channel.failure(what, writing=True, err=err))
