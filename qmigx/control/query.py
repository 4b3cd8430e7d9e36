"""``query-migrate``: the reply QEMU 7.2 gives for each state.

Tools poll ``query-migrate`` and key their logic on which members are
present, so the presence rules matter as much as the values (control.md
§4, checked against QEMU 7.2): nothing but ``status`` while in
``setup``, ``wait-unplug``, ``colo``, ``cancelled``; times and ``ram``
from ``active`` on; ``downtime`` replaces ``expected-downtime`` once
completed; ``error-desc`` only when failed with a recorded error.
``ram.remaining`` and ``ram.dirty-pages-rate`` are mandatory members of
QEMU's schema: once completed they are sent as 0, not left out. Keys
come in QEMU's wire order (:mod:`qmigx.control._qdict`).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

from qmigx.control._qdict import qdict
from qmigx.control.capabilities import Capabilities
from qmigx.control.states import DESTINATION, MigrationStatus, Side, StateMachine
from qmigx.control.stats import MigrationStats

__all__ = ["query_migrate", "ram_info", "disk_info"]

S = MigrationStatus

# Source states whose reply carries times and ram (QEMU's fill_source_migration_info).
_WITH_RAM = frozenset({S.ACTIVE, S.CANCELLING, S.POSTCOPY_ACTIVE, S.PRE_SWITCHOVER, S.DEVICE,
                       S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.COMPLETED})
# Destination states that report a status (others, i.e. none, report nothing).
_DEST_STATUS = frozenset({S.SETUP, S.CANCELLING, S.CANCELLED, S.ACTIVE, S.POSTCOPY_ACTIVE,
                          S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.FAILED, S.COLO, S.COMPLETED})


def _u64(value: float) -> int:
    return max(0, int(value))


def ram_info(stats: MigrationStats, completed: bool, *, skipped: bool = True) -> dict[str, Any]:
    """The ``ram`` member (``MigrationStats``) in QEMU's key order (10.0 has no ``skipped``)."""
    ram = {
        "transferred": stats.transferred,
        "remaining": 0 if completed else stats.remaining,
        "total": stats.total,
        "duplicate": stats.duplicate,
        "skipped": 0,
        "normal": stats.normal,
        "normal-bytes": stats.normal_bytes,
        "dirty-pages-rate": 0 if completed else stats.dirty_pages_rate,
        "mbps": float(stats.mbps),
        "dirty-sync-count": stats.dirty_sync_count,
        "postcopy-requests": stats.postcopy_requests,
        "page-size": stats.page_size,
        "multifd-bytes": stats.multifd_bytes,
        "pages-per-second": _u64(stats.pages_per_second),
        "precopy-bytes": stats.precopy_bytes,
        "downtime-bytes": stats.downtime_bytes,
        "postcopy-bytes": stats.postcopy_bytes,
        "dirty-sync-missed-zero-copy": stats.dirty_sync_missed_zero_copy,
    }
    if not skipped:
        del ram["skipped"]
    return qdict(ram)


def disk_info(disk: dict[str, int]) -> dict[str, Any]:
    """The ``disk`` member: QEMU's MigrationStats again, only the three sizes filled in."""
    s = MigrationStats(page_size=0)
    s.transferred = int(disk["transferred"])
    s.remaining = int(disk["remaining"])
    s.total = int(disk["total"])
    return ram_info(s, False)


def _xbzrle_info(stats: MigrationStats, cache_size: int) -> dict[str, Any]:
    return qdict({
        "cache-size": cache_size,
        "bytes": stats.xbzrle_bytes,
        "pages": stats.xbzrle_pages,
        "cache-miss": stats.xbzrle_cache_miss,
        "cache-miss-rate": float(stats.xbzrle_cache_miss_rate),
        "encoding-rate": float(stats.xbzrle_encoding_rate),
        "overflow": stats.xbzrle_overflow,
    })


