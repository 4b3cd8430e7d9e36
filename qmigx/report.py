"""Migration reports: a JSON record of one migration, per iteration.

Every migration (CLI, server or API) can write one with ``--report FILE``:
the final ``query-migrate`` reply, one row per iteration (pages by kind,
bytes, dirty pages found at sync, rates, throttle, XBZRLE cache figures)
and the migration's own timings, kept apart from process start-up and
file writing.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["colo_report", "write_report", "REPORT_VERSION"]

REPORT_VERSION = 1


def write_report(path: str, *, side: str, query: dict, iterations: list,
                 timings: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """Write the report as JSON and return it."""
    report: dict[str, Any] = {
        "qmigx-report": REPORT_VERSION,
        "side": side,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": query.get("status"),
        "setup-time": query.get("setup-time"),
        "downtime": query.get("downtime"),
        "total-time": query.get("total-time"),
        "timings": timings or {},
        "iterations": iterations,
        "query-migrate": query,
    }
    if extra:
        report.update(extra)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report


def colo_report(colo, status) -> dict:
    """A COLO side's part of a report: its checkpoints (count, dirty pages, pause) and exit."""
    rows = [{k.replace("_", "-"): v for k, v in r.items()} for r in colo.log.rows]
    pauses = [r["pause_ms"] for r in colo.log.rows]
    return {"colo": {
        "status": status.query(),
        "checkpoints": len(rows),
        "pause-ms": {"max": max(pauses), "mean": sum(pauses) / len(pauses)} if pauses else None,
        "error": None if colo.error is None else str(colo.error),
        "rows": rows,
    }}


class IterationLog:
    """Per-iteration rows for a report, from the RAM engine's running totals.

    Each :meth:`row` call closes an iteration: it takes the differences
    of the counters since the previous call, so a row says what that
    iteration sent, found dirty and cost.
    """

    KINDS = ("zero", "normal", "xbzrle", "compressed", "multifd")

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._prev: dict = {}
        self._t0: Optional[float] = None

    def row(self, *, now: float, seconds: float, nbytes: int, pages: dict, dirty_found: int,
            dirty_pages_rate: int, remaining: int, throttle: int, xbzrle_hits: int = 0,
            xbzrle_overflow: int = 0, dirty_sync_count: int = 0,
            page_size: int = TARGET_PAGE_SIZE) -> dict:
        if self._t0 is None:
            self._t0 = now - seconds
        delta = {k: int(pages.get(k, 0)) - int(self._prev.get(k, 0)) for k in self.KINDS}
        hits = xbzrle_hits - self._prev.get("_hits", 0)
        over = xbzrle_overflow - self._prev.get("_over", 0)
        self._prev = {**{k: int(pages.get(k, 0)) for k in self.KINDS}, "_hits": xbzrle_hits,
                      "_over": xbzrle_overflow}
        r = {
            "iteration": len(self.rows) + 1,
            "time": round(now - self._t0, 6),
            "seconds": round(seconds, 6),
            "bytes": nbytes,
            "pages": delta,
            "dirty_sync_count": dirty_sync_count,
            "dirty_pages_found": dirty_found,
            "dirty_pages_rate": dirty_pages_rate,
            "dirty_rate_mbps": dirty_pages_rate * page_size * 8 / 1e6,
            "throughput_mbps": nbytes * 8 / max(seconds, 1e-9) / 1e6,
            "remaining": remaining,
            "throttle": throttle,
            "xbzrle_hits": hits,
            "xbzrle_overflow": over,
        }
        self.rows.append(r)
        return r
