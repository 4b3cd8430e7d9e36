"""COLO checkpoints, both roles (QEMU's colo.c).

After a precopy migration with ``x-colo`` the primary does not hand over:
it keeps its guest running and, every ``x-checkpoint-delay`` ms (or when
asked), stops it for a checkpoint::

    primary                                  secondary
    checkpoint-request   ───────────▶
                         ◀───────────        checkpoint-reply
    stop guest; device state into a buffer
    vmstate-send, RAM END section(s), EOF ──▶ pages into the RAM cache only
    vmstate-size N, N bytes ───────────▶     hold the N bytes
                         ◀───────────        vmstate-received
                                             cache → RAM, devices loaded
                         ◀───────────        vmstate-loaded
    start guest

The secondary's RAM changes only between ``vmstate-received`` and
``vmstate-loaded``, from a checkpoint that arrived whole; a checkpoint cut
short (a dead primary, garbage, a wrong size) is discarded and the
secondary fails over holding the one before.

One thread per side runs the protocol (the source's migration thread,
the destination's incoming thread); failover requests arrive from other
threads (QMP, a timer) through :class:`~qmigx.migration.colo_failover.FailoverState`
and shut the channel down so that a thread blocked on a silent peer wakes,
as QEMU's failover bottom half does. Unlike QEMU 7.2, which waits for
``x-colo-lost-heartbeat`` after a protocol error, qmigx fails over at once
on an error (``COLO_EXIT`` reason ``error``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from qmigx import _backend
from qmigx.errors import (
    CapabilityError,
    ChannelError,
    ChannelTimeout,
    ColoError,
    MigrationError,
    StreamError,
)
from qmigx.migration.colo_failover import ColoStatus
from qmigx.migration.colo_message import (
    MAX_DEVICE_STATE,
    check_device_state_size,
    check_message,
    decode_message,
    decode_value,
    encode_message,
    encode_message_value,
)
from qmigx.migration.direct_send import direct_page_writer
from qmigx.migration.side import S
from qmigx.placement import ColoCachePlacement
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.stream import (
    EndOfState,
    EndOfStream,
    RamEOS,
    RamPages,
    SectionData,
    SectionEnd,
    SectionStart,
    StreamParser,
    StreamWriter,
    parse_vmdesc,
)
from qmigx.wire import (
    TARGET_PAGE_SIZE,
    COLOExitReason,
    COLOMessage,
    COLOMode,
    FailoverStatus,
    SectionType,
)

__all__ = ["CheckpointLog", "ColoPrimary", "ColoSecondary", "check_colo_capabilities"]

_log = logging.getLogger("qmigx.colo")
_colo_recv = _backend.load("colo_recv")

#: a direct read that stored fewer pages than this was a bad guess: the
#: next reads go through the parser (more of them after each bad guess)
_DIRECT_MIN = 4
_DIRECT_BACKOFF_MAX = 64

#: how often a primary between checkpoints looks for a new x-checkpoint-delay (s)
_PARAMETER_POLL = 0.05


def check_colo_capabilities(caps) -> None:
    """Refuse what qmigx cannot checkpoint: x-colo with multifd, postcopy or a return path.

    Multifd pages would bypass the secondary's RAM cache, a postcopy
    migration never completes into ``colo``, and QEMU's return-path reader
    would take COLO's messages (QEMU hangs on the latter).
    """
    if not caps.get("x-colo"):
        return
    for other in ("multifd", "postcopy-ram", "return-path"):
        if caps.get(other):
            raise CapabilityError(f"COLO is not supported with {other}", field=other)


#: socket buffers for the checkpoint bursts (both ways: pages one way, messages the other)
_CHECKPOINT_BUFFER = 4 << 20


def _large_buffers(channel) -> None:
    setter = getattr(channel, "set_buffer_sizes", None)
    if setter is not None:
        setter(send=_CHECKPOINT_BUFFER, recv=_CHECKPOINT_BUFFER)


class CheckpointLog:
    """Per-checkpoint figures (``--report``, ``qmigx plot``): count, dirty pages, pause."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.on_checkpoint: Callable[[dict], None] | None = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, **row) -> dict:
        row["checkpoint"] = len(self.rows) + 1
        self.rows.append(row)
        if self.on_checkpoint is not None:
            self.on_checkpoint(row)
        return row


class _NoVmdescWriter(StreamWriter):
    """A device-state blob is FULL sections and EOF: no vmdesc after it."""

    def vmdesc(self, text: bytes) -> None:
        pass


