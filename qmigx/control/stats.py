"""Migration statistics and the rate windows QEMU derives its speeds from.

``query-migrate`` reports raw counters (bytes, pages) and derived rates;
the rates only match QEMU's if they are computed over the same windows
with the same arithmetic: ``mbps`` / ``pages-per-second`` /
``expected-downtime`` over the last ≥100 ms of sending
(:class:`RateWindow`), ``dirty-pages-rate`` and the XBZRLE / compression
rates over the last ≥1 s period ending at a dirty-bitmap sync
(:class:`DirtyRatePeriod`). The engine owns one :class:`MigrationStats`
and feeds both helpers; :func:`qmigx.control.query_migrate` renders it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["MigrationStats", "RateWindow", "DirtyRatePeriod", "PeriodSample"]


@dataclasses.dataclass
class MigrationStats:
    """Every counter behind ``query-migrate`` (ram.md §13, xbzrle.md §8).

    Times are milliseconds; ``start_time`` and ``downtime_start`` are
    wall-clock (``time.time() * 1000``), the rest are durations.
    """

    # ram
    transferred: int = 0
    total: int = 0
    remaining: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    postcopy_requests: int = 0
    page_size: int = TARGET_PAGE_SIZE
    multifd_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    dirty_sync_missed_zero_copy: int = 0
    pages_per_second: float = 0.0
    mbps: float = 0.0
    # xbzrle-cache
    xbzrle_cache_size: int = 64 << 20
    xbzrle_bytes: int = 0
    xbzrle_pages: int = 0
    xbzrle_cache_miss: int = 0
    xbzrle_cache_miss_rate: float = 0.0
    xbzrle_encoding_rate: float = 0.0
    xbzrle_overflow: int = 0
    # compression
    compression_pages: int = 0
    compression_busy: int = 0
    compression_busy_rate: float = 0.0
    compressed_size: int = 0
    compression_rate: float = 0.0
    # timings
    start_time: int = 0
    setup_time: int = 0
    total_time: int = 0
    downtime: int = 0
    downtime_start: int = 0
    expected_downtime: int = 0
    # other
    cpu_throttle_percentage: int = 0
    error_desc: Optional[str] = None
    # destination, capability postcopy-blocktime
    postcopy_blocktime: Optional[int] = None
    postcopy_vcpu_blocktime: Optional[list[int]] = None

    @property
    def normal_bytes(self) -> int:
        """``normal-bytes``: QEMU derives it as normal pages × page size."""
        return self.normal * self.page_size

    @property
    def total_transferred_pages(self) -> int:
        """Pages sent in any form (normal, zero, compressed, XBZRLE)."""
        return self.normal + self.duplicate + self.compression_pages + self.xbzrle_pages

    def reset(self, now_ms: int, downtime_limit: int) -> None:
        """A new outgoing migration starts: zero everything, start the clock.

        ``expected_downtime`` starts at the ``downtime-limit`` parameter.
        ``page_size`` and ``xbzrle_cache_size`` are kept.
        """
        keep = {"page_size": self.page_size, "xbzrle_cache_size": self.xbzrle_cache_size}
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)
        for k, v in keep.items():
            setattr(self, k, v)
        self.start_time = now_ms
        self.expected_downtime = downtime_limit

    def complete(self, now_ms: int, total_bytes: int) -> None:
        """Final ``total-time``, ``downtime`` (precopy) and average ``mbps``.

        ``total_bytes`` is everything written to the migration channel(s)
        since the start (main stream plus multifd). A ``downtime`` already
        set (postcopy sets it at switch-over) is kept.
        """
        self.total_time = now_ms - self.start_time
        if not self.downtime:
            self.downtime = now_ms - self.downtime_start
        transfer_time = self.total_time - self.setup_time
        if transfer_time:
            self.mbps = total_bytes * 8.0 / transfer_time / 1000


class RateWindow:
    """Speeds over the last window of at least 100 ms (QEMU's BUFFER_DELAY).

    Call :meth:`start` when the iterations begin and :meth:`update` from
    the send loop; an update before 100 ms have passed does nothing.
    After an update :attr:`threshold_size` holds the bytes that can be
    sent within ``downtime-limit`` at the measured bandwidth (the
    convergence threshold).
    """

    BUFFER_DELAY_MS = 100

    def __init__(self) -> None:
        self.start_ms = 0
        self.initial_bytes = 0
        self.initial_pages = 0
        self.threshold_size = 0

    def start(self, stats: MigrationStats, now_ms: int, total_bytes: int) -> None:
        self.start_ms = now_ms
        self.initial_bytes = total_bytes
        self.initial_pages = stats.total_transferred_pages

    def update(self, stats: MigrationStats, now_ms: int, total_bytes: int, downtime_limit: int) -> bool:
        """Close the window if ≥100 ms old: set ``mbps``, ``pages_per_second``,
        ``expected_downtime``; return whether it was closed.

        ``total_bytes`` counts everything sent since the start (main
        stream plus multifd), as for :meth:`MigrationStats.complete`.
        """
        if now_ms < self.start_ms + self.BUFFER_DELAY_MS:
            return False
        transferred = total_bytes - self.initial_bytes
        time_spent = now_ms - self.start_ms
        bandwidth = transferred / time_spent  # bytes per ms
        self.threshold_size = int(bandwidth * downtime_limit)
        stats.mbps = transferred * 8.0 / (time_spent / 1000.0) / 1000.0 / 1000.0
        stats.pages_per_second = (stats.total_transferred_pages - self.initial_pages) / (time_spent / 1000.0)
        # nothing measurable sent: keep the previous estimate
        if stats.dirty_pages_rate and transferred > 10000:
            stats.expected_downtime = int(stats.remaining / bandwidth)
        self.start(stats, now_ms, total_bytes)
        return True


class PeriodSample(NamedTuple):
    """Bytes sent and bytes dirtied during a closed ≥1 s period (auto-converge input)."""

    bytes_xfer: int
    bytes_dirty: int


class DirtyRatePeriod:
    """The ≥1 s period, closed at a dirty-bitmap sync, behind the per-second rates.

    Per sync call :meth:`begin_sync` (counts the sync) and, once the
    bitmap is merged, :meth:`end_sync` with the pages the sync found
    dirty. When more than a second has passed since the period began,
    ``dirty_pages_rate``, ``xbzrle_cache_miss_rate``,
    ``xbzrle_encoding_rate``, ``compression_busy_rate`` and
    ``compression_rate`` are recomputed from the period's deltas.
    """

    PERIOD_MS = 1000

    def __init__(self) -> None:
        self.start_ms = 0
        self.dirty_pages = 0
        self.target_pages_prev = 0
        self.bytes_xfer_prev = 0
        self.xbzrle_cache_miss_prev = 0
        self.xbzrle_pages_prev = 0
        self.xbzrle_bytes_prev = 0
        self.compress_busy_prev = 0
        self.compress_pages_prev = 0
        self.compressed_size_prev = 0

    def begin_sync(self, stats: MigrationStats, now_ms: int) -> int:
        """A sync starts: bump ``dirty_sync_count`` (returned: the MIGRATION_PASS number)."""
        stats.dirty_sync_count += 1
        if not self.start_ms:
            self.start_ms = now_ms
        return stats.dirty_sync_count

    def end_sync(self, stats: MigrationStats, now_ms: int, *, dirty_pages: int, target_pages: int,
                 xbzrle: bool = False, compress: bool = False) -> Optional[PeriodSample]:
        """A sync ended having found ``dirty_pages`` newly dirty pages.

        ``target_pages`` is the running total of target pages the source
        has saved (any form). ``xbzrle`` / ``compress`` are the
        capabilities. Returns the closed period's sample, or None if the
        period is still open.
        """
        self.dirty_pages += dirty_pages
        if now_ms <= self.start_ms + self.PERIOD_MS:
            return None
        sample = PeriodSample(stats.transferred - self.bytes_xfer_prev, self.dirty_pages * stats.page_size)
        stats.dirty_pages_rate = self.dirty_pages * 1000 // (now_ms - self.start_ms)
        page_count = target_pages - self.target_pages_prev
        if page_count:
            if xbzrle:
                self._xbzrle_rates(stats, page_count)
            if compress:
                self._compression_rates(stats, page_count)
        self.target_pages_prev = target_pages
        self.start_ms = now_ms
        self.dirty_pages = 0
        self.bytes_xfer_prev = stats.transferred
        return sample

    def _xbzrle_rates(self, stats: MigrationStats, page_count: int) -> None:
        stats.xbzrle_cache_miss_rate = (stats.xbzrle_cache_miss - self.xbzrle_cache_miss_prev) / page_count
        self.xbzrle_cache_miss_prev = stats.xbzrle_cache_miss
        unencoded = (stats.xbzrle_pages - self.xbzrle_pages_prev) * stats.page_size
        encoded = stats.xbzrle_bytes - self.xbzrle_bytes_prev
        if stats.xbzrle_pages == self.xbzrle_pages_prev or not encoded:
            stats.xbzrle_encoding_rate = 0.0
        else:
            stats.xbzrle_encoding_rate = unencoded / encoded
        self.xbzrle_pages_prev = stats.xbzrle_pages
        self.xbzrle_bytes_prev = stats.xbzrle_bytes

    def _compression_rates(self, stats: MigrationStats, page_count: int) -> None:
        stats.compression_busy_rate = (stats.compression_busy - self.compress_busy_prev) / page_count
        self.compress_busy_prev = stats.compression_busy
        compressed = stats.compressed_size - self.compressed_size_prev
        if compressed:
            stats.compression_rate = (stats.compression_pages - self.compress_pages_prev) * stats.page_size / compressed
            self.compress_pages_prev = stats.compression_pages
            self.compressed_size_prev = stats.compressed_size
