"""Block migration: the ``block`` live section (QEMU's migration/block.c).

A disk moves with the guest as 1 MiB chunks (2048 sectors, aligned to
1 MiB). Each record starts with a be64 ``(sector << 9) | flags``:
DEVICE_BLOCK records then carry the disk's name (str8) and, unless
ZERO_BLOCK is set too, the whole 1 MiB of data (a disk's last chunk as
well: bytes past the disk's end are padding); PROGRESS carries a
percentage where the sector would be; EOS ends a section payload.
:class:`BlockHandler` is that grammar, shared by every reader.

Sending (:class:`BlockSaveHandler`), in QEMU's order and with its records:

* setup (START): the disks are opened; the payload is EOS alone;
* bulk phase (PARTs): each disk in turn, chunk after chunk, until the
  rate limit of the iteration is reached; before a chunk, a PROGRESS
  record whenever QEMU's integer percentage changes (its "completed
  sectors" count the chunks whose read has started, so it reaches 100
  only at the END);
* dirty phase (PARTs): the chunks changed since they were sent, in disk
  and sector order, again up to the rate limit;
* completion (END): the chunks still dirty, PROGRESS 100, EOS. While
  the bulk phase runs the pending figure stays above the driver's
  threshold (QEMU 4.1's rule), so completion never starts before it
  ended; a driver that completes anyway gets the rest of the bulk in
  the END. QEMU 7.2 counts only the chunks being read as pending, so a
  7.2 source whose threshold (bandwidth x downtime limit) is large
  completes in the bulk phase and never sends the rest of the disk.

With capability ``zero-blocks`` an all-zero chunk goes as ZERO_BLOCK,
without its data.

How changed chunks are found. QEMU tracks guest writes with a dirty
bitmap in its block layer. The disks sent here are files that other
processes write through the file system, where nothing reports which
bytes changed, so the source compares content: it keeps a 64-bit digest
of every chunk as it was sent (``qmigx._core.chunkhash``, several GB/s;
zero chunks are recognised by the zero scan alone) and a rescan reads
the sent chunks again and marks those whose digest differs. A rescan
runs when the pending figure is asked for and before each dirty-phase
iteration (at most every ``rescan_interval`` seconds, and never more
often than four times its own duration, so a large disk cannot eat the
migration), and always before completion. It is skipped while the
file's ``fstat`` signature (mtime, ctime, size, inode) equals the one
taken before the last full rescan: a write through the file moves the
mtime. File timestamps come from a coarse clock, so a signature whose
mtime or ctime is within :data:`RACY_SECONDS` of the moment it was taken
is not trusted (a write in the same clock tick would leave it equal).
Writes through a shared ``mmap`` of the image may update the mtime only
at their first fault; for such writers pass ``trust_mtime=False``,
which rescans every time.

Receiving (:class:`BlockLoadHandler`): each chunk goes to the image of
the same name, an existing raw file or block device. Only the bytes
inside the image are written: a tail chunk's padding is dropped, and a
record starting at or past the image's end is an error, as is a name
with no image ("Error unknown block device", QEMU's text). ZERO_BLOCK
chunks, and data chunks that are all zero, become zero ranges.

``query-migrate`` shows QEMU 7.2's figures (:meth:`BlockSaveHandler.disk_info`):
``total`` is the disks' size in sectors, ``transferred`` the sectors
QEMU counts as completed (the start of the last chunk whose bulk read
began, per disk), ``remaining`` the difference; the member disappears
once the END is written.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from qmigx import zeropage
from qmigx.block_image import SourceImage, TargetImage, check_image, chunk_digest
from qmigx.errors import BlockStreamError, ParameterError
from qmigx.qemufile import Cursor, QEMUFile
from qmigx.savevm import SaveVMHandler, Section
from qmigx.wire import (
    BDRV_SECTOR_BITS,
    BLK_MIG_BLOCK_SIZE,
    BLK_MIG_SECTORS_PER_BLOCK,
    BlockFlag,
)

__all__ = [
    "BlockRecord",
    "BlockHandler",
    "BlockSaveHandler",
    "BlockLoadHandler",
    "parse_drive",
    "parse_drives",
    "RACY_SECONDS",
]

# plain ints: IntFlag arithmetic costs a Python call per operation, per record
_DEVICE_BLOCK = int(BlockFlag.DEVICE_BLOCK)
_EOS_FLAG = int(BlockFlag.EOS)
_PROGRESS = int(BlockFlag.PROGRESS)
_ZERO_BLOCK = int(BlockFlag.ZERO_BLOCK)
_KNOWN = _DEVICE_BLOCK | _EOS_FLAG | _PROGRESS | _ZERO_BLOCK
_FLAG_MASK = (1 << BDRV_SECTOR_BITS) - 1

#: A file signature this close to the moment it was read may hide a later write.
RACY_SECONDS = 2.0

#: QEMU's rule for ``-drive id=``: a letter, then letters, digits, ``-``, ``.``, ``_``.
_DRIVE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")

Drives = Union[Mapping[str, str], Iterable[Union[str, Sequence[str]]]]


# -- drives on the command line -----------------------------------------------------------


def parse_drive(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``, or a one-line :class:`ParameterError`."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ParameterError(f"--drive {text!r}: expected NAME=PATH", field="drive")
    _check_name(name)
    return name, path


def _check_name(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ParameterError(f"drive name {name[:40]!r}... is longer than 255 bytes",
                             field="drive")
    if not _DRIVE_NAME.match(name):
        raise ParameterError(
            f"drive name {name!r}: use a letter, then letters, digits, '-', '.' or '_' "
            "(QEMU's rule for -drive id)", field="drive")


def parse_drives(drives: Drives) -> list[tuple[str, str]]:
    """Drives as ``(name, path)`` pairs, from ``NAME=PATH`` texts, pairs or a mapping."""
    items = drives.items() if isinstance(drives, Mapping) else drives
    out: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            name, path = parse_drive(item)
        else:
            name, path = item
            _check_name(name)
        if any(name == seen for seen, _ in out):
            raise ParameterError(f"drive {name!r} given twice", field="drive")
        out.append((name, str(path)))
    return out


# -- the record grammar -----------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRecord:
    """One ``block`` record: a chunk (data or zero), a progress mark, or EOS."""

    flags: int
    sector: int  #: first sector of the chunk; the percentage for PROGRESS
    device: Optional[str] = None
    data: Optional[memoryview] = None  #: the 1 MiB chunk (DEVICE_BLOCK without ZERO_BLOCK)
    offset: int = 0  #: where the record starts in the stream

    @property
    def is_eos(self) -> bool:
        """A bare end-of-section mark (nothing else to apply or show)."""
        return self.flags & (_DEVICE_BLOCK | _PROGRESS) == 0

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & _ZERO_BLOCK)


class BlockHandler(SaveVMHandler):
    """The ``block`` section's record grammar (every side reads with it).

    QEMU decides by the DEVICE_BLOCK bit first, then PROGRESS, then EOS,
    and ends the payload after any record with EOS set. Bits it does not
    define are refused here (QEMU would ignore them; it never sends
    them), as is a record with none of the three.
    """

    idstr = "block"
    version_id = 1
    section_id = 1

    def read_record(self, cur: Cursor, section: Section) -> tuple[Any, bool]:
        at = cur.tell()
        if section.version_id > self.version_id:
            raise BlockStreamError(
                f"savevm: unsupported version {section.version_id} for 'block' "
                f"v{self.version_id}", offset=at, section=section.label, field="version_id")
        hdr = cur.read_be64()
        flags = hdr & _FLAG_MASK
        sector = hdr >> BDRV_SECTOR_BITS
        last = bool(flags & _EOS_FLAG)
        if flags & ~_KNOWN:
            raise BlockStreamError(f"Unknown block migration flags: {flags:#x}",
                                   offset=at, section=section.label, field="flags")
        if flags & _DEVICE_BLOCK:
            name = cur.read_str8(what="block device name", allow_empty=True)
            data = None if flags & _ZERO_BLOCK else cur.read_bytes(BLK_MIG_BLOCK_SIZE)
            return BlockRecord(flags, sector, name, data, at), last
        if flags & (_PROGRESS | _EOS_FLAG):
            return BlockRecord(flags, sector, offset=at), last
        raise BlockStreamError(f"Unknown block migration flags: {flags:#x}",
                               offset=at, section=section.label, field="flags")

    def describe(self, record: BlockRecord) -> Any:
        if record.flags & _DEVICE_BLOCK:
            return {"device": record.device, "sector": record.sector,
                    "zero": record.data is None}
        if record.flags & _PROGRESS:
            return {"progress": record.sector}
        return {"eos": True}


def _header(sector: int, flags: int) -> bytes:
    return struct.pack(">Q", (sector << BDRV_SECTOR_BITS) | flags)


_EOS = _header(0, _EOS_FLAG)


# -- sending ------------------------------------------------------------------------------------


class _SendDisk:
    """One disk being sent (QEMU's BlkMigDevState): cursors, digests, dirty chunks."""

    def __init__(self, image: SourceImage) -> None:
        self.image = image
        self.name_bytes = image.name.encode("utf-8", "surrogateescape")
        n = image.nchunks
        self.digests = np.zeros(n, np.uint64)  #: of each chunk as last sent
        self.sent = np.zeros(n, bool)
        self.dirty = np.zeros(n, bool)
        self.cur_chunk = 0  #: bulk cursor
        self.bulk_completed = False
        self.completed_sectors = 0  #: QEMU's figure, shown by query-migrate
        self.cur_dirty = 0  #: dirty-phase cursor, back to 0 at every iteration
        self.clean_signature: Optional[tuple] = None
        self.last_scan_end = 0.0
        self.last_scan_seconds = 0.0

    def dirty_bytes(self) -> int:
        count = int(self.dirty.sum())
        if count and self.dirty[-1]:
            return (count - 1) * BLK_MIG_BLOCK_SIZE + self.image.chunk_bytes(self.image.nchunks - 1)
        return count * BLK_MIG_BLOCK_SIZE

    def bulk_bytes(self) -> int:
        return max(0, self.image.size - self.cur_chunk * BLK_MIG_BLOCK_SIZE)


class BlockSaveHandler(BlockHandler):
    """The sending side of block migration (see the module docstring).

    Args:
        drives: the disks, as ``NAME=PATH`` texts, ``(name, path)`` pairs
            or a mapping; raw images or block devices, read through the file.
        capabilities: the source's :class:`~qmigx.control.Capabilities`:
            the section is active with ``block`` on, and ``zero-blocks`` is
            read when the migration starts. Without it the section is
            active and ``zero_blocks`` decides.
        zero_blocks: overrides the capability.
        trust_mtime: skip rescans while the file's signature is unchanged.
        rescan_interval: the shortest time between two rescans of a disk
            while iterating (completion always rescans).
    """

    def __init__(self, drives: Drives, *, capabilities=None, zero_blocks: Optional[bool] = None,
                 trust_mtime: bool = True, rescan_interval: float = 0.1) -> None:
        self.drives = parse_drives(drives)
        for name, path in self.drives:
            check_image(name, path, writable=False)
        self.capabilities = capabilities
        self.zero_blocks_override = zero_blocks
        self.trust_mtime = trust_mtime
        self.rescan_interval = rescan_interval
        self._disks: list[_SendDisk] = []
        self._buf = bytearray(BLK_MIG_BLOCK_SIZE)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.zero_blocks = False
        self.bulk_completed = False
        self._prev_progress = -1
        self._total_sectors = 0
        #: chunks sent as data / as ZERO_BLOCK, stream bytes written, dirty chunks found
        self.data_chunks = 0
        self.zero_chunks = 0
        self.bytes_sent = 0
        self.dirty_found = 0
        self.rescans = 0

    # -- SaveVMHandlers ------------------------------------------------------------------
    def is_active(self) -> bool:
        if self.capabilities is None:
            return True
        return bool(self.capabilities.get("block"))

    def save_setup(self, f: QEMUFile) -> None:
        self.save_cleanup()
        self._reset_counters()
        if self.zero_blocks_override is not None:
            self.zero_blocks = bool(self.zero_blocks_override)
        elif self.capabilities is not None:
            self.zero_blocks = bool(self.capabilities.get("zero-blocks"))
        try:
            for name, path in self.drives:
                self._disks.append(_SendDisk(SourceImage(name, path)))
        except BaseException:
            self.save_cleanup()
            raise
        self._total_sectors = sum(d.image.total_sectors for d in self._disks)
        for disk in self._disks:
            self._mark_clean(disk, disk.image.signature(), time.time_ns())
            disk.last_scan_end = time.monotonic()
        self._put(f, _EOS)

    def save_pending(self, max_size: int = 0) -> tuple[int, int]:
        """The bulk left plus the dirty chunks found; more than ``max_size`` during bulk.

        The bulk phase must end in an iteration, as QEMU 4.1 made sure:
        the figure stays above the driver's threshold while it runs.
        """
        self._sync(force=False)
        left = sum(d.bulk_bytes() + d.dirty_bytes() for d in self._disks)
        if not self.bulk_completed and left <= max_size:
            left = max_size + BLK_MIG_BLOCK_SIZE
        elif not self.bulk_completed:
            left = max(left, BLK_MIG_BLOCK_SIZE)
        return (left, 0)

    def save_live_iterate(self, f: QEMUFile) -> bool:
        """One PART payload: bulk chunks, or dirty chunks, up to the rate limit, then EOS.

        Returns True as QEMU does (it wrote something, the EOS at least),
        so the other live sections iterate in the same round.
        """
        for disk in self._disks:
            disk.cur_dirty = 0
        synced = False
        while True:
            if not self.bulk_completed:
                if not self._bulk_step(f):
                    self.bulk_completed = True
            else:
                if not synced:
                    self._sync(force=False)
                    synced = True
                if self._dirty_step(f):
                    break
            if f.rate_limit_exceeded():
                break
        self._put(f, _EOS)
        return True

    def save_complete_precopy(self, f: QEMUFile) -> None:
        while not self.bulk_completed:
            if not self._bulk_step(f):
                self.bulk_completed = True
        self._sync(force=True)
        for disk in self._disks:
            disk.cur_dirty = 0
        while not self._dirty_step(f):
            pass
        self._put(f, _header(100, _PROGRESS))
        self._put(f, _EOS)
        self._release()

    def save_cleanup(self) -> None:
        self._release()

    # -- query-migrate -----------------------------------------------------------------------
    def disk_info(self) -> Optional[dict]:
        """``query-migrate``'s ``disk`` member as QEMU 7.2 fills it, or None when absent."""
        disks = self._disks
        if not disks:
            return None
        total = sum(d.image.total_sectors for d in disks) << BDRV_SECTOR_BITS
        done = sum(d.completed_sectors for d in disks) << BDRV_SECTOR_BITS
        return {"transferred": done, "remaining": total - done, "total": total}

    # -- the phases -------------------------------------------------------------------------------
    def _bulk_step(self, f: QEMUFile) -> bool:
        """Send the next bulk chunk (QEMU's blk_mig_save_bulked_block); False once none is left."""
        completed = 0
        chunk = None
        more = False
        for disk in self._disks:
            if not disk.bulk_completed:
                if disk.cur_chunk >= disk.image.nchunks:
                    disk.completed_sectors = disk.image.total_sectors
                    disk.bulk_completed = True
                else:
                    disk.completed_sectors = disk.cur_chunk * BLK_MIG_SECTORS_PER_BLOCK
                    chunk = (disk, disk.cur_chunk)
                    disk.cur_chunk += 1
                    disk.bulk_completed = disk.cur_chunk >= disk.image.nchunks
                completed += disk.completed_sectors
                more = True
                break
            completed += disk.completed_sectors
        total = self._total_sectors
        progress = completed * 100 // total if total else 100
        if progress != self._prev_progress:
            self._prev_progress = progress
            self._put(f, _header(progress, _PROGRESS))
        if chunk is not None:
            self._send_chunk(f, *chunk)
        return more

    def _dirty_step(self, f: QEMUFile) -> bool:
        """Send the next dirty chunk after the cursors; True once there is none."""
        for disk in self._disks:
            n = disk.image.nchunks
            if disk.cur_dirty >= n:
                continue
            rest = disk.dirty[disk.cur_dirty :]
            k = int(rest.argmax())
            if not rest[k]:
                disk.cur_dirty = n
                continue
            index = disk.cur_dirty + k
            self._send_chunk(f, disk, index)
            disk.cur_dirty = index + 1
            if disk.cur_dirty < n:
                return False
        return True

    def _send_chunk(self, f: QEMUFile, disk: _SendDisk, index: int) -> None:
        buf = self._buf
        disk.image.read_chunks(index, 1, buf)
        digest, zero = chunk_digest(buf)
        disk.digests[index] = digest
        disk.sent[index] = True
        disk.dirty[index] = False
        flags = _DEVICE_BLOCK
        if zero and self.zero_blocks:
            flags |= _ZERO_BLOCK
        name = disk.name_bytes
        head = _header(index * BLK_MIG_SECTORS_PER_BLOCK, flags) + bytes((len(name),)) + name
        if flags & _ZERO_BLOCK:
            self._put(f, head)
            self.zero_chunks += 1
        else:
            f.writev([head, buf])
            self.bytes_sent += len(head) + len(buf)
            self.data_chunks += 1

    def _put(self, f: QEMUFile, data: bytes) -> None:
        f.write(data)
        self.bytes_sent += len(data)

    # -- finding changed chunks -------------------------------------------------------------
    def _sync(self, *, force: bool) -> None:
        """Rescan the sent chunks of each disk whose file may have changed."""
        for disk in self._disks:
            if not disk.sent.any():
                continue
            sig = disk.image.signature()
            if self.trust_mtime and sig == disk.clean_signature:
                continue
            now = time.monotonic()
            wait = max(self.rescan_interval, 4 * disk.last_scan_seconds)
            if not force and now - disk.last_scan_end < wait:
                continue
            taken = time.time_ns()
            found = disk.image.rescan(disk.digests, disk.sent, disk.dirty)
            end = time.monotonic()
            disk.last_scan_end = end
            disk.last_scan_seconds = end - now
            self.dirty_found += found
            self.rescans += 1
            self._mark_clean(disk, sig, taken)

    @staticmethod
    def _mark_clean(disk: _SendDisk, sig: tuple, taken_ns: int) -> None:
        """Trust ``sig`` from now on, unless a write in its clock tick could hide behind it."""
        racy = RACY_SECONDS * 1e9
        mtime_ns, ctime_ns = sig[0], sig[1]
        if taken_ns - mtime_ns < racy or taken_ns - ctime_ns < racy:
            disk.clean_signature = None
        else:
            disk.clean_signature = sig

    def _release(self) -> None:
        disks, self._disks = self._disks, []
        for disk in disks:
            disk.image.close()


# -- receiving ----------------------------------------------------------------------------------


class BlockLoadHandler(BlockHandler):
    """The receiving side of block migration: chunks into existing images.

    Args:
        drives: the images, as for :class:`BlockSaveHandler`; each must
            exist and be writable (the size is whatever it is).
    """

    def __init__(self, drives: Drives) -> None:
        self.drives = parse_drives(drives)
        for name, path in self.drives:
            check_image(name, path, writable=True)
        self._images: dict[str, TargetImage] = {}
        #: the last PROGRESS percentage received
        self.progress: Optional[int] = None
        #: chunks written as data / as zeros, bytes written into images
        self.data_chunks = 0
        self.zero_chunks = 0
        self.bytes_written = 0

    def load_setup(self) -> None:
        if self._images:
            return
        try:
            for name, path in self.drives:
                self._images[name] = TargetImage(name, path)
        except BaseException:
            self.load_cleanup(False)
            raise

    def load_record(self, record: BlockRecord, section: Section) -> None:
        if record.flags & _DEVICE_BLOCK:
            if not self._images:
                self.load_setup()
            image = self._images.get(record.device)
            if image is None:
                raise BlockStreamError(f"Error unknown block device {record.device}",
                                       offset=record.offset, section=section.label,
                                       field="device")
            start = record.sector << BDRV_SECTOR_BITS
            if start >= image.size:
                raise BlockStreamError(
                    f"block device {record.device}: sector {record.sector} is past its end "
                    f"({image.size} bytes)", offset=record.offset, section=section.label,
                    field="sector")
            n = min(BLK_MIG_BLOCK_SIZE, image.size - start)
            data = record.data
            if data is None or zeropage.is_zero(data[:n]):
                image.write_zeros(start, n)
                self.zero_chunks += 1
            else:
                image.write(start, data[:n])
                self.data_chunks += 1
            self.bytes_written += n
        elif record.flags & _PROGRESS:
            self.progress = record.sector

    def load_cleanup(self, ok: bool) -> None:
        images, self._images = self._images, {}
        for image in images.values():
            image.close()
