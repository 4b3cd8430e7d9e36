"""Linux userfaultfd: the kernel interface shared by dirty tracking and postcopy.

Dirty tracking (:mod:`qmigx.dirtylog`) write-protects guest RAM and learns
which pages were written; a postcopy destination registers missing-page
tracking and places each page with one ``UFFDIO_COPY`` or
``UFFDIO_ZEROPAGE`` of a whole host page (:mod:`qmigx.placement`). Both
speak to the kernel through the ioctls and structs here; nothing here knows
about migration.

Kernel ABI used (derived from ``<linux/userfaultfd.h>`` and
``<linux/fs.h>``; ``_IOWR(t, nr, T)`` = ``3 << 30 | sizeof(T) << 16 |
t << 8 | nr``, ``_IOR`` the same with ``2 << 30``):

=========================  ===============================  ==========
Name                       Encoding                         Value
=========================  ===============================  ==========
``userfaultfd(2)``         syscall number (x86-64)          323
                           (aarch64/riscv64 282, ppc64 364,
                           s390x 355, i386 374, arm 388)
``UFFDIO_API``             ``_IOWR(0xAA, 0x3F, 24)``        0xC018AA3F
``UFFDIO_REGISTER``        ``_IOWR(0xAA, 0x00, 32)``        0xC020AA00
``UFFDIO_UNREGISTER``      ``_IOR(0xAA, 0x01, 16)``         0x8010AA01
``UFFDIO_WRITEPROTECT``    ``_IOWR(0xAA, 0x06, 24)``        0xC018AA06
``PAGEMAP_SCAN``           ``_IOWR('f', 16, 96)``           0xC0606610
=========================  ===============================  ==========

=========================  =====  =====================================================
Struct                     Bytes  Layout (native-endian u64 unless noted)
=========================  =====  =====================================================
``uffdio_api``             24     api (0xAA), features (in: wanted, out: granted),
                                  ioctls (out)
``uffdio_range``           16     start, len
``uffdio_register``        32     range (start, len), mode (MISSING=1, WP=2,
                                  MINOR=4), ioctls (out: bit n = ioctl nr n allowed)
``uffdio_writeprotect``    24     range (start, len), mode (WP=1 protect, 0 un-protect;
                                  DONTWAKE=2 — never used: the writer must wake)
``uffd_msg``               32     u8 event (0x12 = PAGEFAULT), u8+u16+u32 reserved,
                                  then flags (WRITE=1, WP=2, MINOR=4) @8,
                                  address @16, u32 ptid @24, 4 bytes padding
``pm_scan_arg``            96     size, flags (WP_MATCHING=1, CHECK_WPASYNC=2), start,
                                  end, walk_end (out), vec, vec_len, max_pages,
                                  category_inverted, category_mask,
                                  category_anyof_mask, return_mask
``page_region``            24     start, end (exclusive), categories
                                  (PAGE_IS_WRITTEN=2)
=========================  =====  =====================================================

Features requested: ``PAGEFAULT_FLAG_WP`` (1<<0), plus when the kernel has
them ``WP_HUGETLBFS_SHMEM`` (1<<12, shmem/hugetlbfs memory),
``WP_UNPOPULATED`` (1<<13, protect pages never touched yet; older kernels
get the block pre-faulted instead) and, in async mode, ``WP_ASYNC``
(1<<15). ``userfaultfd(2)`` flags: ``O_CLOEXEC | O_NONBLOCK``, and
``UFFD_USER_MODE_ONLY`` (1) — tried first in async mode (it needs no
privilege and changes nothing there) but only as a fallback in fault mode,
where it would make the kernel's own writes into the block (``read(2)``,
``recv(2)``) fail with EFAULT instead of being tracked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct

import numpy as np

from qmigx.errors import CapabilityError
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = [
    "UffdUnavailable",
    "create_uffd",
    "api",
    "supported_features",
    "register",
    "unregister",
    "writeprotect",
    "copy",
    "zeropage",
    "buffer_address",
    "all_private",
    "prefault",
    "errtext",
]


class UffdUnavailable(CapabilityError):
    """The kernel or the memory refuses userfaultfd; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"userfaultfd is not available: {reason}", field="userfaultfd")
        self.reason = reason


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOWR, _IOR = 3, 2
UFFDIO_API = _ioc(_IOWR, 0xAA, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOWR, 0xAA, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOR, 0xAA, 0x01, 16)
UFFDIO_WRITEPROTECT = _ioc(_IOWR, 0xAA, 0x06, 24)
PAGEMAP_SCAN = _ioc(_IOWR, ord("f"), 16, 96)
UFFDIO_COPY = _ioc(_IOWR, 0xAA, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_IOWR, 0xAA, 0x04, 32)

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_NR = 0x06
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1

_SYS_USERFAULTFD = {
    "x86_64": 323, "amd64": 323, "aarch64": 282, "arm64": 282, "riscv64": 282,
    "loongarch64": 282, "ppc64le": 364, "ppc64": 364, "s390x": 355,
    "i386": 374, "i686": 374, "armv7l": 388, "armv6l": 388,
}

API_ARG = struct.Struct("=QQQ")
REGISTER_ARG = struct.Struct("=QQQQ")
RANGE_ARG = struct.Struct("=QQ")
WRITEPROTECT_ARG = struct.Struct("=QQQ")
SCAN_ARG = struct.Struct("=12Q")
COPY_ARG = struct.Struct("=QQQQq")
ZEROPAGE_ARG = struct.Struct("=QQQq")
SCAN_VEC_LEN = 2048
_MADV_POPULATE_READ = 22

