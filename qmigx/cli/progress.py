"""A terminal progress bar that stays silent when output is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Draws ``label [#####.....] 42% 1.2 GiB/s`` on one line of a terminal.

    Silent unless ``stream`` is a TTY (or ``force`` is set), so piping a
    command's output never fills a log with control characters.
    """

    def __init__(self, label: str, total: Optional[int], *, stream: TextIO = sys.stderr,
                 force: bool = False, min_interval: float = 0.1) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.enabled = force or (hasattr(stream, "isatty") and stream.isatty())
        self.min_interval = min_interval
        self._t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return
        self._last = now
        rate = done / max(now - self._t0, 1e-9)
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {frac * 100:5.1f}% {_size(rate)}/s {extra}"
        else:
            text = f"{self.label} {_size(done)} {_size(rate)}/s {extra}"
        self.stream.write("\r" + text[:120].ljust(80))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
