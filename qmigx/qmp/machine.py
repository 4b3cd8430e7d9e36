"""The virtual machine behind ``qmigx serve``: runstates, guest, migrations.

An orchestrator drives QEMU through a small set of states it can query
(``query-status``) and that change with its commands and with migration:
a source runs, is stopped for completion and ends ``postmigrate``; a
destination waits ``inmigrate`` until loaded, then runs (or stays paused
with ``-S``, or takes the runstate the stream recorded). :class:`Machine`
keeps those runstates as QEMU 7.2 does, owns the guest stand-in (a
synthetic guest dirtied by a vCPU thread, a saved state, or the state an
incoming migration delivered) and runs the migration engine
(:class:`~qmigx.migration.MigrationSource`,
:class:`~qmigx.migration.MigrationDestination`) with one set of
capabilities and parameters, as QEMU has one migration object.

Everything is thread-safe: commands arrive on the server's event loop,
the engine calls back from its threads. Events (``STOP``, ``RESUME``,
``MIGRATION``, ``MIGRATION_PASS``) go to the emitter the server installs,
from whichever thread caused them. Side effects that a client could
observe right after an event (the ``postmigrate`` runstate after
``completed``, the destination's ``RESUME`` before its ``completed``) are
applied before the event is handed on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from qmigx import transport
from qmigx.records import replace
from qmigx.control import Capabilities, MigrationStatus, Parameters, make_event
from qmigx.control.capabilities import MIGRATION_ACTIVE
from qmigx.crypto import ObjectRoot
from qmigx.errors import CapabilityError, MigrationError, ParameterError
from qmigx.migration.colo_failover import COLO_FEATURE_DISABLED
from qmigx.qmp.protocol import QMPError
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.stream import SectionData

__all__ = ["Machine", "GuestImage", "image_from_stream", "image_from_incoming",
           "recorded_runstate", "RUNSTATES"]

S = MigrationStatus

#: The runstates a served machine passes through (QEMU's names).
RUNSTATES = ("running", "paused", "prelaunch", "inmigrate", "postmigrate", "finish-migrate",
             "shutdown")

Emitter = Callable[[dict], None]

#: ``migrate`` with ``inc`` (or capability ``block`` with ``block-incremental``).
BLOCK_INCREMENTAL_REFUSED = ("Block migration of the top image layer only (inc, block-incremental) "
                             "is not supported: the disks are raw images, migrated whole")

#: Size of the ``pc.rom`` block of :func:`qmigx.synthetic.synthetic_blocks`.
SYNTHETIC_ROM_BYTES = 128 * 1024


#: pages per second the served guest's stand-in reads once postcopy runs it here
POSTCOPY_TOUCH_RATE = 1000


@dataclass
class GuestImage:
    """What ``migrate`` sends: RAM blocks in RAM-list order and device sections.

    ``devices`` holds :class:`~qmigx.tools.streams.DeviceState` (saved here) or
    :class:`~qmigx.stream.SectionData` (replayed with their section ids).
    ``globalstate`` asks the engine to add a ``globalstate`` section; a
    replayed one is instead rewritten with the runstate at completion.
    """

    blocks: RAMBlockList
    devices: list = field(default_factory=list)
    vmdesc: Optional[bytes] = None
    machine_type: str = "pc-i440fx-7.2"
    ram_section_id: int = 2
    globalstate: bool = True


def _runstate_of(sec: SectionData) -> Optional[str]:
    value = sec.value
    if isinstance(value, dict) and isinstance(value.get("state"), str):
        return value["state"]
    payload = bytes(sec.payload)
    if len(payload) < 4:
        return None
    name = payload[4:].split(b"\0", 1)[0]
    try:
        return name.decode()
    except UnicodeDecodeError:
        return None


def recorded_runstate(sections: list) -> Optional[str]:
    """The runstate a stream's ``globalstate`` section recorded, or None if it has none."""
    for sec in sections:
        if isinstance(sec, SectionData) and sec.section.idstr == "globalstate":
            return _runstate_of(sec)
    return None


