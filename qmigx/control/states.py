"""Migration states and the transitions QEMU 7.2 makes between them.

A management tool sees the migration only through ``query-migrate``'s
``status`` and the ``MIGRATION`` events, so an engine that wants to be a
drop-in peer must walk exactly QEMU's states in QEMU's order (spec
control.md §1). This module holds the states, one table of every
transition the source and the destination may make (with what triggers
it), and a small :class:`StateMachine` that refuses anything outside the
table: a refused transition is a bug in the engine, never a user error.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable, Iterable, Literal, NamedTuple, Union

from qmigx.errors import StateError

__all__ = [
    "MigrationStatus",
    "Side",
    "SOURCE",
    "DESTINATION",
    "Transition",
    "TRANSITION_TABLE",
    "TRANSITIONS",
    "RUNNING_STATES",
    "SETUP_OR_ACTIVE_STATES",
    "IDLE_STATES",
    "POSTCOPY_STATES",
    "is_allowed",
    "StateMachine",
]

Side = Literal["source", "destination"]
SOURCE: Side = "source"
DESTINATION: Side = "destination"


class MigrationStatus(enum.Enum):
    """QAPI ``MigrationStatus``: values are QEMU's names, in QAPI order.

    The QAPI index (the integer QEMU uses internally) is :attr:`index`.
    """

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def index(self) -> int:
        """Position in QAPI's enum (``none`` = 0 … ``wait-unplug`` = 13)."""
        return _STATUS_INDEX[self]

    @classmethod
    def from_index(cls, index: int) -> "MigrationStatus":
        """The state with QAPI index ``index``."""
        if not 0 <= index < len(_STATUS_LIST):
            raise StateError(f"no migration status has index {index}", field="status")
        return _STATUS_LIST[index]

    @classmethod
    def parse(cls, value: "MigrationStatus | str") -> "MigrationStatus":
        """A state from itself or its QEMU name."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise StateError(f"unknown migration status {value!r}", field="status") from None

    def __str__(self) -> str:
        return self.value


_STATUS_LIST = tuple(MigrationStatus)
_STATUS_INDEX = {s: i for i, s in enumerate(_STATUS_LIST)}

S = MigrationStatus


class Transition(NamedTuple):
    """One row of the transition table."""

    side: Side
    sources: frozenset[MigrationStatus]
    targets: frozenset[MigrationStatus]
    trigger: str


def _row(side: Side, sources: Iterable[MigrationStatus], targets: Iterable[MigrationStatus],
         trigger: str) -> Transition:
    return Transition(side, frozenset(sources), frozenset(targets), trigger)


_POSTCOPY = (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)

#: Every state change QEMU 7.2 makes, per side (control.md §1.1, §1.2,
#: completed from migration.c / savevm.c / colo.c / multifd.c).
TRANSITION_TABLE: tuple[Transition, ...] = (
    # --- source -----------------------------------------------------------
    _row(SOURCE, (S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED), (S.SETUP,),
         "migrate accepted: state reset, then none -> setup"),
    _row(SOURCE, (S.SETUP,), (S.ACTIVE,), "setup sections written, no unplug pending"),
    _row(SOURCE, (S.SETUP,), (S.WAIT_UNPLUG,), "a failover device unplug is pending"),
    _row(SOURCE, (S.WAIT_UNPLUG,), (S.ACTIVE,), "unplug finished"),
    _row(SOURCE, (S.SETUP,), (S.COMPLETED,), "savevm / snapshot-save written in one go"),
    _row(SOURCE, (S.ACTIVE,), (S.PRE_SWITCHOVER,),
         "pause-before-switchover, at completion or postcopy start"),
    _row(SOURCE, (S.PRE_SWITCHOVER,), (S.DEVICE,), "migrate-continue during completion"),
    _row(SOURCE, (S.PRE_SWITCHOVER,), (S.POSTCOPY_ACTIVE,), "migrate-continue during postcopy start"),
    _row(SOURCE, (S.ACTIVE,), (S.POSTCOPY_ACTIVE,), "postcopy switch-over"),
    _row(SOURCE, (S.ACTIVE, S.DEVICE), (S.COMPLETED,), "completion succeeded"),
    _row(SOURCE, (S.ACTIVE,), (S.COLO,), "completion with x-colo"),
    _row(SOURCE, (S.COLO,), (S.COMPLETED,), "COLO failover on the primary"),
    _row(SOURCE, (S.POSTCOPY_ACTIVE,), (S.COMPLETED,), "postcopy END + EOF sent, return path closed"),
    _row(SOURCE, (S.POSTCOPY_ACTIVE,), (S.POSTCOPY_PAUSED,), "channel error or migrate-pause"),
    _row(SOURCE, (S.POSTCOPY_PAUSED,), (S.POSTCOPY_RECOVER,), "migrate resume:true connected"),
    _row(SOURCE, (S.POSTCOPY_RECOVER,), (S.POSTCOPY_ACTIVE,), "RESUME_ACK received"),
    _row(SOURCE, (S.POSTCOPY_RECOVER,), (S.POSTCOPY_PAUSED,), "recovery handshake failed: pause again"),
    _row(SOURCE, (S.SETUP, S.ACTIVE, *_POSTCOPY, S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG),
         (S.CANCELLING,), "migrate_cancel"),
    _row(SOURCE, (S.CANCELLING,), (S.CANCELLED,), "cleanup after cancel"),
    _row(SOURCE, (S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.POSTCOPY_ACTIVE), (S.FAILED,),
         "error (connect, setup, stream, completion, postcopy start)"),
    _row(SOURCE, (S.POSTCOPY_PAUSED,), (S.FAILED,), "return path could not be reopened for resume"),
    # --- destination --------------------------------------------------------
    _row(DESTINATION, (S.NONE,), (S.ACTIVE,), "first channel connected, loading starts"),
    _row(DESTINATION, (S.ACTIVE,), (S.COMPLETED,), "EOF reached, VM started or left paused"),
    _row(DESTINATION, (S.ACTIVE,), (S.FAILED,), "load error (QEMU then exits)"),
    _row(DESTINATION, (S.ACTIVE,), (S.POSTCOPY_ACTIVE,), "POSTCOPY_LISTEN processed"),
    _row(DESTINATION, (S.POSTCOPY_ACTIVE,), (S.COMPLETED, S.FAILED), "end of postcopy stream / fatal error"),
    _row(DESTINATION, (S.POSTCOPY_ACTIVE,), (S.POSTCOPY_PAUSED,), "channel error or migrate-pause"),
    _row(DESTINATION, (S.POSTCOPY_PAUSED,), (S.POSTCOPY_RECOVER,), "new channel via migrate-recover"),
    _row(DESTINATION, (S.POSTCOPY_RECOVER,), (S.POSTCOPY_ACTIVE,), "POSTCOPY_RESUME received"),
    _row(DESTINATION, (S.POSTCOPY_RECOVER,), (S.POSTCOPY_PAUSED,),
         "channel error during the recovery handshake: pause again"),
    _row(DESTINATION, (S.ACTIVE,), (S.COLO,), "COLO incoming thread started"),
    _row(DESTINATION, (S.COLO,), (S.COMPLETED,), "COLO failover on the secondary"),
)


def _index(table: Iterable[Transition]) -> dict[tuple[str, MigrationStatus], frozenset[MigrationStatus]]:
    out: dict[tuple[str, MigrationStatus], set[MigrationStatus]] = {}
    for row in table:
        for src in row.sources:
            out.setdefault((row.side, src), set()).update(row.targets)
    return {k: frozenset(v) for k, v in out.items()}


#: ``(side, from) -> allowed targets``, derived from :data:`TRANSITION_TABLE`.
TRANSITIONS: dict[tuple[str, MigrationStatus], frozenset[MigrationStatus]] = _index(TRANSITION_TABLE)

#: QEMU's ``migration_is_running``: commands that need an idle migration refuse these.
RUNNING_STATES = frozenset({S.SETUP, S.ACTIVE, *_POSTCOPY, S.PRE_SWITCHOVER, S.DEVICE,
                            S.WAIT_UNPLUG, S.CANCELLING})
#: QEMU's ``migration_is_setup_or_active`` (includes colo, excludes cancelling).
SETUP_OR_ACTIVE_STATES = frozenset({S.SETUP, S.ACTIVE, *_POSTCOPY, S.PRE_SWITCHOVER, S.DEVICE,
                                    S.WAIT_UNPLUG, S.COLO})
#: QEMU's ``migration_is_idle``.
IDLE_STATES = frozenset({S.NONE, S.CANCELLED, S.COMPLETED, S.FAILED})
#: QEMU's ``migration_in_postcopy``.
POSTCOPY_STATES = frozenset(_POSTCOPY)

_SIDES = (SOURCE, DESTINATION)


def _side(side: str) -> Side:
    if side not in _SIDES:
        raise StateError(f"side must be 'source' or 'destination', not {side!r}", field="side")
    return side  # type: ignore[return-value]


def is_allowed(side: Side, old: "MigrationStatus | str", new: "MigrationStatus | str") -> bool:
    """Whether the table lets ``side`` go from ``old`` to ``new``."""
    return MigrationStatus.parse(new) in TRANSITIONS.get((_side(side), MigrationStatus.parse(old)), ())


Listener = Callable[[MigrationStatus, MigrationStatus], object]
StatusLike = Union[MigrationStatus, str]


class StateMachine:
    """The migration state of one side, changed only along the table.

    Listeners (``fn(old, new)``) are called after every change, in
    registration order, outside the internal lock; this is where the
    ``MIGRATION`` event hooks in (:class:`qmigx.control.MigrationEvents`).
    """

    def __init__(self, side: Side = SOURCE, state: StatusLike = MigrationStatus.NONE) -> None:
        self.side: Side = _side(side)
        self._state = MigrationStatus.parse(state)
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    @property
    def state(self) -> MigrationStatus:
        return self._state

    def __repr__(self) -> str:
        return f"StateMachine(side={self.side!r}, state={self._state.value!r})"

    # --- listeners -----------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _notify(self, old: MigrationStatus, new: MigrationStatus) -> None:
        for fn in list(self._listeners):
            fn(old, new)

    # --- transitions -----------------------------------------------------------
    def allowed_targets(self, state: StatusLike | None = None) -> frozenset[MigrationStatus]:
        """The states reachable in one step from ``state`` (default: the current one)."""
        src = self._state if state is None else MigrationStatus.parse(state)
        return TRANSITIONS.get((self.side, src), frozenset())

    def _refuse(self, old: MigrationStatus, new: MigrationStatus) -> StateError:
        return StateError(
            f"migration status cannot change from '{old.value}' to '{new.value}' on the {self.side}",
            field="status")

    def transition(self, to: StatusLike) -> MigrationStatus:
        """Move to ``to``; :class:`StateError` (state unchanged) if the table forbids it.

        Returns the previous state.
        """
        new = MigrationStatus.parse(to)
        with self._lock:
            old = self._state
            if new not in TRANSITIONS.get((self.side, old), ()):
                raise self._refuse(old, new)
            self._state = new
        self._notify(old, new)
        return old

    def try_transition(self, old: StatusLike, new: StatusLike) -> bool:
        """QEMU's ``migrate_set_state``: change to ``new`` only if the state is still ``old``.

        Returns whether the change happened (another party may have moved
        the state first, e.g. a cancel racing a completion). A pair the
        table does not allow raises :class:`StateError` whatever the
        current state is, because asking for it is a bug.
        """
        src = MigrationStatus.parse(old)
        dst = MigrationStatus.parse(new)
        if dst not in TRANSITIONS.get((self.side, src), ()):
            raise self._refuse(src, dst)
        with self._lock:
            if self._state is not src:
                return False
            self._state = dst
        self._notify(src, dst)
        return True

    def reset_for_new_migration(self) -> MigrationStatus:
        """Start a new outgoing migration: any idle state -> ``setup``.

        QEMU refuses ``migrate`` while a migration runs with "There's a
        migration process in progress"; the same text is raised here.
        Only the source restarts; a destination accepts one incoming
        migration per process. Returns the previous state.
        """
        if self.side != SOURCE:
            raise StateError("The incoming migration has already been started", field="status")
        with self._lock:
            old = self._state
            if old in RUNNING_STATES:
                raise StateError("There's a migration process in progress", field="status")
            if MigrationStatus.SETUP not in TRANSITIONS.get((self.side, old), ()):
                raise self._refuse(old, MigrationStatus.SETUP)
            self._state = MigrationStatus.SETUP
        self._notify(old, MigrationStatus.SETUP)
        return old

    # --- QEMU's predicates -------------------------------------------------------
    def is_active(self) -> bool:
        """``migration_is_active``: active or postcopy-active."""
        return self._state in (MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE)

    def is_running(self) -> bool:
        """``migration_is_running``: capabilities and ``migrate`` are refused."""
        return self._state in RUNNING_STATES

    def is_setup_or_active(self) -> bool:
        return self._state in SETUP_OR_ACTIVE_STATES

    def is_idle(self) -> bool:
        return self._state in IDLE_STATES

    def in_postcopy(self) -> bool:
        return self._state in POSTCOPY_STATES

    def has_finished(self) -> bool:
        return self._state is MigrationStatus.COMPLETED

    def has_failed(self) -> bool:
        """``migration_has_failed``: failed or cancelled."""
        return self._state in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)