class _ColoSide:
    """What both roles share: the channel, the reader of the other direction, failover."""

    mode: COLOMode

    def __init__(self, side, channel, status: ColoStatus) -> None:
        self.side = side
        self.channel = channel
        self.status = status
        self.failover = status.failover
        self.failover.on_request = self._on_failover_request
        self.log = CheckpointLog()
        self.error: BaseException | None = None
        self._wake = threading.Event()

    def _on_failover_request(self) -> None:
        """Wake the COLO thread, and shut the channel so no read or write blocks it."""
        self._wake.set()
        try:
            self.channel.shutdown()
        except Exception:  # noqa: BLE001 - already closed
            pass

    def lost_heartbeat(self) -> None:
        """``x-colo-lost-heartbeat``: fail over now."""
        self.status.check_enabled()
        self.failover.request()

    def _finish(self, error: BaseException | None) -> None:
        """The failover work both sides do once the COLO loop ended (QEMU's *_vm_do_failover)."""
        fs = self.failover
        requested = fs.state is not FailoverStatus.NONE and not isinstance(error, _PeerGone)
        if error is not None and not requested:
            self.error = error
            _log.warning("COLO %s: %s", self.mode.qapi_name, error)
            fs.set_state(FailoverStatus.NONE, FailoverStatus.REQUIRE)
        fs.set_state(FailoverStatus.REQUIRE, FailoverStatus.ACTIVE)
        self.side.c.state.try_transition(S.COLO, S.COMPLETED)
        fs.set_state(FailoverStatus.ACTIVE, FailoverStatus.COMPLETED)
        reason = COLOExitReason.REQUEST if requested else COLOExitReason.ERROR
        self.status.leave(reason)
        self.side.c.events.colo_exit(self.mode.qapi_name, reason.qapi_name)


class _PeerGone(ChannelError):
    """The peer's connection ended outside a failover request."""


