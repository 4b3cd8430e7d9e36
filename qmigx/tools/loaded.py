"""A stream read whole, RAM applied to blocks: what ``load_stream`` returns.

Apart from :mod:`qmigx.tools.streams` so that the delta loader, which
``load_stream`` calls for ``base=``, can use it too.
"""

from __future__ import annotations

from typing import Callable, Optional

from qmigx.ram import RAMBlockList, RamLoader
from qmigx.records import Record, factory
from qmigx.stream import (
    Command,
    Configuration,
    EndOfStream,
    RamMappedBlock,
    RamMappedPages,
    RamPages,
    RamSetup,
    SectionData,
    VMDescription,
)
from qmigx.stream.reader import Source, StreamReader

__all__ = ["LoadedStream", "load_plain", "apply_event"]


class LoadedStream(Record, mutable=True):
    """What a stream carried, with RAM loaded into blocks."""

    configuration: Optional[Configuration] = None
    blocks: RAMBlockList = factory(RAMBlockList)
    ram_setup: Optional[RamSetup] = None
    sections: list = factory(list)  # SectionData of non-RAM sections
    commands: list = factory(list)
    vmdesc: Optional[bytes] = None
    size: int = 0
    #: how its source synced multifd: "round" (a MULTIFD_FLUSH in setup), else "section"
    multifd_sync: Optional[str] = None


def load_plain(source: Source, blocks: Optional[RAMBlockList] = None, *,
               factory: Optional[Callable] = None, progress=None,
               create_missing: bool = False, use_mmap: bool = False) -> LoadedStream:
    """Read a whole stream, applying its RAM to ``blocks`` (see :func:`~qmigx.tools.streams.load_stream`).

    ``use_mmap``: a file is read through mmap windows (page data copied out once).
    """
    reader = StreamReader(source, progress=progress, use_mmap=use_mmap)
    loader = RamLoader(blocks, factory=factory, create_missing=create_missing)
    out = LoadedStream(blocks=loader.blocks, vmdesc=reader.vmdesc_text)
    for ev in reader.events():
        apply_event(loader, out, ev)
    out.multifd_sync = reader.parser.ctx.multifd_sync
    return out


def apply_event(loader: RamLoader, out: LoadedStream, ev) -> None:
    """One event of a stream being loaded: RAM to ``loader``, the rest noted in ``out``.

    Shared by :func:`load_plain` and the feed that loads a stream while
    ``qmigx send`` sends it (:mod:`qmigx.tools.feed`), so both load alike.
    """
    t = type(ev)
    if t is RamPages:
        loader.on_pages(ev)
    elif t is RamMappedPages:
        loader.on_mapped_pages(ev)
    elif t is RamMappedBlock:
        loader.on_mapped_block(ev)
    elif t is RamSetup:
        loader.on_setup(ev)
        out.ram_setup = ev
    elif t is SectionData:
        out.sections.append(ev)
    elif t is Configuration:
        out.configuration = ev
    elif t is Command:
        out.commands.append(ev)
    elif t is VMDescription:
        out.vmdesc = ev.json
    elif t is EndOfStream:
        out.size = ev.offset
