"""RAM precopy on the source: which pages to send, and how (QEMU's ram.c).

:class:`RamSaveState` owns, per RAM block, a
:class:`~qmigx.bitmap.DirtyBitmap` fed by that block's dirty-log source,
and walks the dirty pages as QEMU does (ram.md §5): blocks in list order,
pages ascending, resuming where the last call stopped; wrapping to the
first block completes a round. Each dirty page goes, in QEMU's order of
decision, as a ZERO record, to a multifd channel, as an XBZRLE delta
(after the first complete round, with the page cache), zlib-compressed,
or as a PAGE record. Pages are handled in batches: one bitmap call takes
up to a batch of dirty pages (clearing their log chunks first), one copy
snapshots them, one kernel call each detects zero pages, looks them up in
the cache and encodes them, so no Python runs per page.

It writes through a :class:`~qmigx.ram.RamWriter` and knows nothing of
sockets, threads or the migration state: the driver in
:mod:`qmigx.migration` calls :meth:`setup`, :meth:`iterate`,
:meth:`bitmap_sync` and :meth:`complete`.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from qmigx import _backend, xbzrle, zeropage
from qmigx.bitmap import CLEAR_BITMAP_SHIFT_DEFAULT, DirtyBitmap
from qmigx.errors import ReturnPathError
from qmigx.page_cache import PageCache
from qmigx.ram import RAMBlock, RAMBlockList, RamWriter, compress_page
from qmigx.stream import RamBlockInfo
from qmigx.wirelock import WireLock
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["RamSaveState", "MultifdQueue"]

_ramparse = _backend.load("ramparse")

#: Pages taken from a bitmap per batch (1 MiB): small enough for the rate
#: limit to bite promptly, large enough that per-batch Python is noise.
BATCH_PAGES = 256
#: pages taken per batch when they are written straight from guest memory
#: (``direct_pages``, 16 MiB): nothing is copied, so only per-batch Python counts
DIRECT_BATCH_PAGES = 4096
#: the most pages a multifd batch takes (4 MiB)
MULTIFD_BATCH_MAX = 1024
#: QEMU's MAX_WAIT: an iteration yields after 50 ms even within its budget.
MAX_WAIT_S = 0.050


class MultifdQueue:
    """What the RAM engine needs from multifd senders (see multifd_channels)."""

    def queue(self, block: RAMBlock, offsets: np.ndarray, pages: np.ndarray, *,
              owned: bool = False) -> int:
        """Send these pages; return the bytes charged to the main channel.

        ``owned``: ``pages`` is the caller's to give away (no copy needed).
        """
        raise NotImplementedError

    def sync(self) -> int:
        """Flush and send a SYNC packet on every channel; return bytes charged."""
        raise NotImplementedError


@dataclass
class _BlockState:
    block: RAMBlock
    bitmap: DirtyBitmap
    base: int  # address of the block in the cache's key space (QEMU's ram_addr)
    ignored: bool


class RamSaveState:
    """The source side of the ``ram`` section.

    Args:
        blocks: the guest's RAM blocks, in RAM-list order.
        dirty_logs: a dirty-log source per block idstr; blocks without one
            are sent once and never again.
        xbzrle_cache_size: enables XBZRLE with a page cache of this many
            bytes (``None``: capability off).
        compress_level: enables ``compress`` with this zlib level.
        multifd: a :class:`MultifdQueue` when ``multifd`` is on.
        ignore_shared: x-ignore-shared: shared blocks are listed, never sent.
        clear_bitmap_shift: QEMU's ``x-clear-bitmap-shift``.
        multifd_zero_pages: QEMU 10's ``zero-page-detection=multifd``: zero
            pages go in the multifd packets instead of ZERO records.
        mapped: a mapped-ram file (:class:`~qmigx.mapped_ram.MappedRamFile`):
            the setup record carries its headers and every page is written
            at its place in the file instead of being sent as a record.
    """

    def __init__(self, blocks: RAMBlockList, *, dirty_logs: Optional[dict] = None,
                 xbzrle_cache_size: Optional[int] = None, compress_level: Optional[int] = None,
                 multifd: Optional[MultifdQueue] = None, ignore_shared: bool = False,
                 clear_bitmap_shift: int = CLEAR_BITMAP_SHIFT_DEFAULT,
                 multifd_zero_pages: bool = False, mapped=None) -> None:
        self.blocks = blocks
        self.ignore_shared = ignore_shared
        self.multifd = multifd
        self.multifd_zero_pages = multifd_zero_pages and multifd is not None
        self.mapped = mapped
        #: called when the scan wraps past the last block (a round ends): QEMU
        #: 10's per-round multifd sync writes its MULTIFD_FLUSH there
        self.on_round: Optional[Callable[[], None]] = None
        self.compress_level = compress_level
        self.cache = PageCache(xbzrle_cache_size) if xbzrle_cache_size else None
        dirty_logs = dirty_logs or {}
        self._states: list[_BlockState] = []
        base = 0
        for blk in blocks:
            npages = blk.used_length // TARGET_PAGE_SIZE
            bm = DirtyBitmap(max(npages, 1), clear_bitmap_shift, source=dirty_logs.get(blk.idstr))
            self._states.append(_BlockState(blk, bm, base, ignore_shared and blk.shared))
            base += -(-blk.max_length // (1 << 21)) << 21  # keep blocks 2 MiB apart
        self.dirty_sync_count = 0
        self.xbzrle_enabled = False  # set once the first round completes
        self.last_stage = False
        self._cursor_block = 0
        self._cursor_page = 0
        self._round_start = (0, 0)
        #: pages taken per batch (postcopy takes fewer, so requests wait less;
        #: multifd two packets for every channel: fewer, larger handoffs)
        self.batch_pages = BATCH_PAGES if multifd is None else max(
            BATCH_PAGES, min(MULTIFD_BATCH_MAX, multifd.batch_hint))
        self._pages = np.empty((BATCH_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self._taken = np.empty(self.batch_pages, np.int64)
        self._slots = np.empty(BATCH_PAGES, np.int64)
        self._deltas = np.empty((BATCH_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self._lengths = np.empty(BATCH_PAGES, np.int32)
        self._records = np.empty(BATCH_PAGES * (8 + TARGET_PAGE_SIZE), np.uint8)
        self.pages_sent = 0
        self.zero_pages = 0
        self.normal_pages = 0
        self.multifd_pages = 0
        self.xbzrle_pages = 0
        self.compressed_pages = 0
        self.skipped_pages = 0
        #: postcopy-ram: setup entries of huge-page blocks carry their page size
        self.send_page_sizes = False
        self._requests: collections.deque = collections.deque()
        self._request_block: Optional[int] = None
        self._request_lock = threading.Lock()
        #: held while dirty bits are taken, so that a page is taken by one sender only
        #: (a WireLock: the compiled return-path server takes requested pages under it too)
        self.take_lock = WireLock()
        self.requests_served = 0
        self.request_wait = 0.0  # seconds requests spent queued, summed
        #: a writer of plain page records straight from guest memory, called as
        #: ``direct_pages(mem, pages)`` -> ``(nbytes, zeros, normal)`` or None after
        #: a failed write (latched on the file); set by the migration thread when
        #: nothing needs a snapshot of the page (no XBZRLE, compression or multifd)
        self.direct_pages: Optional[Callable] = None
        #: like ``direct_pages`` but called as ``relay_pages(writer, block, pages)`` and
        #: in charge of naming the block: the pages' truth is elsewhere than RAM (a
        #: saved stream's file, :mod:`qmigx.tools.pagerelay`), so every page goes by it
        self.relay_pages: Optional[Callable] = None
        #: pages a batch takes with ``direct_pages`` or ``relay_pages``: large for a stopped guest (COLO's
        #: checkpoints), the usual :attr:`batch_pages` where the rate limit must bite
        self.direct_batch_pages = DIRECT_BATCH_PAGES
        self._taken_direct: Optional[np.ndarray] = None

    # -- setup and syncs -----------------------------------------------------
    @property
    def total(self) -> int:
        """Bytes of RAM that migrate (query-migrate ``ram.total``)."""
        return sum(s.block.used_length for s in self._states if not s.ignored)

    def setup(self, w: RamWriter) -> None:
        """Write the setup record and mark every page dirty (ram.md §3, §5)."""
        if self.mapped is not None:
            self.mapped.setup([s.block for s in self._states], gpa=self.ignore_shared)
        else:
            w.setup([RamBlockInfo(s.block.idstr, s.block.used_length,
                                  s.block.page_size if self.send_page_sizes
                                  and s.block.page_size != TARGET_PAGE_SIZE else None,
                                  s.block.gpa if self.ignore_shared else None)
                     for s in self._states], ignore_shared=self.ignore_shared)
        for s in self._states:
            if s.ignored:
                continue
            s.bitmap.set_all()
        self.bitmap_sync()

    def bitmap_sync(self) -> int:
        """Pull every block's dirty log into its bitmap; count newly dirty pages."""
        new = 0
        for s in self._states:
            if s.ignored:
                continue
            if s.bitmap.source is not None:
                new += s.bitmap.sync_from_source()
        self.dirty_sync_count += 1
        return new

    def dirty_pages(self) -> int:
        return sum(s.bitmap.count() for s in self._states if not s.ignored)

    def pending(self) -> int:
        """Bytes still dirty (query-migrate ``ram.remaining``)."""
        return self.dirty_pages() * TARGET_PAGE_SIZE

    # -- postcopy: page requests and discard ranges ------------------------------
    def request_pages(self, idstr: Optional[str], start: int, length: int) -> None:
        """Queue a destination's page request (REQ_PAGES / REQ_PAGES_ID).

        ``idstr`` None means the block of the previous request, as a
        REQ_PAGES without an id does. Any thread may call this (the return
        path reader); :meth:`iterate` serves queued requests before it walks
        the bitmap. A request naming an unknown block, a range outside the
        block or a start that is not page aligned is refused as QEMU's
        ram_save_queue_pages refuses it.
        """
        with self._request_lock:
            if idstr is None:
                si = self._request_block
                if si is None:
                    raise ReturnPathError("page request without a block name and no previous block",
                                          field="rbname")
            else:
                si = next((i for i, st in enumerate(self._states) if st.block.idstr == idstr), None)
                if si is None:
                    raise ReturnPathError(f"page request for unknown block {idstr!r}",
                                          field="rbname")
            blk = self._states[si].block
            if start % TARGET_PAGE_SIZE or length <= 0 or start + length > blk.used_length:
                raise ReturnPathError(
                    f"page request 0x{start:x}+0x{length:x} is not inside block {blk.idstr} "
                    f"(0x{blk.used_length:x} bytes) on page boundaries", field="start")
            self._request_block = si
            first = start // TARGET_PAGE_SIZE
            n = -(-length // TARGET_PAGE_SIZE)
            self._requests.append((si, first, n, time.monotonic()))

    @property
    def requests_pending(self) -> int:
        return len(self._requests)

    def _serve_requests(self, w: RamWriter) -> None:
        """Send every queued page that is still dirty or unsent (QEMU's get_queued_page)."""
        while self._requests:
            si, first, n, queued = self._requests.popleft()
            s = self._states[si]
            pages = np.fromiter((p for p in range(first, first + n) if s.bitmap.take(p)),
                                np.int64)
            for i in range(0, len(pages), BATCH_PAGES):  # a huge page is more than a batch
                self._send(w, s, pages[i : i + BATCH_PAGES])
            self.requests_served += 1
            self.request_wait += time.monotonic() - queued

    def take_requested(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """Pop the queued requests: ``(block, offset, page)`` for each page not sent yet.

        For a sender of its own (the postcopy preempt channel); pages taken
        here are no longer dirty, so the background scan skips them.
        """
        ps = TARGET_PAGE_SIZE
        while self._requests:
            si, first, n, queued = self._requests.popleft()
            s = self._states[si]
            blk = s.block
            for p in range(first, first + n):
                with self.take_lock:
                    took = s.bitmap.take(p)
                if took:
                    self.pages_sent += 1
                    self.normal_pages += 1
                    yield blk.idstr, p * ps, blk.buffer[p * ps : (p + 1) * ps]
            self.requests_served += 1
            self.request_wait += time.monotonic() - queued

    @property
    def request_block(self) -> int:
        """Index of the block of the last page request (-1: none): a REQ_PAGES names none."""
        with self._request_lock:
            return -1 if self._request_block is None else self._request_block

    @request_block.setter
    def request_block(self, index: int) -> None:
        with self._request_lock:
            self._request_block = None if index < 0 else index

    def count_served(self, pages: int, requests: int) -> None:
        """Pages and requests the compiled server sent (as :meth:`take_requested` counts)."""
        self.pages_sent += pages
        self.normal_pages += pages
        self.requests_served += requests

    def request_table(self) -> list:
        """Per block, in order: ``(name, dirty words, armed chunks, clear shift, memory)``.

        For the compiled server of page requests (:mod:`qmigx._core.rp_serve`),
        which takes dirty bits under :attr:`take_lock` as :meth:`take_requested` does.
        """
        out = []
        for s in self._states:
            bm = s.bitmap
            out.append((s.block.idstr.encode(), bm.words_to_take(), bm.clear_bmap,
                        bm.clear_bitmap_shift, s.block.buffer[: s.block.used_length]))
        return out

    def load_received_bitmap(self, idstr: str, bitmap: bytes) -> None:
        """Postcopy recovery: what the destination has not received is dirty again.

        ``bitmap`` is the destination's RECV_BITMAP blob body (bit p = page
        p, little-endian bit order, padded to whole 8-byte words).
        """
        s = next((st for st in self._states if st.block.idstr == idstr), None)
        if s is None:
            raise ReturnPathError(f"received bitmap for unknown block {idstr!r}", field="rbname")
        npages = s.bitmap.npages
        want = -(-npages // 64) * 8
        if len(bitmap) != want:
            raise ReturnPathError(f"received bitmap of {idstr} has {len(bitmap)} bytes, "
                                  f"expected {want}", field="size")
        received = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[:npages]
        s.bitmap.clear(0, npages)
        s.bitmap.sync(np.packbits(received == 0, bitorder="little").tobytes())

    def canonicalize_host_pages(self) -> None:
        """Huge-page blocks: a host page partly dirty becomes wholly dirty (postcopy places
        host pages whole, so the destination discards and receives them whole)."""
        for s in self._states:
            per = s.block.page_size // TARGET_PAGE_SIZE
            if s.ignored or per <= 1:
                continue
            bm = s.bitmap
            bits = np.unpackbits(bm.words.view(np.uint8), bitorder="little")[: bm.npages]
            n = -(-bm.npages // per) * per
            padded = np.zeros(n, np.uint8)
            padded[: bm.npages] = bits
            hosts = padded.reshape(-1, per).any(axis=1)
            for h in np.flatnonzero(hosts).tolist():
                first = h * per
                bm.set(first, min(per, bm.npages - first))

    def discard_ranges(self) -> Iterator[tuple[str, list[tuple[int, int]]]]:
        """Per block, the runs of pages still dirty or unsent, as ``(first page, count)``.

        What a postcopy source tells the destination to discard before it
        starts running (POSTCOPY_RAM_DISCARD): pages it holds may be stale.
        """
        for s in self._states:
            if s.ignored:
                continue
            words = s.bitmap.words
            bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: s.bitmap.npages]
            if not bits.any():
                continue
            edges = np.flatnonzero(np.diff(np.r_[0, bits.astype(np.int8), 0]))
            yield s.block.idstr, [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]

    # -- sending ------------------------------------------------------------
    def iterate(self, w: RamWriter, *, over_budget: Callable[[], bool] = lambda: False,
                max_wait: float = MAX_WAIT_S, serve_requests: bool = True) -> bool:
        """Send dirty pages until the budget is spent or none is left.

        Returns True when a whole pass found nothing more to send (QEMU's
        "done"). ``over_budget`` is polled between batches (the rate limit).
        Queued page requests go first, unless ``serve_requests`` is False
        (postcopy-preempt serves them on its own channel).
        """
        t0 = time.monotonic()
        empty_blocks = 0
        nblocks = len(self._states)
        while empty_blocks <= nblocks:
            if self._requests and serve_requests:
                self._serve_requests(w)
            if over_budget():
                return False
            s = self._states[self._cursor_block]
            taken, limit = self._taken, self.batch_pages
            if self.direct_pages is not None or self.relay_pages is not None:  # no copy kept
                if self._taken_direct is None or len(self._taken_direct) != self.direct_batch_pages:
                    self._taken_direct = np.empty(self.direct_batch_pages, np.int64)
                taken, limit = self._taken_direct, self.direct_batch_pages
            if s.ignored:
                n = 0
            else:  # another thread may take requested pages meanwhile (postcopy preempt)
                n = s.bitmap.take_dirty(self._cursor_page, limit, taken, self.take_lock)
            if n == 0:
                empty_blocks += 1
                self._cursor_block += 1
                self._cursor_page = 0
                if self._cursor_block == nblocks:
                    self._cursor_block = 0
                    self.xbzrle_enabled = self.cache is not None
                    if self.on_round is not None:
                        self.on_round()
                continue
            empty_blocks = 0
            pages = taken[:n]
            self._cursor_page = int(pages[-1]) + 1
            self._send(w, s, pages)
            if time.monotonic() - t0 > max_wait:
                return False
        return True

    def complete(self, w: RamWriter, *, last_stage: bool = True) -> None:
        """The final pass, VM stopped: sync, then send everything dirty.

        ``last_stage`` False: a COLO checkpoint, after which the migration
        goes on, so XBZRLE keeps its cache up to date (QEMU's ram_save_complete
        in COLO state).
        """
        self.bitmap_sync()
        self.last_stage = last_stage
        failed = lambda: w.f.error is not None  # noqa: E731 - a write failed: stop sending
        while not self.iterate(w, over_budget=failed, max_wait=float("inf")):
            w.f.check()
        if self.mapped is not None:
            self.mapped.write_bitmaps()  # QEMU writes them once, at completion

    def _send(self, w: RamWriter, s: _BlockState, pages: np.ndarray) -> None:
        if self.relay_pages is not None or (
                self.multifd is None and not self.xbzrle_enabled and self.compress_level is None
                and self.mapped is None and w.last_block == s.block.idstr):
            self._send_plain(w, s, pages)
            return
        if self.direct_pages is not None and len(pages) > BATCH_PAGES:  # other ways: smaller
            for lo in range(0, len(pages), BATCH_PAGES):
                self._send(w, s, pages[lo : lo + BATCH_PAGES])
            return
        blk = s.block
        ps = TARGET_PAGE_SIZE
        n = len(pages)
        mem = blk.buffer[: blk.used_length].reshape(-1, ps)
        if self.multifd is not None:
            # what the channel threads send later: a run of pages is sent from
            # guest memory itself (as QEMU's multifd does: a page written
            # meanwhile is dirty again and goes again), others from a fresh copy
            if int(pages[-1]) - int(pages[0]) == n - 1:
                rows = mem[int(pages[0]) : int(pages[0]) + n]
            else:
                rows = np.take(mem, pages, axis=0)
        else:
            rows = self._pages[:n]
            np.take(mem, pages, axis=0, out=rows)  # snapshot: what we send is what we cache
        offsets = pages.astype(np.uint64) * np.uint64(ps)
        zmap = zeropage.zero_page_map(rows, ps)
        if self.mapped is not None:
            self.mapped.pages(blk, offsets, rows)
            self.pages_sent += n
            nzero = int(zmap.sum())
            self.zero_pages += nzero
            self.normal_pages += n - nzero
            return
        if self.multifd_zero_pages:
            charged = self.multifd.queue(blk, offsets, rows, owned=True, zero=zmap)
            w.stats.transferred += charged
            w.f.rate_limit_used += charged
            self.pages_sent += n
            nzero = int(zmap.sum())
            self.zero_pages += nzero
            self.multifd_pages += n - nzero
            return
        nz = ~zmap
        self.pages_sent += n
        if zmap.any():
            zoffs = offsets[zmap]
            w.zeros(blk.idstr, zoffs)
            self.zero_pages += len(zoffs)
            if self.xbzrle_enabled and not self.last_stage:
                for off in zoffs:
                    self.cache.insert_zero(s.base + int(off), self.dirty_sync_count)
        if not nz.any():
            return
        if self.multifd is not None:  # the zero pages went on the main channel
            charged = self.multifd.queue(blk, offsets, rows, owned=True, skip=zmap)
            w.stats.transferred += charged
            w.f.rate_limit_used += charged  # 7.2 charges multifd to the main budget
            self.multifd_pages += int(nz.sum())
            return
        offs = offsets[nz]
        data = rows[nz] if not nz.all() else rows
        if self.xbzrle_enabled:
            self._send_xbzrle(w, s, offs, data)
        elif self.compress_level is not None:
            for off, page in zip(offs, data):
                w.compressed(blk.idstr, int(off), compress_page(page, self.compress_level))
            self.compressed_pages += len(offs)
        else:
            w.page_rows(blk.idstr, offs, data)
            self.normal_pages += len(offs)

    def _send_plain(self, w: RamWriter, s: _BlockState, pages: np.ndarray) -> None:
        """ZERO and PAGE records encoded straight from guest memory in one pass.

        The common case (no XBZRLE, compression or multifd, block already
        named): no snapshot is needed, so each page is copied once, into the
        record buffer, and the kernel copies it once more into the channel.
        With ``direct_pages`` (a stopped guest) not even that: the kernel
        copies each page from guest memory.
        """
        blk = s.block
        if self.relay_pages is not None:
            w.f.flush()  # what the file holds goes first
            sent = self.relay_pages(w, blk, pages)
            if sent is None:
                return
            nbytes, zeros, normal = sent
        elif self.direct_pages is not None:
            w.f.flush()
            sent = self.direct_pages(blk.buffer[: blk.used_length], pages)
            if sent is None:
                return
            nbytes, zeros, normal = sent
        else:
            nbytes, zeros, normal = _ramparse.encode_pages(
                blk.buffer[: blk.used_length], pages, self._records, TARGET_PAGE_SIZE)
            w.f.write(memoryview(self._records)[:nbytes])
        w.stats.transferred += nbytes
        w.stats.duplicate += zeros
        w.stats.normal += normal
        self.pages_sent += len(pages)
        self.zero_pages += zeros
        self.normal_pages += normal

    def _send_xbzrle(self, w: RamWriter, s: _BlockState, offs: np.ndarray,
                     data: np.ndarray) -> None:
        cache = self.cache
        gen = self.dirty_sync_count
        n = len(offs)
        addrs = offs + np.uint64(s.base)
        slots = self._slots[:n]
        cache.lookup_batch(addrs, gen, slots)
        hit = slots >= 0
        name = s.block.idstr
        miss = ~hit
        if miss.any():
            moffs = offs[miss]
            mdata = np.ascontiguousarray(data[miss])
            if not self.last_stage:
                ins = np.empty(len(moffs), np.int64)
                cache.insert_batch(addrs[miss], mdata, gen, ins)
            w.page_rows(name, moffs, mdata)
            self.normal_pages += len(moffs)
        if not hit.any():
            return
        hslots = slots[hit]
        new = np.ascontiguousarray(data[hit])
        old = cache.data[hslots]
        k = len(hslots)
        deltas = self._deltas[:k]
        lengths = self._lengths[:k]
        xbzrle.encode_pages(old, new, deltas, lengths)
        hoffs = offs[hit]
        over = lengths < 0
        if over.any():
            for _ in range(int(over.sum())):
                cache.count_overflow()
            w.page_rows(name, hoffs[over], np.ascontiguousarray(new[over]))
            self.normal_pages += int(over.sum())
        for i in np.flatnonzero(lengths > 0):
            named = w.last_block != name
            w.xbzrle(name, int(hoffs[i]), deltas[i, : lengths[i]])
            cache.count_encoded(int(lengths[i]), len(name.encode()) if named else None)
        self.xbzrle_pages += int((lengths > 0).sum())
        self.skipped_pages += int((lengths == 0).sum())
        if not self.last_stage:
            changed = lengths != 0
            if changed.any():
                cache.data[hslots[changed]] = new[changed]
