"""Wire constants of QEMU's migration stream, by QEMU's names.

Every value here is a fact of the byte format of QEMU 4.1, 7.2 or 10.0
(see the spec tables cited in each class; what 10.0 added says so).
Code elsewhere refers to these names rather than to bare numbers.
"""

from __future__ import annotations

import enum

__all__ = [
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_FILE_VERSION_COMPAT",
    "SectionType",
    "MigCmd",
    "MigRpMsg",
    "COLOMessage",
    "COLOMode",
    "COLOExitReason",
    "FailoverStatus",
    "RamFlag",
    "ENCODING_FLAG_XBZRLE",
    "RAM_VERSION_ID",
    "TARGET_PAGE_SIZE",
    "TARGET_PAGE_BITS",
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "MultifdFlag",
    "MULTIFD_PACKET_SIZE",
    "MULTIFD_INIT_PACKET_SIZE",
    "MULTIFD_RAMBLOCK_NAME_LEN",
    "MAX_DISCARDS_PER_COMMAND",
    "VMSTATE_NULLPTR_MARKER",
    "QTAILQ_ELEM_START",
    "QTAILQ_END",
    "MIGRATION_RESUME_ACK_VALUE",
    "GLOBALSTATE_RUNSTATE_LEN",
    "MAX_RP_MESSAGE_LEN",
    "MAPPED_RAM_HDR_VERSION",
    "MAPPED_RAM_HDR_SIZE",
    "MAPPED_RAM_FILE_OFFSET_ALIGNMENT",
]

#: ``QEVM``: the first four bytes of every stream (stream.md §2).
QEMU_VM_FILE_MAGIC = 0x5145564D
#: The only stream version QEMU 4.1 and 7.2 accept.
QEMU_VM_FILE_VERSION = 0x00000003
#: The obsolete version 2, rejected with its own message.
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002


class SectionType(enum.IntEnum):
    """Top-level record types (stream.md §4)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class MigCmd(enum.IntEnum):
    """``QEMU_VM_COMMAND`` sub-commands (stream.md §7)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    #: QEMU 10.0 (machine types >= 10.0): the source is about to switch over
    SWITCHOVER_START = 11


