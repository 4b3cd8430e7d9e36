"""Raw disk images as block migration reads and writes them.

:class:`SourceImage` is one disk on the sending side: it reads 1 MiB
chunks (a tail chunk padded with zeros, as every chunk on the wire is
1 MiB), digests them, and tells whether the file may have changed since
a point in time (its ``stat`` signature). :class:`TargetImage` is one
disk on the receiving side: it writes a chunk's bytes that fall inside
the image and never past its end, and turns all-zero chunks into
``fallocate`` zero ranges (falling back to plain writes where the file
system cannot).

Both work on anything ``lseek(SEEK_END)`` gives a size for: a regular
file or a block device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from typing import Optional

import numpy as np

from qmigx import _backend, zeropage
from qmigx.errors import ParameterError
from qmigx.wire import BDRV_SECTOR_SIZE, BLK_MIG_BLOCK_SIZE

__all__ = ["SourceImage", "TargetImage", "ZERO_DIGEST", "chunk_digest", "check_image"]

_chunkhash = _backend.load("chunkhash")

#: Chunks read per system call when a whole image is rescanned.
_SCAN_CHUNKS = 8


def chunk_digest(buf) -> tuple[int, bool]:
    """The digest of one whole chunk and whether it is all zero."""
    if zeropage.is_zero(buf):
        return ZERO_DIGEST, True
    d = np.empty(1, np.uint64)
    z = np.empty(1, np.uint8)
    _chunkhash.chunk_digests(buf, BLK_MIG_BLOCK_SIZE, d, z)
    return int(d[0]), False


def _zero_digest() -> int:
    d = np.empty(1, np.uint64)
    z = np.empty(1, np.uint8)
    _chunkhash.chunk_digests(bytes(BLK_MIG_BLOCK_SIZE), BLK_MIG_BLOCK_SIZE, d, z)
    return int(d[0])


#: The digest of an all-zero chunk (zero chunks are recognised without digesting them).
ZERO_DIGEST = _zero_digest()


def check_image(name: str, path: str, *, writable: bool) -> int:
    """Fail with a one-line :class:`ParameterError` unless ``path`` is a usable image; its size."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        st = os.stat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ParameterError(f"drive {name}: {path} is not a regular file or block device",
                                 field="drive")
        fd = os.open(path, flags)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ParameterError(f"drive {name}: {path}: {exc.strerror}", field="drive") from None
    if size <= 0:
        raise ParameterError(f"drive {name}: {path} is empty", field="drive")
    return size


def _stat_signature(fd: int) -> tuple:
    st = os.fstat(fd)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


class SourceImage:
    """One disk being sent: size, chunk reads, digests, change signature."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            os.close(self.fd)
            raise
        #: sectors of 512 bytes, the last one possibly partial (QEMU rounds up)
        self.total_sectors = -(-self.size // BDRV_SECTOR_SIZE)
        self.nchunks = -(-self.size // BLK_MIG_BLOCK_SIZE)
        self._scan = bytearray(_SCAN_CHUNKS * BLK_MIG_BLOCK_SIZE)

    def chunk_bytes(self, index: int) -> int:
        """How many bytes of chunk ``index`` lie inside the image."""
        return min(BLK_MIG_BLOCK_SIZE, self.size - index * BLK_MIG_BLOCK_SIZE)

    def read_chunks(self, first: int, count: int, buf) -> None:
        """Read chunks ``first .. first+count-1`` into ``buf``, zero-padded past the end.

        A file that shrank since it was opened reads as zeros where it
        ended, as a device of the size it had.
        """
        view = memoryview(buf)[: count * BLK_MIG_BLOCK_SIZE]
        off = first * BLK_MIG_BLOCK_SIZE
        want = max(0, min(len(view), self.size - off))
        got = 0
        while got < want:
            n = os.preadv(self.fd, [view[got:want]], off + got)
            if n == 0:
                break
            got += n
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def signature(self) -> tuple:
        """What ``fstat`` says about the file; any write through it changes this."""
        return _stat_signature(self.fd)

    def rescan(self, digests: np.ndarray, check: np.ndarray, dirty: np.ndarray) -> int:
        """Mark dirty every chunk ``i`` with ``check[i]`` whose content no longer has ``digests[i]``.

        Returns the number of chunks newly marked. Reads ``_SCAN_CHUNKS``
        chunks per system call; zero chunks are recognised by the zero scan
        and skip the digest.
        """
        todo = np.flatnonzero(check & ~dirty)
        if not len(todo):
            return 0
        found = 0
        d = np.empty(_SCAN_CHUNKS, np.uint64)
        z = np.empty(_SCAN_CHUNKS, np.uint8)
        buf = self._scan
        i = 0
        while i < len(todo):
            first = int(todo[i])
            # one read covers the run of wanted chunks starting here (at most _SCAN_CHUNKS)
            last = first
            j = i + 1
            while j < len(todo) and todo[j] == last + 1 and last + 1 - first < _SCAN_CHUNKS:
                last += 1
                j += 1
            count = last - first + 1
            self.read_chunks(first, count, buf)
            view = memoryview(buf)[: count * BLK_MIG_BLOCK_SIZE]
            zmap = zeropage.zero_page_map(view, BLK_MIG_BLOCK_SIZE)
            if zmap.all():
                d[:count] = ZERO_DIGEST
            else:
                _chunkhash.chunk_digests(view, BLK_MIG_BLOCK_SIZE, d, z)
            changed = d[:count] != digests[first : first + count]
            if changed.any():
                dirty[first : first + count] |= changed
                found += int(changed.sum())
            i = j
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- writing zeros ---------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


def _load_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


class TargetImage:
    """One disk being received: writes stay inside its size.

    Zeros go out as ``fallocate`` zero ranges (keeping the allocation, as
    QEMU's raw driver does by default), else as punched holes, else as
    written zeros; the first mode the file system refuses is not tried
    again.
    """

    _ZERO_MODES = (_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE,
                   _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            os.close(self.fd)
            raise
        self._modes = list(self._ZERO_MODES) if _fallocate is not None else []
        self._zeros: Optional[bytes] = None

    def write(self, offset: int, data) -> None:
        """Write ``data`` at ``offset``; the caller has clipped it to the image."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def write_zeros(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        while self._modes:
            mode = self._modes[0]
            if _fallocate(self.fd, mode, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise OSError(err, os.strerror(err), self.path)
            self._modes.pop(0)
        if self._zeros is None:
            self._zeros = bytes(BLK_MIG_BLOCK_SIZE)
        while length > 0:
            n = min(length, len(self._zeros))
            self.write(offset, memoryview(self._zeros)[:n])
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
