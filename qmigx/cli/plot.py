"""``qmigx plot``: a migration report as a timeline picture (matplotlib).

Top: throughput and dirty rate per iteration, the shape that tells
whether a migration converges. Bottom: the mix of page kinds each
iteration sent (zero, normal, XBZRLE, compressed, multifd). matplotlib
is an optional extra (``pip install qmigx[plot]``).
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
