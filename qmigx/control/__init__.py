"""The migration control plane: what QMP shows of a migration.

A peer that wants to be driven like QEMU 7.2 (by libvirt, by tests
written against QEMU) has to expose the same states, capabilities,
parameters, statistics and events, with the same names, defaults,
refusals and error texts (spec control.md). This package is that layer,
sans-IO: no threads, no sockets; the engine holds one of each object per
side and calls them.

* :mod:`.states`       -- :class:`MigrationStatus`, the transition table, :class:`StateMachine`
* :mod:`.capabilities` -- :class:`Capabilities` and their combination rules
* :mod:`.parameters`   -- :class:`Parameters` (QMP) and :class:`InternalProperties`
* :mod:`.stats`        -- :class:`MigrationStats`, :class:`RateWindow`, :class:`DirtyRatePeriod`
* :mod:`.query`        -- :func:`query_migrate`
* :mod:`.events`       -- :class:`MigrationEvents`

Every reply dict iterates in the key order a real QEMU 7.2 sends.
"""

from __future__ import annotations

from qmigx.control.capabilities import (
    BACKGROUND_SNAPSHOT_INCOMPATIBLE,
    CAPABILITIES,
    MIGRATION_ACTIVE,
    UNSUPPORTED_CAPABILITIES,
    Capabilities,
    MigrationCapability,
    WriteTracking,
)
from qmigx.control.events import MigrationEvents, make_event
from qmigx.control.parameters import (
    DEFAULTS,
    MULTIFD_COMPRESSION,
    PARAMETERS,
    InternalProperties,
    Parameters,
    ParamSpec,
)
from qmigx.control.query import query_migrate
from qmigx.control.states import (
    DESTINATION,
    SOURCE,
    TRANSITION_TABLE,
    TRANSITIONS,
    MigrationStatus,
    Side,
    StateMachine,
    Transition,
    is_allowed,
)
from qmigx.control.stats import DirtyRatePeriod, MigrationStats, PeriodSample, RateWindow

__all__ = [
    "BACKGROUND_SNAPSHOT_INCOMPATIBLE",
    "CAPABILITIES",
    "DEFAULTS",
    "DESTINATION",
    "MIGRATION_ACTIVE",
    "MULTIFD_COMPRESSION",
    "PARAMETERS",
    "SOURCE",
    "TRANSITIONS",
    "TRANSITION_TABLE",
    "UNSUPPORTED_CAPABILITIES",
    "Capabilities",
    "DirtyRatePeriod",
    "InternalProperties",
    "MigrationCapability",
    "MigrationEvents",
    "MigrationStats",
    "MigrationStatus",
    "ParamSpec",
    "Parameters",
    "PeriodSample",
    "RateWindow",
    "Side",
    "StateMachine",
    "Transition",
    "WriteTracking",
    "is_allowed",
    "make_event",
    "query_migrate",
]
