"""COLO failover: who asked for it, how far it got (QEMU's colo-failover.c).

A failover can be asked for from any thread (QMP ``x-colo-lost-heartbeat``,
a lost connection, a heartbeat timeout) while the COLO thread is in the
middle of a checkpoint. So the request only moves a small state machine
(:class:`FailoverState`, compare-and-set under a lock, as QEMU's atomic
cmpxchg) and wakes the COLO thread, which does the work when it is safe:

====================  ==========  ===========================================
from                  to          when
====================  ==========  ===========================================
none                  require     failover requested (twice: refused)
require               active      the COLO thread starts the failover
active                completed   failover work done
active                relaunch    secondary: a checkpoint is being applied
relaunch              require     secondary: the checkpoint was applied
====================  ==========  ===========================================

:class:`ColoStatus` answers ``query-colo-status`` from the mode, the last
mode and the failover state, as QEMU's qmp_query_colo_status does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from qmigx.errors import StateError
from qmigx.wire import COLOExitReason, COLOMode, FailoverStatus

__all__ = ["COLO_FEATURE_DISABLED", "FAILOVER_ALREADY_ACTIVE", "ColoStatus", "FailoverState"]

#: QEMU's error for x-colo-lost-heartbeat outside COLO (QERR_FEATURE_DISABLED)
COLO_FEATURE_DISABLED = "The feature 'colo' is not enabled"
#: QEMU's error for a second failover request
FAILOVER_ALREADY_ACTIVE = "COLO failover is already activated"


class FailoverState:
    """The failover state machine; ``on_request`` wakes whoever must act on a request."""

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._state = FailoverStatus.NONE
        self.on_request = on_request
        self.changed = threading.Condition(self._lock)

    @property
    def state(self) -> FailoverStatus:
        return self._state

    def set_state(self, old: FailoverStatus, new: FailoverStatus) -> FailoverStatus:
        """Move ``old`` → ``new`` if the state is ``old``; return the state found (cmpxchg)."""
        with self._lock:
            found = self._state
            if found is old:
                self._state = new
                self.changed.notify_all()
            return found

    def request(self) -> None:
        """Ask for a failover (``x-colo-lost-heartbeat``); a second request is refused."""
        if self.set_state(FailoverStatus.NONE, FailoverStatus.REQUIRE) is not FailoverStatus.NONE:
            raise StateError(FAILOVER_ALREADY_ACTIVE, field="failover")
        hook = self.on_request
        if hook is not None:
            hook()

    @property
    def requested(self) -> bool:
        """Anything but ``none``: the COLO loop must stop checkpointing."""
        return self._state is not FailoverStatus.NONE

    def reset(self) -> None:
        with self._lock:
            self._state = FailoverStatus.NONE


class ColoStatus:
    """Mode, last mode and exit reason of one side (``query-colo-status``, ``COLO_EXIT``)."""

    def __init__(self) -> None:
        self.mode = COLOMode.NONE
        self.last_mode = COLOMode.NONE
        self.failover = FailoverState()
        #: the reason COLO_EXIT reported (none while COLO runs or never ran)
        self.exit_reason = COLOExitReason.NONE

    def enter(self, mode: COLOMode) -> None:
        self.mode = mode
        self.failover.reset()
        self.exit_reason = COLOExitReason.NONE

    def leave(self, reason: COLOExitReason) -> None:
        self.last_mode = self.mode
        self.mode = COLOMode.NONE
        self.exit_reason = reason

    def query(self) -> dict:
        """QEMU's ``query-colo-status`` reply: ``{mode, last-mode, reason}``."""
        fs = self.failover.state
        if fs is FailoverStatus.NONE:
            reason = COLOExitReason.NONE
        elif fs is FailoverStatus.COMPLETED:
            reason = COLOExitReason.REQUEST
        elif self.mode is not COLOMode.NONE:
            reason = COLOExitReason.PROCESSING
        else:
            reason = COLOExitReason.ERROR
        if self.exit_reason is COLOExitReason.ERROR:
            reason = COLOExitReason.ERROR  # COLO ended on an error, not on a request
        return {"mode": self.mode.qapi_name, "last-mode": self.last_mode.qapi_name,
                "reason": reason.qapi_name}

    def check_enabled(self) -> None:
        """``x-colo-lost-heartbeat`` outside COLO: QEMU's "feature disabled" error."""
        if self.mode is COLOMode.NONE:
            raise StateError(COLO_FEATURE_DISABLED, field="colo")
