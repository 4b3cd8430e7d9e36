"""QMP events of a migration: ``MIGRATION``, ``MIGRATION_PASS`` and ``COLO_EXIT``.

Management tools follow a migration through these events instead of
polling (control.md §5). QEMU sends them only while the side's
``events`` capability is on, with one exception: a destination always
announces ``setup`` when ``migrate-incoming`` starts listening. Event
objects carry QEMU's wall-clock timestamp and use its key order
(``timestamp``, ``event``, ``data``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from qmigx.control._qdict import qdict
from qmigx.control.capabilities import Capabilities
from qmigx.control.states import MigrationStatus, StateMachine

__all__ = ["MigrationEvents", "make_event"]

Event = dict[str, Any]


def make_event(name: str, data: dict[str, Any], time_ns: int) -> Event:
    """A QMP event object stamped ``time_ns`` (ns since the epoch)."""
    us = time_ns // 1000
    stamp = qdict({"seconds": us // 1_000_000, "microseconds": us % 1_000_000})
    return qdict({"event": name, "data": qdict(data), "timestamp": stamp})


class MigrationEvents:
    """Turns state changes and bitmap syncs into events for registered callbacks.

    Args:
        capabilities: this side's switches (``events`` is read at each emit,
            as QEMU does).
        clock_ns: wall clock in ns (injectable for tests).
    """

    def __init__(self, capabilities: Capabilities, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.capabilities = capabilities
        self.clock_ns = clock_ns
        self._callbacks: list[Callable[[Event], object]] = []

    def subscribe(self, callback: Callable[[Event], object]) -> None:
        self._callbacks.append(callback)

    def unsubscribe(self, callback: Callable[[Event], object]) -> None:
        self._callbacks.remove(callback)

    def attach(self, state_machine: StateMachine) -> None:
        """Emit ``MIGRATION`` for every change of ``state_machine``."""
        state_machine.add_listener(lambda old, new: self.status(new))

    def _emit(self, name: str, data: dict[str, Any]) -> Event:
        event = make_event(name, data, self.clock_ns())
        for cb in list(self._callbacks):
            cb(event)
        return event

    def status(self, status: MigrationStatus | str) -> Event | None:
        """``MIGRATION {"status": ...}`` if ``events`` is on; returns the event sent."""
        if not self.capabilities.get("events"):
            return None
        return self._emit("MIGRATION", {"status": MigrationStatus.parse(status).value})

    def incoming_setup(self) -> Event:
        """The destination's unconditional ``MIGRATION {"status": "setup"}`` at migrate-incoming."""
        return self._emit("MIGRATION", {"status": MigrationStatus.SETUP.value})

    def colo_exit(self, mode: str, reason: str) -> Event:
        """``COLO_EXIT {"mode", "reason"}``: COLO ended on this side (not gated by ``events``)."""
        return self._emit("COLO_EXIT", {"mode": mode, "reason": reason})

    def dirty_pass(self, count: int) -> Event | None:
        """``MIGRATION_PASS {"pass": count}`` (count = dirty-sync-count) if ``events`` is on."""
        if not self.capabilities.get("events"):
            return None
        return self._emit("MIGRATION_PASS", {"pass": count})
