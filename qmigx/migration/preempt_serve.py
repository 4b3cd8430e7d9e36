"""The source's page requests served by a compiled loop while postcopy runs with preempt.

The return-path thread hands its channel to :class:`RequestServer` once
the postcopy stream starts (when both the return path and the preempt
channel are plain sockets). The compiled loop (:mod:`qmigx._core.rp_serve`)
reads the requests and writes the pages taken on the preempt channel
without the GIL; what it does not handle (other messages, refusals, a
chunk whose dirty log is still to clear) comes back here to be decoded
by :class:`~qmigx.returnpath.ReturnPathParser` as before. The counters the
Python side keeps (pages sent, requests served, the last request's block,
the preempt writer's block) are brought up to date each time it returns,
at least every :data:`TURN_MS`.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from qmigx import _backend

__all__ = ["RequestServer", "TURN_MS"]

#: the longest the compiled loop runs before counters and cancellation are looked at
TURN_MS = 1000


class RequestServer:
    """Page requests from ``ram`` (a :class:`~qmigx.precopy.RamSaveState`) onto ``pre``.

    ``on_turn`` is called with the requests served after each return of
    the loop (the source adds them to ``postcopy-requests``).
    """

    def __init__(self, ram, pre, on_turn: Callable[[int], None]) -> None:
        self._k = _backend.load("rp_serve")
        self.ram = ram
        self.pre = pre
        self.on_turn = on_turn
        self.table = ram.request_table()
        self.names = [e[0].decode() for e in self.table]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.state = np.zeros(self._k.STATE_SLOTS, np.int64)
        self.buf = bytearray(2 * self._k.MIN_BUFFER)
        self.active = True

    @staticmethod
    def possible(pre) -> bool:
        """The preempt channel is a plain socket (the return path is looked at in :meth:`serve`)."""
        return pre is not None and pre.lock.fd >= 0

    def serve(self, ch, parser, cancelled: Callable[[], bool]) -> Optional[bytes]:
        """Serve until a message needs Python: the bytes from it on (for ``parser``).

        None: the peer closed the return path. Returns ``b""`` once
        :attr:`active` is cleared (postcopy's stream ended or paused).
        """
        k = self._k
        get = getattr(ch, "socket_fds", None)
        fds = get() if get is not None else None
        if fds is None:  # not a plain socket: the Python reader goes on alone
            self.active = False
            return b""
        fd, wake = fds
        have = 0
        read_before = int(self.state[4])

        def rest(data: bytes) -> bytes:
            got = int(self.state[4]) - read_before
            ch.bytes_read += got
            parser.skipped(got - len(data))  # error offsets stay those of the whole path
            return data

        while True:
            self._enter()
            try:
                st, pos, have, err = k.serve_requests(fd, wake, self.buf, have, self.table,
                                                      self.ram.take_lock, self.pre.lock,
                                                      self.state, TURN_MS)
            finally:
                self._leave()
            if st == k.TIMEOUT:
                self.buf[: have - pos] = self.buf[pos:have]
                have -= pos
                if cancelled():
                    raise ch.failure("timeout")
                if self.active:
                    continue
                return rest(bytes(self.buf[:have]))
            if st == k.DONE:
                return rest(bytes(self.buf[pos:have]))
            if st == k.END:
                rest(bytes(self.buf[pos:have]))
                return None
            if st == k.WRITE_FAILED:
                raise self.pre.failure(err)
            raise ch.failure("stopped" if st == k.STOPPED else "failed", err=err)

    def _enter(self) -> None:
        st = self.state
        st[0] = self.ram.request_block
        st[1] = self._index.get(self.pre.block, -1)
        self._before = (int(st[2]), int(st[3]))

    def _leave(self) -> None:
        st, pre = self.state, self.pre
        pages, served = int(st[2]) - self._before[0], int(st[3]) - self._before[1]
        if st[0] >= 0:
            self.ram.request_block = int(st[0])
        if st[1] >= 0:
            pre.block = self.names[int(st[1])]
        pre.pages += pages
        self.ram.count_served(pages, served)
        if served:
            self.on_turn(served)
