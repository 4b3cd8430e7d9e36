"""Migration capabilities: QEMU 7.2's 21 and 10.0's 22 switches, and their rules.

``migrate-set-capabilities`` is where a management tool learns what a
peer can do, so qmigx must accept and refuse exactly what QEMU 7.2
accepts and refuses, with the same error text (control.md §2). A new
set is checked as a whole (the current switches with the requested
changes applied) and applied all-or-nothing.

qmigx behaves like a QEMU built with old-style block migration
(:mod:`qmigx.block`) and with COLO (:mod:`qmigx.migration.colo`), whose
block replication and network comparison it does not emulate.

Each :class:`Capabilities` speaks one QEMU version (``qemu_version``):
10.0 has no ``compress`` and ``block`` and adds ``switchover-ack``,
``dirty-limit`` and ``mapped-ram`` with their rules (qemu10.md §7.1);
None accepts the names of both, with the rules both versions share
plus those of the new capabilities (qmigx's command line). A capability
of another version reads as off and cannot be set.
"""

from __future__ import annotations

import enum
from typing import Any, Iterable, Mapping, Optional, Union

from qmigx.control._qdict import qdict_keys
from qmigx.control.options import ZERO_COPY_REFUSED, SettingsView, zero_copy_refused
from qmigx.errors import CapabilityError

__all__ = [
    "MigrationCapability",
    "CAPABILITIES",
    "CAPABILITIES_10",
    "UNSUPPORTED_CAPABILITIES",
    "BACKGROUND_SNAPSHOT_INCOMPATIBLE",
    "WriteTracking",
    "Capabilities",
    "MIGRATION_ACTIVE",
]

#: QEMU's QERR_MIGRATION_ACTIVE text.
MIGRATION_ACTIVE = "There's a migration process in progress"


class MigrationCapability(enum.Enum):
    """QAPI ``MigrationCapability``: values are QEMU's names, in QAPI order."""

    XBZRLE = "xbzrle"
    RDMA_PIN_ALL = "rdma-pin-all"
    AUTO_CONVERGE = "auto-converge"
    ZERO_BLOCKS = "zero-blocks"
    COMPRESS = "compress"
    EVENTS = "events"
    POSTCOPY_RAM = "postcopy-ram"
    X_COLO = "x-colo"
    RELEASE_RAM = "release-ram"
    BLOCK = "block"
    RETURN_PATH = "return-path"
    PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"
    MULTIFD = "multifd"
    DIRTY_BITMAPS = "dirty-bitmaps"
    POSTCOPY_BLOCKTIME = "postcopy-blocktime"
    LATE_BLOCK_ACTIVATE = "late-block-activate"
    X_IGNORE_SHARED = "x-ignore-shared"
    VALIDATE_UUID = "validate-uuid"
    BACKGROUND_SNAPSHOT = "background-snapshot"
    ZERO_COPY_SEND = "zero-copy-send"
    POSTCOPY_PREEMPT = "postcopy-preempt"

    @property
    def index(self) -> int:
        """Position in QAPI's enum (``xbzrle`` = 0 … ``postcopy-preempt`` = 20)."""
        return _CAP_INDEX[self]

    def __str__(self) -> str:
        return self.value


_CAP_INDEX = {c: i for i, c in enumerate(MigrationCapability)}

#: Capability names in QAPI order (all default to false).
CAPABILITIES: tuple[str, ...] = tuple(c.value for c in MigrationCapability)
#: QEMU 10.0's, in its QAPI order.
CAPABILITIES_10: tuple[str, ...] = tuple(
    c for c in CAPABILITIES if c not in ("compress", "block")) + (
    "switchover-ack", "dirty-limit", "mapped-ram")
_BY_VERSION: dict[Optional[str], tuple[str, ...]] = {
    "7.2": CAPABILITIES,
    "10.0": CAPABILITIES_10,
    None: CAPABILITIES + ("switchover-ack", "dirty-limit", "mapped-ram"),
}
_ALL_NAMES = frozenset(_BY_VERSION[None])

#: Refused because qmigx does not implement them (QEMU's text for a build without them).
UNSUPPORTED_CAPABILITIES: dict[str, str] = {}

#: Checked in this order; the first one enabled is named in the error.
BACKGROUND_SNAPSHOT_INCOMPATIBLE: tuple[str, ...] = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "return-path", "multifd", "pause-before-switchover", "auto-converge",
    "release-ram", "rdma-pin-all", "compress", "xbzrle", "x-colo",
    "validate-uuid", "zero-copy-send",
)



class WriteTracking(enum.IntEnum):
    """What the host offers for ``background-snapshot`` (userfaultfd write-protect)."""

    ABSENT = 1       # kernel lacks UFFD write-protect
    AVAILABLE = 2    # kernel has it, but guest memory cannot use it
    COMPATIBLE = 3


