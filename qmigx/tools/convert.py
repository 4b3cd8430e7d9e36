"""Rewriting streams: RAM encodings, and the conventions of another QEMU version.

:func:`convert_stream` re-encodes a stream's RAM records (every page
whole, zero pages as ZERO records, XBZRLE deltas, zlib pages) and, with
``target``, rewrites the stream so that QEMU 7.2 or QEMU 10.0 loads it,
for the machine types both know (qemu10.md §9). No QEMU does this: a
QEMU 10 destination cannot load a 7.2 stream with compressed pages, and
a QEMU 7.2 destination stops at QEMU 10's SWITCHOVER_START command.

What ``target`` changes (everything else is copied as it is):

============================  =============================  =============================
record                        for 10.0                       for 7.2
============================  =============================  =============================
machine type                  any 7.2 knows is in 10.0       newer than 7.2: refused
COMPRESS_PAGE (0x100)         the page, as PAGE or ZERO      kept
ZERO with a fill byte != 0    the filled page, as PAGE       kept
SWITCHOVER_START (cmd 11)     kept                           dropped
MULTIFD_FLUSH (0x200)         kept                           dropped
mapped-ram setup + page area  a plain setup record and the stored pages as records
vmdesc ``configuration``      kept                           dropped
============================  =============================  =============================

Device sections are the same for the machine types both versions have
(qemu10.md §3.4), so they are copied byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from qmigx.compat import QEMU_VERSIONS, check_machine_known
from qmigx.errors import IncompatibleStreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamLoader, RamWriter, compress_page
from qmigx.stream import (
    Command,
    ConfigSubsection,
    Configuration,
    EndOfState,
    RamEOS,
    RamMappedBlock,
    RamMappedPages,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    SectionData,
    SectionEnd,
    SectionRecord,
    SectionStart,
    StreamHeader,
    StreamWriter,
    VMDescription,
)
from qmigx.stream.reader import Source, StreamReader
from qmigx.tools.packaged import rewrite_package
from qmigx.wire import TARGET_PAGE_SIZE, MigCmd, SectionType

__all__ = ["RAM_ENCODINGS", "convert_stream"]

RAM_ENCODINGS = ("keep", "page", "zero", "xbzrle", "compress")

# the record kinds of the RAM scanner (qmigx.reference.ramparse)
_ZERO, _PAGE, _XBZRLE, _COMPRESS = range(4)


def convert_stream(source: Source, sink: Callable, encoding: str = "keep", *,
                   compress_level: int = 1, progress=None, target: Optional[str] = None) -> None:
    """Re-encode a stream's RAM records; with ``target``, rewrite it for that QEMU.

    ``encoding`` is one of :data:`RAM_ENCODINGS`. With ``keep`` and no
    ``target`` the output is byte-identical to the input. Otherwise the RAM
    records are re-made, in the same order and sections, from the page
    contents the input gives at that point: ``keep`` keeps each record's
    kind (and its XBZRLE delta or zlib data) unless ``target`` cannot load
    it, ``page`` sends every page in full, ``zero`` sends all-zero pages as
    ZERO records (QEMU's default), ``xbzrle`` also sends a page the output
    already carried as an XBZRLE delta against that earlier copy when the
    delta is smaller, ``compress`` sends non-zero pages zlib-compressed.

    ``target`` (``"7.2"`` or ``"10.0"``): see the module docstring.

    Raises:
        IncompatibleStreamError: the stream cannot be made to load into
            ``target`` (its machine type; compressed pages for 10.0).
    """
    if encoding not in RAM_ENCODINGS:
        raise ValueError(f"unknown RAM encoding {encoding!r}; choose from {RAM_ENCODINGS}")
    if target is not None and target not in QEMU_VERSIONS:
        raise ValueError(f"target must be one of {QEMU_VERSIONS}, not {target!r}")
    if target == "10.0" and encoding == "compress":
        raise IncompatibleStreamError("QEMU 10 cannot load compressed pages (it has no "
                                      "compress capability)", field="encoding")
    if encoding == "keep" and target is None:
        _copy(source, sink)
        return
    _Converter(sink, encoding, compress_level, target).run(StreamReader(source,
                                                                        progress=progress))


class _Converter:
    def __init__(self, sink: Callable, encoding: str, level: int, target: Optional[str]) -> None:
        self.f = QEMUFile(sink)
        self.w = StreamWriter(self.f)
        self.ram = RamWriter(self.f)
        self.loader = RamLoader(None)
        self.encoding = encoding
        self.level = level
        self.target = target
        self.sent: dict[str, np.ndarray] = {}  # per block: pages already in the output
        self.delta = np.empty(TARGET_PAGE_SIZE, np.uint8)
        self.old = np.empty(TARGET_PAGE_SIZE, np.uint8)
        self.mapped = False

    def run(self, reader: StreamReader) -> None:
        from qmigx import xbzrle, zeropage

        self._xbzrle, self._zeropage = xbzrle, zeropage
        w, f, ram = self.w, self.f, self.ram
        for ev in reader.events():
            t = type(ev)
            if t is RamPages:
                self._batch(ev)
            elif t is RamMappedPages:
                self.loader.on_mapped_pages(ev)
            elif t is RamMappedBlock:
                self.loader.on_mapped_block(ev)
            elif t is RamSetup:
                self._setup(ev, reader.parser.ignore_shared)
            elif t is RamEOS:
                ram.eos()
            elif t is RamMultifdFlush:
                if self.target != "7.2":
                    ram.multifd_flush()
            elif t is SectionStart:
                w.section_header(ev.type, ev.section)
            elif t is SectionData:
                f.write(ev.payload)
            elif t is SectionRecord:
                f.write(ev.raw)
            elif t is SectionEnd:
                if ev.footer:
                    f.put_u8(SectionType.SECTION_FOOTER)
                    f.put_be32(ev.section.section_id)
            elif t is StreamHeader:
                w.header()
            elif t is Configuration:
                self._configuration(ev)
            elif t is Command:
                if not (ev.cmd == MigCmd.SWITCHOVER_START and self.target == "7.2"):
                    packaged = None
                    if ev.packaged is not None:  # decoded and written again, record by record
                        packaged = rewrite_package(ev, reader.vmdesc)
                    w.command(ev.cmd, ev.payload, packaged)
            elif t is EndOfState:
                w.eof()
            elif t is VMDescription:
                w.vmdesc(self._vmdesc(ev.json))
        f.flush()
        f.check()

    # -- configuration and vmdesc -----------------------------------------------------
    def _configuration(self, ev: Configuration) -> None:
        if self.target is not None:
            check_machine_known(ev.machine_type, self.target, offset=ev.offset)
        caps = ev.capabilities
        self.mapped = "mapped-ram" in caps
        if not self.mapped:
            self.w.raw_configuration(ev.raw)
            return
        # the output carries the pages as records: it is no mapped-ram stream
        subs = []
        for sub in ev.subsections:
            if sub.name == "configuration/capabilities":
                rest = [c.encode() for c in caps if c != "mapped-ram"]
                if not rest:
                    continue
                data = len(rest).to_bytes(4, "big") + b"".join(bytes((len(c),)) + c
                                                                for c in rest)
                sub = ConfigSubsection(sub.name, sub.version, data)
            subs.append(sub)
        self.w.configuration(ev.machine_type, subs)

    def _vmdesc(self, text: bytes) -> bytes:
        """7.2's vmdesc has no ``configuration`` entry; drop 10.0's (and its mapped-ram note)."""
        if self.target != "7.2" and not self.mapped:
            return text
        try:
            desc = json.loads(text)
        except ValueError:
            return text
        if not isinstance(desc, dict) or "configuration" not in desc:
            return text
        if self.target == "7.2":
            desc.pop("configuration")
        else:
            cfg = desc["configuration"]
            cfg["subsections"] = [s for s in cfg.get("subsections", ())
                                  if s.get("vmsd_name") != "configuration/capabilities"]
            if not cfg["subsections"]:
                cfg.pop("subsections")
        return json.dumps(desc).encode()

    # -- RAM -------------------------------------------------------------------------
    def _setup(self, ev: RamSetup, ignore_shared: bool) -> None:
        from qmigx.stream import RamBlockInfo

        self.loader.on_setup(ev)
        plain = [RamBlockInfo(b.idstr, b.used_length, b.page_size, b.gpa) for b in ev.blocks]
        self.ram.setup(plain, ignore_shared=ignore_shared)
        for b in ev.blocks:
            self.sent[b.idstr] = np.zeros(b.used_length // TARGET_PAGE_SIZE, bool)
        if self.mapped:
            self._mapped_pages()

    def _mapped_pages(self) -> None:
        """The stored pages of a mapped-ram file, as records right after the setup record."""
        ps = TARGET_PAGE_SIZE
        for blk, bits, _ in self.loader._mapped.values():
            for p in np.flatnonzero(bits):
                off = int(p) * ps
                self._emit(blk.idstr, off, blk.buffer[off : off + ps], _PAGE, None)
                self.sent[blk.idstr][p] = True

    def _batch(self, ev: RamPages) -> None:
        """Re-encode one batch, record by record, from the content each leaves."""
        rec = ev.records
        ps = TARGET_PAGE_SIZE
        loader = self.loader
        for i in range(rec.count):
            blk = loader.block_of(ev, i)
            off = int(rec.offset[i])
            page = blk.buffer[off : off + ps]
            name = blk.idstr
            was_sent = self.sent[name][off // ps]
            if self.encoding == "xbzrle" and was_sent:
                self.old[:] = page
            kind = int(rec.kind[i])
            body = None
            if self.encoding == "keep":
                pos, length = int(rec.pos[i]), int(rec.length[i])
                body = bytes(ev.data[pos : pos + length]) if kind in (_XBZRLE, _COMPRESS) \
                    else int(rec.fill[i])
            loader.apply_range(ev, i, i + 1)
            self._emit(name, off, page, kind, body, was_sent)
            self.sent[name][off // ps] = True

    def _emit(self, name: str, off: int, page, kind: int, body, was_sent: bool = False) -> None:
        ram = self.ram
        enc = self.encoding
        if enc == "keep":
            if kind == _ZERO and (body == 0 or self.target != "10.0"):
                ram.zero(name, off, body or 0)
            elif kind == _XBZRLE:
                ram.xbzrle(name, off, body)
            elif kind == _COMPRESS and self.target != "10.0":
                ram.compressed(name, off, body)
            elif self._zeropage.is_zero(page):
                ram.zero(name, off)
            else:  # a PAGE, or what 10.0 cannot load (zlib page, non-zero fill) made whole
                ram.page(name, off, page)
            return
        if enc != "page" and self._zeropage.is_zero(page):
            ram.zero(name, off)
        elif enc == "compress":
            ram.compressed(name, off, compress_page(page, self.level))
        elif enc == "xbzrle" and was_sent:
            dlen = self._xbzrle.encode_buffer(self.old, page, self.delta)
            if dlen > 0:
                ram.xbzrle(name, off, self.delta[:dlen])
            elif dlen < 0:  # the delta would not be smaller: the page goes whole
                ram.page(name, off, page)
            # 0: the destination already holds exactly this page: nothing to send
        else:
            ram.page(name, off, page)


def _copy(source: Source, sink: Callable) -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        sink(source)
        return
    if not isinstance(source, (str, os.PathLike)):  # a file object (a save image's body)
        _copy_from(source, sink)
        return
    with open(source, "rb") as f:
        _copy_from(f, sink)


def _copy_from(f, sink: Callable) -> None:
    while True:
        chunk = f.read(8 << 20)
        if not chunk:
            break
        sink(chunk)
