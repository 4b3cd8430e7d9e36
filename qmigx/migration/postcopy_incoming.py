"""The postcopy destination (QEMU's postcopy-ram.c, incoming side, and the load half of savevm.c).

Before POSTCOPY_LISTEN pages are copied as in precopy, but each one is
recorded as received. At LISTEN every page not received is dropped from
memory and the blocks are registered with userfaultfd (missing mode), so
a read of such a page blocks its thread in the kernel; the fault thread
here turns each fault into a page request on the return path, and the
page, when it arrives on the main or the preempt channel, is placed with
one ``UFFDIO_COPY`` of its host page (:class:`~qmigx.placement.UffdPlacement`)
which wakes the reader.

Nothing that may block on a missing page holds the GIL: the fault thread
waits in ``poll(2)``, and the stand-in for a vCPU (:class:`Toucher`) reads
pages through the kernel (``pwrite(2)`` from guest memory into a memfd),
so a Python thread blocked on a page never stops the threads that fetch it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import select
import struct
import threading
import time
from typing import Callable, Optional

import numpy as np

from qmigx import _backend, returnpath, uffd
from qmigx._backend import load_compiled
from qmigx.errors import CapabilityError, RamStreamError, StreamError
from qmigx.placement import CopyPlacement, UffdPlacement
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["PostcopyIncoming", "Toucher", "host_page_summary", "parse_discard"]

_MSG = struct.Struct("=BBHIQQI4x")  # uffd_msg, page-fault form (see qmigx.uffd)
_EVENT_PAGEFAULT = 0x12
_MADV_DONTNEED = 4
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def host_page_summary(blocks) -> int:
    """OR of the host page sizes of the blocks (ADVISE's first field)."""
    summary = 0
    for b in blocks:
        summary |= max(int(getattr(b, "page_size", 0) or 0), mmap.PAGESIZE)
    return summary or mmap.PAGESIZE


def parse_discard(payload: bytes) -> tuple[str, list[tuple[int, int]]]:
    """POSTCOPY_RAM_DISCARD: u8 version 0, u8 name length, name, NUL, then be64 start/length pairs."""
    n = payload[1]
    name = payload[2 : 2 + n].decode("utf-8", "replace")
    body = payload[3 + n :]
    ranges = [struct.unpack_from(">QQ", body, i) for i in range(0, len(body), 16)]
    return name, ranges


class TrackingCopyPlacement(CopyPlacement):
    """Precopy placement that records every page received (postcopy needs the bitmap)."""

    tracks_batches = True


class PostcopyIncoming:
    """A destination's postcopy: advise, discards, listen, run, the fault thread and the end.

    Args:
        loader: the destination's :class:`~qmigx.ram.RamLoader`.
        rp: the return-path writer page requests go out through.
        blocktime: capability ``postcopy-blocktime``: measure time spent
            waiting for pages.
    """

    NONE, ADVISE, DISCARD, LISTENING, RUNNING, END = range(6)

    def __init__(self, loader, rp, *, enabled: bool, blocktime: bool = False,
                 uffd_fd: int = -1) -> None:
        self.loader = loader
        #: the userfaultfd of another process that registered the memory (-1: make our own)
        self.uffd_fd = uffd_fd
        self.rp = rp
        self.enabled = enabled
        self.blocktime = blocktime
        self.state = self.NONE
        self.placement: Optional[UffdPlacement] = None
        #: faults read, requests sent, index of the last request's block (-1: none yet);
        #: the compiled fault loop updates them as it goes
        self._counts = np.array([0, 0, -1], np.int64)
        self._latencies: list[float] = []  # seconds, fault read to page placed
        #: per block, per 4 KiB page: when the host page starting there was asked for
        #: (time.monotonic(); 0: not waited for)
        self._asked: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._given: set = set()
        self._to_drop: dict[str, np.ndarray] = {}
        self._stop_r, self._stop_w = -1, -1
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.on_error: Optional[Callable[[BaseException], None]] = None

    @property
    def faults(self) -> int:
        """Page faults read from the userfaultfd."""
        return int(self._counts[0])

    @property
    def requests(self) -> int:
        """Page requests made (each host page once until it is placed)."""
        return int(self._counts[1])

    # -- commands -------------------------------------------------------------------
    def advise(self, payload: bytes, offset: int) -> None:
        """POSTCOPY_ADVISE: check what the source's RAM needs against this side."""
        if self.state != self.NONE:
            raise StreamError("POSTCOPY_ADVISE in the wrong postcopy state", offset=offset,
                              field="command")
        if len(payload) == 0:
            if self.enabled:
                raise StreamError("RAM postcopy is enabled but have 0 byte advise",
                                  offset=offset, field="command")
            # postcopy of dirty bitmaps alone: LISTEN and RUN come, RAM stays precopy
            self.state = self.ADVISE
            return
        if not self.enabled:
            raise StreamError("RAM postcopy is disabled but have 16 byte advise",
                              offset=offset, field="command")
        summary, target = struct.unpack(">QQ", payload)
        try:
            os.close(uffd.create_uffd(user_mode_only_first=False)[0])  # only a check
        except uffd.UffdUnavailable as e:
            raise CapabilityError(f"Postcopy is not supported: {e.message}",
                                  field="postcopy-ram") from None
        given = list(self.loader.blocks)
        if given and summary != host_page_summary(given):
            raise StreamError(f"Postcopy needs matching RAM page sizes "
                              f"(s=0x{summary:x} d=0x{host_page_summary(given):x})",
                              offset=offset, field="command")
        if target != TARGET_PAGE_SIZE:
            raise StreamError(f"Postcopy needs matching target page sizes "
                              f"(s=0x{target:x} d=0x{TARGET_PAGE_SIZE:x})",
                              offset=offset, field="command")
        # blocks made from the setup record from here on start empty: a page of theirs
        # not received is missing already, only one received and then discarded must go
        self._given = {b.idstr for b in given}
        # every page counts from now on; memory is not populated ahead of use
        self.loader.placement = TrackingCopyPlacement()
        self.loader.populate = False
        self.state = self.ADVISE

    def discard(self, payload: bytes, offset: int) -> None:
        """POSTCOPY_RAM_DISCARD: these pages may be stale; drop them, they come again."""
        if self.state not in (self.ADVISE, self.DISCARD):
            raise StreamError("POSTCOPY_RAM_DISCARD outside the advise/discard state",
                              offset=offset, field="command")
        self.state = self.DISCARD
        name, ranges = parse_discard(payload)
        blk = self.loader.blocks.get(name)
        if blk is None:
            raise RamStreamError(f"POSTCOPY_RAM_DISCARD: unknown block {name!r}",
                                 offset=offset, section="ram", field="rbname")
        rb = self.loader.placement.received.get(name)
        for start, length in ranges:
            if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or \
                    start + length > blk.used_length:
                raise RamStreamError(
                    f"POSTCOPY_RAM_DISCARD 0x{start:x}+0x{length:x} outside block {name} "
                    f"(0x{blk.used_length:x} bytes) or not page aligned",
                    offset=offset, section="ram", field="range")
            if rb is None:
                _drop(blk, start, length)
                continue
            first, stop = start // TARGET_PAGE_SIZE, (start + length) // TARGET_PAGE_SIZE
            if name not in self._given:  # received, now stale: dropped at LISTEN, in one pass
                td = self._to_drop.get(name)
                if td is None:
                    td = self._to_drop[name] = np.zeros(len(rb), bool)
                td[first:stop] |= rb[first:stop]
            rb[first:stop] = False

    def listen(self, offset: int) -> None:
        """POSTCOPY_LISTEN: missing pages become faults from here on."""
        if self.state not in (self.ADVISE, self.DISCARD):
            raise StreamError("POSTCOPY_LISTEN without a postcopy advise", offset=offset,
                              field="command")
        if not self.enabled:  # bitmaps alone: RAM is whole already, nothing can fault
            self.state = self.LISTENING
            return
        blocks = list(self.loader._table) or list(self.loader.blocks)
        received = self.loader.placement.received
        for b in blocks:  # whatever did not arrive (or was discarded) must fault
            rb = received.get(b.idstr)
            if rb is None:
                _drop(b, 0, b.used_length)
                continue
            per = max(int(b.page_size or 0), mmap.PAGESIZE) // TARGET_PAGE_SIZE
            fresh = b.idstr not in self._given
            if per > 1:  # a huge page is there whole or not at all: partly received goes
                n = len(rb) // per * per
                whole = rb[:n].reshape(-1, per).all(axis=1)
                partly = rb[:n].reshape(-1, per).any(axis=1) & ~whole
                rb[:n] = np.repeat(whole, per)
                rb[n:] = False
                for h in np.flatnonzero(partly).tolist():
                    _drop(b, h * per * TARGET_PAGE_SIZE, per * TARGET_PAGE_SIZE)
            if fresh:  # made empty, never populated: only what was received and discarded goes
                td = self._to_drop.get(b.idstr)
                if td is not None:
                    _drop_pages(b, td & ~rb)
                continue
            _drop_pages(b, ~rb)
        pl = UffdPlacement(blocks, fd=self.uffd_fd)
        for b in blocks:
            if b.idstr in received:
                pl.received[b.idstr][:] = received[b.idstr]
        pl.on_placed = self._placed
        self._asked = {b.idstr: np.zeros(-(-b.used_length // TARGET_PAGE_SIZE), np.float64)
                       for b in blocks}
        try:
            pl.register()
        except uffd.UffdUnavailable as e:
            raise CapabilityError(f"Postcopy is not supported: {e.message}",
                                  field="postcopy-ram") from None
        self.placement = pl
        self.loader.placement = pl
        self.loader._buffers = None  # one page at a time, through UFFDIO_COPY
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._fault_thread, name="postcopy/fault",
                                        daemon=True)
        self._thread.start()
        self.state = self.LISTENING

    def run(self, offset: int) -> None:
        if self.state != self.LISTENING:
            raise StreamError("POSTCOPY_RUN before POSTCOPY_LISTEN", offset=offset,
                              field="command")
        self.state = self.RUNNING

    # -- faults ----------------------------------------------------------------------
    def _fault_thread(self) -> None:
        try:
            if self._compiled_faults():
                return
            self._python_faults()
        except BaseException as exc:  # noqa: BLE001 - reported to the load thread
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    def _fault_table(self) -> list:
        pl = self.placement
        return [(b.idstr.encode(), pl._addr[b.idstr], b.used_length, pl._host_page(b),
                 pl.received[b.idstr], self._asked[b.idstr]) for b in pl.blocks]

    def _compiled_faults(self) -> bool:
        """Faults to requests in the compiled loop while the return path is a plain socket.

        Returns False (nothing done yet, or the return path changed to one
        that is not) for the Python loop to go on; True once stopped.
        """
        kernel = _backend.load("postcopy_fault")
        table = self._fault_table()
        while True:
            rp = self.rp
            if rp is None or rp.lock.fd < 0:
                return False
            st, err = kernel.serve_faults(self.placement.fd, self._stop_r, table, rp.lock,
                                          self._counts)
            if st == kernel.STOPPED:
                return True
            if st == kernel.READ_FAILED:
                raise OSError(err, f"reading the userfaultfd: {os.strerror(err)}")
            if st == kernel.WRITE_FAILED:
                raise rp.failure(err)
            # CLOSED: postcopy paused; wait for the recovered return path (or the end)
            while self.rp is rp:
                ready, _, _ = select.select([self._stop_r], [], [], 0.05)
                if ready:
                    return True

    def _python_faults(self) -> None:
        fd = self.placement.fd
        while True:
            ready, _, _ = select.select([fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(fd, _MSG.size * 64)
            except BlockingIOError:
                continue
            for i in range(0, len(data) - _MSG.size + 1, _MSG.size):
                event, _, _, _, _flags, addr, _ptid = _MSG.unpack_from(data, i)
                if event == _EVENT_PAGEFAULT:
                    self._fault(addr)

    def _fault(self, addr: int) -> None:
        pl = self.placement
        for index, b in enumerate(pl.blocks):
            base = pl._addr[b.idstr]
            if base <= addr < base + b.used_length:
                break
        else:
            return  # not guest RAM (cannot happen: only the blocks are registered)
        hps = pl._host_page(b)
        host = (addr - base) // hps * hps
        idx = host // TARGET_PAGE_SIZE
        asked = self._asked[b.idstr]
        with self._lock:
            self._counts[0] += 1
            if pl.received[b.idstr][idx] or asked[idx] > 0:
                return  # placed meanwhile (the kernel woke the reader already), or asked
            asked[idx] = time.monotonic()
            self._counts[1] += 1
        self._request(host, hps, index)

    def _request(self, host: int, hps: int, index: int) -> None:
        """REQ_PAGES, or REQ_PAGES_ID for another block than the previous request's.

        Decided under the return path's lock, as the compiled loop decides it.
        """
        rp = self.rp
        with rp.lock:
            named = int(self._counts[2]) != index
            name = self.placement.blocks[index].idstr if named else None
            if rp.send_locked(returnpath.req_pages(host, hps, name)):
                self._counts[2] = index

    def _placed(self, block, host_offset: int) -> None:
        asked = self._asked.get(block.idstr)
        if asked is None:
            return
        idx = host_offset // TARGET_PAGE_SIZE
        with self._lock:
            t = float(asked[idx])
            asked[idx] = 0.0
        if t > 0:
            self._latencies.append(max(0.0, time.monotonic() - t))

    def _drain(self) -> None:
        """Settle the requests whose pages arrived without an ``on_placed`` call.

        The compiled preempt placer stamps ``placed_at`` instead; a page the
        fault side asked for just as it was placed settles with no wait.
        """
        pl = self.placement
        if pl is None:
            return
        with self._lock:
            for name, asked in self._asked.items():
                # the fault thread writes ``asked`` meanwhile (the compiled one without
                # this lock): one comparison pass reads each entry once, where
                # flatnonzero would count, then fail if the count had changed
                idx = np.flatnonzero(asked != 0)
                if not len(idx):
                    continue
                done = idx[pl.received[name][idx] != 0]
                if not len(done):
                    continue
                t = asked[done]
                stamps = pl.placed_at.get(name)
                at = stamps[done] if stamps is not None else np.zeros(len(done))
                self._latencies.extend(np.where(at > 0, np.maximum(at - t, 0.0), 0.0).tolist())
                asked[done] = 0.0

    @property
    def latencies(self) -> list[float]:
        """Seconds from each requested page's fault read to its placement."""
        self._drain()
        return self._latencies

    def _outstanding(self) -> bool:
        return any(asked.any() for asked in self._asked.values())

    def wait_served(self, timeout: Optional[float]) -> bool:
        """Wait until no requested page is outstanding; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain()
            if not self._outstanding():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)

    def resend_requests(self) -> None:
        """Ask again for every page still waited for (after recovery, as 7.2 does)."""
        self._drain()
        pl = self.placement
        self._counts[2] = -1
        for index, b in enumerate(pl.blocks):
            hps = pl._host_page(b)
            for idx in np.flatnonzero(self._asked[b.idstr] != 0).tolist():
                self._request(idx * TARGET_PAGE_SIZE, hps, index)

    def report(self, **extra) -> dict:
        """Counts and latency percentiles (ms) of the requested pages."""
        lat = np.sort(np.asarray(self.latencies, float)) * 1000
        pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if len(lat) else (lambda q: None)
        return {"faults": self.faults, "requests": self.requests, "served": len(lat),
                "latency_ms": {"p50": pct(50), "p99": pct(99),
                               "max": round(float(lat[-1]), 3) if len(lat) else None},
                "blocktime_ms": self.blocktime_ms, **extra}

    @property
    def blocktime_ms(self) -> int:
        return int(sum(self.latencies) * 1000)

    def finish(self) -> None:
        """The end (or a failure): stop the fault thread, unregister the memory."""
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        if self.placement is not None:
            self.placement.close()
        self.state = self.END


class Toucher:
    """A stand-in for a vCPU: reads random guest pages at ``rate`` pages per second.

    Each read goes through the kernel (``pwrite(2)`` of the page into a
    memfd), so a read of a missing page waits in the kernel for the page
    to be placed, without holding the GIL. ``touched`` counts pages read.
    """

    def __init__(self, blocks, rate: float, seed: Optional[int] = None) -> None:
        self.blocks = [b for b in blocks if b.used_length >= TARGET_PAGE_SIZE]
        self.rate = rate
        self.rng = random.Random(seed)
        self.touched = 0
        self.wait_time = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.rate <= 0 or not self.blocks:
            return
        self._thread = threading.Thread(target=self._run, name="postcopy/touch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = os.memfd_create("qmigx-touch", os.MFD_CLOEXEC)
        try:
            weights = [b.used_length for b in self.blocks]
            period = 1.0 / self.rate
            nxt = time.monotonic()
            while not self._stop.is_set():
                b = self.rng.choices(self.blocks, weights)[0]
                p = self.rng.randrange(b.used_length // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE
                t0 = time.monotonic()
                os.pwrite(fd, memoryview(b.buffer[p : p + TARGET_PAGE_SIZE]), 0)
                self.wait_time += time.monotonic() - t0
                self.touched += 1
                nxt += period
                delay = nxt - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    nxt = time.monotonic()
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def _drop_pages(block, mask: np.ndarray) -> None:
    """:func:`_drop` every run of target pages ``mask`` marks, in one compiled loop."""
    if not mask.any():
        return
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0])).astype(np.int64)
    starts = np.ascontiguousarray(edges[::2] * TARGET_PAGE_SIZE)
    lengths = np.ascontiguousarray((edges[1::2] - edges[::2]) * TARGET_PAGE_SIZE)
    fd = getattr(block, "fd", None)
    err = load_compiled("uffd").drop_runs(uffd.local_address(block),
                                          fd if fd is not None and block.shared else -1,
                                          starts, lengths)
    if err:
        raise OSError(err, f"madvise(MADV_DONTNEED) on block {block.idstr}: {os.strerror(err)}")


def _drop(block, start: int, length: int) -> None:
    """Make pages missing again: hole-punch shared memory, DONTNEED private memory."""
    if length <= 0:
        return
    fd = getattr(block, "fd", None)
    if fd is not None and block.shared:
        try:
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, length)
        except OSError:
            pass
    addr = uffd.local_address(block) + start
    uffd.madvise(addr, length, _MADV_DONTNEED)


_libc = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
