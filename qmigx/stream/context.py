"""What a stream has established so far, apart from its bytes (QEMU's savevm state).

Section ids map to the sections their START or FULL record introduced;
the RAM setup record fixes the block table; a RAM record without a name
(CONTINUE) means the block of the record before it; the configuration
says whether setup entries carry GPAs (x-ignore-shared) and page sizes
(postcopy with huge pages). A COLO checkpoint and a PACKAGED blob carry
no header and rely on all of that, so it lives in a :class:`StreamContext`
that outlives one parser: the next parser of the same channel is given
the same context and goes on where the last one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qmigx import _backend
from qmigx.savevm import Section
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["StreamContext"]

_ramparse = _backend.load("ramparse")


@dataclass
class StreamContext:
    """Section ids, the RAM block table, the CONTINUE block, the configuration."""

    page_size: int = TARGET_PAGE_SIZE
    sections: dict[int, Section] = field(default_factory=dict)
    configuration: Optional[Any] = None
    ignore_shared: bool = False
    postcopy_page_sizes: bool = False
    ram_blocks: tuple = ()
    block_names: tuple[str, ...] = ()
    #: the compiled RAM record scanner: holds the block table and the CONTINUE block
    scanner: Any = None

    def __post_init__(self) -> None:
        if self.scanner is None:
            self.scanner = _ramparse.RamScanner(self.page_size, [], [])
