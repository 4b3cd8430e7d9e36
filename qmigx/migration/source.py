"""The outgoing side (QEMU's migration thread, migration.c).

:class:`MigrationSource` runs QEMU's migration thread: setup (channels,
header, configuration, return path, the live sections' START), iterations
(one PART per live section, rate-limited to ``max-bandwidth`` in 100 ms
windows, until what is left could be sent within ``downtime-limit``),
then completion (guest stopped, final sync, END sections, device
sections, EOF, vmdesc, and the destination's SHUT when the return path is
open).

A failed or cancelled migration loses nothing on the source: its guest
memory is only ever read, and a guest stopped for completion is started
again.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Callable, Optional, Sequence

from qmigx import transport
from qmigx.autoconverge import AutoConverge
from qmigx.compat import MigrationCompat, migration_compat
from qmigx.crypto import ObjectRoot, TLSSettings
from qmigx.control import (
    Capabilities,
    DirtyRatePeriod,
    MigrationStats,
    MigrationStatus,
    Parameters,
    RateWindow,
    query_migrate,
)
from qmigx.errors import (
    CapabilityError,
    ChannelError,
    MigrationCancelled,
    MigrationError,
)
from qmigx.guest import Guest, SimpleGuest
from qmigx.migration.colo import ColoPrimary, check_colo_capabilities
from qmigx.migration.colo_failover import ColoStatus
from qmigx.migration.direct_send import direct_page_writer
from qmigx.migration.postcopy_source import advise_payload, connect_preempt, run_postcopy
from qmigx.migration.side import Controls, S, Side, now_ms
from qmigx.migration.source_rp import SourceReturnPath
from qmigx.multifd import pack_init_packet
from qmigx.multifd.channels import MultifdSender
from qmigx.precopy import RamSaveState
from qmigx.qemufile import QEMUFile
from qmigx.ram import RAMBlockList, RamWriter
from qmigx.report import IterationLog
from qmigx.savevm import SaveVMHandler
from qmigx.stream import (
    ConfigSubsection,
    Configuration,
    Section,
    SectionData,
    StreamWriter,
)
from qmigx.wire import TARGET_PAGE_SIZE, MigCmd, SectionType

__all__ = ["MigrationSource"]


class MigrationSource(SourceReturnPath, Side):
    """An outgoing migration of ``blocks`` (and device state) to a URI.

    Args:
        blocks: the guest's RAM blocks, in RAM-list order.
        devices: device sections to send at completion, in order
            (:class:`~qmigx.tools.streams.DeviceState`; or
            :class:`~qmigx.stream.SectionData` replayed verbatim, ids kept).
        vmdesc: the vmdesc text to send; default: built from ``devices``.
        guest: what completion stops (default: a :class:`SimpleGuest`).
        dirty_logs: a dirty-log source per block idstr (see
            :mod:`qmigx.dirtylog`); blocks without one are sent once.
        capabilities, parameters: QEMU's, as set with
            ``migrate-set-capabilities`` / ``-parameters``.
        machine_type: sent in the configuration section.
        configuration: a received :class:`~qmigx.stream.Configuration` to
            replay instead (keeps its subsections).
        uuid: the VM's 16-byte UUID (multifd init packets, validate-uuid).
        clear_bitmap_shift: ``x-clear-bitmap-shift``.
        globalstate: add a ``globalstate`` section (QEMU's default).
        ram_section_id: the ``ram`` section's id (replayed streams keep theirs).
        handlers: further live sections (``block``, ``dirty-bitmap``:
            :class:`~qmigx.savevm.SaveVMHandler`), run with RAM in QEMU's
            order (by section id) and skipped when not ``is_active()``.
        compat: the wire conventions to follow (:mod:`qmigx.compat`);
            default: those of the machine type (``configuration``'s, else
            ``machine_type``) as QEMU 10 migrates it, which QEMU 7.2 shares
            for the machine types it has. They decide the multifd sync
            model (per section, or per round announced by MULTIFD_FLUSH:
            mixing them hangs QEMU 10), whether SWITCHOVER_START is sent and
            QEMU 10's SYNC packet layout.
        objects: the VM's objects (:class:`~qmigx.crypto.ObjectRoot`) that
            ``tls-creds`` names; default: an empty root of its own
            (:attr:`objects`).
    """

    def __init__(self, blocks: RAMBlockList, *, devices: list = (), vmdesc: Optional[bytes] = None,
                 guest: Optional[Guest] = None, dirty_logs: Optional[dict] = None,
                 capabilities: Optional[Capabilities] = None,
                 parameters: Optional[Parameters] = None,
                 machine_type: str = "pc-i440fx-7.2",
                 configuration: Optional[Configuration] = None, uuid: Optional[bytes] = None,
                 clear_bitmap_shift: int = 18, globalstate: bool = True,
                 ram_section_id: int = 2, handlers: Sequence[SaveVMHandler] = (),
                 connect_timeout: float = 30.0, io_timeout: Optional[float] = 60.0,
                 compat: Optional[MigrationCompat] = None,
                 objects: Optional[ObjectRoot] = None) -> None:
        self.blocks = blocks
        self.objects = objects if objects is not None else ObjectRoot()
        self.handlers = list(handlers)
        self.devices = list(devices)
        self.vmdesc = vmdesc
        self.guest = guest if guest is not None else SimpleGuest()
        self.dirty_logs = dirty_logs or {}
        self.c = Controls("source", capabilities, parameters)
        self.machine_type = machine_type
        self.configuration = configuration
        self.compat = compat or migration_compat(
            configuration.machine_type if configuration is not None else machine_type, "10.0")
        self._switchover_acked = threading.Event()
        self._ponged = threading.Event()  # a PONG came back on the return path
        self._start_postcopy = threading.Event()
        self._postcopy_request = threading.Event()
        #: sends the queued page requests on the preempt channel (set while postcopy streams)
        self._serve_requested: Optional[Callable[[], None]] = None
        #: postcopy with preempt over plain sockets: the return path's compiled page server
        self._rp_server = None
        self.preempt_pages = 0
        self._pc_stopped = False  # the guest was stopped for postcopy
        self._pc_ran = False  # the destination was told to RUN: the guest never resumes here
        self._resume = threading.Event()
        self._resume_uri: Optional[str] = None
        self._uri: Optional[str] = None  # where the current migration goes
        #: why postcopy is paused (the error that broke the connection)
        self.pause_reason: Optional[BaseException] = None
        self._resume_acked = threading.Event()
        self._recv_bitmaps: dict = {}
        self._rp_event = threading.Event()
        #: seconds a paused postcopy waits for migrate(resume=True); None: for ever
        self.recover_timeout: Optional[float] = None
        self.uuid = uuid
        self.clear_bitmap_shift = clear_bitmap_shift
        #: a :class:`~qmigx.tools.pagerelay.RelayPlacement` whose file holds the pages
        self.page_relay = None
        self.globalstate = globalstate
        self.ram_section_id = ram_section_id
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._thread: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._continue = threading.Event()
        self._chans: list = []
        self._rp_thread: Optional[threading.Thread] = None
        self._shut = threading.Event()
        self._shut_status: Optional[int] = None
        self._rp_error: Optional[BaseException] = None
        self.ram: Optional[RamSaveState] = None
        self.iterations: list[dict] = []  # per-iteration report rows
        self.on_iteration: Optional[Callable[[dict], None]] = None
        #: called in the migration thread once the iterations end, before the
        #: final pass (``qmigx send`` waits there for FILE to be loaded whole)
        self.before_complete: Optional[Callable[[], None]] = None
        self._log = IterationLog()
        self._converge = AutoConverge()
        self._dirty_found = 0
        #: COLO: the checkpointing thread while in ``colo`` (x-colo), and its status
        self.colo: Optional[ColoPrimary] = None
        self.colo_status = ColoStatus()

    # -- public --------------------------------------------------------------
    def migrate(self, uri: str, *, resume: bool = False, start_postcopy: bool = False) -> None:
        """Start migrating to ``uri`` in the background (QMP ``migrate``).

        ``resume``: reconnect a paused postcopy to ``uri`` (a destination
        that ran ``migrate-recover`` there). ``start_postcopy``: as
        ``migrate-start-postcopy`` given at once, but without the race of a
        separate call: the first iteration already sees it, so RAM goes
        after the switch-over rather than in a first precopy pass.
        """
        st = self.c.state
        if resume:
            if st.state is not S.POSTCOPY_PAUSED:
                raise MigrationError("Cannot resume if there is no paused migration")
            transport.parse_uri(uri)
            self._resume_uri = uri
            self._resume.set()
            return
        if st.is_running():
            raise MigrationError("There's a migration process in progress")
        parsed = transport.parse_uri(uri)  # bad URIs fail here, before any state change
        mapped = self.c.caps.get("mapped-ram")
        if mapped and parsed.scheme != "file":
            raise CapabilityError("Mapped-ram migration requires a seekable transport (file:)",
                                  field="mapped-ram")
        if self.c.caps.get("multifd") and not parsed.multi_channel and not mapped:
            raise CapabilityError("multifd is not supported by current protocol",
                                  field="multifd")
        check_colo_capabilities(self.c.caps)
        if start_postcopy:
            self._check_postcopy_enabled()
        prev = self._thread
        if prev is not None and prev is not threading.current_thread():
            prev.join(timeout=30)  # the last run is idle but may still be cleaning up
        self.c.error = None
        self.c.stats.error_desc = None
        self.c.done.clear()
        self._rp_error = None
        self._shut_status = None
        self._rp_thread = None
        self._cancel.clear()
        self._continue.clear()
        self._shut.clear()
        self._switchover_acked.clear()
        self._ponged.clear()
        self.iterations = []
        self._log = IterationLog()
        self._converge.reset()
        if self.guest.running and hasattr(self.guest, "throttle"):
            self.guest.throttle(0)
        self.c.stats.reset(now_ms(), self.c.params.downtime_limit)
        st.reset_for_new_migration()  # -> setup
        self._start_postcopy.clear()  # QEMU's migrate_init forgets the last one's request
        self._pc_stopped = self._pc_ran = False
        if start_postcopy:
            self._start_postcopy.set()
        self._thread = threading.Thread(target=self._run, args=(uri,), name="migration",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """``migrate_cancel``: stop now; the guest keeps (or resumes) running."""
        st = self.c.state
        for old in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG):
            if st.try_transition(old, S.CANCELLING):
                break
        else:
            return
        self._cancel.set()
        self._continue.set()
        for ch in list(self._chans):
            try:
                ch.shutdown()
            except Exception:
                pass

    def pause(self) -> None:
        """``migrate-pause``: break the connection; postcopy pauses."""
        if self.c.state.state is not S.POSTCOPY_ACTIVE:
            raise MigrationError("migrate-pause is currently only supported during "
                                 "postcopy-active state")
        for ch in list(self._chans):
            try:
                ch.shutdown()
            except Exception:
                pass

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: switch to postcopy at the next opportunity."""
        self._check_postcopy_enabled()
        if self._thread is None or self.c.state.state == S.NONE:
            raise MigrationError("Postcopy must be started after migration has been started")
        self._start_postcopy.set()

    def _check_postcopy_enabled(self) -> None:
        if not (self.c.caps.get("postcopy-ram") or self.c.caps.get("dirty-bitmaps")):
            raise MigrationError("Enable postcopy with migrate_set_capability before the start "
                                 "of migration", field="postcopy-ram")

    def migrate_continue(self, state: str) -> None:
        """``migrate-continue``: leave ``pre-switchover``."""
        cur = self.c.state.state
        if cur.value != state:
            raise MigrationError(f"Migration not in expected state: {cur.value}")
        self._continue.set()

    def wait(self, timeout: Optional[float] = None) -> MigrationStatus:
        """Wait until the migration ended; return the final state."""
        self.c.done.wait(timeout)
        return self.c.state.state

    def query(self) -> dict:
        """QEMU's ``query-migrate`` reply for this side."""
        self._refresh_stats()
        return query_migrate(self.c.state, self.c.stats, self.c.caps,
                             xbzrle_cache_size=self.c.params.xbzrle_cache_size,
                             disk=self._disk_info())

    def _disk_info(self) -> Optional[dict]:
        """Block migration's figures, from the handler that sends disks (if one does now)."""
        for h in self.handlers:
            info = getattr(h, "disk_info", None)
            if info is not None:
                disk = info()
                if disk is not None:
                    return disk
        return None

    def connection_options(self) -> transport.ConnectionOptions:
        """How this migration opens its connections: timeouts and TLS (QEMU's tls-* parameters).

        Every connection goes through these: the main channel, each multifd
        channel, and a postcopy preempt channel (``transport.connect_extra``).
        The objects the parameters name are looked up at each connection.
        """
        p = self.c.params
        tls = None
        if p.tls_creds:
            tls = TLSSettings(self.objects, p.tls_creds, hostname=p.tls_hostname or "")
        return transport.ConnectionOptions(connect_timeout=self.connect_timeout,
                                           io_timeout=self.io_timeout, tls=tls,
                                           handshake_timeout=self.connect_timeout)

    # -- the migration thread -------------------------------------------------
    def _refresh_stats(self) -> None:
        ram = self.ram
        if ram is None:
            return
        s = self.c.stats
        s.total = ram.total
        if self.c.state.state not in (S.COMPLETED,):
            s.remaining = ram.pending()
        if ram.cache is not None:
            cs = ram.cache.stats()
            s.xbzrle_cache_miss = cs["cache-miss"]
            s.xbzrle_overflow = cs["overflow"]
            s.xbzrle_bytes = cs["bytes"]
            s.xbzrle_pages = cs["pages"]

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")

    def _lost_transition(self) -> None:
        """A ``try_transition`` found another state: only cancel moves it under us."""
        if self._cancel.is_set() or self.c.state.state is S.CANCELLING:
            raise MigrationCancelled("migration cancelled")
        raise MigrationError(f"unexpected migration state {self.c.state.state.value}",
                             field="status")

    def _add_channel(self, ch) -> None:
        self._chans.append(ch)
        if self._cancel.is_set():  # cancel() may have shut the others down before this one
            ch.shutdown()
            self._check_cancel()

    def _run(self, uri: str) -> None:
        self._uri = uri
        st = self.c.state
        caps, params, stats = self.c.caps, self.c.params, self.c.stats
        guest_was_running = self.guest.running
        stopped_by_us = False
        sender = None
        main = None
        failure: Optional[BaseException] = None
        try:
            compat = self.compat
            per_round = compat.multifd_sync == "round"
            mapped_ram = bool(caps.get("mapped-ram"))
            options = self.connection_options()
            main = transport.connect(uri, options=options)
            main.set_timeout(self.io_timeout)
            self._add_channel(main)
            postcopy = bool(caps.get("postcopy-ram"))
            preempt = None
            if postcopy and caps.get("postcopy-preempt") and compat.preempt_pre_7_2:
                # machine types up to 7.2: the second connection, made now; later
                # ones connect it when postcopy starts (run_postcopy)
                preempt = connect_preempt(self, uri)
            if caps.get("multifd") and not mapped_ram:  # mapped-ram writes pages in place
                extra = []
                # One at a time, each handshake complete and its init packet sent
                # before the next connection, as QEMU's source does: a 7.2
                # destination takes the first finished handshake as the main
                # channel, and reads each channel's init packet in its main loop
                # (blocking) as soon as that channel's handshake completed.
                for i in range(params.multifd_channels):
                    ch = transport.connect_extra(uri, options=options)
                    ch.set_timeout(self.io_timeout)
                    self._add_channel(ch)
                    ch.write(pack_init_packet(self.uuid, i))
                    extra.append(ch)
                comp = params.multifd_compression
                level = {"zlib": params.multifd_zlib_level,
                         "zstd": params.multifd_zstd_level}.get(comp)
                sender = MultifdSender(extra, compression=comp, level=level, uuid=self.uuid,
                                       init_sent=True,
                                       sync_format="10.0" if per_round else "7.2")
            f = QEMUFile(main.write, sink_v=main.writev)
            w = StreamWriter(f)
            rw = RamWriter(f)
            ignore_shared = bool(caps.get("x-ignore-shared"))
            mapped = None
            if mapped_ram:
                from qmigx.mapped_ram import MappedRamFile

                mapped = MappedRamFile(f, main.fileno(), main.file_offset)
            # where zero pages go: QEMU 10's parameter (7.2 has ZERO records only)
            zpd = ("legacy" if params.qemu_version == "7.2"
                   else params.get("zero-page-detection"))
            ram = RamSaveState(
                self.blocks, dirty_logs=self.dirty_logs,
                xbzrle_cache_size=params.xbzrle_cache_size if caps.get("xbzrle") else None,
                compress_level=params.compress_level if caps.get("compress") else None,
                multifd=sender, ignore_shared=ignore_shared,
                clear_bitmap_shift=self.clear_bitmap_shift,
                multifd_zero_pages=zpd == "multifd", mapped=mapped)
            if sender is not None and per_round:
                ram.on_round = lambda: self._multifd_flush(rw, sender)
            ram.send_page_sizes = postcopy
            plain = (sender is None and mapped is None and not postcopy and not caps.get("x-colo")
                     and not caps.get("dirty-bitmaps")
                     and ram.cache is None and ram.compress_level is None)
            if self.page_relay is not None:  # pages that lie in a saved stream's file
                if not plain:
                    raise CapabilityError("pages relayed from a file go as plain records only",
                                          field="capabilities")
                ram.relay_pages = self.page_relay.sender(main, f)
            elif plain:
                ram.direct_pages = direct_page_writer(main, f)  # a plain socket: no copy
            ram.direct_batch_pages = ram.batch_pages
            self.ram = ram
            period = DirtyRatePeriod()
            # -- setup
            w.header()
            if self.configuration is not None:
                w.raw_configuration(self.configuration.raw)
            else:
                w.configuration(self.machine_type,
                                self._config_subsections(ignore_shared, mapped_ram))
            rp = bool(caps.get("return-path")) or postcopy  # postcopy always opens it
            if rp:
                if not main.has_return_path:
                    raise ChannelError("return path not available on this transport",
                                       field="return-path")
                w.command(MigCmd.OPEN_RETURN_PATH)
                w.command(MigCmd.PING, struct.pack(">I", 1))
                self._rp_thread = threading.Thread(target=self._rp_reader, args=(main,),
                                                   name="return-path", daemon=True)
                self._rp_thread.start()
            if postcopy:
                w.command(MigCmd.POSTCOPY_ADVISE, advise_payload(self.blocks, ignore_shared))
            elif caps.get("dirty-bitmaps"):
                # QEMU advises postcopy (without page sizes) whenever bitmaps may migrate
                w.command(MigCmd.POSTCOPY_ADVISE)
            if caps.get("x-colo"):
                w.command(MigCmd.ENABLE_COLO)
            sec = Section(self.ram_section_id, "ram", 0, 4)
            live = self._live_sections(sec)
            for lsec, h in live:
                w.section_header(SectionType.SECTION_START, lsec)
                if h is not None:
                    h.save_setup(f)
                    w.footer(lsec)
                    continue
                pass_no = period.begin_sync(stats, now_ms())
                ram.setup(rw)
                self.c.events.dirty_pass(pass_no)
                self._ram_tail(rw, sender, w, sec, per_round)
            f.flush()
            f.check()
            stats.setup_time = now_ms() - stats.start_time
            if not st.try_transition(S.SETUP, S.ACTIVE):
                self._lost_transition()
            window = RateWindow()
            switch = False  # migrate-start-postcopy took effect
            f.rate_limit_max = params.max_bandwidth // 10
            window.start(stats, now_ms(), f.total_transferred + self._multifd_bytes(sender))
            # -- iterations
            while True:
                self._check_cancel()
                f.check()
                self._rp_check()
                pending = ram.pending()
                if pending < window.threshold_size:
                    self._sync(ram, period, stats)
                    pending = ram.pending()
                others = [h.save_pending(window.threshold_size) for _, h in live if h is not None]
                precopy_only = sum(p[0] for p in others) + (0 if postcopy else pending)
                pending += sum(sum(p) for p in others)
                # Bitmaps alone: RAM ends at the switch-over and the bitmaps follow.
                # Their bits, which QEMU counts as pending and qmigx does not, are
                # what makes QEMU switch rather than complete.
                bitmaps_only = (not postcopy and self._start_postcopy.is_set()
                                and any(h.has_postcopy() for _, h in live
                                        if h is not None and h.is_active()))
                if (not pending or pending < window.threshold_size) and not bitmaps_only:
                    break
                if self._start_postcopy.is_set() and precopy_only <= window.threshold_size \
                        and (postcopy or bitmaps_only):
                    switch = True
                    break  # the precopy-only rest is small enough
                t0 = time.monotonic()
                sent_before = f.total_transferred
                self._iterate(live, w, rw, sender, f)
                f.flush()
                f.check()
                self._account(ram, rw, stats, f, sender)
                self._report_iteration(ram, f.total_transferred - sent_before, t0)
                now = now_ms()
                f.rate_limit_max = params.max_bandwidth // 10
                if window.update(stats, now, f.total_transferred + self._multifd_bytes(sender),
                                 params.downtime_limit):
                    f.rate_limit_reset()
                elif f.rate_limit_exceeded():
                    # budget spent: wait for the window to end (QEMU's migration_rate_limit)
                    delay = (window.start_ms + RateWindow.BUFFER_DELAY_MS - now) / 1000
                    if delay > 0 and self._cancel.wait(delay):
                        self._check_cancel()
            # -- completion
            if self.before_complete is not None:
                self.before_complete()
            in_postcopy = switch and (not postcopy or self.ram.dirty_pages() > 0)
            if in_postcopy:
                run_postcopy(self, w, rw, f, live, sec, preempt,
                             lambda: self._ram_tail(rw, sender, w, sec, per_round))
            else:
                self._check_cancel()
                if rp and caps.get("switchover-ack") and self.guest.running:
                    self._wait_switchover_ack()
                runstate = self.guest.runstate()
                stats.downtime_start = now_ms()
                if self.guest.running:
                    self.guest.stop()
                    stopped_by_us = True
                if caps.get("pause-before-switchover"):
                    if not st.try_transition(S.ACTIVE, S.PRE_SWITCHOVER):
                        self._lost_transition()
                    while not self._continue.wait(0.1):
                        self._check_cancel()
                    self._check_cancel()
                    if not st.try_transition(S.PRE_SWITCHOVER, S.DEVICE):
                        self._lost_transition()
                f.rate_limit_max = 0
                if self.compat.send_switchover_start:  # QEMU 10, machine types >= 10.0
                    w.command(MigCmd.SWITCHOVER_START)
                for lsec, h in live:
                    if h is not None and not h.is_active():  # e.g. dirty-bitmap found none at setup
                        continue
                    w.section_header(SectionType.SECTION_END, lsec)
                    if h is not None:
                        h.save_complete_precopy(f)
                        w.footer(lsec)
                        continue
                    pass_no = period.begin_sync(stats, now_ms())
                    ram.complete(rw)
                    self.c.events.dirty_pass(pass_no)
                    self._ram_tail(rw, sender, w, sec, per_round)
                first_device_id = max(s.section_id for s, _ in live) + 1
                self._write_devices(w, runstate, first_id=first_device_id)
                f.flush()
                f.check()
                self._account(ram, rw, stats, f, sender)
                if rp:
                    self._wait_shut()
                stats.remaining = 0
                stats.complete(now_ms(), f.total_transferred + self._multifd_bytes(sender))
                if caps.get("x-colo"):  # checkpoints until failover, then completed
                    self.colo = ColoPrimary(self, main, f, w, rw, ram, sec, first_device_id)
                    self.colo.run()
                elif not (st.try_transition(S.ACTIVE, S.COMPLETED)
                          or st.try_transition(S.DEVICE, S.COMPLETED)):
                    self._lost_transition()
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a state
            failure = exc
        finally:
            # Free everything before the final state is visible: whoever sees
            # failed/cancelled may start the next migration at once.
            try:
                self._cleanup(sender)
            finally:
                if failure is not None:
                    stopped_by_us = stopped_by_us or self._pc_stopped
                    if stopped_by_us and guest_was_running and not self._pc_ran:
                        self.guest.start()
                    self._finish_failure(failure)
                self.c.done.set()

    def postcopy_report(self) -> Optional[dict]:
        """Page requests served (count, time queued) after a postcopy switch-over, else None."""
        if not self._pc_ran or self.ram is None:
            return None
        ram = self.ram
        wait = ram.request_wait / ram.requests_served if ram.requests_served else 0.0
        return {"postcopy": {"requests": self.c.stats.postcopy_requests,
                             "served": ram.requests_served,
                             "queued_ms_mean": round(wait * 1000, 3),
                             "preempt_pages": self.preempt_pages}}

    def _live_sections(self, ram_sec: Section) -> list:
        """The active live sections in QEMU's order; RAM's handler slot is None."""
        live = [(ram_sec, None)]
        for h in self.handlers:
            if h.is_active():
                sid = h.section_id if h.section_id is not None else ram_sec.section_id + len(live)
                live.append((Section(sid, h.idstr, h.instance_id, h.version_id), h))
        return sorted(live, key=lambda e: e[0].section_id)

    def _iterate(self, live: list, w: StreamWriter, rw: RamWriter, sender, f: QEMUFile) -> None:
        """One round of PART sections (QEMU's qemu_savevm_state_iterate).

        Each section in turn, unless the rate limit is spent; a section
        that has not finished its current stage ends the round, so a fast
        changing section is not synchronised over and over again.
        """
        for i, (lsec, h) in enumerate(live):
            if h is not None and not h.is_active_iterate():
                continue
            if i and f.rate_limit_exceeded():
                return
            w.section_header(SectionType.SECTION_PART, lsec)
            if h is not None:
                done = h.save_live_iterate(f)
                w.footer(lsec)
            else:
                done = self.ram.iterate(rw, over_budget=f.rate_limit_exceeded)
                self._ram_eos(rw, None if self.compat.multifd_sync == "round" else sender,
                              w, lsec)
            if not done:
                return

    def _cleanup(self, sender) -> None:
        """Stop this run's threads and close its channels (success or not)."""
        for h in self.handlers:
            try:
                h.save_cleanup()
            except Exception:
                pass
        chans, self._chans = self._chans, []
        failed = self.c.state.state is not S.COMPLETED
        if failed:
            for ch in chans:  # unblock threads stuck on a stalled or dead peer
                try:
                    ch.shutdown()
                except Exception:
                    pass
        if sender is not None:
            sender.close(wait=True, timeout=5)
        rp = self._rp_thread
        if rp is not None and rp is not threading.current_thread():
            if rp.is_alive() and not failed:
                for ch in chans[:1]:
                    ch.shutdown()
            rp.join(timeout=5)
        for ch in chans:
            try:
                ch.close(timeout=2)
            except Exception:
                pass

    def _finish_failure(self, exc: BaseException) -> None:
        st = self.c.state
        if (self._cancel.is_set() or isinstance(exc, MigrationCancelled)
                or st.state is S.CANCELLING):
            st.try_transition(S.CANCELLING, S.CANCELLED)
            return
        self.c.fail(exc)
        if self._pc_ran and st.try_transition(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
            return  # the destination runs the guest: nothing here may resume it
        for old in (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG, S.POSTCOPY_ACTIVE):
            if st.try_transition(old, S.FAILED):
                break

    def _config_subsections(self, ignore_shared: bool, mapped_ram: bool = False) -> list:
        subs = []
        names = [n for n, on in ((b"x-ignore-shared", ignore_shared), (b"mapped-ram", mapped_ram))
                 if on]
        if names:  # the validated capabilities (QEMU 10 adds mapped-ram)
            subs.append(ConfigSubsection("configuration/capabilities", 1,
                                         struct.pack(">I", len(names))
                                         + b"".join(bytes((len(n),)) + n for n in names)))
        if self.c.caps.get("validate-uuid") and self.uuid is not None:
            subs.append(ConfigSubsection("configuration/uuid", 1, bytes(self.uuid)))
        return subs

    @staticmethod
    def _multifd_bytes(sender) -> int:
        return 0 if sender is None else sender.bytes_charged

    def _ram_tail(self, rw: RamWriter, sender, w: StreamWriter, sec: Section,
                  per_round: bool) -> None:
        """The end of a RAM section: multifd's sync in the migration's model, then EOS."""
        if sender is not None and per_round:
            self._multifd_flush(rw, sender)
        self._ram_eos(rw, None if per_round else sender, w, sec)

    def _ram_eos(self, rw: RamWriter, sender, w: StreamWriter, sec: Section) -> None:
        """EOS of a RAM section; ``sender``: sync multifd first (7.2's per-section model)."""
        if sender is not None:
            charged = sender.sync()
            rw.stats.transferred += charged
        rw.eos()
        w.footer(sec)

    @staticmethod
    def _multifd_flush(rw: RamWriter, sender) -> None:
        """QEMU 10's per-round sync: every channel's SYNC, then a MULTIFD_FLUSH record.

        The record goes out at once: the destination's channels wait after
        their SYNC until its main thread reads it, so while it sat in our
        buffer the next pages would fill the channels and nobody would move.
        """
        rw.stats.transferred += sender.sync()
        rw.multifd_flush()
        rw.f.flush()

    def _sync(self, ram: RamSaveState, period: DirtyRatePeriod, stats: MigrationStats) -> None:
        pass_no = period.begin_sync(stats, now_ms())
        new = ram.bitmap_sync()
        self._dirty_found = new
        self.c.events.dirty_pass(pass_no)
        sample = period.end_sync(stats, now_ms(), dirty_pages=new, target_pages=ram.pages_sent,
                                 xbzrle=ram.cache is not None,
                                 compress=ram.compress_level is not None)
        stats.dirty_sync_count = max(stats.dirty_sync_count, ram.dirty_sync_count)
        if sample is not None and self.c.caps.get("auto-converge"):
            p = self.c.params
            if self._converge.update(sample[0], sample[1],
                                     threshold_pct=p.throttle_trigger_threshold,
                                     initial=p.cpu_throttle_initial,
                                     increment=p.cpu_throttle_increment,
                                     maximum=p.max_cpu_throttle,
                                     tailslow=p.cpu_throttle_tailslow):
                stats.cpu_throttle_percentage = self._converge.percentage
                self.guest.throttle(self._converge.percentage)

    def _account(self, ram: RamSaveState, rw: RamWriter, stats: MigrationStats, f: QEMUFile,
                 sender) -> None:
        stats.transferred = rw.stats.transferred
        stats.duplicate = ram.zero_pages
        stats.normal = ram.normal_pages + ram.multifd_pages
        stats.compression_pages = ram.compressed_pages
        stats.multifd_bytes = self._multifd_bytes(sender)
        if self.guest.running:
            stats.precopy_bytes = rw.stats.transferred - stats.downtime_bytes
        else:
            stats.downtime_bytes = rw.stats.transferred - stats.precopy_bytes
        self._refresh_stats()

    def _report_iteration(self, ram: RamSaveState, nbytes: int, t0: float) -> None:
        cache = ram.cache.stats() if ram.cache is not None else {}
        row = self._log.row(
            now=time.monotonic(), seconds=time.monotonic() - t0, nbytes=nbytes,
            pages={"zero": ram.zero_pages, "normal": ram.normal_pages,
                   "xbzrle": ram.xbzrle_pages, "compressed": ram.compressed_pages,
                   "multifd": ram.multifd_pages},
            dirty_found=self._dirty_found, dirty_pages_rate=self.c.stats.dirty_pages_rate,
            remaining=ram.pending(), throttle=self._converge.percentage,
            xbzrle_hits=cache.get("pages", 0), xbzrle_overflow=cache.get("overflow", 0),
            dirty_sync_count=ram.dirty_sync_count)
        self._dirty_found = 0
        self.iterations.append(row)
        if self.on_iteration is not None:
            self.on_iteration(row)

    def report(self, path: str, *, timings: Optional[dict] = None) -> dict:
        """Write this migration's JSON report (see :mod:`qmigx.report`)."""
        from qmigx.report import write_report

        return write_report(path, side="source", query=self.query(),
                            iterations=self.iterations, timings=timings)

    def _write_devices(self, w: StreamWriter, runstate: str, first_id: int,
                       package: bool = False) -> None:
        """The FULL device sections, then EOF and the vmdesc (not in a postcopy package)."""
        from qmigx.savevm import vmstate_device
        from qmigx.vmstate import VMSTATE_GLOBALSTATE, globalstate

        entries = []
        next_id = first_id
        devices = list(self.devices)
        if self.globalstate and not any(
                getattr(getattr(d, "section", d), "idstr", None) == "globalstate"
                for d in devices):
            devices.append(vmstate_device("globalstate", 0, VMSTATE_GLOBALSTATE,
                                          globalstate(runstate)))
        for dev in devices:
            if isinstance(dev, SectionData):
                w.section(SectionType.SECTION_FULL, dev.section, dev.payload)
                continue
            sec = Section(next_id, dev.idstr, dev.instance_id, dev.version_id)
            next_id += 1
            w.section(SectionType.SECTION_FULL, sec, dev.payload)
            if dev.vmdesc is not None:
                entries.append(dev.vmdesc)
        text = self.vmdesc
        if text is None:
            text = ('{"page_size": %d, "devices": [%s]}' % (TARGET_PAGE_SIZE, ", ".join(entries))).encode()
        if package:
            return
        w.eof()
        w.vmdesc(text)
