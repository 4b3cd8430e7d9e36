"""What a stream has established so far, apart from its bytes (QEMU's savevm state).

Section ids map to the sections their START or FULL record introduced;
the RAM setup record fixes the block table; a RAM record without a name
(CONTINUE) means the block of the record before it; the configuration
says whether setup entries carry GPAs (x-ignore-shared) and page sizes
(postcopy with huge pages) and whether blocks are mapped (mapped-ram);
a MULTIFD_FLUSH in the setup section tells how multifd syncs. A COLO checkpoint and a PACKAGED blob carry
no header and rely on all of that, so it lives in a :class:`StreamContext`
that outlives one parser: the next parser of the same channel is given
the same context and goes on where the last one stopped.
"""

from __future__ import annotations

from typing import Any, Optional

from qmigx import _backend
from qmigx.savevm import Section
from qmigx.records import Record, factory
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["StreamContext"]

_ramparse = _backend.load("ramparse")


class StreamContext(Record, mutable=True):
    """Section ids, the RAM block table, the CONTINUE block, the configuration."""

    page_size: int = TARGET_PAGE_SIZE
    sections: dict[int, Section] = factory(dict)
    configuration: Optional[Any] = None
    ignore_shared: bool = False
    postcopy_page_sizes: bool = False
    #: blocks whose setup entry carries a page size (a postcopy destination's huge-page
    #: blocks: the entry has one when the source's block is not of the host's page size)
    huge_page_blocks: frozenset = frozenset()
    ram_blocks: tuple = ()
    block_names: tuple[str, ...] = ()
    #: capability ``mapped-ram`` announced by the configuration section (QEMU 10)
    mapped_ram: bool = False
    #: how the source syncs multifd (qemu10.md §4.4): None until the ram
    #: START section ended, then ``"round"`` (it held a MULTIFD_FLUSH) or
    #: ``"section"`` (7.2's model: a sync before every RAM EOS)
    multifd_sync: Optional[str] = None
    #: MULTIFD_FLUSH records seen so far
    multifd_flushes: int = 0
    #: the compiled RAM record scanner: holds the block table and the CONTINUE block
    scanner: Any = None

    def __post_init__(self) -> None:
        if self.scanner is None:
            self.scanner = _ramparse.RamScanner(self.page_size, [], [])