def _compression_info(stats: MigrationStats) -> dict[str, Any]:
    return qdict({
        "pages": stats.compression_pages,
        "busy": stats.compression_busy,
        "busy-rate": float(stats.compression_busy_rate),
        "compressed-size": stats.compressed_size,
        "compression-rate": float(stats.compression_rate),
    })


def query_migrate(
    state_machine: StateMachine,
    stats: MigrationStats,
    capabilities: Capabilities,
    *,
    side: Optional[Side] = None,
    now_ms: Optional[int] = None,
    xbzrle_cache_size: Optional[int] = None,
    blocked_reasons: Iterable[str] = (),
    socket_address: Optional[list[dict[str, Any]]] = None,
    disk: Optional[dict[str, int]] = None,
) -> dict[str, Any]:
    """QEMU 7.2's ``query-migrate`` reply for one side.

    Args:
        state_machine: that side's state (its ``side`` unless ``side`` is given).
        stats: the counters; ``stats.start_time`` must be set for the
            running ``total-time``.
        capabilities: that side's switches (``xbzrle``, ``compress``,
            ``postcopy-blocktime`` decide optional members).
        now_ms: wall-clock ms for ``total-time`` while running
            (default: now).
        xbzrle_cache_size: the ``xbzrle-cache-size`` parameter (default:
            ``stats.xbzrle_cache_size``).
        blocked_reasons: why a migration would be refused now (7.2: shown
            in any state when not empty).
        socket_address: destination listening addresses (QAPI
            ``SocketAddress`` dicts), shown when given.
        disk: block migration's ``transferred``/``remaining``/``total``
            while its disks are being sent (QEMU leaves it out once
            completed, and when no block migration runs).
    """
    side = state_machine.side if side is None else side
    state = state_machine.state
    info: dict[str, Any] = {}
    reasons = list(blocked_reasons)

    if side == DESTINATION:
        if state in _DEST_STATUS:
            info["status"] = state.value
        if (state is S.COMPLETED and capabilities.get("postcopy-blocktime")
                and stats.postcopy_blocktime is not None):
            info["postcopy-blocktime"] = stats.postcopy_blocktime
            info["postcopy-vcpu-blocktime"] = list(stats.postcopy_vcpu_blocktime or [])
        if socket_address is not None:
            info["socket-address"] = socket_address
        return qdict(_in_schema_order(info))

    if state is not S.NONE:
        info["status"] = state.value
    if state in _WITH_RAM:
        completed = state is S.COMPLETED
        info["ram"] = ram_info(stats, completed,
                               skipped=getattr(capabilities, "qemu_version", "7.2") != "10.0")
        if disk is not None and not completed:
            info["disk"] = disk_info(disk)
        if capabilities.get("xbzrle"):
            size = stats.xbzrle_cache_size if xbzrle_cache_size is None else xbzrle_cache_size
            info["xbzrle-cache"] = _xbzrle_info(stats, size)
        if completed:
            info["total-time"] = stats.total_time
            info["downtime"] = stats.downtime
        else:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            info["total-time"] = now - stats.start_time
            info["expected-downtime"] = stats.expected_downtime
        info["setup-time"] = stats.setup_time
        if stats.cpu_throttle_percentage:
            info["cpu-throttle-percentage"] = stats.cpu_throttle_percentage
        if capabilities.get("compress"):
            info["compression"] = _compression_info(stats)
    if state is S.FAILED and stats.error_desc is not None:
        info["error-desc"] = stats.error_desc
    if reasons:
        info["blocked-reasons"] = reasons
    return qdict(_in_schema_order(info))


_MIGRATION_INFO_ORDER = (
    "status", "ram", "disk", "vfio", "xbzrle-cache", "total-time", "expected-downtime",
    "downtime", "setup-time", "cpu-throttle-percentage", "error-desc", "blocked-reasons",
    "postcopy-blocktime", "postcopy-vcpu-blocktime", "compression", "socket-address",
)


def _in_schema_order(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in _MIGRATION_INFO_ORDER if k in info}