def _ordered_blocks(blocks: RAMBlockList, setup) -> RAMBlockList:
    """The blocks in the order (and with the addresses) the setup record listed."""
    if setup is None:
        return blocks
    out = RAMBlockList()
    for info in setup.blocks:
        blk = blocks[info.idstr]
        if info.gpa is not None:
            blk.gpa = info.gpa
        out.add(blk)
    return out


def _image(blocks: RAMBlockList, setup, sections: list, vmdesc, configuration) -> GuestImage:
    return GuestImage(
        blocks=_ordered_blocks(blocks, setup), devices=list(sections), vmdesc=vmdesc,
        machine_type=configuration.machine_type if configuration is not None else "pc-i440fx-7.2",
        ram_section_id=setup.section.section_id if setup is not None else 2,
        globalstate=False)


def image_from_stream(loaded) -> GuestImage:
    """A :class:`GuestImage` replaying a :class:`~qmigx.tools.streams.LoadedStream`."""
    return _image(loaded.blocks, loaded.ram_setup, loaded.sections, loaded.vmdesc,
                  loaded.configuration)


def image_from_incoming(blocks: RAMBlockList, result) -> GuestImage:
    """A :class:`GuestImage` of what an incoming migration delivered."""
    return _image(blocks, result.setup, result.sections, result.vmdesc, result.configuration)


def _globalstate_payload(runstate: str) -> bytes:
    from qmigx.savevm import vmstate_device
    from qmigx.vmstate import VMSTATE_GLOBALSTATE, globalstate

    return vmstate_device("globalstate", 0, VMSTATE_GLOBALSTATE, globalstate(runstate)).payload


class _GuestAdapter:
    """The engine's view of the machine's guest (the :class:`~qmigx.migration.Guest` protocol)."""

    def __init__(self, machine: "Machine") -> None:
        self._m = machine

    @property
    def running(self) -> bool:
        return self._m.runstate == "running"

    def stop(self) -> None:
        self._m._engine_stop()

    def start(self) -> None:
        self._m._engine_start()

    def runstate(self) -> str:
        return self._m._completion_runstate()

    def throttle(self, percent: int) -> None:
        vcpu = self._m._vcpu
        if vcpu is not None:
            vcpu.throttle(percent)


