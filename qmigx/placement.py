"""Page placement: where a destination puts the pages it receives (QEMU's ram.c, load side).

Every page that arrives, on the main channel or a multifd channel, goes
through one :class:`PagePlacement`:

* :class:`CopyPlacement` copies it into the RAM block (precopy, and
  postcopy before LISTEN);
* :class:`ColoCachePlacement` copies it into a cache beside each block,
  so that a COLO secondary applies a checkpoint to its RAM only once the
  whole checkpoint has arrived (:meth:`ColoCachePlacement.flush`);
* :class:`UffdPlacement` places each whole host page once with
  ``UFFDIO_COPY`` / ``UFFDIO_ZEROPAGE`` into memory registered for
  missing-page faults (postcopy after LISTEN): the page appears
  atomically and any thread waiting on it wakes.

Each keeps a received bitmap per block (one bool per target page), which
a postcopy destination sends back on recovery (RECV_BITMAP) and which
refuses to place a host page twice.

The loaders write batches straight into :meth:`PagePlacement.buffers`
(the compiled record applier and the multifd receivers), when a placement
has such buffers; a placement without them (userfaultfd) takes pages one
at a time through :meth:`PagePlacement.place`.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Optional, Sequence

import numpy as np

from qmigx import uffd
from qmigx.errors import RamStreamError
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["PagePlacement", "CopyPlacement", "ColoCachePlacement", "UffdPlacement"]


class PagePlacement:
    """The interface; see the module docstring.

    ``blocks`` are :class:`~qmigx.ram.RAMBlock` objects (anything with
    ``idstr``, ``used_length``, ``page_size`` and a uint8 ``buffer``).
    """

    #: whether batch copies must be reported with :meth:`mark_received`
    tracks_batches = False
    #: whether pages land in the RAM blocks (fresh blocks are then populated ahead of use)
    fills_ram = True
    #: whether :meth:`view` is the placed page itself, so a delta applied to it is in place
    #: (else the loader places the result with :meth:`place`)
    live_view = True
    #: whether runs of PAGE and ZERO records go to :meth:`place_batch` as they came
    takes_batches = False

    def __init__(self, page_size: int = TARGET_PAGE_SIZE) -> None:
        self.page_size = page_size
        self.received: dict[str, np.ndarray] = {}

    def attach(self, blocks: Sequence) -> None:
        """Start placing into ``blocks`` (the setup record's table, in order)."""
        for b in blocks:
            if b.idstr not in self.received:
                self.received[b.idstr] = np.zeros(b.used_length // self.page_size, bool)

    def buffers(self, blocks: Sequence) -> Optional[list]:
        """Writable buffers a batch may be copied into, one per block; None: use :meth:`place`."""
        return None

    def buffer(self, block) -> Optional[np.ndarray]:
        """The writable buffer of one block (multifd); None: use :meth:`place`."""
        bufs = self.buffers([block])
        return None if bufs is None else bufs[0]

    def view(self, block, offset: int) -> np.ndarray:
        """The current content of one target page (XBZRLE decodes against it)."""
        return block.buffer[offset : offset + self.page_size]

    def place(self, block, offset: int, data) -> None:
        """Place one target page whose content is ``data`` (``page_size`` bytes)."""
        raise NotImplementedError

    def place_zero(self, block, offset: int) -> None:
        """Place one all-zero target page."""
        self.place(block, offset, bytes(self.page_size))

    def place_batch(self, ev, first: int, stop: int) -> int:
        """Place the PAGE and ZERO records of a :class:`~qmigx.stream.RamPages` batch from
        ``first`` on, stopping before ``stop`` or a record it leaves to the loader (another
        kind, or one it cannot take as it came); returns the index it stopped at (only
        with :attr:`takes_batches`). The loader hands such a record to :meth:`place`."""
        raise NotImplementedError

    def mark_received(self, block, offsets) -> None:
        """Record that batch-copied pages arrived (the buffers path)."""
        rb = self.received.get(block.idstr)
        if rb is not None:
            rb[np.asarray(offsets, np.uint64) // np.uint64(self.page_size)] = True

    def received_bitmap(self, block) -> np.ndarray:
        return self.received[block.idstr]

    def close(self) -> None:
        pass


def _check(block, offset: int, page_size: int) -> None:
    if offset % page_size or not 0 <= offset <= block.used_length - page_size:
        raise RamStreamError(f"page 0x{offset:x} lies outside RAM block {block.idstr} "
                             f"(0x{block.used_length:x} bytes)", section="ram", field="offset")


class CopyPlacement(PagePlacement):
    """Pages are copied straight into the RAM blocks (precopy).

    Batches copied through :meth:`buffers` are not entered in the received
    bitmap (precopy has no use for it, and it would cost every batch a
    pass); pages placed one by one are.
    """

    def buffers(self, blocks: Sequence) -> list:
        return [b.buffer for b in blocks]

    def place(self, block, offset: int, data) -> None:
        _check(block, offset, self.page_size)
        block.buffer[offset : offset + self.page_size] = np.frombuffer(data, np.uint8)
        self.received[block.idstr][offset // self.page_size] = True


class ColoCachePlacement(PagePlacement):
    """Pages land in a cache copy of each block; :meth:`flush` applies them to RAM.

    A COLO secondary (QEMU's ``colo_cache`` in ram.c) loads each
    checkpoint's RAM into the cache and copies the pages that changed into
    guest RAM only when the checkpoint is complete, so a checkpoint that
    stops half-way is never applied. The cache starts as a copy of RAM,
    as QEMU's colo_init_ram_cache does once the first migration completed.
    """

    tracks_batches = True

    def __init__(self, page_size: int = TARGET_PAGE_SIZE) -> None:
        super().__init__(page_size)
        self.cache: dict[str, np.ndarray] = {}
        self.dirty: dict[str, np.ndarray] = {}

    def attach(self, blocks: Sequence) -> None:
        super().attach(blocks)
        for b in blocks:
            if b.idstr not in self.cache:
                self.cache[b.idstr] = np.array(b.buffer[: b.used_length], np.uint8, copy=True)
                self.dirty[b.idstr] = np.zeros(b.used_length // self.page_size, bool)

    def buffers(self, blocks: Sequence) -> list:
        return [self.cache[b.idstr] for b in blocks]

    def view(self, block, offset: int) -> np.ndarray:
        return self.cache[block.idstr][offset : offset + self.page_size]

    def place(self, block, offset: int, data) -> None:
        _check(block, offset, self.page_size)
        self.cache[block.idstr][offset : offset + self.page_size] = np.frombuffer(data, np.uint8)
        self.mark_received(block, [offset])

    def mark_received(self, block, offsets) -> None:
        idx = np.asarray(offsets, np.uint64) // np.uint64(self.page_size)
        self.received[block.idstr][idx] = True
        self.dirty[block.idstr][idx] = True

    def pending_pages(self) -> int:
        """Pages in the cache that :meth:`flush` would copy into RAM."""
        return sum(int(np.count_nonzero(d)) for d in self.dirty.values())

    def flush(self, blocks: Sequence) -> int:
        """Copy every page the completed checkpoint changed into RAM; returns the count."""
        n = 0
        ps = self.page_size
        for b in blocks:
            d = self.dirty.get(b.idstr)
            if d is None:
                continue
            pages = np.flatnonzero(d)
            if len(pages):
                _copy_pages(b.buffer[: b.used_length], self.cache[b.idstr], pages, ps)
                d[:] = False
                n += len(pages)
        return n

    def discard(self, blocks: Sequence) -> None:
        """Forget a checkpoint that did not complete: the cache goes back to RAM's content."""
        ps = self.page_size
        for b in blocks:
            d = self.dirty.get(b.idstr)
            if d is None:
                continue
            pages = np.flatnonzero(d)
            if len(pages):
                _copy_pages(self.cache[b.idstr], b.buffer[: b.used_length], pages, ps)
                d[:] = False


def _copy_pages(dst: np.ndarray, src: np.ndarray, pages: np.ndarray, ps: int) -> None:
    """Copy pages ``pages`` (sorted indexes) of ``src`` into ``dst``.

    Runs of consecutive pages go as one slice copy each (a memcpy); pages
    scattered one by one go through a single gather/scatter, which beats a
    Python loop over thousands of tiny runs.
    """
    breaks = np.flatnonzero(np.diff(pages) != 1)
    if len(breaks) + 1 > max(8, len(pages) // 16):
        dst.reshape(-1, ps)[pages] = src.reshape(-1, ps)[pages]
        return
    starts = np.r_[pages[0], pages[breaks + 1]]
    ends = np.r_[pages[breaks], pages[-1]] + 1
    for a, e in zip(starts.tolist(), ends.tolist()):
        dst[a * ps : e * ps] = src[a * ps : e * ps]


class UffdPlacement(PagePlacement):
    """Postcopy placement into memory registered for missing-page faults.

    Args:
        blocks: the RAM blocks; each must be page aligned at its host page
            size (anonymous, memfd/shmem or hugetlbfs memory).

    :meth:`register` registers every block with a new userfaultfd
    (``UFFDIO_REGISTER_MODE_MISSING``); from then on a read of a page
    that has not been placed blocks its thread until the page is placed,
    and the fault appears on :attr:`fd` for the postcopy fault thread.
    Target pages of a host page larger than the target page (hugetlbfs)
    are gathered in a staging page and placed together once all have
    arrived; each host page is placed exactly once (a second placement is
    a :class:`~qmigx.errors.RamStreamError`).
    """

    def __init__(self, blocks: Sequence, page_size: int = TARGET_PAGE_SIZE,
                 fd: int = -1) -> None:
        super().__init__(page_size)
        self.blocks = list(blocks)
        #: a userfaultfd the memory's owner registered already (another process's)
        self.external = fd >= 0
        self.fd = fd
        self._lock = threading.Lock()
        self._staging: dict[tuple[str, int], np.ndarray] = {}
        self._staged: dict[tuple[str, int], np.ndarray] = {}
        self.placed_host_pages = 0
        # where each block is for the kernel: computed once, not per page
        self._addr = {b.idstr: uffd.buffer_address(b) for b in self.blocks}
        #: called as ``on_placed(block, host_offset)`` after each host page is placed
        self.on_placed = None
        #: per block, ``time.monotonic()`` at which each page was placed by a compiled
        #: placer (the preempt channel's), which calls no ``on_placed``; 0: not by it
        self.placed_at: dict[str, np.ndarray] = {}
        self.attach(self.blocks)

    def register(self) -> None:
        if self.external:
            return  # the owner registered its memory with this userfaultfd
        fd, _ = uffd.create_uffd(user_mode_only_first=False)
        try:
            uffd.api(fd, 0)
            for b in self.blocks:
                hps = self._host_page(b)
                addr = uffd.buffer_address(b)
                length = -(-b.used_length // hps) * hps
                if addr % hps:
                    raise uffd.UffdUnavailable(
                        f"block {b.idstr} at 0x{addr:x} is not aligned to its {hps}-byte pages")
                try:
                    uffd.register(fd, addr, length, uffd.UFFDIO_REGISTER_MODE_MISSING)
                except OSError as e:
                    raise uffd.UffdUnavailable(
                        f"UFFDIO_REGISTER of {b.idstr} failed: {uffd.errtext(e.errno)}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    @staticmethod
    def _host_page(block) -> int:
        return max(int(getattr(block, "page_size", 0) or 0), mmap.PAGESIZE)

    def place(self, block, offset: int, data) -> None:
        _check(block, offset, self.page_size)
        hps = self._host_page(block)
        tp = self.page_size
        rb = self.received[block.idstr]
        idx = offset // tp
        with self._lock:
            if rb[idx]:
                raise RamStreamError(f"page 0x{offset:x} of {block.idstr} placed twice",
                                     section="ram", field="offset")
            if hps == tp:
                self._copy(block, offset, np.frombuffer(data, np.uint8), tp)
                rb[idx] = True
                return
            host = offset - offset % hps
            key = (block.idstr, host)
            stage = self._staging.get(key)
            if stage is None:
                stage = self._staging[key] = np.zeros(hps, np.uint8)
                self._staged[key] = np.zeros(hps // tp, bool)
            stage[offset - host : offset - host + tp] = np.frombuffer(data, np.uint8)
            got = self._staged[key]
            got[(offset - host) // tp] = True
            rb[idx] = True
            if got.all() or host + hps > block.used_length and got[: (block.used_length - host) // tp].all():
                self._copy(block, host, stage, hps)
                del self._staging[key], self._staged[key]

    def place_zero(self, block, offset: int) -> None:
        hps = self._host_page(block)
        if hps != self.page_size or getattr(block, "shared", False):
            # huge pages gather their parts; shared memory (shmem) has no UFFDIO_ZEROPAGE
            self.place(block, offset, bytes(self.page_size))
            return
        _check(block, offset, self.page_size)
        rb = self.received[block.idstr]
        idx = offset // self.page_size
        with self._lock:
            if rb[idx]:
                raise RamStreamError(f"page 0x{offset:x} of {block.idstr} placed twice",
                                     section="ram", field="offset")
            try:
                uffd.zeropage(self.fd, self._addr[block.idstr] + offset, hps)
            except OSError as e:
                raise RamStreamError(f"UFFDIO_ZEROPAGE at 0x{offset:x} of {block.idstr} failed: "
                                     f"{uffd.errtext(e.errno)}", section="ram", field="offset") from None
            rb[idx] = True
            self.placed_host_pages += 1
        if self.on_placed is not None:
            self.on_placed(block, offset)

    def view(self, block, offset: int) -> np.ndarray:
        raise RamStreamError("XBZRLE pages cannot be placed in postcopy", section="ram",
                             field="flags")

    def _copy(self, block, host_offset: int, src: np.ndarray, length: int) -> None:
        try:
            uffd.copy(self.fd, self._addr[block.idstr] + host_offset, _address_of(src), length)
        except OSError as e:
            raise RamStreamError(f"UFFDIO_COPY at 0x{host_offset:x} of {block.idstr} failed: "
                                 f"{uffd.errtext(e.errno)}", section="ram", field="offset") from None
        self.placed_host_pages += 1
        if self.on_placed is not None:
            self.on_placed(block, host_offset)

    def close(self) -> None:
        if self.fd >= 0 and self.external:  # the owner unregisters its memory
            os.close(self.fd)
            self.fd = -1
        if self.fd >= 0:
            for b in self.blocks:
                try:
                    hps = self._host_page(b)
                    uffd.unregister(self.fd, uffd.buffer_address(b), -(-b.used_length // hps) * hps)
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = -1


def _address_of(data) -> int:
    """The address of a page's bytes (a numpy array, or any buffer)."""
    if isinstance(data, np.ndarray):
        return int(data.ctypes.data)
    return int(np.frombuffer(data, np.uint8).ctypes.data)