CapabilityLike = Union[MigrationCapability, str]


def _parse_changes(changes: Any, names: frozenset = frozenset(CAPABILITIES)) -> list[tuple[str, bool]]:
    """QMP's argument checks for ``capabilities``, with QEMU's error texts."""
    if isinstance(changes, Mapping):
        items: list[Any] = [{"capability": k, "state": v} for k, v in changes.items()]
    elif isinstance(changes, (str, bytes)) or not isinstance(changes, Iterable):
        raise CapabilityError("Invalid parameter type for 'capabilities', expected: array",
                              field="capabilities")
    else:
        items = list(changes)
    out: list[tuple[str, bool]] = []
    for i, item in enumerate(items):
        path = f"capabilities[{i}]"
        if isinstance(item, tuple) and len(item) == 2:
            item = {"capability": item[0], "state": item[1]}
        if not isinstance(item, Mapping):
            raise CapabilityError(f"Invalid parameter type for '{path}', expected: object", field=path)
        if "capability" not in item:
            raise CapabilityError(f"Parameter '{path}.capability' is missing", field=f"{path}.capability")
        name = item["capability"]
        if isinstance(name, MigrationCapability):
            name = name.value
        if not isinstance(name, str):
            raise CapabilityError(f"Invalid parameter type for '{path}.capability', expected: string",
                                  field=f"{path}.capability")
        if name not in names:
            raise CapabilityError(f"Parameter 'capability' does not accept value '{name}'", field=name)
        if "state" not in item:
            raise CapabilityError(f"Parameter '{path}.state' is missing", field=f"{path}.state")
        state = item["state"]
        if not isinstance(state, bool):
            raise CapabilityError(f"Invalid parameter type for '{path}.state', expected: boolean",
                                  field=f"{path}.state")
        for key in item:
            if key not in ("capability", "state"):
                raise CapabilityError(f"Parameter '{path}.{key}' is unexpected", field=f"{path}.{key}")
        out.append((name, state))
    return out