class MigRpMsg(enum.IntEnum):
    """Return-path message types (stream.md §8)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    #: QEMU 10.0 (capability switchover-ack): the destination agrees to switch over
    SWITCHOVER_ACK = 7


class COLOMessage(enum.IntEnum):
    """COLO's messages (QAPI ``COLOMessage``): each is a bare be32 of its value on the wire.

    The primary sends ``checkpoint-request``, ``vmstate-send`` and
    ``vmstate-size`` (followed by a be64 size and that many bytes of device
    state) on the main channel; the secondary answers the others on the
    return path. A value of 7 or more is invalid.
    """

    CHECKPOINT_READY = 0  #: secondary: the initial migration is loaded, checkpoints may start
    CHECKPOINT_REQUEST = 1  #: primary: a checkpoint begins
    CHECKPOINT_REPLY = 2  #: secondary: stopped, ready to receive it
    VMSTATE_SEND = 3  #: primary: the RAM part follows (END sections, EOF)
    VMSTATE_SIZE = 4  #: primary: be64 size, then the device-state blob
    VMSTATE_RECEIVED = 5  #: secondary: the whole checkpoint arrived
    VMSTATE_LOADED = 6  #: secondary: the checkpoint is applied

    @property
    def qapi_name(self) -> str:
        return self.name.lower().replace("_", "-")


class COLOMode(enum.IntEnum):
    """QAPI ``COLOMode``: which end of COLO this side is."""

    NONE = 0
    PRIMARY = 1
    SECONDARY = 2

    @property
    def qapi_name(self) -> str:
        return self.name.lower()


class COLOExitReason(enum.IntEnum):
    """QAPI ``COLOExitReason``: why COLO ended (``COLO_EXIT``, ``query-colo-status``)."""

    NONE = 0
    REQUEST = 1
    ERROR = 2
    PROCESSING = 3

    @property
    def qapi_name(self) -> str:
        return self.name.lower()


class FailoverStatus(enum.IntEnum):
    """QAPI ``FailoverStatus``: the failover state machine of colo-failover.c."""

    NONE = 0
    REQUIRE = 1
    ACTIVE = 2
    COMPLETED = 3
    RELAUNCH = 4

    @property
    def qapi_name(self) -> str:
        return self.name.lower()


class RamFlag(enum.IntFlag):
    """Low bits of a RAM record header (ram.md §2)."""

    FULL = 0x001  #: obsolete, never sent
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080  #: RDMA only
    COMPRESS_PAGE = 0x100  #: QEMU <= 8.x only (10.0 rejects it)
    #: QEMU 10.0: sync every multifd channel now (per-round multifd sync)
    MULTIFD_FLUSH = 0x200


#: The byte after an XBZRLE record's block name (ram.md §4.3).
ENCODING_FLAG_XBZRLE = 0x01
#: Version of the ``ram`` section; a destination rejects any other.
RAM_VERSION_ID = 4
#: x86 target page (the only target qmigx speaks today).
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS

#: Multifd init and page packets (multifd.md §3-4).
MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1


class MultifdFlag(enum.IntFlag):
    """``flags`` of a multifd packet (multifd.md §4, qemu10.md §4.2)."""

    SYNC = 0x1
    ZLIB = 0x2
    ZSTD = 0x4
    COMPRESSION_MASK = 0xE
    #: QEMU 10.0's wider mask (qpl, uadk, qatzip besides zlib and zstd)
    COMPRESSION_MASK_10 = 0x3E


#: Bytes of page data one multifd packet can carry (512 KiB).
MULTIFD_PACKET_SIZE = 512 * 1024
MULTIFD_INIT_PACKET_SIZE = 64
MULTIFD_RAMBLOCK_NAME_LEN = 256

#: QEMU 7.2 sends at most this many ranges per POSTCOPY_RAM_DISCARD.
MAX_DISCARDS_PER_COMMAND = 12
#: A NULL element of a VMS_ARRAY_OF_POINTER field (vmstate.md §7).
VMSTATE_NULLPTR_MARKER = 0x30
#: Element markers of ``qtailq``/``qlist``/``gtree`` fields.
QTAILQ_ELEM_START = 0x01
QTAILQ_END = 0x00
MIGRATION_RESUME_ACK_VALUE = 1
#: ``globalstate.runstate`` is a fixed 100-byte buffer (other.md §1).
GLOBALSTATE_RUNSTATE_LEN = 100
#: The source reads at most this much of one return-path message.
MAX_RP_MESSAGE_LEN = 512

#: mapped-ram (QEMU 9.0+, qemu10.md §5.2): the per-block header version
#: a destination accepts, its size on the wire, and the alignment QEMU
#: gives each block's page area in the file.
MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HDR_SIZE = 28
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000


class BlockFlag(enum.IntFlag):
    """Flags in the low 9 bits of a ``block`` record header (other.md §2)."""

    DEVICE_BLOCK = 0x01
    EOS = 0x02
    PROGRESS = 0x04
    ZERO_BLOCK = 0x08


#: ``block`` records carry sector numbers shifted left by this many bits.
BDRV_SECTOR_BITS = 9
BDRV_SECTOR_SIZE = 1 << BDRV_SECTOR_BITS
#: One ``block`` chunk: 1 MiB = 2048 sectors.
BLK_MIG_BLOCK_SIZE = 1 << 20
BLK_MIG_SECTORS_PER_BLOCK = BLK_MIG_BLOCK_SIZE >> BDRV_SECTOR_BITS


class DirtyBitmapFlag(enum.IntFlag):
    """Flags of a ``dirty-bitmap`` record header (other.md §3)."""

    EOS = 0x01
    ZEROES = 0x02
    BITMAP_NAME = 0x04
    DEVICE_NAME = 0x08
    START = 0x10
    COMPLETE = 0x20
    BITS = 0x40
    EXTRA_FLAGS = 0x80


class DirtyBitmapStartFlag(enum.IntFlag):
    """The u8 of a ``dirty-bitmap`` START record body."""

    ENABLED = 0x01
    PERSISTENT = 0x02
    AUTOLOAD = 0x04  #: ignored (old "autoload")
    RESERVED = 0xF8


#: Bytes of bitmap per ``dirty-bitmap`` BITS record (QEMU's CHUNK_SIZE): 8192 granules.
DIRTY_BITMAP_CHUNK_SIZE = 1 << 10
#: A BITS buffer is rounded up to this many bytes (four host longs).
DIRTY_BITMAP_BUF_ALIGN = 32
#: A destination refuses ``dirty-bitmap`` BITS payloads larger than this (ten chunks).
DIRTY_BITMAP_MAX_BUFSIZE = 10 * DIRTY_BITMAP_CHUNK_SIZE
