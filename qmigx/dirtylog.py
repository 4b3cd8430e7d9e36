"""Dirty-log sources for a RAMBlock: who tells the source which pages were written.

QEMU asks KVM (or TCG) for the pages the guest wrote since the last bitmap
sync and re-arms the tracking of a chunk just before it sends a page of it
(ram.md §6, §12). qmigx migrates memory that ordinary Python code (or C
code, or the kernel on its behalf) writes, so it needs its own trackers.
Both implement :class:`qmigx.bitmap.DirtyLogSource`:

* :class:`ExplicitDirtyLog` — the writer calls ``mark_dirty(offset,
  length)``. Works for any buffer on any OS; costs a call per write and
  trusts the writer not to forget one.
* :class:`UffdWriteProtectLog` — the kernel tracks every write by any thread
  of this process (or kernel code writing on its behalf, e.g. ``read(2)``
  into the block) with Linux userfaultfd write-protection. Writes made by
  *another process* through its own mapping of shared memory are NOT seen:
  write-protection lives in this process's page tables. Two modes:

  - ``"async"`` (kernel ≥ 6.7, ``UFFD_FEATURE_WP_ASYNC``): the kernel lifts
    the protection itself on the first write, so writers never wait for
    us; ``sync()`` reads which pages lost their protection with the
    ``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap``, and ``clear()``
    re-protects with the same ioctl (``PM_SCAN_WP_MATCHING``), which also
    returns — atomically — the pages written since the last ``sync()`` so
    none is lost. Preferred when available (see ``mode="auto"``), for
    private memory only: the "written" state lives only in page-table
    entries, and for shared (shmem/file) memory the kernel may drop the
    entry of a written page when it reclaims it, and the write with it.
    Anonymous pages keep the state across swap.
  - ``"fault"`` (kernel ≥ 5.7): the first write to a protected page stops
    the writer and queues a fault message; a handler thread records the
    page and un-protects it, which resumes the writer. The handler is the
    compiled helper :mod:`qmigx._core.uffd`, running without the GIL — a
    Python handler would deadlock against a writer that holds the GIL
    while the kernel has it stopped.

:func:`best_dirty_log` picks the uffd tracker when the kernel allows it and
falls back to explicit marking, saying why in ``reason``.

Both trackers log at target-page granularity (4 KiB, page p of the block =
bit p % 64 of word p // 64 of a uint64 array, as :class:`DirtyBitmap`).

The kernel interface itself (ioctls, structs, feature bits) is in
:mod:`qmigx.uffd`, shared with postcopy.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from typing import Optional

import numpy as np

from qmigx.errors import CapabilityError, ChannelError, ParameterError, StateError
from qmigx.uffd import (
    PAGE_IS_WRITTEN,
    PAGEMAP_SCAN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    RANGE_ARG,
    REGISTER_ARG,
    SCAN_ARG,
    SCAN_VEC_LEN,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_WP,
    UFFDIO_UNREGISTER,
    UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP,
    UFFDIO_WRITEPROTECT_NR,
    WRITEPROTECT_ARG,
    UffdUnavailable,
    create_uffd,
    supported_features,
)
from qmigx.uffd import (
    all_private as _all_private,
)
from qmigx.uffd import (
    api as _api,
)
from qmigx.uffd import (
    buffer_address as _buffer_address,
)
from qmigx.uffd import (
    errtext as _errtext,
)
from qmigx.uffd import (
    prefault as _prefault,
)
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = [
    "ExplicitDirtyLog",
    "UffdWriteProtectLog",
    "best_dirty_log",
    "uffd_wp_features",
]

_PAGE_SHIFT = TARGET_PAGE_SIZE.bit_length() - 1


_HINT = "use explicit dirty marking (ExplicitDirtyLog)"


def _refuse(reason: str) -> CapabilityError:
    return CapabilityError(
        f"userfaultfd write-protect is not available: {reason}; {_HINT}", field="dirty-log"
    )


def uffd_wp_features() -> int:
    """The userfaultfd feature bits this kernel offers (CapabilityError if none)."""
    try:
        return supported_features()
    except UffdUnavailable as e:
        raise _refuse(e.reason) from None


def _create_uffd(user_mode_only_first: bool) -> tuple[int, bool]:
    try:
        return create_uffd(user_mode_only_first)
    except UffdUnavailable as e:
        raise _refuse(e.reason) from None


def _check_range(npages: int, start_page, npages_arg, what: str) -> tuple[int, int]:
    start, n = int(start_page), int(npages_arg)
    if start < 0 or n < 0 or start + n > npages:
        raise ParameterError(
            f"{what} pages {start}..{start + n} outside the block's {npages} pages",
            field="start_page",
        )
    return start, n


class ExplicitDirtyLog:
    """Dirty log filled by the writer itself: ``mark_dirty(offset, length)``.

    Thread-safe: any number of threads may mark while another syncs; every
    mark lands in exactly one ``sync()`` result. ``clear()`` does nothing:
    nothing is protected, so nothing needs re-arming (the writer marks
    every write, including those after a page was sent).

    Attributes:
        kind: ``"explicit"``.
        reason: why :func:`best_dirty_log` did not use userfaultfd, or None.
    """

    kind = "explicit"

    def __init__(self, block, *, reason: Optional[str] = None) -> None:
        self.block = block
        self.npages = block.used_length >> _PAGE_SHIFT
        self._nbytes = 8 * ((self.npages + 63) // 64)
        self._bits = bytearray(self._nbytes)
        self._any = False
        self._lock = threading.Lock()
        self.reason = reason

    def mark_dirty(self, offset: int, length: int = 1) -> None:
        """Mark every target page that ``[offset, offset + length)`` touches."""
        offset, length = int(offset), int(length)
        if offset < 0 or length < 0 or offset + length > self.npages << _PAGE_SHIFT:
            raise ParameterError(
                f"dirty range 0x{offset:x}+0x{length:x} is outside block "
                f"{self.block.idstr} of 0x{self.npages << _PAGE_SHIFT:x} bytes",
                offset=offset, field="offset",
            )
        if length:
            first = offset >> _PAGE_SHIFT
            self._set(first, ((offset + length - 1) >> _PAGE_SHIFT) - first + 1)

    def mark_pages(self, start_page: int, npages: int = 1) -> None:
        """Mark target pages ``[start_page, start_page + npages)``."""
        start, n = _check_range(self.npages, start_page, npages, "dirty")
        if n:
            self._set(start, n)

    def _set(self, first: int, n: int) -> None:
        end = first + n
        fb, lb = first >> 3, (end - 1) >> 3
        with self._lock:
            b = self._bits
            if fb == lb:
                b[fb] |= ((1 << n) - 1) << (first & 7)
            else:
                b[fb] |= (0xFF << (first & 7)) & 0xFF
                if lb > fb + 1:
                    b[fb + 1 : lb] = b"\xff" * (lb - fb - 1)
                b[lb] |= (1 << (((end - 1) & 7) + 1)) - 1
            self._any = True

    def sync(self) -> Optional[np.ndarray]:
        """The pages marked since the previous sync (uint64 words), or None; resets the log."""
        with self._lock:
            if not self._any:
                return None
            old, self._bits, self._any = self._bits, bytearray(self._nbytes), False
        return np.frombuffer(old, dtype="<u8")

    def clear(self, start_page: int, npages: int) -> None:
        """No-op (explicit marking needs no re-protection); checks the range."""
        _check_range(self.npages, start_page, npages, "clear")

    def start(self) -> None:
        """No-op: marks are collected from construction on."""

    def close(self) -> None:
        """No-op."""

    def __enter__(self) -> "ExplicitDirtyLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExplicitDirtyLog({self.block.idstr!r}, npages={self.npages})"


# -- userfaultfd plumbing ------------------------------------------------------

class UffdWriteProtectLog:
    """Kernel dirty tracking of a RAMBlock with userfaultfd write-protection.

    Args:
        block: a :class:`~qmigx.ram.RAMBlock` whose buffer is page aligned
            (mmap-backed: :meth:`RAMBlock.anonymous`, a shmem/hugetlbfs
            :meth:`RAMBlock.from_file`; not a malloc'ed numpy array).
        mode: ``"auto"`` (async if the kernel has WP_ASYNC and
            PAGEMAP_SCAN and the memory is private, else fault),
            ``"async"`` or ``"fault"``.

    Raises:
        CapabilityError: the kernel or the memory refuses, with the reason.

    Life cycle: construct (registers the range), :meth:`start` (protects the
    whole block; the migration bitmap starts all-dirty, so nothing written
    before is lost), then ``sync()`` / ``clear()`` as the DirtyBitmap asks,
    and :meth:`close`. Writes after ``start()`` to a protected page are
    reported by exactly one later ``sync()``; once reported, a page is not
    reported again until ``clear()`` re-protects it (QEMU's rule: clear
    before reading the page, ram.md §12).

    Attributes:
        kind: ``"uffd-wp"``; mode: ``"async"`` or ``"fault"``;
        user_mode_only: the fd was created with UFFD_USER_MODE_ONLY;
        faults: write faults served (fault mode).
    """

    kind = "uffd-wp"
    reason: Optional[str] = None

    def __init__(self, block, *, mode: str = "auto", _unpopulated: bool = True) -> None:
        if mode not in ("auto", "async", "fault"):
            raise ParameterError(f"dirty-log mode {mode!r} is not auto, async or fault", field="mode")
        self.block = block
        self.npages = block.used_length >> _PAGE_SHIFT
        self.length = self.npages << _PAGE_SHIFT
        self.base = _buffer_address(block)
        self.host_page_size = max(int(block.page_size), mmap.PAGESIZE)
        self._lock = threading.Lock()
        self._uffd = -1
        self._pagemap = -1
        self._stop = -1
        self._thread: Optional[threading.Thread] = None
        self._handler_error: Optional[BaseException] = None
        self._started = False
        self._closed = False
        self.user_mode_only = False
        if self.npages == 0:
            raise _refuse(f"block {block.idstr} is empty")
        if self.base % self.host_page_size or self.length % self.host_page_size:
            raise _refuse(
                f"block {block.idstr} at 0x{self.base:x}+0x{self.length:x} is not aligned to its "
                f"{self.host_page_size}-byte pages (use mmap-backed memory, e.g. RAMBlock.anonymous)"
            )
        supported = uffd_wp_features()
        if not supported & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise _refuse("the kernel lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP (needs Linux >= 5.7)")
        self._unpopulated = bool(_unpopulated and supported & UFFD_FEATURE_WP_UNPOPULATED)
        can_async = bool(supported & UFFD_FEATURE_WP_ASYNC) and self._unpopulated
        if mode == "async" and not can_async:
            raise _refuse("the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (needs Linux >= 6.7)")
        want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | (supported & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        if self._unpopulated:
            want |= UFFD_FEATURE_WP_UNPOPULATED
        if can_async and not _all_private(self.base, self.length):
            # Async mode keeps "written" only in page table entries; reclaim of a
            # written shared (shmem/file) page drops its entry and the write with it.
            can_async = False
            if mode == "async":
                raise _refuse("async tracking would lose writes to shared memory that the "
                              "kernel reclaims; use mode='fault' for shared blocks")
        if mode in ("auto", "async") and can_async:
            try:
                self._setup(want | UFFD_FEATURE_WP_ASYNC, async_=True)
                self.mode = "async"
                return
            except CapabilityError:
                if mode == "async":
                    raise
        self._setup(want, async_=False)
        self.mode = "fault"

    # -- setup / teardown ------------------------------------------------------

    def _setup(self, features: int, *, async_: bool) -> None:
        if not async_:
            try:
                from qmigx._backend import load_compiled

                self._helper = load_compiled("uffd")
            except ImportError as e:
                raise _refuse(f"the compiled fault handler qmigx._core.uffd is missing ({e})") from None
        fd, self.user_mode_only = _create_uffd(user_mode_only_first=async_)
        try:
            try:
                _api(fd, features)
            except OSError as e:
                raise _refuse(f"UFFDIO_API with features 0x{features:x} failed: {_errtext(e.errno)}") from None
            reg = bytearray(REGISTER_ARG.pack(self.base, self.length, UFFDIO_REGISTER_MODE_WP, 0))
            try:
                fcntl.ioctl(fd, UFFDIO_REGISTER, reg, True)
            except OSError as e:
                why = {
                    errno.EINVAL: "this memory type cannot be write-protected (uffd-wp covers anonymous "
                    "memory, and shmem/hugetlbfs with UFFD_FEATURE_WP_HUGETLBFS_SHMEM)",
                    errno.ENOMEM: "the range is not entirely mapped",
                    errno.EPERM: "the mapping does not allow it (read-only or sealed)",
                    errno.EBUSY: "the range is already registered with another userfaultfd",
                }.get(e.errno, "")
                raise _refuse(f"UFFDIO_REGISTER failed: {_errtext(e.errno)}{': ' + why if why else ''}") from None
            if not REGISTER_ARG.unpack(reg)[3] & (1 << UFFDIO_WRITEPROTECT_NR):
                raise _refuse("UFFDIO_WRITEPROTECT is not offered for this memory")
            if async_:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                self._vec = np.zeros(3 * SCAN_VEC_LEN, np.uint64)
                self._uffd = fd
                try:
                    self._scan(0, 1, wp=False)
                except ChannelError as e:
                    raise _refuse(f"{e.message} (needs Linux >= 6.7)") from None
                self._reported = np.zeros(self.npages, bool)
                self._pending = np.zeros(self.npages, bool)
            else:
                self._log = np.zeros((self.npages + 63) // 64, np.uint64)
                self._stats = np.zeros(2, np.uint64)
                self._uffd = fd
        except BaseException:
            self._uffd = -1
            if self._pagemap >= 0:
                os.close(self._pagemap)
                self._pagemap = -1
            os.close(fd)
            raise

    def start(self) -> None:
        """Write-protect the whole block and (fault mode) start the handler thread."""
        with self._lock:
            if self._closed:
                raise StateError("dirty log is closed", field="dirty-log")
            if self._started:
                return
            if not self._unpopulated:
                _prefault(self.base, self.length, self.block.memory)
            if self.mode == "fault":
                self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._thread = threading.Thread(
                    target=self._serve, name=f"uffd-wp {self.block.idstr}", daemon=True
                )
                self._thread.start()
            try:
                self._writeprotect(0, self.npages, True)
            except ChannelError as e:
                if self._thread is not None:
                    os.eventfd_write(self._stop, 1)
                    self._thread.join()
                    self._thread = None
                raise _refuse(e.message) from None
            self._started = True

    def _serve(self) -> None:
        try:
            self._helper.serve_faults(
                self._uffd, self._stop, self.base, self.length, self.host_page_size,
                self._log, self._stats,
            )
        except OSError as e:  # the helper already un-protected the block and marked it all dirty
            self._handler_error = e

    def close(self) -> None:
        """Un-protect, stop the handler, unregister and close the descriptors. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._uffd >= 0 and self._started:
                try:
                    self._writeprotect(0, self.npages, False)
                except ChannelError:
                    pass
            if self._thread is not None:
                os.eventfd_write(self._stop, 1)
                self._thread.join()
                self._thread = None
            if self._uffd >= 0:
                try:
                    fcntl.ioctl(self._uffd, UFFDIO_UNREGISTER, RANGE_ARG.pack(self.base, self.length))
                except OSError:
                    pass  # the mapping may already be gone; closing the fd releases it anyway
                os.close(self._uffd)
                self._uffd = -1
            for name in ("_pagemap", "_stop"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    def __enter__(self) -> "UffdWriteProtectLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_uffd", -1) >= 0:
            self.close()

    # -- kernel calls ----------------------------------------------------------

    def _writeprotect(self, first: int, n: int, protect: bool) -> None:
        hp = self.host_page_size
        start = (self.base + (first << _PAGE_SHIFT)) // hp * hp
        end = -(-(self.base + ((first + n) << _PAGE_SHIFT)) // hp) * hp
        arg = WRITEPROTECT_ARG.pack(start, end - start, UFFDIO_WRITEPROTECT_MODE_WP if protect else 0)
        while True:
            try:
                fcntl.ioctl(self._uffd, UFFDIO_WRITEPROTECT, arg)
                return
            except (InterruptedError, BlockingIOError):  # EAGAIN: the address space is changing
                continue
            except OSError as e:
                raise ChannelError(
                    f"UFFDIO_WRITEPROTECT of 0x{start:x}+0x{end - start:x} failed: {_errtext(e.errno)}",
                    field="dirty-log") from None

    def _scan(self, first: int, end_page: int, *, wp: bool) -> np.ndarray:
        """Written pages in [first, end_page) as (start_page, end_page) rows; wp re-protects them."""
        start = self.base + (first << _PAGE_SHIFT)
        end = self.base + (end_page << _PAGE_SHIFT)
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if wp else 0)
        vec = self._vec
        rows = []
        while start < end:
            arg = bytearray(SCAN_ARG.pack(
                SCAN_ARG.size, flags, start, end, 0, vec.ctypes.data, SCAN_VEC_LEN, 0,
                0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN,
            ))
            try:
                n = fcntl.ioctl(self._pagemap, PAGEMAP_SCAN, arg, True)
            except OSError as e:
                raise ChannelError(f"PAGEMAP_SCAN of 0x{start:x}..0x{end:x} failed: "
                                   f"{_errtext(e.errno)}", field="dirty-log") from None
            if n:
                rows.append(vec.reshape(-1, 3)[:n, :2].copy())
            walk_end = SCAN_ARG.unpack(arg)[4]
            if walk_end <= start:
                raise ChannelError(f"PAGEMAP_SCAN made no progress at 0x{start:x}", field="dirty-log")
            start = walk_end
        if not rows:
            return np.zeros((0, 2), np.int64)
        out = np.concatenate(rows).astype(np.int64)
        out -= self.base
        out >>= _PAGE_SHIFT
        return out

    @staticmethod
    def _ranges_to_bool(rows: np.ndarray, lo: int, n: int) -> np.ndarray:
        if len(rows) <= 32:
            out = np.zeros(n, bool)
            for s, e in rows.tolist():
                out[s - lo : e - lo] = True
            return out
        d = np.zeros(n + 1, np.int32)
        d[rows[:, 0] - lo] += 1
        d[rows[:, 1] - lo] -= 1
        return np.cumsum(d[:-1]) > 0

    def _check_alive(self) -> None:
        if self._handler_error is not None:
            raise ChannelError(
                f"userfaultfd handler for {self.block.idstr} failed: {self._handler_error}",
                field="dirty-log",
            )

    # -- DirtyLogSource ----------------------------------------------------------

    def sync(self) -> Optional[np.ndarray]:
        """Pages written since the previous sync (uint64 words), or None; resets the log."""
        with self._lock:
            if self._closed or not self._started:
                return None
            if self.mode == "fault":
                out = np.empty_like(self._log)
                count = self._helper.take_log(self._log, out)
                self._check_alive()
                return out if count else None
            rows = self._scan(0, self.npages, wp=False)
            if not len(rows) and not self._pending.any():
                return None
            written = self._ranges_to_bool(rows, 0, self.npages)
            new = (written & ~self._reported) | self._pending
            self._reported = written
            self._pending[:] = False
            if not new.any():
                return None
            return _pack(new)

    def clear(self, start_page: int, npages: int) -> None:
        """Re-protect pages ``[start_page, start_page + npages)`` (one ioctl): writes after this are caught."""
        start, n = _check_range(self.npages, start_page, npages, "clear")
        if not n:
            return
        with self._lock:
            if self._closed or not self._started:
                return
            if self.mode == "fault":
                self._check_alive()
                self._helper.wait_batch(self._stats)
                self._writeprotect(start, n, True)
                return
            # Re-protect and learn, in the same walk, which pages were written since
            # the last sync: those must still reach the next sync.
            rows = self._scan(start, start + n, wp=True)
            if len(rows):
                caught = self._ranges_to_bool(rows, start, n)
                self._pending[start : start + n] |= caught & ~self._reported[start : start + n]
            self._reported[start : start + n] = False

    def mark_dirty(self, offset: int, length: int = 1) -> None:
        """Add writes the kernel cannot see (e.g. another process's, through shared memory)."""
        offset, length = int(offset), int(length)
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ParameterError(
                f"dirty range 0x{offset:x}+0x{length:x} is outside block "
                f"{self.block.idstr} of 0x{self.length:x} bytes", offset=offset, field="offset",
            )
        if not length:
            return
        first = offset >> _PAGE_SHIFT
        n = ((offset + length - 1) >> _PAGE_SHIFT) - first + 1
        if self.mode == "fault":
            self._helper.atomic_or_range(self._log, first, n)
        else:
            with self._lock:
                self._pending[first : first + n] = True

    @property
    def faults(self) -> int:
        return int(self._stats[0]) if self.mode == "fault" else 0

    def __repr__(self) -> str:
        return (f"UffdWriteProtectLog({self.block.idstr!r}, mode={self.mode!r}, "
                f"npages={self.npages})")


def _pack(pages: np.ndarray) -> np.ndarray:
    """A bool per page -> uint64 words, page p = bit p % 64 of word p // 64."""
    nwords = (len(pages) + 63) // 64
    padded = np.zeros(nwords * 64, bool)
    padded[: len(pages)] = pages
    return np.packbits(padded, bitorder="little").view("<u8")


def best_dirty_log(block, *, mode: str = "auto"):
    """The best tracker the kernel allows for ``block``: uffd write-protect, else explicit.

    The result's ``kind`` says which (``"uffd-wp"`` or ``"explicit"``); an
    explicit log's ``reason`` says why userfaultfd was not used. Call
    ``start()`` on it when the migration's bitmap has been set all-dirty.
    """
    try:
        return UffdWriteProtectLog(block, mode=mode)
    except CapabilityError as e:
        return ExplicitDirtyLog(block, reason=e.message)
