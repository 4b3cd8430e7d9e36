"""The incoming side (QEMU's ``-incoming``, the load half of migration.c and savevm.c).

:class:`MigrationDestination` accepts the channels, feeds the stream
parser, dispatches sections to their handlers, places pages (multifd
channels included) and answers on the return path.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from qmigx import transport
from qmigx.compat import migration_compat
from qmigx.crypto import ObjectRoot, TLSSettings
from qmigx.control import (
    Capabilities,
    MigrationStatus,
    Parameters,
    query_migrate,
)
from qmigx.errors import (
    CapabilityError,
    ChannelError,
    MigrationCancelled,
    MigrationError,
    RamStreamError,
    StreamError,
    printable_name,
)
from qmigx.migration.colo import ColoSecondary
from qmigx.migration.colo_failover import ColoStatus
from qmigx.migration.postcopy_incoming import PostcopyIncoming, Toucher
from qmigx.migration.preempt import PreemptReader
from qmigx.migration.side import Controls, S, Side
from qmigx.multifd.channels import MultifdReceiver
from qmigx.ram import RAMBlockList, RamLoader
from qmigx.returnpath import ReturnPathWriter
from qmigx.savevm import SaveVMHandler
from qmigx.stream import (
    Command,
    Configuration,
    EndOfState,
    EndOfStream,
    RamEOS,
    RamMappedBlock,
    RamMappedPages,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    SectionData,
    SectionRecord,
    StreamParser,
    VMDescription,
    default_registry,
)
from qmigx.wire import TARGET_PAGE_SIZE, MigCmd

__all__ = ["IncomingResult", "MigrationDestination"]

_POSTCOPY_COMMANDS = frozenset({MigCmd.POSTCOPY_ADVISE, MigCmd.POSTCOPY_RAM_DISCARD,
                                MigCmd.PACKAGED, MigCmd.POSTCOPY_LISTEN, MigCmd.POSTCOPY_RUN})
_log = logging.getLogger("qmigx.migration")


#: Bytes read from the main channel at a time: a socket hands over at most
#: what it buffered (a few MiB), so a larger buffer only adds to the
#: destination's memory beside guest RAM.
_FILL = 2 << 20


@dataclass
class IncomingResult:
    """What an incoming migration received, besides RAM."""

    configuration: Optional[Configuration] = None
    setup: Optional[RamSetup] = None
    sections: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    vmdesc: Optional[bytes] = None
    return_path: bool = False


class MigrationDestination(Side):
    """An incoming migration into ``blocks`` (QEMU's ``-incoming``).

    Args:
        blocks: the destination's RAM; None creates blocks from the
            incoming setup record ("a destination with no RAM configured").
        capabilities, parameters: this side's (``multifd``, ``compress``,
            ``x-ignore-shared``, ``multifd-channels``,
            ``multifd-compression`` must match the source's).
        machine_type: check the configuration's machine type as QEMU does
            (a prefix comparison); None accepts any.
        uuid: this VM's UUID, compared with multifd init packets.
        handlers: the live sections this destination loads besides RAM
            (``block``, ``dirty-bitmap``); a section without one is read by
            its grammar and dropped.
        objects: the VM's objects that ``tls-creds`` and ``tls-authz`` name
            (:class:`~qmigx.crypto.ObjectRoot`); default: an empty root of its
            own (:attr:`objects`).

    With ``tls-creds`` set every accepted connection is a TLS server
    session; a peer refused in its handshake (no TLS, its certificate, its
    key, authz) is reported to :attr:`on_refused` (default: logged) and
    recorded in :attr:`refused`, and the destination keeps listening for
    the right peer, as QEMU 7.2 does.
    """

    def __init__(self, blocks: Optional[RAMBlockList] = None, *,
                 capabilities: Optional[Capabilities] = None,
                 parameters: Optional[Parameters] = None, machine_type: Optional[str] = None,
                 uuid: Optional[bytes] = None, accept_timeout: Optional[float] = None,
                 io_timeout: Optional[float] = 60.0,
                 handlers: Sequence[SaveVMHandler] = (),
                 objects: Optional[ObjectRoot] = None) -> None:
        self.c = Controls("destination", capabilities, parameters)
        self.objects = objects if objects is not None else ObjectRoot()
        #: called as ``on_refused(peer, error)`` for each refused TLS peer
        self.on_refused = None
        self.refused: list = []
        self.registry = default_registry()
        for h in handlers:
            self.registry.remove(h.idstr, h.instance_id)
            self.registry.add(h)
        self.handlers = list(handlers)
        self.loader_blocks = blocks
        self.machine_type = machine_type
        self.uuid = uuid
        self.accept_timeout = accept_timeout
        self.io_timeout = io_timeout
        self.result = IncomingResult()
        self.loader: Optional[RamLoader] = None
        #: where received pages go (default: copied into RAM); ``incoming
        #: --save`` logs them to write OUT as they arrive (qmigx.tools.journal)
        self.loader_placement = None
        #: with ``blocks`` given, also create the blocks it lacks
        self.loader_create_missing = False
        #: load a mapped-ram stream even without the capability set here
        #: (QEMU refuses; a file destination has nothing to negotiate)
        self.accept_mapped_ram = True
        self.rp: Optional[ReturnPathWriter] = None
        self._listener = None
        self._chans: list = []
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._cancelled = False
        self.socket_address: Optional[list] = None
        self.t_first_byte: Optional[float] = None
        self.t_done: Optional[float] = None
        #: COLO: the secondary's checkpoint thread once ENABLE_COLO arrived, its status,
        #: and (beyond QEMU) a failover when no checkpoint comes for this many seconds
        self.colo: Optional[ColoSecondary] = None
        self.colo_status = ColoStatus()
        self.colo_heartbeat_timeout: Optional[float] = None
        self._preempt = False
        self._preempt_reader: Optional[PreemptReader] = None
        self._recover_uri: Optional[str] = None
        self._recover_listener = None
        #: the listener a resumed attempt's preempt channel is accepted from
        self._resume_listener = None
        self._recover_event = threading.Event()
        self._postcopy_error: Optional[BaseException] = None
        #: why postcopy paused last (the broken connection's error)
        self.pause_reason: Optional[BaseException] = None
        self.postcopy: Optional[PostcopyIncoming] = None
        #: pages per second the vCPU stand-in reads once postcopy runs (0: none)
        self.touch_rate = 0.0
        self.toucher: Optional[Toucher] = None
        #: called with the destination when postcopy RUN arrives (a program starts using RAM)
        self.on_postcopy_run = None
        #: makes the blocks the setup record announces (default: anonymous memory)
        self.block_factory = None
        #: postcopy into another process's memory: the userfaultfd it registered that
        #: memory with (its blocks carry ``uffd_address``); -1: this process's own
        self.uffd_fd = -1

    @property
    def blocks(self) -> RAMBlockList:
        return self.loader.blocks if self.loader is not None else (self.loader_blocks or RAMBlockList())

    def incoming(self, uri: str) -> None:
        """Start listening on ``uri`` and load in the background (``migrate-incoming``)."""
        if self._started:
            raise MigrationError("The incoming migration has already been started")
        parsed = transport.parse_uri(uri, incoming=True)
        # a mapped-ram file holds what multifd channels wrote: read as one (qemu10.md §5.2)
        mapped_file = self.c.caps.get("mapped-ram") and parsed.scheme == "file"
        multifd = self.c.caps.get("multifd") and not mapped_file
        nchan = 1 + (self.c.params.multifd_channels if multifd else 0)
        # 7.2's postcopy-preempt: a second connection for requested pages
        self._preempt = bool(self.c.caps.get("postcopy-preempt")) and not multifd
        if self._preempt:
            if not parsed.multi_channel:
                raise CapabilityError("Postcopy preempt needs a socket transport",
                                      field="postcopy-preempt")
            nchan = 2
        if multifd and not parsed.multi_channel:
            raise CapabilityError("multifd is not supported by current protocol",
                                  field="multifd")
        self._listener = transport.listen(uri, channels=nchan, options=self.connection_options(),
                                          on_refused=self._refuse)
        if self._listener.multi_channel:
            self.socket_address = self._listener.socket_address
        self._started = True
        self.c.events.incoming_setup()
        self._thread = threading.Thread(target=self._run, args=(nchan,), name="incoming",
                                        daemon=True)
        self._thread.start()

    def connection_options(self) -> transport.ConnectionOptions:
        """Timeouts and TLS for the accepted connections (parameters tls-creds, tls-authz)."""
        p = self.c.params
        tls = None
        if p.tls_creds:
            tls = TLSSettings(self.objects, p.tls_creds, authz=p.tls_authz or None)
        return transport.ConnectionOptions(io_timeout=self.io_timeout, tls=tls,
                                           handshake_timeout=self.io_timeout)

    def _refuse(self, peer: str, exc: BaseException) -> None:
        self.refused.append((peer, exc))
        hook = self.on_refused
        if hook is not None:
            hook(peer, exc)
        else:
            _log.error("%s", exc)

    @property
    def connect_uri(self) -> str:
        """A URI the source can use (the real port when listening on port 0)."""
        return self._listener.connect_uri

    def cancel(self) -> None:
        """Stop the incoming migration now: it ends ``failed`` (a destination has no cancelled)."""
        self._cancelled = True
        self._recover_event.set()
        if self._listener is not None:
            self._listener.shutdown()
        for ch in list(self._chans):
            try:
                ch.shutdown()
            except Exception:
                pass

    def wait(self, timeout: Optional[float] = None) -> MigrationStatus:
        self.c.done.wait(timeout)
        return self.c.state.state

    def query(self) -> dict:
        return query_migrate(self.c.state, self.c.stats, self.c.caps,
                             socket_address=self.socket_address)

    def _add_channel(self, ch) -> None:
        ch.set_timeout(self.io_timeout)
        self._chans.append(ch)
        if self._cancelled:  # cancel() may have run between accept and here
            ch.shutdown()

    def _run(self, nchan: int) -> None:
        st = self.c.state
        receiver = None
        main = None
        failure: Optional[BaseException] = None
        try:
            # the preempt channel is accepted whenever it connects (QEMU 10: at postcopy start)
            main, extra = self._accept_channels(1 if self._preempt else nchan)
            st.transition(S.ACTIVE)
            caps = self.c.caps
            self.loader = RamLoader(self.loader_blocks,
                                    ignore_shared=bool(caps.get("x-ignore-shared")),
                                    compress=bool(caps.get("compress")),
                                    create_missing=self.loader_create_missing,
                                    factory=self.block_factory,
                                    # a destination that is QEMU 10 refuses fill bytes but 0
                                    zero_fill=getattr(caps, "qemu_version", None) == "10.0",
                                    placement=self.loader_placement)
            self.postcopy = PostcopyIncoming(self.loader, None, uffd_fd=self.uffd_fd,
                                             enabled=bool(caps.get("postcopy-ram")),
                                             blocktime=bool(caps.get("postcopy-blocktime")))
            if self._preempt:
                self._preempt_reader = PreemptReader(None, self.loader)
                self._accept_preempt(self._listener, self._preempt_reader, close=False)
            if extra:
                ordered = MultifdReceiver.order_channels(extra, uuid=self.uuid)
                receiver = MultifdReceiver(ordered, self.loader.blocks,
                                           compression=self.c.params.multifd_compression,
                                           placement=self.loader.placement)
            self._load(main, receiver)
            self._postcopy_end()
            self._load_cleanup(True)
            if st.state is not S.COMPLETED:  # a COLO secondary is there after failover
                st.transition(S.COMPLETED)
        except BaseException as exc:  # noqa: BLE001
            if self._cancelled and isinstance(exc, ChannelError):
                exc = MigrationCancelled("incoming migration cancelled")
            failure = exc
            self._postcopy_stop()
            self._load_cleanup(False)
            self.c.fail(exc)
            if self.result.return_path and self.rp is not None:
                try:
                    self.rp.shut(1)
                except Exception:
                    pass
        finally:
            # Free everything before the final state is visible.
            self.t_done = time.monotonic()
            try:
                if failure is not None:
                    for ch in list(self._chans):
                        try:
                            ch.shutdown()
                        except Exception:
                            pass
                if receiver is not None:
                    receiver.close()
                for ch in self._chans:
                    try:
                        ch.close(timeout=2)
                    except Exception:
                        pass
                if self._listener is not None:
                    self._listener.close()
            finally:
                if failure is not None:
                    if st.state == S.NONE:
                        st.transition(S.ACTIVE)
                    if st.state in (S.ACTIVE, S.POSTCOPY_ACTIVE):
                        st.transition(S.FAILED)
                self.c.done.set()

    def _accept_channels(self, nchan: int) -> tuple:
        """Accept the main channel and the multifd channels, told apart by their first bytes.

        QEMU 10 peeks at the first 4 bytes of each connection: ``QEVM`` is
        the main channel, anything else a multifd channel (whose init
        packet names its id), so the connection order does not matter
        (qemu10.md §4.6). Channels that cannot peek (not sockets) keep 7.2's
        rule: the first connection is the main channel.
        """
        chans = []
        for i in range(nchan):
            ch = self._listener.accept(self.accept_timeout if i == 0 else self.io_timeout)
            self._add_channel(ch)
            chans.append(ch)
        if nchan == 1 or not all(ch.can_peek for ch in chans):
            return chans[0], chans[1:]
        # the first bytes tell: QEVM is the main channel, the others multifd;
        # once the main one (or every multifd one) is known, the rest follow
        main = None
        multifd: list = []
        pending = list(chans)
        deadline = None if self.io_timeout is None else time.monotonic() + self.io_timeout
        while main is None and len(multifd) < nchan - 1:
            for ch in list(pending):
                if main is not None or len(multifd) == nchan - 1:
                    break
                head = ch.peek_nowait(4)
                if head is None:
                    continue
                pending.remove(ch)
                if head == b"QEVM":
                    if main is not None:
                        raise ChannelError("two connections start with QEVM; one main channel "
                                           "expected", field="channels")
                    main = ch
                else:
                    multifd.append(ch)
            if main is None and len(multifd) < nchan - 1:
                if self._cancelled:
                    raise ChannelError("incoming migration cancelled", field="channels")
                if deadline is not None and time.monotonic() > deadline:
                    raise ChannelError("no data on the incoming connections to tell the main "
                                       "channel from the multifd ones", field="channels")
                time.sleep(0.002)
        if main is None:
            if not pending:
                raise ChannelError("no incoming connection starts with QEVM: no main channel",
                                   field="channels")
            main = pending.pop(0)
        return main, multifd + pending

    def _load(self, main, receiver) -> None:
        """Load the incoming stream: a dispatch over phases (QEMU's qemu_loadvm_state_main).

        Each phase reads the main channel until the stream ends (None) or a
        command hands over to another phase: POSTCOPY_LISTEN to the postcopy
        listen phase, ENABLE_COLO to the COLO phase. Return-path messages of
        every thread go out through one locked :class:`ReturnPathWriter`.
        """
        self.rp = ReturnPathWriter.for_channel(main)
        if self.postcopy is not None:
            self.postcopy.rp = self.rp
        self._parser = StreamParser(registry=self.registry)
        if self.loader_blocks is not None:
            self._parser.ctx.huge_page_blocks = frozenset(
                b.idstr for b in self.loader_blocks if b.page_size != TARGET_PAGE_SIZE)
        self._parser.rx.base = getattr(main, "file_offset", 0)  # file:PATH,offset=N
        self._started: set = set()
        phase = self._precopy_phase
        while phase is not None:
            try:
                phase = phase(main, receiver)
            except BaseException as exc:  # noqa: BLE001 - postcopy pauses instead of failing
                main = self._postcopy_pause(exc)
                phase = self._precopy_phase
        if receiver is not None:
            receiver._check()
        if self.result.return_path:
            self.rp.shut(0)

    def _precopy_phase(self, main, receiver, *, buffered: bool = False):
        """Load until EOF (and vmdesc) or a command hands over.

        ``buffered``: parse what is already buffered before reading more
        (a phase that resumes after a command, as COLO's does).
        """
        parser = self._parser
        while True:
            if buffered:
                buffered = False
                n = None
            else:
                n = parser.fill(main.readinto_available, _FILL)
            if self.t_first_byte is None and n:
                self.t_first_byte = time.monotonic()
            for ev in parser.events():
                t = type(ev)
                if t is RamPages:
                    self.loader.on_pages(ev)
                elif t is RamEOS:
                    # 7.2's model: every RAM EOS is a sync point; per round
                    # (QEMU 10) only MULTIFD_FLUSH is (qemu10.md §4.4)
                    if receiver is not None and parser.ctx.multifd_sync != "round":
                        receiver.wait_sync(self.io_timeout)
                elif t is RamMultifdFlush:
                    if receiver is not None:
                        receiver.wait_sync(self.io_timeout)
                elif t is Command:
                    nxt = self._command(ev)
                    if nxt is not None:
                        return nxt
                elif t is VMDescription:
                    self.result.vmdesc = ev.json
                    return None
                elif t is EndOfStream:
                    return None
                elif t is EndOfState and self.postcopy.state >= PostcopyIncoming.LISTENING:
                    return None  # a postcopy stream ends at EOF: no vmdesc follows
                else:
                    self._dispatch(ev)
            if n == 0:
                raise StreamError("the stream ended before its EOF", offset=parser.offset)

    def _dispatch(self, ev) -> None:
        """An event every phase handles the same way."""
        t = type(ev)
        res = self.result
        if t is RamSetup:
            self._setup_blocks(self.loader, ev)
            res.setup = ev
        elif t is RamMappedBlock:
            self.loader.on_mapped_block(ev)
        elif t is RamMappedPages:
            self.loader.on_mapped_pages(ev)
        elif t is SectionRecord:
            h = self.registry.live(ev.section.idstr)
            if h not in self._started:
                self._started.add(h)
                h.load_setup()
            h.load_record(ev.record, ev.section)
        elif t is SectionData:
            res.sections.append(ev)
        elif t is Configuration:
            self._check_configuration(ev)
            res.configuration = ev

    def _colo_phase(self, main, receiver):
        """ENABLE_COLO: load the migration to its end, then checkpoints until failover."""
        if receiver is not None:
            raise CapabilityError("COLO with multifd is not supported", field="multifd")
        self.c.caps.set("x-colo", True)  # as QEMU's secondary shows it, failover or not
        if self._precopy_phase(main, receiver, buffered=True) is not None:
            raise StreamError("a COLO migration may not hand over to another phase",
                              offset=self._parser.offset, field="command")
        self.colo = ColoSecondary(self, main, self._parser,
                                  heartbeat_timeout=self.colo_heartbeat_timeout)
        self.colo.run()
        return None

    def _load_cleanup(self, ok: bool) -> None:
        for h in self.handlers:
            try:
                h.load_cleanup(ok)
            except Exception:
                if ok:
                    raise

    @staticmethod
    def _setup_blocks(loader: RamLoader, ev: RamSetup) -> None:
        """Match or create the blocks; an allocation the peer's sizes make fail is its fault."""
        try:
            loader.on_setup(ev)
        except MigrationError:
            raise
        except (OSError, ValueError, OverflowError, MemoryError) as exc:
            raise RamStreamError(f"cannot create the RAM blocks of the setup record: {exc}",
                                 offset=ev.offset, section=ev.section.label,
                                 field="used_length") from exc

    def _check_configuration(self, cfg: Configuration) -> None:
        mt = self.machine_type
        if mt is not None and not mt.startswith(cfg.machine_type):
            raise StreamError(f"Machine type received is '{printable_name(cfg.machine_type)}' "
                              f"and local is '{mt}'",
                              offset=cfg.offset, section="configuration", field="machine_type")
        received = set(cfg.capabilities)
        validated = ("x-ignore-shared", "mapped-ram")  # the capabilities QEMU 10 validates
        for name in received - set(validated):
            raise StreamError(f"Received unknown capability {printable_name(name)}",
                              offset=cfg.offset,
                              section="configuration", field="capabilities")
        for name in validated:
            mine = bool(self.c.caps.as_dict().get(name, False))
            theirs = name in received
            if name == "mapped-ram" and theirs and self.accept_mapped_ram:
                continue  # qmigx reads a mapped-ram file whatever it was told
            if mine != theirs:
                raise StreamError(
                    f"Capability {name} is {'on' if mine else 'off'}, "
                    f"but received capability is {'on' if theirs else 'off'}",
                    offset=cfg.offset, section="configuration", field="capabilities")

    def _command(self, ev: Command):
        """Handle a command; return the phase it hands over to, if any."""
        res = self.result
        res.commands.append(ev)
        if ev.cmd == MigCmd.OPEN_RETURN_PATH:
            res.return_path = True
            if self.c.caps.get("switchover-ack"):
                # no device here waits for anything: agree at once, as QEMU 10 does
                self.rp.switchover_ack()
        elif ev.cmd == MigCmd.PING:
            if not res.return_path:
                raise StreamError("PING without an open return path", offset=ev.offset,
                                  field="command")
            self.rp.pong(struct.unpack(">I", ev.payload)[0])
        elif ev.cmd == MigCmd.ENABLE_COLO:
            return self._colo_phase
        elif ev.cmd in _POSTCOPY_COMMANDS:
            self._postcopy_command(ev)
        elif ev.cmd == MigCmd.RECV_BITMAP:
            self._send_recv_bitmap(ev)
        elif ev.cmd == MigCmd.POSTCOPY_RESUME:
            # QEMU ignores a RESUME outside postcopy-recover
            if self.c.state.try_transition(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE):
                self.rp.resume_ack()
                self.postcopy.resend_requests()
        return None

    # -- postcopy pause and recovery (postcopy.md §6) ------------------------------------
    def recover(self, uri: str) -> str:
        """``migrate-recover``: listen on ``uri`` for the source that resumes; returns its connect URI."""
        if self.c.state.state is not S.POSTCOPY_PAUSED:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        if self._recover_uri is not None:
            raise MigrationError("Migrate recovery is triggered already")
        nchan = 2 if self._preempt else 1
        if self._listener is not None:  # QEMU keeps its first listener until migrate-recover
            self._listener.close()
        self._recover_listener = transport.listen(uri, channels=nchan,
                                                  options=self.connection_options(),
                                                  on_refused=self._refuse)
        self._recover_uri = uri
        self.c.events.incoming_setup()  # QEMU announces setup again
        self._recover_event.set()
        return self._recover_listener.connect_uri

    def pause(self) -> None:
        """``migrate-pause``: cut the connection now; postcopy pauses."""
        if self.c.state.state is not S.POSTCOPY_ACTIVE:
            raise MigrationError("migrate-pause is currently only supported during "
                                 "postcopy-active state")
        for ch in list(self._chans):
            try:
                ch.shutdown()
            except Exception:
                pass

    def _postcopy_pause(self, exc: BaseException):
        """A broken postcopy: keep every placed page, wait for recover(), return the new channel."""
        pc = self.postcopy
        st = self.c.state
        if self._cancelled or pc is None or pc.state < PostcopyIncoming.LISTENING \
                or not pc.enabled:  # only RAM postcopy recovers (bitmaps alone fail)
            raise exc
        self.pause_reason = exc  # before the state: whoever sees postcopy-paused sees why
        # QEMU pauses from postcopy-active and from postcopy-recover (a cut mid-handshake)
        if not (st.try_transition(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED)
                or st.try_transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)):
            raise exc
        _log.warning("postcopy paused: %s", exc)
        self.rp.close()
        if self._preempt_reader is not None:
            self._preempt_reader.stop()
        if self._resume_listener is not None:  # a cut mid-handshake: that preempt never came
            self._resume_listener.close()
            self._resume_listener = None
        for ch in list(self._chans):
            try:
                ch.close(timeout=1)
            except Exception:
                pass
        self._chans.clear()
        self._postcopy_error = None
        while not self._recover_event.wait(0.2) and not self._cancelled:
            pass
        if self._cancelled:
            raise MigrationCancelled("incoming migration cancelled while postcopy was paused")
        self._recover_event.clear()
        lst = self._recover_listener
        try:
            main = lst.accept(None)
            self._add_channel(main)
        except BaseException:
            lst.close()
            raise
        finally:
            self._recover_uri = None
        if self._preempt:  # told apart by its order: the connection after the main one
            self._preempt_reader = PreemptReader(None, self.loader,
                                                 expect_eos=self._preempt_eos())
            self._resume_listener = lst
            self._accept_preempt(lst, self._preempt_reader, close=True)
        else:
            lst.close()
        self.c.state.transition(S.POSTCOPY_RECOVER)
        self.rp = ReturnPathWriter.for_channel(main)
        pc.rp = self.rp
        # a new connection: no header; sections and blocks as established before
        self._parser = StreamParser(header=False, package=False, registry=self.registry,
                                    context=self._parser.ctx)
        if self._preempt_reader is not None:
            self._preempt_reader.start(pc.placement, self._postcopy_failed)
        return main

    def _accept_preempt(self, listener, reader: PreemptReader, *, close: bool) -> None:
        """Accept the preempt channel on a thread and hand it to ``reader``.

        QEMU 7.2 connects it during setup, QEMU 10 (machine types after 7.2)
        only when postcopy starts or resumes, so the load must not wait for it.
        """
        def run() -> None:
            try:
                ch = listener.accept(None)
                if reader.stopped:  # its attempt was cut meanwhile: nobody reads it
                    ch.close(timeout=1)
                    return
                self._add_channel(ch)
                reader.attach(ch)
            except Exception as exc:  # noqa: BLE001 - the listener closed: the migration ended
                _log.debug("no postcopy preempt channel: %s", exc)
            finally:
                if close:
                    listener.close()

        threading.Thread(target=run, name="postcopy/preempt-accept", daemon=True).start()

    def _preempt_eos(self) -> bool:
        """Whether the source ends the preempt channel with an EOS (machine types <= 7.2)."""
        cfg = self.result.configuration
        return cfg is not None and migration_compat(cfg.machine_type).preempt_pre_7_2

    def _send_recv_bitmap(self, ev: Command) -> None:
        if self.c.state.state is not S.POSTCOPY_RECOVER:
            raise StreamError("RECV_BITMAP outside a postcopy recovery", offset=ev.offset,
                              field="command")
        n = ev.payload[0] if ev.payload else 0
        name = ev.payload[1 : 1 + n].decode("utf-8", "replace")
        blk = self.loader.blocks.get(name)
        if blk is None or len(ev.payload) != 1 + n:
            raise StreamError(f"RECV_BITMAP for unknown block {printable_name(name)}",
                              offset=ev.offset, field="rbname")
        self.rp.recv_bitmap(name, self.postcopy.placement.received[name])

    def _postcopy_command(self, ev: Command) -> None:
        """ADVISE, DISCARD, the PACKAGED device state, LISTEN and RUN (postcopy.md §2-5)."""
        pc = self.postcopy
        cmd = ev.cmd
        if cmd == MigCmd.POSTCOPY_ADVISE:
            pc.advise(ev.payload, ev.offset)
        elif cmd == MigCmd.POSTCOPY_RAM_DISCARD:
            pc.discard(ev.payload, ev.offset)
        elif cmd == MigCmd.PACKAGED:
            self._package(ev)
        elif cmd == MigCmd.POSTCOPY_LISTEN:
            pc.on_error = self._postcopy_failed
            pc.listen(ev.offset)
            if not self.c.state.try_transition(S.ACTIVE, S.POSTCOPY_ACTIVE):
                raise MigrationError("POSTCOPY_LISTEN: the incoming migration is not active")
            if self._preempt_reader is not None:
                self._preempt_reader.expect_eos = self._preempt_eos()
                self._preempt_reader.start(pc.placement, self._postcopy_failed)
        elif cmd == MigCmd.POSTCOPY_RUN:
            pc.run(ev.offset)
            if self.touch_rate > 0:
                self.toucher = Toucher(self.loader._table or list(self.loader.blocks),
                                       self.touch_rate)
                self.toucher.start()
            if self.on_postcopy_run is not None:
                self.on_postcopy_run(self)

    def _package(self, ev: Command) -> None:
        """A PACKAGED command: the device state and LISTEN/RUN, read from its blob.

        QEMU hands the package to the load loop while a listen thread takes
        over the main channel; here the package is already whole in memory,
        so it is loaded in place and the main channel is read on after it.
        """
        sub = StreamParser(header=False, registry=self.registry)
        sub.feed(ev.packaged)
        sub.feed_eof()
        base = ev.offset + 9  # type, command, length, package length
        try:
            for inner in sub.events():
                t = type(inner)
                if t is Command:
                    self._command(inner)
                elif t in (SectionData, SectionRecord, Configuration):
                    self._dispatch(inner)
        except StreamError as exc:
            if exc.offset is not None:
                exc.offset += base
            raise

    def postcopy_report(self) -> Optional[dict]:
        """Faults, requests and fault-to-placed latencies (ms), or None without postcopy."""
        pc = self.postcopy
        if pc is None or pc.state < PostcopyIncoming.LISTENING:
            return None
        return pc.report(preempt_pages=self._preempt_reader.pages if self._preempt_reader else 0,
                         touched=self.toucher.touched if self.toucher else 0)

    def _postcopy_failed(self, exc: BaseException) -> None:
        """A fault or preempt thread failed: stop the load (the main channel's read ends)."""
        if self.c.state.state is not S.POSTCOPY_ACTIVE:
            return  # paused already: the old channels are gone
        self._postcopy_error = exc
        for ch in list(self._chans):
            try:
                ch.shutdown()
            except Exception:
                pass

    def _postcopy_end(self) -> None:
        """After the main stream's EOF: the preempt channel's EOS, then the fault thread stops."""
        pc = self.postcopy
        if pc is None or pc.state < PostcopyIncoming.LISTENING:
            return
        reader = self._preempt_reader
        if reader is not None and reader.expect_eos:
            reader.join(self.io_timeout)
        elif reader is not None:  # no EOS will come: every requested page, then stop reading
            pc.wait_served(self.io_timeout)
            reader.stop()
            if reader.error is not None:
                raise reader.error
        err = getattr(self, "_postcopy_error", None)
        if err is not None:
            raise err
        self._postcopy_stop()
        if pc.blocktime:
            ms = pc.blocktime_ms
            self.c.stats.postcopy_blocktime = ms
            self.c.stats.postcopy_vcpu_blocktime = [ms]

    def _postcopy_stop(self) -> None:
        if self.toucher is not None:
            self.toucher.stop()
        if self._preempt_reader is not None:
            self._preempt_reader.stop()
        if self.postcopy is not None and self.postcopy.state >= PostcopyIncoming.LISTENING:
            self.postcopy.finish()