class Capabilities:
    """One side's capability switches (all false initially).

    Args:
        postcopy_supported: whether this host could serve postcopy as a
            destination (userfaultfd); checked when ``postcopy-ram`` is
            first enabled on an incoming side.
        write_tracking: what the host offers for ``background-snapshot``.
        parameters: the same side's :class:`Parameters`, consulted by the
            ``zero-copy-send`` rule (multifd compression, TLS). Linking a
            :class:`Parameters` to this object sets it.
        qemu_version: ``"7.2"`` (default), ``"10.0"``, or None for both.
        kvm_dirty_ring: whether ``dirty-limit`` could work (KVM with a
            dirty ring); qmigx, like QEMU under TCG, has none.
    """

    def __init__(self, *, postcopy_supported: bool = True,
                 write_tracking: WriteTracking = WriteTracking.COMPATIBLE,
                 parameters: Optional[SettingsView] = None,
                 qemu_version: Optional[str] = "7.2", kvm_dirty_ring: bool = False) -> None:
        if qemu_version not in _BY_VERSION:
            raise ValueError(f"qemu_version must be '7.2', '10.0' or None, not {qemu_version!r}")
        self.qemu_version = qemu_version
        self.names = _BY_VERSION[qemu_version]
        self._names = frozenset(self.names)
        self.kvm_dirty_ring = kvm_dirty_ring
        self._state: dict[str, bool] = dict.fromkeys(self.names, False)
        self.postcopy_supported = postcopy_supported
        self.write_tracking = WriteTracking(write_tracking)
        self.parameters = parameters

    def __repr__(self) -> str:
        return f"Capabilities(enabled={sorted(self.enabled())!r})"

    def get(self, name: CapabilityLike) -> bool:
        """Whether ``name`` is on (a capability of another QEMU version is off)."""
        key = name.value if isinstance(name, MigrationCapability) else name
        if key not in _ALL_NAMES:
            raise CapabilityError(f"Parameter 'capability' does not accept value '{key}'", field=str(key))
        return self._state.get(key, False)

    __getitem__ = get

    def enabled(self) -> frozenset[str]:
        return frozenset(k for k, v in self._state.items() if v)

    def as_dict(self) -> dict[str, bool]:
        """Every capability in QAPI order, including ``block``."""
        return dict(self._state)

    def set_many(self, changes: Any, *, running: bool = False, incoming: bool = False,
                 multi_channels_allowed: bool = True) -> None:
        """``migrate-set-capabilities``: apply ``changes`` atomically or raise.

        ``changes`` is a sequence of ``(name, state)`` pairs or of QMP's
        ``{"capability": name, "state": bool}`` objects, or a mapping
        ``name -> state``; later entries win. ``running`` is whether a
        migration is running on this side (see ``StateMachine.is_running``);
        ``incoming`` whether this QEMU waits for an incoming migration;
        ``multi_channels_allowed`` whether that incoming URI can carry
        several channels (tcp/unix/vsock). Raises :class:`CapabilityError`
        with QEMU 7.2's text, and then nothing changes.
        """
        parsed = _parse_changes(changes, self._names)
        if running:
            raise CapabilityError(MIGRATION_ACTIVE, field="capabilities")
        new = dict(self._state)
        for name, state in parsed:
            new[name] = state
        self._check(new, incoming=incoming, multi_channels_allowed=multi_channels_allowed)
        self._state = new

    def set(self, name: CapabilityLike, state: bool = True, **kwargs: Any) -> None:
        """Shorthand for :meth:`set_many` with one capability."""
        key = name.value if isinstance(name, MigrationCapability) else name
        self.set_many([(key, state)], **kwargs)

    def check(self, proposed: Mapping[str, bool], *, incoming: bool = False,
              multi_channels_allowed: bool = True) -> None:
        """Raise :class:`CapabilityError` unless the full set ``proposed`` is acceptable."""
        full = dict(self._state)
        full.update(proposed)
        self._check(full, incoming=incoming, multi_channels_allowed=multi_channels_allowed)

    def _check(self, state: Mapping[str, bool], *, incoming: bool,
               multi_channels_allowed: bool) -> None:
        cap = dict.fromkeys(_ALL_NAMES, False)
        cap.update(state)
        v10 = self.qemu_version == "10.0"

        def fail(message: str, field: str) -> CapabilityError:
            return CapabilityError(message, field=field)

        for name, message in UNSUPPORTED_CAPABILITIES.items():
            if cap[name]:
                raise fail(message, name)
        if cap["postcopy-ram"]:
            if not self._state["postcopy-ram"] and incoming and not self.postcopy_supported:
                raise fail("Postcopy is not supported", "postcopy-ram")
            if cap["x-ignore-shared"]:
                raise fail("Postcopy is not compatible with ignore-shared", "postcopy-ram")
            if v10 and cap["multifd"]:
                raise fail("Postcopy is not yet compatible with multifd", "postcopy-ram")
        if cap["background-snapshot"]:
            if self.write_tracking < WriteTracking.AVAILABLE:
                raise fail("Background-snapshot is not supported by host kernel", "background-snapshot")
            if self.write_tracking < WriteTracking.COMPATIBLE:
                raise fail("Background-snapshot is not compatible with guest memory configuration",
                           "background-snapshot")
            for other in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
                if cap[other]:
                    raise fail(f"Background-snapshot is not compatible with {other}", "background-snapshot")
        if cap["zero-copy-send"]:
            if zero_copy_refused(cap, self.parameters):
                raise fail(ZERO_COPY_REFUSED, "zero-copy-send")
        if incoming and not multi_channels_allowed and cap["multifd"]:
            raise fail("multifd is not supported by current protocol", "multifd")
        if cap["postcopy-preempt"]:
            if not cap["postcopy-ram"]:
                raise fail("Postcopy preempt requires postcopy-ram", "postcopy-preempt")
            if cap["compress"]:
                raise fail("Postcopy preempt not compatible with compress", "postcopy-preempt")
        if cap["multifd"] and cap["compress"]:
            raise fail("Multifd is not compatible with compress", "multifd")
        # the capabilities QEMU 10 added, and its new refusals
        if cap["switchover-ack"] and not cap["return-path"]:
            raise fail("Capability 'switchover-ack' requires capability 'return-path'",
                       "switchover-ack")
        if cap["dirty-limit"]:
            if cap["auto-converge"]:
                raise fail("dirty-limit conflicts with auto-converge either of then available "
                           "currently", "dirty-limit")
            if not self.kvm_dirty_ring:
                raise fail("dirty-limit requires KVM with accelerator property "
                           "'dirty-ring-size' set", "dirty-limit")
        if v10 and cap["multifd"] and cap["xbzrle"]:
            raise fail("Multifd is not compatible with xbzrle", "multifd")
        if cap["mapped-ram"]:
            for other, what in (("xbzrle", "xbzrle"), ("compress", "compression"),
                                ("postcopy-ram", "postcopy")):
                if cap[other]:
                    raise fail(f"Mapped-ram migration is incompatible with {what}", "mapped-ram")

    def as_qmp(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities``: QAPI order, QEMU's key order."""
        order = qdict_keys(("capability", "state"))
        out = []
        for name in self.names:
            entry = {"capability": name, "state": self._state[name]}
            out.append({k: entry[k] for k in order})
        return out
