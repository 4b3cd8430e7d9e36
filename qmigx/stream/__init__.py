"""The migration stream format (QEMU's savevm.c), as a sans-IO codec.

:class:`StreamParser` takes bytes (``feed``) and returns events
(``events``); it never reads a file or a socket itself, so the same parser
serves a file, a pipe, a socket and a test. :class:`StreamWriter` is its
mirror: it writes records through a :class:`~qmigx.qemufile.QEMUFile`.

How the parser finds the end of each section payload, since the format
has no record lengths (stream.md §1):

* ``ram``: the RAM record scanner (``qmigx._core.ramparse``) walks page
  records up to EOS, in batches, without the GIL;
* ``block`` and ``dirty-bitmap``: their own record grammars (other.md);
* device (VMState) sections: a description registered with the parser,
  else the stream's own vmdesc entry (vmstate.md §8.1) when the caller
  supplied it (a file has it at its end: :func:`find_vmdesc`), else the
  footer that follows every section in streams of QEMU 2.4 and newer.

Events that refer to parsed bytes (``RamPages``) are views into the
input; with :meth:`StreamParser.fill` that is the parser's own buffer,
reused by the next ``fill``.
"""

from qmigx.stream.buffer import ReceiveBuffer
from qmigx.stream.context import StreamContext
from qmigx.stream.events import (
    Command,
    ConfigSubsection,
    Configuration,
    EndOfState,
    EndOfStream,
    Event,
    MappedRamHeader,
    RamBlockInfo,
    RamMappedBlock,
    RamMappedPages,
    RamMultifdFlush,
    RamEOS,
    RamPages,
    RamSetup,
    Section,
    SectionData,
    SectionEnd,
    SectionRecord,
    SectionStart,
    StreamHeader,
    VMDescription,
)
from qmigx.stream.parser import (
    StreamParser,
    default_registry,
    find_vmdesc,
    parse_vmdesc,
)
from qmigx.stream.reader import Source, StreamReader
from qmigx.stream.writer import StreamWriter

__all__ = [
    "Section",
    "StreamHeader",
    "Configuration",
    "ConfigSubsection",
    "SectionStart",
    "SectionData",
    "RamBlockInfo",
    "RamSetup",
    "RamPages",
    "RamEOS",
    "RamMultifdFlush",
    "MappedRamHeader",
    "RamMappedBlock",
    "RamMappedPages",
    "SectionEnd",
    "Command",
    "EndOfState",
    "VMDescription",
    "EndOfStream",
    "SectionRecord",
    "Event",
    "default_registry",
    "StreamParser",
    "StreamWriter",
    "find_vmdesc",
    "parse_vmdesc",
    "Source",
    "StreamReader",
    "ReceiveBuffer",
    "StreamContext",
]
