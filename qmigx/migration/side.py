"""What both ends of a migration share: settings, state, events, statistics."""

from __future__ import annotations

import threading
import time
from typing import Optional

from qmigx.control import (
    Capabilities,
    MigrationEvents,
    MigrationStats,
    MigrationStatus,
    Parameters,
    StateMachine,
)

__all__ = ["S", "now_ms", "Controls", "Side"]

S = MigrationStatus


def now_ms() -> int:
    return int(time.time() * 1000)


class Controls:
    """Capabilities, parameters, state, stats and events of one side."""

    def __init__(self, side: str, capabilities: Optional[Capabilities],
                 parameters: Optional[Parameters]) -> None:
        self.caps = capabilities if capabilities is not None else Capabilities()
        self.params = parameters if parameters is not None else Parameters(capabilities=self.caps)
        self.state = StateMachine(side)
        self.stats = MigrationStats()
        self.events = MigrationEvents(self.caps)
        self.events.attach(self.state)
        self.error: Optional[BaseException] = None
        self.done = threading.Event()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self.stats.error_desc = str(exc)


class Side:
    """What both ends expose: QEMU's settings, state, counters and events."""

    c: Controls

    @property
    def capabilities(self) -> Capabilities:
        return self.c.caps

    @property
    def parameters(self) -> Parameters:
        return self.c.params

    @property
    def state(self) -> StateMachine:
        return self.c.state

    @property
    def events(self) -> MigrationEvents:
        return self.c.events

    @property
    def stats(self) -> MigrationStats:
        return self.c.stats

    @property
    def error(self) -> Optional[BaseException]:
        return self.c.error
