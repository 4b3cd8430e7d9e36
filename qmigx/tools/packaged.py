"""The records inside postcopy's PACKAGED command, parsed and written again.

A package is a nested stream without header that carries the device state
(QEMU's ``qemu_savevm_send_packaged``); ``verify`` counts what it holds and
``convert`` writes it back record by record, so both need to open it.
"""

from __future__ import annotations

from typing import Optional

from qmigx.errors import StreamError
from qmigx.qemufile import QEMUFile
from qmigx.stream import (
    Command,
    EndOfState,
    SectionData,
    SectionEnd,
    SectionStart,
    StreamParser,
    StreamWriter,
)


def packaged_events(ev: Command, vmdesc: Optional[dict]) -> list:
    """The records inside a PACKAGED command, parsed; errors name file offsets.

    A package is a nested stream without header: device sections (each
    delimited by the vmdesc when the stream has one, by its footer
    otherwise) and commands (LISTEN, PING, RUN).
    """
    sub = StreamParser(header=False, vmdesc=vmdesc)
    sub.feed(ev.packaged)
    sub.feed_eof()
    base = ev.offset + 1 + 2 + 2 + 4  # type, command, length, package length
    try:
        return list(sub.events())
    except StreamError as exc:
        if exc.offset is not None:
            exc.offset += base
        exc.message = f"{exc.message} (inside the PACKAGED command at 0x{ev.offset:x})"
        exc.args = (exc.message,)
        raise


def rewrite_package(ev: Command, vmdesc: Optional[dict]) -> bytes:
    """A package written again from its parsed records (the same bytes)."""
    out = bytearray()
    f = QEMUFile(out.extend)
    w = StreamWriter(f)
    for inner in packaged_events(ev, vmdesc):
        t = type(inner)
        if t is SectionStart:
            w.section_header(inner.type, inner.section)
        elif t is SectionData:
            f.write(inner.payload)
        elif t is SectionEnd:
            if inner.footer:
                w.footer(inner.section)
        elif t is Command:
            w.command(inner.cmd, inner.payload, inner.packaged)
        elif t is EndOfState:
            w.eof()
    f.flush()
    return bytes(out)
