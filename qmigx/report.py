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

__all__ = ["write_report", "REPORT_VERSION"]

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