_libc = None
_supported_cache: dict[bool, int] = {}


def syscall_nr() -> int:
    nr = _SYS_USERFAULTFD.get(platform.machine().lower())
    if nr is None or not os.uname().sysname == "Linux":
        raise UffdUnavailable(f"no userfaultfd syscall known on {os.uname().sysname} {platform.machine()}")
    return nr


def errtext(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def create_uffd(user_mode_only_first: bool) -> tuple[int, bool]:
    """A new userfaultfd, trying with/without UFFD_USER_MODE_ONLY in the given order."""
    global _libc
    nr = syscall_nr()
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    base = os.O_CLOEXEC | os.O_NONBLOCK
    failures = []
    for umo in ((True, False) if user_mode_only_first else (False, True)):
        fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(base | (UFFD_USER_MODE_ONLY if umo else 0)))
        if fd >= 0:
            return int(fd), umo
        err = ctypes.get_errno()
        failures.append(err)
        if err == errno.ENOSYS:
            raise UffdUnavailable("the kernel has no userfaultfd(2) (ENOSYS)")
    if errno.EPERM in failures:
        try:
            with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
                sysctl = f.read().strip()
        except OSError:
            sysctl = "?"
        raise UffdUnavailable(
            f"userfaultfd(2) refused with EPERM (vm.unprivileged_userfaultfd={sysctl}, "
            "and the process lacks CAP_SYS_PTRACE)"
        )
    raise UffdUnavailable(f"userfaultfd(2) failed: {errtext(failures[-1])}")


def api(fd: int, features: int) -> int:
    buf = bytearray(API_ARG.pack(UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, buf, True)
    return API_ARG.unpack(buf)[1]


def supported_features() -> int:
    """The userfaultfd feature bits this kernel offers (raises UffdUnavailable if none)."""
    if True not in _supported_cache:
        fd, _ = create_uffd(True)
        try:
            _supported_cache[True] = api(fd, 0)
        except OSError as e:
            raise UffdUnavailable(f"UFFDIO_API failed: {errtext(e.errno)}") from None
        finally:
            os.close(fd)
    return _supported_cache[True]


def buffer_address(block) -> int:
    """Where the block is in the memory its userfaultfd serves.

    Normally this process's own mapping; a block another process registered
    (``block.uffd_address``: a postcopy receiver serving a program's memory
    through the program's userfaultfd) is addressed as that process sees it.
    """
    theirs = getattr(block, "uffd_address", None)
    if theirs is not None:
        return theirs
    return local_address(block)


def local_address(block) -> int:
    """The block's memory in this process."""
    arr = block.buffer
    if not isinstance(arr, np.ndarray):
        arr = np.frombuffer(arr, np.uint8)
    return int(arr.ctypes.data)


def all_private(addr: int, length: int) -> bool:
    """Whether every mapping in [addr, addr + length) is private (anonymous or copy-on-write)."""
    end, covered = addr + length, addr
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if hi <= addr or lo >= end:
                    continue
                if perms[3] != "p":
                    return False
                covered = max(covered, hi)
    except OSError:
        return False
    return covered >= end


def prefault(addr: int, length: int, memory: np.ndarray) -> None:
    """Map every page (read access) so protection applies to it (kernels without WP_UNPOPULATED)."""
    if _libc is not None:
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_POPULATE_READ) == 0:
            return
    int(memory[::TARGET_PAGE_SIZE].max(initial=0))  # a read of each page faults it in


def register(fd: int, start: int, length: int, mode: int) -> int:
    """``UFFDIO_REGISTER`` a range; returns the ioctls the kernel offers for it (a bit mask)."""
    reg = bytearray(REGISTER_ARG.pack(start, length, mode, 0))
    fcntl.ioctl(fd, UFFDIO_REGISTER, reg, True)
    return REGISTER_ARG.unpack(reg)[3]


def unregister(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, UFFDIO_UNREGISTER, RANGE_ARG.pack(start, length))


def writeprotect(fd: int, start: int, length: int, protect: bool) -> None:
    """Protect (or un-protect and wake the writers of) a range."""
    fcntl.ioctl(fd, UFFDIO_WRITEPROTECT,
                WRITEPROTECT_ARG.pack(start, length, UFFDIO_WRITEPROTECT_MODE_WP if protect else 0))


def copy(fd: int, dst: int, src: int, length: int) -> int:
    """``UFFDIO_COPY``: fill missing pages atomically and wake their faulting threads.

    Returns the bytes copied. EEXIST (the page is already there) is an
    OSError the caller decides about: placing a page twice is a bug.
    """
    arg = bytearray(COPY_ARG.pack(dst, src, length, 0, 0))
    fcntl.ioctl(fd, UFFDIO_COPY, arg, True)
    return struct.unpack_from("=q", arg, 32)[0]


def zeropage(fd: int, dst: int, length: int) -> int:
    """``UFFDIO_ZEROPAGE``: map zero pages at missing pages and wake their faulting threads."""
    arg = bytearray(ZEROPAGE_ARG.pack(dst, length, 0, 0))
    fcntl.ioctl(fd, UFFDIO_ZEROPAGE, arg, True)
    return struct.unpack_from("=q", arg, 24)[0]


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(2)`` on a raw range (MADV_DONTNEED makes private pages missing again)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(0x{addr:x}, 0x{length:x}, {advice}): {os.strerror(err)}")