class Machine:
    """A VM as QMP sees it.

    Args:
        ram_bytes: give it a synthetic guest of this much RAM
            (:func:`qmigx.synthetic.synthetic_blocks`, devices from
            :func:`~qmigx.synthetic.synthetic_devices`).
        dirty_rate: pages per second a vCPU thread dirties while running
            (marked through :class:`~qmigx.dirtylog.ExplicitDirtyLog`).
        load: a saved state (:class:`~qmigx.tools.streams.LoadedStream`) instead.
        incoming: ``"defer"`` or a URI: wait for an incoming migration
            (``-incoming``); the URI is listened on at :meth:`start`.
        paused: QEMU's ``-S``: do not start the guest (``prelaunch``), and
            leave a loaded destination ``paused``.
        seed: content seed of the synthetic guest.
        qemu_version: the QEMU this machine is (``"7.2"`` or ``"10.0"``): its
            greeting, commands, capabilities, parameters and replies.
        machine_type: the machine type of a synthetic guest (default: the
            version's ``pc-i440fx-X.Y``); a saved state keeps its own. It
            decides the wire conventions an outgoing migration follows
            (:mod:`qmigx.compat`) and the default ``zero-page-detection``.
        drives: the VM's disks, ``NAME=PATH`` raw images (QEMU's ``-drive``):
            sent by block migration (``migrate`` with ``blk``, or capability
            ``block``), or written by an incoming one.
    """

    def __init__(self, *, ram_bytes: Optional[int] = None, dirty_rate: int = 0, load=None,
                 incoming: Optional[str] = None, paused: bool = False, seed: int = 1,
                 drives=(), qemu_version: str = "7.2",
                 machine_type: Optional[str] = None) -> None:
        from qmigx.block import parse_drives
        from qmigx.block_image import check_image
        from qmigx.compat import migration_compat

        self.drives = parse_drives(drives)
        for name, path in self.drives:
            check_image(name, path, writable=incoming is not None)
        self._remove_block_options = False
        self.qemu_version = qemu_version
        self.machine_type = machine_type or f"pc-i440fx-{qemu_version}"
        if load is not None and load.configuration is not None:
            self.machine_type = load.configuration.machine_type
        zpd = migration_compat(self.machine_type, "10.0").zero_page_detection
        self.caps = Capabilities(qemu_version=qemu_version)
        self.params = Parameters(capabilities=self.caps, qemu_version=qemu_version,
                                 defaults={"zero-page-detection": zpd})
        self._exit_on_error = True
        #: user-created objects (``-object``, ``object-add``): TLS credentials, authz
        self.objects = ObjectRoot()
        self._lock = threading.RLock()
        self._emit: Emitter = lambda ev: None
        self._fatal: Callable[[int, str], None] = lambda code, msg: None
        self.dirty_rate = max(0, int(dirty_rate))
        self.autostart = not paused
        self.incoming = incoming
        self._incoming_started = False
        self._incoming_finished = False
        self._multi_channels = True
        self._ram_bytes = ram_bytes
        self._seed = seed
        self._vcpu = None
        self._dirty_logs: dict = {}
        self._guest = _GuestAdapter(self)
        self.src = None
        self.dst = None
        self.image: Optional[GuestImage] = None
        if incoming is not None:
            self.runstate = "inmigrate"
        elif load is not None:
            self.image = image_from_stream(load)
            rec = recorded_runstate(load.sections)
            if rec is None or rec == "running":
                self.runstate = "running" if self.autostart else "paused"
            else:
                self.runstate = rec
        elif ram_bytes is not None:
            self.image = self._synthetic_image(ram_bytes, seed)
            self.image.machine_type = self.machine_type
            self.runstate = "running" if self.autostart else "prelaunch"
        else:
            raise ParameterError("a served VM needs a guest: RAM, a saved state, or -incoming",
                                 field="guest")
        self._setup_vcpu()

    # -- wiring -----------------------------------------------------------------
    def set_emitter(self, emit: Emitter) -> None:
        """Where events go; ``emit`` may be called from any thread."""
        self._emit = emit

    def set_fatal_handler(self, fatal: Callable[[int, str], None]) -> None:
        """Called as ``fatal(exit_code, message)`` when the machine must exit (a failed load)."""
        self._fatal = fatal

    def start(self) -> None:
        """Begin what the command line asked for (``-incoming URI`` listens now)."""
        if self.incoming is not None and self.incoming != "defer":
            self.migrate_incoming(self.incoming)
        with self._lock:
            if self.runstate == "running" and self._vcpu is not None:
                self._vcpu.start()

    def event(self, name: str, data: Optional[dict] = None) -> dict:
        """Emit a QMP event now (QEMU's shape: no ``data`` member when it has none)."""
        ev = make_event(name, data or {}, time.time_ns())
        if data is None:
            ev = {k: v for k, v in ev.items() if k != "data"}
        self._emit(ev)
        return ev

    # -- guest --------------------------------------------------------------------
    @staticmethod
    def _synthetic_image(ram_bytes: int, seed: int) -> GuestImage:
        from qmigx.savevm import vmstate_device
        from qmigx.synthetic import synthetic_blocks, synthetic_devices

        blocks = synthetic_blocks(ram_bytes, seed)
        devices = [vmstate_device(*d) for d in synthetic_devices(seed)]
        return GuestImage(blocks=blocks, devices=devices)

    def _setup_vcpu(self) -> None:
        """A vCPU thread dirtying the largest block, if a dirty rate was asked for."""
        if self._vcpu is not None:
            self._vcpu.stop()
            self._vcpu = None
        self._dirty_logs = {}
        if not self.dirty_rate or self.image is None or not len(self.image.blocks):
            return
        from qmigx.guest import DirtyingGuest
        from qmigx.dirtylog import ExplicitDirtyLog

        block = max(self.image.blocks, key=lambda b: b.used_length)
        log = ExplicitDirtyLog(block)
        self._dirty_logs = {block.idstr: log}
        self._vcpu = DirtyingGuest(block.memory, log, pages_per_second=self.dirty_rate,
                                   seed=self._seed + 2)

    def _vm_start_locked(self) -> None:
        self.runstate = "running"
        self.event("RESUME")
        if self._vcpu is not None:
            self._vcpu.start()

    def _vm_stop_locked(self, state: str) -> None:
        if self._vcpu is not None:
            self._vcpu.stop()  # joins: no guest write lands after this
        self.runstate = state
        self.event("STOP")

    def _engine_stop(self) -> None:
        with self._lock:
            if self.runstate == "running":
                in_colo = any(side is not None and side.state.state is S.COLO
                              for side in (self.src, self.dst))
                self._vm_stop_locked("colo" if in_colo else "finish-migrate")

    def _engine_start(self) -> None:
        with self._lock:
            if self.runstate != "running":
                self._vm_start_locked()

    def _completion_runstate(self) -> str:
        """The runstate recorded at completion; replayed ``globalstate`` sections follow it."""
        with self._lock:
            state = self.runstate
            src = self.src
            if src is not None:
                for i, dev in enumerate(src.devices):
                    if isinstance(dev, SectionData) and dev.section.idstr == "globalstate":
                        src.devices[i] = replace(
                            dev, payload=_globalstate_payload(state), value=None)
            return state

    # -- QMP commands ---------------------------------------------------------------
    def query_status(self) -> dict:
        from qmigx.control._qdict import qdict

        with self._lock:
            state = self.runstate
        if self.qemu_version == "10.0":  # no singlestep member any more
            return qdict({"running": state == "running", "status": state})
        return qdict({"running": state == "running", "singlestep": False, "status": state})

    def stop(self) -> None:
        with self._lock:
            if self.runstate == "inmigrate":
                self.autostart = False
            elif self.runstate == "running":
                self._vm_stop_locked("paused")

    def cont(self) -> None:
        with self._lock:
            if self.runstate == "inmigrate":
                self.autostart = True
            elif self.runstate == "finish-migrate":
                raise QMPError("Migration is not finalized yet")
            elif self.runstate != "running":
                self._vm_start_locked()

    def set_capabilities(self, changes: list) -> None:
        running = self.src is not None and self.src.state.is_running()
        self.caps.set_many(changes, running=running, incoming=self.runstate == "inmigrate",
                           multi_channels_allowed=self._multi_channels)

    def set_parameters(self, values: dict) -> None:
        self.params.set(values)

    def migrate(self, uri: str, *, blk: bool = False, inc: bool = False,
                resume: bool = False) -> None:
        """QMP ``migrate``: QEMU 7.2's checks, then the engine in the background.

        ``blk`` turns capability ``block`` on for this migration only, as
        QEMU does; ``inc`` (block-incremental) is refused: a raw image has
        no backing layer to leave out.
        """
        from qmigx.block import BlockSaveHandler
        from qmigx.migration import MigrationSource

        with self._lock:
            if resume:
                if self.src is None or self.src.state.state is not S.POSTCOPY_PAUSED:
                    raise QMPError("Cannot resume if there is no paused migration")
                self.src.migrate(uri, resume=True)
                return
            if self.src is not None and self.src.state.is_running():
                raise QMPError(MIGRATION_ACTIVE)
            if self.runstate == "inmigrate":
                raise QMPError("Guest is waiting for an incoming migration")
            if self.runstate == "postmigrate":
                raise QMPError("Can't migrate the vm that was paused due to previous migration")
            if blk or inc:
                if self.caps.get("x-colo"):
                    raise QMPError("No disk migration is required in COLO mode")
                if self.caps.get("block") or self.params.get("block-incremental"):
                    raise QMPError("Command options are incompatible with current migration "
                                   "capabilities")
            if inc or (self.caps.get("block") and self.params.get("block-incremental")):
                raise QMPError(BLOCK_INCREMENTAL_REFUSED)
            image = self.image
            if image is None:
                raise QMPError("There is no guest state to migrate")
            disks = BlockSaveHandler(self.drives, capabilities=self.caps)
            if blk:
                self.caps.set("block", True)
                self._remove_block_options = True
            src = MigrationSource(
                image.blocks, devices=image.devices, vmdesc=image.vmdesc, guest=self._guest,
                dirty_logs=self._dirty_logs, capabilities=self.caps, parameters=self.params,
                machine_type=image.machine_type, globalstate=image.globalstate,
                ram_section_id=image.ram_section_id, handlers=[disks], objects=self.objects)
            src.events.subscribe(self._source_event)
            src.state.add_listener(self._source_state)
            self.src = src
            try:
                parsed = transport.parse_uri(uri)
            except ParameterError as exc:
                if self.qemu_version == "10.0":
                    # QEMU 10 parses the URI first: no state change, its incoming text
                    self.src = None
                    raise QMPError(f"unknown migration protocol: {uri}") from None
                # QEMU 7.2 enters setup before it looks at the URI, then fails
                src.state.reset_for_new_migration()
                src.state.try_transition(S.SETUP, S.FAILED)
                self._block_options_done()
                raise QMPError(exc.message) from None
            self._multi_channels = parsed.multi_channel
            try:
                src.migrate(uri)
            except CapabilityError as exc:
                # QEMU accepts the command and fails the migration in setup
                src.c.error = exc
                src.c.stats.error_desc = exc.message
                src.state.reset_for_new_migration()
                src.state.try_transition(S.SETUP, S.FAILED)
                self._block_options_done()

    def _block_options_done(self) -> None:
        """Drop what ``migrate`` with ``blk`` turned on, once that migration ended."""
        with self._lock:
            if self._remove_block_options:
                self._remove_block_options = False
                self.caps.set_many([("block", False)])

    def migrate_incoming(self, uri: str, *, exit_on_error: bool = True) -> None:
        """QMP ``migrate-incoming`` (also ``-incoming URI`` at start).

        ``exit_on_error`` (QEMU 10): False keeps the machine alive after a
        failed load, ``failed`` in query-migrate with the error.
        """
        from qmigx.block import BlockLoadHandler
        from qmigx.migration import MigrationDestination

        with self._lock:
            self._exit_on_error = exit_on_error
            if self._incoming_started:
                raise QMPError("The incoming migration has already been started")
            if self.runstate != "inmigrate":
                raise QMPError("'-incoming' was not specified on the command line")
            dst = MigrationDestination(self._destination_blocks(), capabilities=self.caps,
                                       parameters=self.params,
                                       handlers=[BlockLoadHandler(self.drives)],
                                       objects=self.objects)
            dst.events.subscribe(self._destination_event)
            dst.state.add_listener(self._destination_state)
            dst.on_postcopy_run = self._postcopy_run
            try:
                dst.incoming(uri)
            except MigrationError as exc:
                # QEMU announces setup before it looks at the URI
                self.event("MIGRATION", {"status": "setup"})
                raise QMPError(exc.message) from None
            self._multi_channels = transport.parse_uri(uri, incoming=True).multi_channel
            self.dst = dst
            self._incoming_started = True

    def _destination_blocks(self) -> Optional[RAMBlockList]:
        if self._ram_bytes is None:
            return None  # created from the incoming setup record
        # a synthetic guest's layout (qmigx.synthetic), zero-filled: the content comes in
        return RAMBlockList([RAMBlock.anonymous("pc.ram", self._ram_bytes),
                             RAMBlock.anonymous("pc.rom", SYNTHETIC_ROM_BYTES)])

    def start_postcopy(self) -> None:
        """QMP ``migrate-start-postcopy`` (QEMU 7.2's checks)."""
        if not (self.caps.get("postcopy-ram") or self.caps.get("dirty-bitmaps")):
            raise QMPError("Enable postcopy with migrate_set_capability before the start of "
                           "migration")
        src = self.src
        if src is None or src.state.state is S.NONE:
            raise QMPError("Postcopy must be started after migration has been started")
        src.start_postcopy()

    def migrate_pause(self) -> bool:
        """QMP ``migrate-pause`` on whichever side is in postcopy-active; False: none is."""
        for side in (self.src, self.dst):
            if side is not None and side.state.state is S.POSTCOPY_ACTIVE:
                side.pause()
                return True
        return False

    def migrate_recover(self, uri: str) -> None:
        """QMP ``migrate-recover``: a paused incoming postcopy listens on ``uri``."""
        dst = self.dst
        if dst is None or dst.state.state is not S.POSTCOPY_PAUSED:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        try:
            dst.recover(uri)
        except MigrationError as exc:
            raise QMPError(exc.message) from None

    def _postcopy_run(self, dst) -> None:
        """POSTCOPY_RUN: the guest runs here now; its stand-in reads memory, faulting pages in."""
        from qmigx.migration.postcopy_incoming import Toucher

        with self._lock:
            if not self.autostart:
                return
            self.runstate = "running"
        blocks = dst.loader._table or list(dst.blocks)
        dst.toucher = Toucher(blocks, POSTCOPY_TOUCH_RATE)
        dst.toucher.start()

    def migrate_cancel(self) -> None:
        src = self.src
        if src is not None:
            src.cancel()

    def migrate_continue(self, state: str) -> None:
        src = self.src
        current = src.state.state if src is not None else S.NONE
        if current.value != state:
            raise QMPError(f"Migration not in expected state: {current.value}")
        if src is not None:
            src.migrate_continue(state)

    def query_migrate(self) -> dict:
        src, dst = self.src, self.dst
        if src is not None and src.state.state is not S.NONE:
            q = src.query()
            err = src.error
            if "error-desc" in q and isinstance(err, MigrationError):
                q["error-desc"] = err.message
            return q
        if dst is not None:
            q = dst.query()
            if dst.state.state in (S.COMPLETED, S.FAILED):
                q.pop("socket-address", None)
            if (self.qemu_version == "10.0" and dst.state.state is S.FAILED
                    and isinstance(dst.error, MigrationError)):
                # QEMU 10 stays up with exit-on-error false and says why
                q["error-desc"] = f"load of migration failed: {dst.error.message}"
            return q
        return {}

    def _colo_side(self):
        """The engine side in COLO now, else the one that was last, else None."""
        sides = [x for x in (self.src, self.dst) if x is not None]
        for side in sides:
            if side.colo_status.mode.value:
                return side
        for side in sides:
            if side.colo_status.last_mode.value:
                return side
        return None

    def colo_lost_heartbeat(self) -> None:
        """``x-colo-lost-heartbeat``: the secondary takes over, or the primary goes on alone."""
        side = self._colo_side()
        if side is None or side.colo is None:
            raise QMPError(COLO_FEATURE_DISABLED)
        side.colo.lost_heartbeat()

    def colo_checkpoints(self) -> dict:
        """``x-query-qmigx-colo``: this side's checkpoints (count and the last one's figures).

        A secondary also says where it is (``phase``: waiting, receiving,
        applying, ended) and how many checkpoints it discarded half-way.
        """
        from qmigx.control._qdict import qdict

        side = self._colo_side()
        colo = side.colo if side is not None else None
        rows = colo.log.rows if colo is not None else []
        last = {k.replace("_", "-"): v for k, v in rows[-1].items()} if rows else {}
        out = {"checkpoints": len(rows), "last": qdict(last)}
        phase = getattr(colo, "phase", None)  # a secondary's: where its checkpoint loop is
        if phase is not None:
            out["phase"] = phase
            out["discarded"] = colo.discarded
        return qdict(out)

    def query_colo_status(self) -> dict:
        """``query-colo-status``: ``{mode, last-mode, reason}``."""
        from qmigx.control._qdict import qdict
        from qmigx.migration.colo_failover import ColoStatus

        side = self._colo_side()
        status = side.colo_status if side is not None else ColoStatus()
        return qdict(status.query())

    def ram_digest(self) -> list:
        """``x-query-qmigx-ram``: each RAM block's name, size and SHA-256 (a qmigx extension).

        Lets a test or an operator check that two machines hold the same
        memory without moving it: on a stopped source and its destination
        the lists are equal.
        """
        import hashlib

        from qmigx.control._qdict import qdict

        with self._lock:
            image = self.image
            vcpu_paused = self._vcpu is None or not self._vcpu.running
            if image is None:
                return []
            out = []
            for blk in image.blocks:
                digest = hashlib.sha256(memoryview(blk.memory)).hexdigest() if vcpu_paused else ""
                out.append(qdict({"id": blk.idstr, "size": blk.used_length, "sha256": digest}))
            return out

    def shutdown(self) -> None:
        """Stop everything running (before exit): migrations, listener, vCPU."""
        with self._lock:
            if self.src is not None:
                self.src.cancel()
            if self.dst is not None and not self._incoming_finished:
                self.dst.cancel()
            if self._vcpu is not None:
                self._vcpu.stop()
            self.runstate = "shutdown"

    # -- engine callbacks (engine threads) ---------------------------------------------
    @staticmethod
    def _status_of(ev: dict) -> Optional[str]:
        if ev.get("event") == "MIGRATION":
            return ev["data"]["status"]
        return None

    def _source_event(self, ev: dict) -> None:
        src = self.src
        if self._status_of(ev) == "completed" and (src is None or src.colo is None):
            self._outgoing_done()
        self._emit(ev)

    def _source_state(self, old: MigrationStatus, new: MigrationStatus) -> None:
        if new is S.COMPLETED and old is not S.COLO:  # after COLO the primary goes on alone
            self._outgoing_done()
        if new in (S.COMPLETED, S.FAILED, S.CANCELLED):
            self._block_options_done()

    def _outgoing_done(self) -> None:
        with self._lock:
            if self.runstate != "postmigrate":
                if self._vcpu is not None:
                    self._vcpu.stop()
                self.runstate = "postmigrate"

    def _destination_event(self, ev: dict) -> None:
        if self._status_of(ev) == "completed":
            self._incoming_done()
        self._emit(ev)

    def _destination_state(self, old: MigrationStatus, new: MigrationStatus) -> None:
        if new is S.COLO:
            self._colo_secondary_started()
        elif new is S.COMPLETED:
            self._incoming_done()
        elif new is S.FAILED:
            dst = self.dst
            err = dst.error if dst is not None else None
            text = err.message if isinstance(err, MigrationError) else str(err)
            if self._exit_on_error:
                self._fatal(1, f"load of migration failed: {text}")

    def _colo_secondary_started(self) -> None:
        """COLO secondary: the migration is loaded and the VM runs between checkpoints."""
        with self._lock:
            dst = self.dst
            if dst is None:
                return
            self.image = image_from_incoming(dst.blocks, dst.result)
            self._setup_vcpu()  # --dirty-rate: the secondary's guest writes too
            if dst.colo is not None:
                dst.colo.guest = self._guest
                dst.colo.dirty_logs = self._dirty_logs  # reverted by each checkpoint
            if self.runstate != "running":
                self._vm_start_locked()

    def _incoming_done(self) -> None:
        """The stream is loaded: the machine now holds it and takes its runstate."""
        with self._lock:
            if self._incoming_finished or self.dst is None:
                return
            self._incoming_finished = True
            dst = self.dst
            colo = dst.colo is not None
            if colo:  # failover: the secondary runs as the new primary, -S or not
                self.autostart = True
            self.image = image_from_incoming(dst.blocks, dst.result)
            self._setup_vcpu()
            rec = None if colo else recorded_runstate(dst.result.sections)
            if rec is None or rec == "running":
                if self.autostart:
                    if self.runstate != "running":  # a COLO secondary runs already
                        self._vm_start_locked()
                else:
                    self.runstate = "paused"
            else:
                self.runstate = rec

