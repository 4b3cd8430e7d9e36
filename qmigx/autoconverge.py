"""Auto-converge: slowing the guest down when it dirties memory too fast.

QEMU's rule (ram.md §6, 7.2): at a bitmap sync that closes a period of at
least a second, if the bytes dirtied in the period exceed
``throttle-trigger-threshold`` % of the bytes sent, for the second time
in a row, throttle the vCPUs: first to ``cpu-throttle-initial`` %, then
``cpu-throttle-increment`` % more each time (with
``cpu-throttle-tailslow``, a smaller step sized by how far the dirty rate
is above the threshold), never above ``max-cpu-throttle`` %. The guest
owner applies the percentage through ``Guest.throttle``.
"""

from __future__ import annotations

__all__ = ["AutoConverge"]


class AutoConverge:
    """The throttle decision; feed it each closed period's (sent, dirtied) bytes."""

    def __init__(self) -> None:
        self.percentage = 0
        self._high = 0

    def update(self, bytes_xfer: int, bytes_dirty: int, *, threshold_pct: int,
               initial: int, increment: int, maximum: int, tailslow: bool = False) -> bool:
        """Account one period; return True when the throttle changed."""
        limit = bytes_xfer * threshold_pct / 100
        if bytes_dirty <= limit:
            return False
        self._high += 1
        if self._high < 2:
            return False
        self._high = 0
        if not self.percentage:
            new = initial
        else:
            step = increment
            if tailslow and bytes_dirty:
                cpu_now = 100 - self.percentage
                cpu_ideal = cpu_now * (limit / bytes_dirty)
                step = min(int(cpu_now - cpu_ideal), increment)
            new = self.percentage + step
        new = min(new, maximum)
        changed = new != self.percentage
        self.percentage = new
        return changed

    def reset(self) -> None:
        self.percentage = 0
        self._high = 0
