"""``qmigx plot``: a migration report as a timeline picture (matplotlib).

Top: throughput and dirty rate per iteration, the shape that tells
whether a migration converges. Bottom: the mix of page kinds each
iteration sent (zero, normal, XBZRLE, compressed, multifd). A COLO
report (one with ``colo`` checkpoints) is drawn per checkpoint instead:
the pause of each, and the dirty pages it carried. matplotlib is an
optional extra (``pip install qmigx[plot]``).
"""

from __future__ import annotations

import json
from typing import Optional

from qmigx.errors import ParameterError

__all__ = ["plot_report"]

KINDS = ("zero", "normal", "xbzrle", "compressed", "multifd")


def plot_report(report_path: str, out_path: str, *, title: Optional[str] = None) -> str:
    """Draw ``report_path`` into ``out_path`` (PNG); return ``out_path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParameterError("qmigx plot needs matplotlib: pip install 'qmigx[plot]'",
                             field="plot") from None
    with open(report_path) as f:
        try:
            report = json.load(f)
        except ValueError as exc:
            raise ParameterError(f"{report_path}: not a JSON report ({exc})",
                                 field="report") from None
    colo = report.get("colo")
    if isinstance(colo, dict) and colo.get("rows"):
        return _plot_checkpoints(plt, report, colo["rows"], out_path, title)
    rows = report.get("iterations") or []
    if not isinstance(rows, list):
        raise ParameterError(f"{report_path}: 'iterations' is not a list", field="iterations")
    x = list(range(1, len(rows) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    q = report.get("query-migrate", {})
    fig.suptitle(title or f"{report.get('side', 'migration')}: {report.get('status')} — "
                 f"total {q.get('total-time', '?')} ms, downtime {q.get('downtime', '?')} ms")
    thr = [r.get("throughput_mbps", 0) for r in rows]
    dirty = [r.get("dirty_rate_mbps", 0) for r in rows]
    top.plot(x, thr, marker="o", label="throughput (Mbit/s)")
    top.plot(x, dirty, marker="s", label="dirty rate (Mbit/s)")
    top.set_ylabel("Mbit/s")
    top.grid(alpha=0.3)
    top.legend(loc="upper right")
    bottoms = [0] * len(rows)
    for kind in KINDS:
        vals = [r.get("pages", {}).get(kind, 0) for r in rows]
        if any(vals):
            bottom.bar(x, vals, bottom=bottoms, label=kind)
            bottoms = [a + b for a, b in zip(bottoms, vals)]
    bottom.set_ylabel("pages sent")
    bottom.set_xlabel("iteration")
    if any(bottoms):
        bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _plot_checkpoints(plt, report: dict, rows: list, out_path: str, title: Optional[str]) -> str:
    """COLO: one point per checkpoint, its pause (ms) on top, its dirty pages below."""
    if not all(isinstance(r, dict) for r in rows):
        raise ParameterError("'colo.rows' holds something else than checkpoints", field="colo")
    x = [r.get("checkpoint", i + 1) for i, r in enumerate(rows)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    status = report.get("colo", {}).get("status", {})
    fig.suptitle(title or f"COLO {status.get('last-mode') or status.get('mode', '?')}: "
                 f"{len(rows)} checkpoints, exit {status.get('reason', '?')}")
    top.plot(x, [r.get("pause-ms", 0) for r in rows], marker=".", label="pause (ms)")
    top.set_ylabel("ms")
    top.grid(alpha=0.3)
    top.legend(loc="upper right")
    bottom.bar(x, [r.get("dirty-pages", 0) for r in rows], label="dirty pages")
    bottom.set_ylabel("pages")
    bottom.set_xlabel("checkpoint")
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
