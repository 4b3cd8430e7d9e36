"""Live migration: the source and destination drivers (QEMU's migration.c).

* :mod:`.source`: :class:`MigrationSource`, the migration thread;
* :mod:`.destination`: :class:`MigrationDestination`, the incoming side;
* :mod:`.side`: what both share (settings, state machine, events, stats).

Both drivers run in a thread of their own, report state changes through
:class:`~qmigx.control.StateMachine` listeners (the MIGRATION event) and
answer ``query()`` at any time.
"""

from qmigx.guest import Guest, SimpleGuest
from qmigx.migration.destination import IncomingResult, MigrationDestination
from qmigx.migration.source import MigrationSource

__all__ = ["Guest", "SimpleGuest", "MigrationSource", "MigrationDestination", "IncomingResult"]