class ColoPrimary(_ColoSide):
    """The primary's COLO thread (QEMU's colo_process_checkpoint).

    Args:
        source: the :class:`~qmigx.migration.source.MigrationSource` whose
            precopy migration just completed (its guest, devices, state).
        channel: the migration channel; the return direction carries the
            secondary's messages.
        f, w, rw: the stream's writers, which go on where the precopy
            migration stopped (section ids, the CONTINUE block).
        ram: the source's :class:`~qmigx.precopy.RamSaveState`.
        ram_section: the ``ram`` section.
        first_device_id: the section id of the first device section.
    """

    mode = COLOMode.PRIMARY

    def __init__(self, source, channel, f: QEMUFile, w: StreamWriter, rw, ram, ram_section,
                 first_device_id: int) -> None:
        super().__init__(source, channel, source.colo_status)
        self.f = f
        self.w = w
        self.rw = rw
        self.ram = ram
        self.ram_section = ram_section
        self.first_device_id = first_device_id
        self._rx_buf = bytearray(16)
        #: the secondary said checkpoint-ready: checkpoints may be asked for
        self.ready = False

    def checkpoint_now(self) -> None:
        """Start a checkpoint at once (on demand, or ``x-checkpoint-delay`` changed)."""
        self._wake.set()

    # -- the return direction: exactly the bytes asked for, nothing read ahead
    def _read(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            k = self.channel.readinto(memoryview(self._rx_buf)[: n - len(out)])
            if k == 0:
                raise _PeerGone(f"the secondary closed the connection (waiting for {what})",
                                field="colo-message")
            out += self._rx_buf[:k]
        return bytes(out)

    def _expect(self, expected: COLOMessage) -> None:
        check_message(decode_message(self._read(4, expected.qapi_name)), expected)

    def _send(self, msg: COLOMessage) -> None:
        self.f.write(encode_message(msg))
        self.f.flush()
        self.f.check()

    def run(self) -> None:
        """Enter ``colo``, checkpoint until failover, then leave in ``completed``."""
        src = self.side
        st = src.c.state
        if not st.try_transition(S.ACTIVE, S.COLO):
            src._lost_transition()
        self.status.enter(COLOMode.PRIMARY)
        self.failover.on_request = self._on_failover_request
        error: BaseException | None = None
        try:
            self.channel.set_timeout(src.io_timeout)
            _large_buffers(self.channel)
            self._expect(COLOMessage.CHECKPOINT_READY)
            src.guest.start()
            self.ready = True
            last = time.monotonic()
            delay_ms = src.c.params.x_checkpoint_delay
            while not self.failover.requested:
                now_delay = src.c.params.x_checkpoint_delay
                if now_delay != delay_ms:  # a new delay in COLO: a checkpoint at once, as QEMU
                    delay_ms = now_delay
                    self._wake.set()
                left = delay_ms / 1000 - (time.monotonic() - last)
                if left > 0 and not self._wake.is_set():
                    self._wake.wait(min(left, _PARAMETER_POLL))
                    self._check_secondary()
                    continue
                self._wake.clear()
                if self.failover.requested:
                    break
                self.checkpoint()
                last = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - every end of COLO is a failover
            error = exc
        if not src.guest.running:
            src.guest.start()  # the primary goes on alone
        self._finish(error)

    def _check_secondary(self) -> None:
        """Between checkpoints: a secondary that closed the connection ends COLO now.

        QEMU's primary only finds out at its next checkpoint, which a long
        ``x-checkpoint-delay`` may put far away.
        """
        can_peek = getattr(self.channel, "can_peek", False)
        if can_peek and not self.failover.requested:
            try:
                gone = self.channel.peek_nowait(1) == b""
            except ChannelError:
                gone = True
            if gone:
                raise _PeerGone("the secondary closed the connection", field="colo")

    def checkpoint(self) -> dict:
        """One checkpoint transaction (QEMU's colo_do_checkpoint_transaction)."""
        src = self.side
        ram, rw, w, f = self.ram, self.rw, self.w, self.f
        t_request = time.monotonic()
        self._send(COLOMessage.CHECKPOINT_REQUEST)
        self._expect(COLOMessage.CHECKPOINT_REPLY)
        if self.failover.requested:
            raise ChannelError("failover requested", field="colo")
        t_stop = time.monotonic()
        src.guest.stop()
        blob = self.device_state()
        self._send(COLOMessage.VMSTATE_SEND)
        sent_before = ram.pages_sent
        bytes_before = f.total_transferred
        w.section_header(SectionType.SECTION_END, self.ram_section)
        ram.direct_pages = direct_page_writer(self.channel, self.f)
        try:
            ram.complete(rw, last_stage=False)  # XBZRLE's cache follows each checkpoint
        finally:
            ram.direct_pages = None
        rw.eos()
        w.footer(self.ram_section)
        w.eof()
        f.write(encode_message_value(COLOMessage.VMSTATE_SIZE, len(blob)))
        f.write(blob)
        f.flush()
        f.check()
        self._expect(COLOMessage.VMSTATE_RECEIVED)
        self._expect(COLOMessage.VMSTATE_LOADED)
        src.guest.start()  # also a guest the user stopped: QEMU restarts it too
        t_run = time.monotonic()
        src.c.stats.dirty_sync_count = max(src.c.stats.dirty_sync_count, ram.dirty_sync_count)
        return self.log.add(dirty_pages=ram.pages_sent - sent_before,
                            bytes=f.total_transferred - bytes_before,
                            pause_ms=(t_run - t_stop) * 1000,
                            total_ms=(t_run - t_request) * 1000, time=time.time())

    def device_state(self) -> bytes:
        """The device-state blob: every device's FULL section, then EOF; no header, no vmdesc."""
        sink = BytesSink()
        bf = QEMUFile(sink)
        self.side._write_devices(_NoVmdescWriter(bf), "running", first_id=self.first_device_id)
        bf.flush()
        return bytes(sink.data)


class ColoSecondary(_ColoSide):
    """The secondary's COLO thread (QEMU's colo_process_incoming_thread).

    Args:
        destination: the :class:`~qmigx.migration.destination.MigrationDestination`
            whose initial migration (up to its EOF and vmdesc) was loaded.
        channel: the migration channel.
        parser: the destination's stream parser: its receive buffer and
            stream context go on into the checkpoints.
        heartbeat_timeout: beyond QEMU (which has no heartbeat): fail over
            when no checkpoint request arrives for this many seconds.
        max_device_state: the largest ``vmstate-size`` accepted.
    """

    mode = COLOMode.SECONDARY

    def __init__(self, destination, channel, parser: StreamParser, *,
                 heartbeat_timeout: float | None = None,
                 max_device_state: int = MAX_DEVICE_STATE) -> None:
        super().__init__(destination, channel, destination.colo_status)
        self.parser = parser
        self.rx = parser.rx
        self.ctx = parser.ctx
        self.heartbeat_timeout = heartbeat_timeout
        self.max_device_state = max_device_state
        self.placement = ColoCachePlacement()
        #: the device sections of the last complete checkpoint (at first: the migration's)
        self.devices: list = [s for s in destination.result.sections
                              if s.type == SectionType.SECTION_FULL]
        self._apply_lock = threading.Lock()
        #: the cache→RAM copy of the last checkpoint, when it runs after VMSTATE_LOADED
        self._flusher: threading.Thread | None = None
        self._ram_parser: StreamParser | None = None
        #: direct reads into the cache: the page the next record is predicted
        #: for (block index, page), the bytes read past a run, the reads left
        #: to the parser after a bad guess and how many the next one leaves
        self._predict: tuple[int, int] | None = None
        self._spill = bytearray((_colo_recv.MAX_RUN + 1) * (TARGET_PAGE_SIZE + 8) + (1 << 16))
        self._direct_cool = 0
        self._direct_backoff = 1
        #: the secondary's own guest, run between checkpoints and stopped for each
        #: (anything with ``stop()``/``start()``), and the dirty logs of its writes
        #: (idstr → :mod:`qmigx.dirtylog` log): each checkpoint puts the pages it
        #: wrote back to the checkpoint's content, as QEMU merges the SVM's dirty log
        self.guest = None
        self.dirty_logs: dict = {}
        #: where the protocol is: "waiting" for a request, "receiving" a checkpoint,
        #: "applying" one (RAM changes then, or, without a guest here, in the
        #: background just after), "ended"
        self.phase = "waiting"
        #: checkpoints that stopped half-way and were discarded
        self.discarded = 0
        self._vmdesc = None
        if destination.result.vmdesc:
            try:
                self._vmdesc = parse_vmdesc(destination.result.vmdesc)
            except (ValueError, MigrationError):
                self._vmdesc = None

    @property
    def checkpoints(self) -> int:
        """Complete checkpoints applied."""
        return self.log.count

    def _on_failover_request(self) -> None:
        # a checkpoint being applied finishes first (QEMU's relaunch): the
        # lock is held only while the cache is copied into RAM
        with self._apply_lock:
            super()._on_failover_request()

    def _read(self, n: int, what: str) -> bytes:
        return self.rx.read_exact(n, self.channel.readinto_available, what=what)

    def _receive(self, what: COLOMessage) -> COLOMessage:
        at = self.rx.offset
        return decode_message(self._read(4, f"COLO message {what.qapi_name}"), offset=at)

    def _expect(self, expected: COLOMessage) -> None:
        at = self.rx.offset
        check_message(self._receive(expected), expected, offset=at)

    def _send(self, msg: COLOMessage) -> None:
        self.side.rp.send(encode_message(msg))

    def run(self) -> None:
        """Enter ``colo``, apply checkpoints until failover, then leave in ``completed``."""
        dst = self.side
        loader = dst.loader
        st = dst.c.state
        st.transition(S.COLO)
        self.status.enter(COLOMode.SECONDARY)
        self.failover.on_request = self._on_failover_request
        loader.use_placement(self.placement)
        error: BaseException | None = None
        try:
            _large_buffers(self.channel)
            self._send(COLOMessage.CHECKPOINT_READY)
            while not self.failover.requested:
                self.phase = "waiting"
                if not self._wait_request():
                    break
                self.phase = "receiving"
                self.checkpoint()
        except BaseException as exc:  # noqa: BLE001 - every end of COLO is a failover
            error = exc
        if self.phase == "receiving":
            self.discarded += 1
        self._join_flush()  # the last complete checkpoint is in RAM before anything goes on
        self.phase = "ended"
        if self.guest is not None:
            self.guest.start()  # the secondary goes on as the new primary
        self.placement.discard(loader.table)  # a checkpoint cut short is never applied
        if isinstance(error, ChannelError) and self.failover.requested:
            error = None
        self._finish(error)

    def _wait_request(self) -> bool:
        """Wait for ``checkpoint-request``; False: a heartbeat timeout or failover came first."""
        io_timeout = self.side.io_timeout
        deadline = (None if self.heartbeat_timeout is None
                    else time.monotonic() + self.heartbeat_timeout)
        # between checkpoints the channel is idle for x-checkpoint-delay, however
        # long: poll, so that only a failover or the heartbeat timeout ends the wait
        self.channel.set_timeout(0.2)
        try:
            while True:
                if self.failover.requested:
                    return False
                try:
                    at = self.rx.offset
                    raw = self._read(4, "COLO message checkpoint-request")
                    break
                except ChannelTimeout:
                    if deadline is not None and time.monotonic() > deadline:
                        raise ColoError(f"no checkpoint within the heartbeat timeout of "
                                        f"{self.heartbeat_timeout:g} s",
                                        field="heartbeat") from None
        finally:
            self.channel.set_timeout(io_timeout)
        msg = decode_message(raw, offset=at)
        if msg != COLOMessage.CHECKPOINT_REQUEST:
            raise ColoError(f"Got unknown COLO message: {int(msg)}", offset=at,
                            field="colo-message")
        return True

    def checkpoint(self) -> dict:
        """Receive one checkpoint and apply it only once it arrived whole.

        With a guest here (it runs on RAM as soon as the checkpoint is
        loaded) the cache is copied into RAM before VMSTATE_LOADED, as
        QEMU's secondary does. Without one, nothing reads RAM until a
        failover, so the copy runs after VMSTATE_LOADED and the primary
        resumes without waiting for it: the checkpoint is whole in the
        cache already, and the next checkpoint, a failover and the end of
        COLO each wait for the copy to finish.
        """
        self._join_flush()
        t0 = time.monotonic()
        if self.guest is not None:
            self.guest.stop()
        self._send(COLOMessage.CHECKPOINT_REPLY)
        self._expect(COLOMessage.VMSTATE_SEND)
        pages = self._load_ram_part()
        self._expect(COLOMessage.VMSTATE_SIZE)
        at = self.rx.offset
        size = decode_value(self._read(8, "vmstate-size value"), COLOMessage.VMSTATE_SIZE,
                            offset=at)
        check_device_state_size(size, self.max_device_state, offset=at)
        at = self.rx.offset
        try:
            blob = self._read(size, "COLO device state")
        except StreamError as exc:
            raise ColoError(f"Got {self.rx.pending} VMState data, less than expected {size}",
                            offset=at, field="vmstate") from exc
        self._send(COLOMessage.VMSTATE_RECEIVED)
        devices = self._parse_devices(blob, at)
        with self._apply_lock:
            self.phase = "applying"
            self._merge_own_writes()
            if self.guest is None and not self.dirty_logs:
                flushed = self.placement.pending_pages()
                flusher = threading.Thread(target=self._flush, name="colo/flush", daemon=True)
                flusher.start()
                self._flusher = flusher
            else:
                flushed = self.placement.flush(self.side.loader.table)
            self.devices = devices
            self.side.result.sections = list(devices)  # what the machine now holds
        self._send(COLOMessage.VMSTATE_LOADED)
        if self.guest is not None:
            self.guest.start()
        return self.log.add(dirty_pages=pages, flushed_pages=flushed, device_bytes=size,
                            pause_ms=(time.monotonic() - t0) * 1000, time=time.time())

    def _flush(self) -> None:
        with self._apply_lock:  # a failover asked for now waits for the copy
            self.placement.flush(self.side.loader.table)

    def settle(self) -> None:
        """Wait until the last complete checkpoint is in RAM (its copy may still run)."""
        t = self._flusher
        if t is not None:
            t.join()

    def _join_flush(self) -> None:
        self.settle()
        self._flusher = None

    def _merge_own_writes(self) -> int:
        """Mark the pages the secondary's guest wrote since the last checkpoint for the flush."""
        n = 0
        for idstr, log in self.dirty_logs.items():
            dirty = self.placement.dirty.get(idstr)
            words = log.sync()
            if dirty is None or words is None:
                continue
            bits = np.unpackbits(np.asarray(words).view(np.uint8), bitorder="little")
            own = bits[: len(dirty)].astype(bool)
            n += int(own.sum())
            dirty |= own
        return n

    def _load_ram_part(self) -> int:
        """The END section(s) and EOF after ``vmstate-send``: pages into the cache only."""
        parser = self._ram_parser
        if parser is None:
            parser = self._ram_parser = StreamParser(
                registry=self.parser.registry, header=False, context=self.ctx, buffer=self.rx,
                stop_at_eof=True)
        else:
            parser.next_part()
        loader = self.side.loader
        pages = 0
        direct = self._direct_possible()
        self._predict = None
        while True:
            for ev in parser.events():
                t = type(ev)
                if t is RamPages:
                    loader.on_pages(ev)
                    pages += ev.records.count
                    if direct:
                        rec = ev.records
                        last = rec.count - 1
                        self._predict = (int(rec.block[last]),
                                         int(rec.offset[last]) // TARGET_PAGE_SIZE + 1)
                elif t is RamEOS or t is SectionEnd:
                    self._predict = None
                    continue
                elif t is SectionStart and ev.type == SectionType.SECTION_END:
                    continue  # each live section's END (QEMU sends ram only)
                elif t is EndOfState:
                    return pages
                elif t is EndOfStream:
                    raise ColoError("the checkpoint ends before its EOF", offset=ev.offset,
                                    field="checkpoint")
                else:
                    raise ColoError(f"unexpected {t.__name__} in a COLO checkpoint's RAM part",
                                    offset=getattr(ev, "offset", None), field="checkpoint")
            if self._predict is not None and parser.in_ram_records:
                got = self._receive_direct()
                if got >= 0:
                    pages += got
                    continue
            if parser.fill(self.channel.readinto_available) == 0:
                parser.feed_eof()

    def _direct_possible(self) -> bool:
        """Whether pages may be read straight into the cache this checkpoint.

        A bad guess gives the cache pages it passed through their RAM
        content back, which is right only while the cache and RAM agree on
        every page not yet received: so not with a secondary guest writing
        RAM, nor for blocks the loader ignores; and only on a plain socket.
        """
        loader = self.side.loader
        return (self.guest is None and not self.dirty_logs and not loader.ignore_shared
                and loader.placement is self.placement and self.channel.socket_fds() is not None)

    def _receive_direct(self) -> int:
        """Read the block's pages from the predicted one on into the cache; -1: not tried."""
        if self._direct_cool:
            self._direct_cool -= 1
            return -1
        bi, page = self._predict
        self._predict = None  # the parser's next page records predict again
        loader = self.side.loader
        table = loader.table
        rx = self.rx
        if not 0 <= bi < len(table) or self.ctx.scanner.last_block != bi or rx.pending > 1 << 16:
            return -1
        blk = table[bi]
        pl = self.placement
        dirty = pl.dirty.get(blk.idstr)
        cache = pl.cache.get(blk.idstr)
        fds = self.channel.socket_fds()
        if dirty is None or cache is None or fds is None or page >= len(dirty) or dirty[page]:
            return -1
        prefix = bytes(rx.view[rx.pos :])
        stored, used, spilled, status, err = _colo_recv.receive_pages(
            fds[0], fds[1], cache, blk.buffer[: blk.used_length], dirty, pl.received[blk.idstr],
            page, prefix, self._spill, TARGET_PAGE_SIZE, self.channel.timeout)
        self.channel.bytes_read += used + spilled - len(prefix)
        loader.pages_loaded += stored
        rx.resume(memoryview(self._spill)[:spilled], used)
        if stored < _DIRECT_MIN:
            self._direct_cool = self._direct_backoff
            self._direct_backoff = min(2 * self._direct_backoff, _DIRECT_BACKOFF_MAX)
        else:
            self._direct_backoff = 1
        if status == _colo_recv.END:
            rx.eof = True
        elif status != _colo_recv.DONE:
            what = {_colo_recv.STOPPED: "stopped", _colo_recv.TIMEOUT: "timeout"}.get(status,
                                                                                      "failed")
            raise self.channel.failure(what, err=err)
        return stored

    def _parse_devices(self, blob: bytes, at: int) -> list:
        """Check the device-state blob whole before anything is applied: FULL sections and EOF."""
        parser = StreamParser(vmdesc=self._vmdesc, registry=self.parser.registry, header=False,
                              context=self.ctx, stop_at_eof=True, batch=16)  # no RAM in it
        parser.rx.base = at
        parser.feed(blob)
        parser.feed_eof()
        out = []
        ended = False
        for ev in parser.events():
            t = type(ev)
            if t is SectionData and ev.type == SectionType.SECTION_FULL:
                out.append(ev)
            elif (t is SectionStart and ev.type == SectionType.SECTION_FULL) or t is SectionEnd:
                continue
            elif t is EndOfState:
                ended = True
                break
            else:
                raise ColoError(f"unexpected {t.__name__} in COLO device state",
                                offset=getattr(ev, "offset", None), field="vmstate")
        if not ended:
            raise ColoError("COLO device state ends before its EOF", offset=at + len(blob),
                            field="vmstate")
        if parser.rx.pending:
            raise ColoError(f"{parser.rx.pending} bytes after the EOF of COLO device state",
                            offset=parser.offset, field="vmstate")
        return out
