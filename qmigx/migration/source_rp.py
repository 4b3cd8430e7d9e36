"""The source's side of the return path (QEMU's source_return_path_thread).

The destination answers on the main connection: PONGs, SHUT at the end,
SWITCHOVER_ACK (QEMU 10), and in postcopy its page requests, and on
recovery the received bitmap of each block and RESUME_ACK. A thread reads
them and hands each to the migration thread through events and queues.
"""

from __future__ import annotations

import time

from qmigx import returnpath
from qmigx.errors import ChannelError, ChannelTimeout, MigrationError, StreamError
from qmigx.migration.side import S
from qmigx.wire import MigRpMsg

__all__ = ["SourceReturnPath"]


class SourceReturnPath:
    """Mixed into :class:`~qmigx.migration.MigrationSource`: the return-path thread and waits."""

    def _rp_reader(self, ch) -> None:
        parser = returnpath.ReturnPathParser()
        buf = bytearray(4096)
        try:
            while True:
                server = self._rp_server
                if server is not None and server.active and parser.idle:
                    # postcopy with preempt: requests served without the GIL
                    data = server.serve(ch, parser, self._cancel.is_set)
                else:
                    data = self._rp_read(ch, buf)
                if data is None:
                    if not self._shut.is_set():
                        raise ChannelError("return path closed before SHUT", field="return-path")
                    return
                parser.feed(data)
                if self._rp_messages(parser):
                    return
        except BaseException as exc:
            if not self._cancel.is_set() and self.c.state.state != S.COMPLETED:
                self._rp_error = exc
            self._shut.set()

    def _rp_read(self, ch, buf: bytearray):
        """What the return path has (None: it closed)."""
        try:
            n = ch.readinto(buf)
        except ChannelTimeout:
            # Between PONG and SHUT the return path is idle for as long as
            # the migration runs: the channel's I/O timeout, meant for a
            # stalled stream, is no reason to fail (_wait_shut bounds SHUT).
            if not self._cancel.is_set():
                return b""
            raise
        return memoryview(buf)[:n] if n else None

    def _rp_messages(self, parser) -> bool:
        """Act on every whole message ``parser`` holds; True at SHUT (the reader's end)."""
        for msg in parser.messages():
            if msg.type == MigRpMsg.PONG:
                self._ponged.set()
                self._rp_event.set()
                continue
            if msg.type == MigRpMsg.SWITCHOVER_ACK:
                self._switchover_acked.set()
                continue
            if msg.type == MigRpMsg.RECV_BITMAP:
                self._recv_bitmaps[msg.block] = msg.bitmap
                self._rp_event.set()
                continue
            if msg.type == MigRpMsg.RESUME_ACK:
                self._resume_acked.set()
                self._rp_event.set()
                continue
            if msg.type == MigRpMsg.SHUT:
                self._shut_status = msg.value
                self._shut.set()
                return True
            if msg.type in (MigRpMsg.REQ_PAGES, MigRpMsg.REQ_PAGES_ID):
                if not self._pc_stopped and not self._start_postcopy.is_set():
                    raise StreamError("postcopy page request during precopy",
                                      offset=msg.offset, field="return-path")
                self.ram.request_pages(msg.block, msg.start, msg.length)
                self.c.stats.postcopy_requests += 1
                serve = self._serve_requested
                if serve is not None:  # the preempt channel: no wait for the stream
                    serve()
                self._postcopy_request.set()
        return False

    def _rp_check(self) -> None:
        if self._rp_error is not None:
            raise self._rp_error
        if self._shut_status:  # a failed destination says so before it closes
            raise MigrationError(f"destination reported failure (SHUT {self._shut_status})")

    def _wait_switchover_ack(self) -> None:
        """``switchover-ack``: a running guest is not stopped before the destination agrees."""
        deadline = time.monotonic() + (self.io_timeout or 3600)
        while not self._switchover_acked.wait(0.1):
            self._check_cancel()
            self._rp_check()
            if self._shut.is_set():
                raise ChannelError("return path ended without SWITCHOVER_ACK",
                                   field="switchover-ack")
            if time.monotonic() > deadline:
                raise ChannelError("timed out waiting for the destination's SWITCHOVER_ACK",
                                   field="switchover-ack")

    def _wait_shut(self) -> None:
        deadline = time.monotonic() + (self.io_timeout or 3600)
        while not self._shut.wait(0.1):
            self._check_cancel()
            if time.monotonic() > deadline:
                raise ChannelError("timed out waiting for the destination's SHUT",
                                   field="return-path")
        self._rp_check()
        if self._shut_status:
            raise MigrationError(f"destination reported failure (SHUT {self._shut_status})")
