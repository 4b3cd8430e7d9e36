"""The migration stream format (QEMU's savevm.c), as a sans-IO codec.

* :mod:`.parser`: :class:`StreamParser`, bytes in, events out (how it
  delimits each kind of section is in its docstring);
* :mod:`.events`: the events, one dataclass per record kind;
* :mod:`.writer`: :class:`StreamWriter`, records out through a
  :class:`~qmigx.qemufile.QEMUFile`;
* :mod:`.reader`: :class:`StreamReader`, a whole stream from a path,
  bytes or a file (mmap windows or chunked reads into the parser);
* :mod:`.buffer`, :mod:`.context`: the receive buffer a channel's readers
  share and the stream state that outlives one parser.

Nothing here reads a socket: the same code serves a file, a pipe, a
socket and a test.
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
