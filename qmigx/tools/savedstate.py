"""What a saved state holds besides RAM, found without reading the RAM.

Tools that write RAM somewhere other than a stream (an ELF core, block
files) must know where each page goes before the first page arrives, and
that depends on state that a precopy stream carries *after* its RAM: the
machine's chipset registers (PAM, SMRAM), PCI BARs, and the vCPUs. Reading
the whole stream twice would cost a second pass over every page, so
:func:`saved_state` reads only the two ends of a file:

* the head: file header, configuration section (machine type) and the
  ``ram`` setup record (the RAM block list), a few hundred bytes in;
* the tail: the vmdesc trailer, and the device (FULL) sections that a
  precopy stream writes between the last RAM section and EOF. Their start
  is found by looking, from the end, for the header of the first section
  the vmdesc lists, and it is accepted only if parsing from there yields
  exactly the vmdesc's sections, in its order, up to the EOF record.

Streams where that does not hold (no vmdesc, devices inside a PACKAGED
command, RAM records after the devices) are read once from the start,
headers only (the file is mapped, page data is never touched).
"""

from __future__ import annotations

import io
import os
import struct
from typing import Iterable, Optional

from qmigx.errors import StreamError
from qmigx.records import Record, factory
from qmigx.stream import (
    Command,
    Configuration,
    EndOfState,
    RamSetup,
    SectionData,
    StreamParser,
    find_vmdesc,
    parse_vmdesc,
)
from qmigx.stream.reader import Source, StreamReader
from qmigx.wire import SectionType

__all__ = ["SavedState", "saved_state"]

#: How much of the head to read for the configuration and RAM setup record.
_HEAD = 1 << 20
#: Tail windows tried in turn for the device sections (they are ~0.5 MiB on pc).
_TAILS = (4 << 20, 64 << 20)


class SavedState(Record, mutable=True):
    """A stream's configuration, RAM block list and device sections.

    ``devices`` maps ``(idstr, instance_id)`` to the
    :class:`~qmigx.stream.SectionData` of each device section, in stream
    order; their ``value`` is decoded by the vmdesc when the stream has one.
    """

    configuration: Optional[Configuration] = None
    ram_setup: Optional[RamSetup] = None
    devices: dict = factory(dict)
    vmdesc: Optional[dict] = None

    @property
    def machine_type(self) -> Optional[str]:
        return None if self.configuration is None else self.configuration.machine_type

    def sections(self, idstr: str) -> list:
        """Device sections of one idstr, by instance id."""
        return [d for (name, _), d in sorted(self.devices.items(), key=lambda kv: kv[0][1])
                if name == idstr]

    def vmsd_name(self, idstr: str, instance_id: int) -> Optional[str]:
        """The VMSD name the vmdesc gives a section (None without a vmdesc)."""
        for dev in (self.vmdesc or {}).get("devices", ()):
            if dev.get("name") == idstr and dev.get("instance_id") == instance_id:
                return dev.get("vmsd_name")
        return None


def saved_state(source: Source) -> SavedState:
    """Configuration, RAM setup and device sections of a stream (see the module doc)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            found = _from_ends(f)
        if found is not None:
            return found
    elif isinstance(source, (bytes, bytearray, memoryview)):
        found = _from_ends(io.BytesIO(source))
        if found is not None:
            return found
    elif getattr(source, "seekable", lambda: False)():
        start = source.tell()
        found = _from_ends(source)
        if found is not None:
            return found
        source.seek(start)
    return _full_pass(source)


def _from_ends(f) -> Optional[SavedState]:
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    state = SavedState()
    head = f.read(min(size, _HEAD))
    p = StreamParser()
    p.feed(head)
    try:
        for ev in p.events():
            if type(ev) is Configuration:
                state.configuration = ev
            elif type(ev) is RamSetup:
                state.ram_setup = ev
                break
    except StreamError:
        if len(head) == size:
            raise
    for tail in _TAILS:
        n = min(size, tail)
        f.seek(size - n)
        buf = f.read(n)
        found = find_vmdesc(buf)
        if found is None:
            if n == size:
                return None
            continue
        desc = parse_vmdesc(found[1])
        state.vmdesc = desc
        devices = _tail_devices(buf, found[0], desc)
        if devices is not None:
            state.devices = devices
            return state
        if n == size:
            return None
    return None


def _tail_devices(buf: bytes, vmdesc_at: int, desc: dict) -> Optional[dict]:
    """The device sections ending at the EOF byte just before ``vmdesc_at``."""
    entries = [(d.get("name"), d.get("instance_id")) for d in desc.get("devices", ())]
    eof = vmdesc_at - 1
    if eof < 0 or buf[eof] != SectionType.EOF:
        return None
    if not entries:
        return {}
    first, inst = entries[0]
    if not isinstance(first, str) or not isinstance(inst, int):
        return None
    name = first.encode("utf-8", "surrogateescape")
    if not 0 < len(name) < 256:
        return None
    needle = bytes((len(name),)) + name + struct.pack(">I", inst & 0xFFFFFFFF)
    end = eof
    while True:
        hit = buf.rfind(needle, 0, end)
        if hit < 5:
            return None
        start = hit - 5
        if buf[start] == SectionType.SECTION_FULL:
            devices = _parse_devices(buf, start, eof, desc, entries)
            if devices is not None:
                return devices
        end = hit + len(needle) - 1


def _parse_devices(buf: bytes, start: int, eof: int, desc: dict,
                   entries: list) -> Optional[dict]:
    p = StreamParser(header=False, vmdesc=desc)
    p.feed(memoryview(buf)[start : eof + 1])
    p.feed_eof()
    devices: dict = {}
    order = []
    try:
        for ev in p.events():
            t = type(ev)
            if t is SectionData:
                key = (ev.section.idstr, ev.section.instance_id)
                devices[key] = ev
                order.append(key)
            elif t is EndOfState:
                break
            elif t not in _PLAIN:
                return None
    except StreamError:
        return None
    if order != entries or p.offset != eof + 1 - start:
        return None
    return devices


def _plain_events() -> tuple:
    from qmigx.stream import SectionEnd, SectionStart

    return (SectionStart, SectionEnd)


_PLAIN = _plain_events()


def _full_pass(source: Source) -> SavedState:
    """Read the whole stream, headers only, for what its ends did not give."""
    reader = StreamReader(source, use_mmap=True)
    state = SavedState(vmdesc=reader.vmdesc)
    for ev in reader.events():
        t = type(ev)
        if t is SectionData:
            state.devices[(ev.section.idstr, ev.section.instance_id)] = ev
        elif t is RamSetup:
            if state.ram_setup is None:
                state.ram_setup = ev
        elif t is Configuration:
            state.configuration = ev
        elif t is Command and ev.packaged is not None:
            _packaged_devices(ev.packaged, reader.vmdesc, state.devices)
    return state


def _packaged_devices(blob: bytes, vmdesc: Optional[dict], devices: dict) -> None:
    """Device sections inside a PACKAGED command (postcopy)."""
    sub = StreamParser(header=False, vmdesc=vmdesc)
    sub.feed(blob)
    sub.feed_eof()
    for ev in sub.events():
        if type(ev) is SectionData:
            devices[(ev.section.idstr, ev.section.instance_id)] = ev


def device_values(state: SavedState, keys: Iterable) -> list:
    """The decoded values of some device sections (missing ones skipped)."""
    return [state.devices[k].value for k in keys if k in state.devices]
