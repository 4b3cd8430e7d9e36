"""The migration stream parser (QEMU's savevm.c, input side), sans-IO.

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

from __future__ import annotations

import json
import struct
from typing import Any, Callable, Iterator, Optional

from qmigx import _backend
from qmigx.errors import (
    BadHeaderError,
    RamStreamError,
    StreamError,
    TruncatedStreamError,
    UnknownSectionError,
    printable_name,
)
from qmigx.qemufile import Cursor, NeedData
from qmigx.savevm import SaveVMRegistry, Section
from qmigx.stream.buffer import ReceiveBuffer
from qmigx.stream.context import StreamContext
from qmigx.stream.mapped_ram import MappedSetupReader
from qmigx.stream.events import (
    Command,
    ConfigSubsection,
    Configuration,
    EndOfState,
    EndOfStream,
    Event,
    RamBlockInfo,
    RamEOS,
    RamMultifdFlush,
    RamPages,
    RamSetup,
    SectionData,
    SectionEnd,
    SectionRecord,
    SectionStart,
    StreamHeader,
    VMDescription,
)
from qmigx.wire import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    TARGET_PAGE_SIZE,
    MigCmd,
    SectionType,
)

__all__ = ["StreamParser", "default_registry", "find_vmdesc", "parse_vmdesc"]

_ramparse = _backend.load("ramparse")

# -- helpers ---------------------------------------------------------------

#: Fixed payload lengths of commands (None: variable, checked separately).
_CMD_LEN = {
    MigCmd.OPEN_RETURN_PATH: 0,
    MigCmd.PING: 4,
    MigCmd.POSTCOPY_LISTEN: 0,
    MigCmd.POSTCOPY_RUN: 0,
    MigCmd.PACKAGED: 4,
    MigCmd.ENABLE_COLO: 0,
    MigCmd.POSTCOPY_RESUME: 0,
    MigCmd.SWITCHOVER_START: 0,
}



class _LazyHandler:
    """A built-in handler made on first use.

    ``block`` and ``dirty-bitmap`` need numpy, whose import costs more
    than reading the device state of a whole stream without them
    (``qmigx analyze``): streams that carry neither never import it.
    Reads and writes of attributes go to the handler.
    """

    def __init__(self, idstr: str, module: str, cls: str) -> None:
        object.__setattr__(self, "idstr", idstr)
        object.__setattr__(self, "instance_id", 0)
        object.__setattr__(self, "_where", (module, cls))
        object.__setattr__(self, "_handler", None)

    def _made(self):
        h = object.__getattribute__(self, "_handler")
        if h is None:
            import importlib

            module, cls = object.__getattribute__(self, "_where")
            h = getattr(importlib.import_module(module), cls)()
            object.__setattr__(self, "_handler", h)
        return h

    def __getattr__(self, name: str):
        return getattr(self._made(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._made(), name, value)


def default_registry() -> SaveVMRegistry:
    """The grammars every reader knows without being told: ``block`` and ``dirty-bitmap``."""
    return SaveVMRegistry([_LazyHandler("block", "qmigx.block", "BlockHandler"),
                           _LazyHandler("dirty-bitmap", "qmigx.block_dirty_bitmap",
                                        "DirtyBitmapHandler")])


def find_vmdesc(buf) -> Optional[tuple[int, bytes]]:
    """Locate the vmdesc trailer at the end of a whole stream.

    Returns ``(offset_of_0x06_byte, json_bytes)`` or None. As QEMU's
    analysis script does, it looks for the last NUL byte and the ``{``
    after it, then checks that a ``0x06`` + be32 length precede it and
    that the length reaches exactly the end of the data.
    """
    mv = memoryview(buf).cast("B")
    n = len(mv)
    tail_start = max(0, n - (64 << 20))
    tail = bytes(mv[tail_start:]) if n - tail_start <= (64 << 20) else b""
    nul = tail.rfind(b"\0")
    while nul >= 0:
        brace = tail.find(b"{", nul)
        if brace < 0:
            return None
        hdr = brace - 5
        if hdr >= 0 and tail[hdr] == SectionType.VMDESCRIPTION:
            length = struct.unpack_from(">I", tail, hdr + 1)[0]
            if brace + length == len(tail):
                return tail_start + hdr, tail[brace:]
        nul = tail.rfind(b"\0", 0, nul)
    return None


def parse_vmdesc(text: bytes, *, ordered: bool = False) -> dict:
    """Parse vmdesc JSON into a dict; duplicate keys keep the last value."""
    try:
        if ordered:
            import collections

            return json.loads(text, object_pairs_hook=collections.OrderedDict)
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StreamError(f"vmdesc is not valid JSON: {exc}", field="vmdesc") from None


def _plausible_record_start(mv, pos: int, end: int, known_ids: set[int],
                            eof: bool = False) -> Optional[bool]:
    """Could a top-level record start at ``pos``? None: need more bytes."""
    if pos >= end:
        return None
    t = mv[pos]
    if t == SectionType.EOF:
        # EOF is followed by the vmdesc (0x06, be32 length, "{") or by nothing
        if eof and pos + 1 == end:
            return True
        if end - pos < 7:
            return None
        return mv[pos + 1] == SectionType.VMDESCRIPTION and mv[pos + 6] == 0x7B
    if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        if end - pos < 6:
            return None
        n = mv[pos + 5]
        if n == 0:
            return False
        if end - pos < 6 + n + 8:
            return None
        name = bytes(mv[pos + 6 : pos + 6 + n])
        sid, inst, ver = struct.unpack_from(">III", mv, pos + 1)[0], *struct.unpack_from(
            ">II", mv, pos + 6 + n)
        return (all(32 <= c < 127 for c in name) and sid not in known_ids
                and inst < 1 << 16 and ver < 1 << 16)
    if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
        if end - pos < 5:
            return None
        return struct.unpack_from(">I", mv, pos + 1)[0] in known_ids
    if t == SectionType.COMMAND:
        if end - pos < 3:
            return None
        return 0 < struct.unpack_from(">H", mv, pos + 1)[0] <= max(MigCmd)
    return False


# -- the parser ---------------------------------------------------------------

_S_HEADER, _S_TOP, _S_RAM, _S_FOOTER, _S_AFTER_EOF, _S_END, _S_DONE, _S_LIVE, _S_MAPPED = range(9)


class StreamParser:
    """Sans-IO parser of a migration stream.

    Args:
        vmdesc: the stream's parsed vmdesc (from :func:`find_vmdesc`), used to
            delimit device sections; optional.
        registry: the section handlers (:class:`~qmigx.savevm.SaveVMRegistry`):
            live handlers delimit their sections record by record, VMState
            handlers load device payloads; default: :func:`default_registry`.
        page_size: the target page size.
        header: whether the input starts with the file header (COLO
            checkpoints and PACKAGED blobs do not). Without it the input
            may also end at any record boundary, as a package does.
        batch: capacity of a RAM record batch.
        context: the stream state to continue (section ids, RAM block
            table, the CONTINUE block): a COLO checkpoint or a PACKAGED
            blob goes on where the stream before it left off.
        buffer: the channel's :class:`ReceiveBuffer`, shared with other
            readers of the same channel.
        stop_at_eof: end at the EOF record (the vmdesc, if any, and
            whatever follows stay in the buffer for the next reader).
        package: the input may end cleanly at any record boundary (default:
            without a header, as a PACKAGED command's blob does).
    """

    def __init__(
        self,
        *,
        vmdesc: Optional[dict] = None,
        registry: Optional[SaveVMRegistry] = None,
        page_size: int = TARGET_PAGE_SIZE,
        header: bool = True,
        batch: int = 65536,
        context: Optional[StreamContext] = None,
        buffer: Optional[ReceiveBuffer] = None,
        stop_at_eof: bool = False,
        package: Optional[bool] = None,
    ) -> None:
        self.registry = registry if registry is not None else default_registry()
        self._live = None
        self._vmdesc_index: dict[tuple[str, int], dict] = {}
        if vmdesc is not None:
            for dev in vmdesc.get("devices", ()):
                self._vmdesc_index[(dev.get("name"), dev.get("instance_id"))] = dev
        self.rx = buffer if buffer is not None else ReceiveBuffer()
        self.ctx = context if context is not None else StreamContext(page_size)
        self._state = _S_HEADER if header else _S_TOP
        # a package may end at any record boundary; a stream resumed after
        # postcopy recovery (no header either) only at its EOF
        self._package = not header if package is None else package
        self._stop_at_eof = stop_at_eof
        self._cur_type: Optional[SectionType] = None
        self._cur: Optional[Section] = None
        self._records = _ramparse.RamRecords(batch)
        self._mapped: Optional[MappedSetupReader] = None

    # -- the stream context, as attributes ------------------------------------
    @property
    def configuration(self) -> Optional[Configuration]:
        return self.ctx.configuration

    @property
    def ignore_shared(self) -> bool:
        return self.ctx.ignore_shared

    @property
    def postcopy_page_sizes(self) -> bool:
        return self.ctx.postcopy_page_sizes

    @property
    def ram_blocks(self) -> tuple[RamBlockInfo, ...]:
        return self.ctx.ram_blocks

    @property
    def page_size(self) -> int:
        return self.ctx.page_size

    # -- input --------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Absolute offset of the next unparsed byte."""
        return self.rx.offset

    def feed(self, data) -> None:
        """Add input. With no unparsed bytes pending, ``data`` is not copied."""
        self.rx.feed(data)

    def fill(self, readinto: Callable[[memoryview], Optional[int]], size: int = 8 << 20) -> int:
        """Read more input straight into the receive buffer (see :meth:`ReceiveBuffer.fill`)."""
        return self.rx.fill(readinto, size)

    def set_window(self, view, base: int, *, last: bool = False) -> None:
        """Parse from ``view``, whose first byte is at absolute offset ``base``.

        For input that is already in memory (successive ``mmap`` windows of a
        file): nothing is copied. The window must hold every byte not yet
        parsed: ``base <= offset <= base + len(view)``. ``last`` declares
        that the input ends with this window.
        """
        self.rx.set_window(view, base, last=last)

    def next_part(self) -> None:
        """Go on with another headerless part of the same input, ended by its own EOF.

        A COLO secondary parses each checkpoint's RAM part with one parser
        (``header=False, stop_at_eof=True``): building a new one per
        checkpoint would cost more than an idle checkpoint may take.
        """
        if self._state != _S_DONE or not self._stop_at_eof:
            raise StreamError("next_part: the parser has not stopped at an EOF",
                              offset=self.offset)
        self._state = _S_TOP

    @property
    def in_ram_records(self) -> bool:
        """Whether the next input is a ``ram`` section's records (what a direct reader may take)."""
        return self._state == _S_RAM and self._mapped is None

    def feed_eof(self) -> None:
        """Declare the input complete."""
        self.rx.eof = True

    # -- output -------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        """Yield every event the buffered input allows; stop when more is needed.

        Raises a :class:`~qmigx.errors.StreamError` subclass on bad input,
        :class:`~qmigx.errors.TruncatedStreamError` if the input ended
        (``feed_eof``) inside a record.
        """
        while self._state != _S_DONE:
            if (self._package and self.rx.eof and self._state == _S_TOP
                    and self.rx.pos == len(self.rx.view)):
                self._state = _S_DONE
                yield EndOfStream(self.offset)
                return
            start = self.rx.pos
            cur = Cursor(self.rx.view, self.rx.pos, base=self.rx.base)
            try:
                evs = self._step(cur)
            except NeedData as nd:
                self.rx.pos = start
                if self.rx.eof:
                    raise self._truncated(nd) from None
                return
            for ev in evs:
                yield ev
        if self.rx.pos < len(self.rx.view) and not self._stop_at_eof:
            raise StreamError(
                f"{len(self.rx.view) - self.rx.pos} unexpected bytes after the end of the stream",
                offset=self.offset)

    def _truncated(self, nd: NeedData) -> TruncatedStreamError:
        where = (self._cur.label if self._cur is not None
                 and self._state in (_S_RAM, _S_FOOTER, _S_LIVE, _S_MAPPED) else None)
        return TruncatedStreamError(
            "unexpected end of stream", offset=self.rx.base + self.rx.pos, section=where)

    def _step(self, cur: Cursor) -> list:
        st = self._state
        if st == _S_HEADER:
            return self._read_header(cur)
        if st == _S_RAM:
            return self._read_ram(cur)
        if st == _S_LIVE:
            return self._read_live(cur)
        if st == _S_MAPPED:
            return self._read_mapped(cur)
        if st == _S_FOOTER:
            return self._read_footer(cur)
        if st == _S_AFTER_EOF:
            return self._read_after_eof(cur)
        if st == _S_END:
            return self._read_end(cur)
        return self._read_record(cur)

    def _commit(self, cur: Cursor) -> None:
        self.rx.pos = cur.pos

    def _read_header(self, cur: Cursor) -> list:
        magic = cur.read_be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadHeaderError(
                f"Not a migration stream (magic 0x{magic:08x}, expected 0x{QEMU_VM_FILE_MAGIC:08x})",
                offset=cur.tell() - 4, field="magic")
        version = cur.read_be32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise BadHeaderError("SaveVM v2 format is obsolete and don't work anymore",
                                 offset=cur.tell() - 4, field="version")
        if version != QEMU_VM_FILE_VERSION:
            raise BadHeaderError(f"Unsupported migration stream version {version}",
                                 offset=cur.tell() - 4, field="version")
        self._commit(cur)
        self._state = _S_TOP
        return [StreamHeader(version, self.rx.base)]

    def _read_record(self, cur: Cursor) -> list:
        at = cur.tell()
        t = cur.read_u8()
        if t == SectionType.CONFIGURATION:
            return self._read_configuration(cur, at)
        if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            sid = cur.read_be32()
            idstr = cur.read_str8(what="idstr", allow_empty=False)
            instance = cur.read_be32()
            version = cur.read_be32()
            sec = Section(sid, idstr, instance, version)
            stype = SectionType(t)
            return self._begin_payload(cur, stype, sec, at, new=True)
        if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
            sid = cur.read_be32()
            sec = self.ctx.sections.get(sid)
            if sec is None:
                raise UnknownSectionError(f"Unknown savevm section {sid}", offset=at,
                                          field="section_id")
            return self._begin_payload(cur, SectionType(t), sec, at, new=False)
        if t == SectionType.COMMAND:
            return self._read_command(cur, at)
        if t == SectionType.EOF:
            self._commit(cur)
            self._state = _S_DONE if self._stop_at_eof else _S_AFTER_EOF
            return [EndOfState(at)]
        raise UnknownSectionError(f"Unknown savevm section type {t}", offset=at, field="type")

    def _read_configuration(self, cur: Cursor, at: int) -> list:
        n = cur.read_be32()
        if n > 255:
            raise StreamError(f"machine type name of {n} bytes", offset=at + 1,
                              section="configuration", field="len")
        name = bytes(cur.read_bytes(n)).decode("utf-8", "replace")
        subs = []
        while cur.peek_u8() == SectionType.SUBSECTION:
            n = cur.peek_u8(1)
            prefix = b"configuration/"
            if n < len(prefix) + 1:
                break
            # the name is only part of this section if it has its prefix
            head = bytes(Cursor(cur.buf, cur.pos + 2, cur.end).read_bytes(len(prefix)))
            if head != prefix:
                break
            sub_at = cur.tell()
            cur.read_u8()
            sname = cur.read_str8()
            sver = cur.read_be32()
            if sname == "configuration/capabilities":
                body_start = cur.pos
                count = cur.read_be32()
                if count > 64:
                    raise StreamError(f"{count} capabilities", offset=sub_at,
                                      section="configuration", field=sname)
                for _ in range(count):
                    cur.read_str8_bytes()
                data = bytes(cur.buf[body_start : cur.pos])
            elif sname == "configuration/uuid":
                data = bytes(cur.read_bytes(16))
            elif sname == "configuration/target-page-bits":
                data = bytes(cur.read_bytes(4))
            else:
                raise UnknownSectionError(f"unknown configuration subsection '{printable_name(sname)}'",
                                          offset=sub_at, section="configuration", field=sname)
            subs.append(ConfigSubsection(sname, sver & 0xFF, data))
        raw = bytes(cur.buf[at - cur.base + 1 : cur.pos])
        cfg = Configuration(name, tuple(subs), at, raw)
        self.ctx.configuration = cfg
        self.ctx.ignore_shared = "x-ignore-shared" in cfg.capabilities
        self.ctx.mapped_ram = "mapped-ram" in cfg.capabilities
        self._commit(cur)
        return [cfg]

    def _read_command(self, cur: Cursor, at: int) -> list:
        cmd = cur.read_be16()
        length = cur.read_be16()
        if cmd == 0 or cmd > max(MigCmd):
            raise StreamError(f"MIG_CMD 0x{cmd:x} unknown", offset=at, field="command")
        mc = MigCmd(cmd)
        want = _CMD_LEN.get(mc)
        if want is not None and length != want:
            raise StreamError(f"{mc.name} received with bad length {length}", offset=at,
                              field="len")
        if mc == MigCmd.POSTCOPY_ADVISE and length not in (0, 16):
            raise StreamError(f"POSTCOPY_ADVISE received with bad length {length}",
                              offset=at, field="len")
        payload = bytes(cur.read_bytes(length))
        if mc == MigCmd.RECV_BITMAP and (length < 2 or payload[0] + 1 != length):
            raise StreamError("RECV_BITMAP with a bad block name length", offset=at, field="len")
        if mc == MigCmd.POSTCOPY_RAM_DISCARD:
            self._check_discard(payload, at)
        packaged = None
        if mc == MigCmd.PACKAGED:
            plen = struct.unpack(">I", payload)[0]
            packaged = bytes(cur.read_bytes(plen))
        if mc == MigCmd.POSTCOPY_ADVISE and length == 16:
            self.ctx.postcopy_page_sizes = True
        self._commit(cur)
        return [Command(mc, payload, at, packaged)]

    @staticmethod
    def _check_discard(payload: bytes, at: int) -> None:
        if len(payload) < 20:
            raise StreamError("POSTCOPY_RAM_DISCARD too short", offset=at, field="len")
        if payload[0] != 0:
            raise StreamError(f"POSTCOPY_RAM_DISCARD version {payload[0]}", offset=at,
                              field="version")
        n = payload[1]
        if len(payload) < 3 + n or payload[2 + n] != 0:
            raise StreamError("POSTCOPY_RAM_DISCARD block name not terminated", offset=at,
                              field="name")
        if (len(payload) - 3 - n) % 16:
            raise StreamError("POSTCOPY_RAM_DISCARD ranges not a multiple of 16 bytes",
                              offset=at, field="len")

    def _begin_payload(self, cur: Cursor, stype: SectionType, sec: Section, at: int,
                       new: bool) -> list:
        if sec.idstr == "ram":
            if new:
                self.ctx.sections[sec.section_id] = sec
            self._commit(cur)
            self._cur, self._cur_type = sec, stype
            self._state = _S_RAM
            return [SectionStart(stype, sec, at)]
        live = self.registry.live(sec.idstr)
        if live is not None:
            if new:
                self.ctx.sections[sec.section_id] = sec
            self._commit(cur)
            self._cur, self._cur_type, self._live = sec, stype, live
            self._state = _S_LIVE
            return [SectionStart(stype, sec, at)]
        body = cur.pos
        value = self._consume_payload(cur, sec, stype)
        payload = bytes(cur.buf[body : cur.pos])
        if new:
            self.ctx.sections[sec.section_id] = sec
        evs: list = [SectionStart(stype, sec, at),
                     SectionData(stype, sec, payload, body + cur.base, value)]
        evs.append(self._footer(cur, stype, sec))
        self._commit(cur)
        return evs

    def _consume_payload(self, cur: Cursor, sec: Section, stype: SectionType) -> Any:
        """Consume one non-RAM payload; return its decoded value, if any."""
        dev = self.registry.find(sec.idstr, sec.instance_id)
        if dev is not None and not dev.live:
            return dev.load(cur, sec)
        desc = self._vmdesc_index.get((sec.idstr, sec.instance_id))
        if desc is not None:
            from qmigx.vmstate import walk_with_vmdesc

            return walk_with_vmdesc(desc, cur, section=sec.label, eof=self.rx.eof)
        if not self._vmdesc_index and self._vmdesc_arrived(cur):
            return self._consume_payload(cur, sec, stype)
        self._scan_to_footer(cur, sec)
        return None

    def _vmdesc_arrived(self, cur: Cursor) -> bool:
        """Look for the vmdesc at the end of what has arrived; use it if there.

        A live destination sees the device sections before the vmdesc that
        describes them, and QEMU keeps the connection open afterwards (it
        waits for SHUT), so the parser waits for the vmdesc to complete the
        buffered data — a ``0x06`` record whose JSON parses and ends exactly
        at the end of the input — and then delimits every device section by
        it. Only a stream with no vmdesc at all falls back to footers.
        """
        found = find_vmdesc(cur.buf[cur.pos : cur.end])
        if found is not None:
            try:
                desc = parse_vmdesc(found[1])
            except StreamError:
                desc = None
            if desc is not None:
                for dev in desc.get("devices", ()):
                    self._vmdesc_index[(dev.get("name"), dev.get("instance_id"))] = dev
                if self._vmdesc_index:
                    return True
        if not self.rx.eof:
            raise NeedData(cur.base + cur.end)
        return False

    def _scan_to_footer(self, cur: Cursor, sec: Section) -> None:
        """Delimit a payload of unknown layout by the footer that ends it."""
        marker = bytes((SectionType.SECTION_FOOTER,)) + struct.pack(">I", sec.section_id)
        known = set(self.ctx.sections) | {sec.section_id}
        mv = cur.buf
        search = cur.pos
        data = bytes(mv[cur.pos : cur.end])
        while True:
            i = data.find(marker, search - cur.pos)
            if i < 0:
                if self.rx.eof:
                    raise TruncatedStreamError(
                        "the stream ends before this device section does (no description "
                        "for it, and no footer followed by a valid record)",
                        offset=cur.tell(), section=sec.label)
                raise NeedData(cur.base + cur.end)
            pos = cur.pos + i
            ok = _plausible_record_start(mv, pos + 5, cur.end, known, self.rx.eof)
            if ok is None:
                if self.rx.eof:
                    ok = pos + 5 == cur.end
                else:
                    raise NeedData(cur.base + cur.end)
            if ok:
                cur.pos = pos
                return
            search = pos + 1

    def _footer(self, cur: Cursor, stype: SectionType, sec: Section):
        at = cur.tell()
        if cur.remaining() >= 1 and cur.peek_u8() == SectionType.SECTION_FOOTER:
            cur.read_u8()
            fid = cur.read_be32()
            if fid != sec.section_id:
                raise StreamError(
                    f"Mismatched section id in footer for '{printable_name(sec.idstr)}' (read 0x{fid:x} "
                    f"expected 0x{sec.section_id:x})",
                    offset=at, section=sec.label, field="footer")
            return SectionEnd(stype, sec, True, at)
        if cur.remaining() < 1:
            raise NeedData(cur.base + cur.end)
        return SectionEnd(stype, sec, False, at)

    def _read_footer(self, cur: Cursor) -> list:
        assert self._cur is not None and self._cur_type is not None
        ev = self._footer(cur, self._cur_type, self._cur)
        self._commit(cur)
        self._state = _S_TOP
        self._cur = self._cur_type = None
        return [ev]

    def _read_live(self, cur: Cursor) -> list:
        """One record of a live section, by its handler's grammar."""
        sec = self._cur
        assert sec is not None and self._live is not None
        at = cur.tell()
        start = cur.pos
        record, last = self._live.read_record(cur, sec)
        ev = SectionRecord(sec, record, at, bytes(cur.buf[start : cur.pos]))
        self._commit(cur)
        if last:
            self._state = _S_FOOTER
            self._live = None
        return [ev]

    # -- RAM ----------------------------------------------------------------
    def _read_ram(self, cur: Cursor) -> list:
        sec = self._cur
        assert sec is not None
        if sec.version_id != 4:
            raise RamStreamError(f"Unsupported ram section version {sec.version_id}",
                                 offset=cur.tell(), section=sec.label, field="version_id")
        rec = self._records
        rec.clear()
        try:
            pos, status = self.ctx.scanner.scan(self.rx.view, cur.pos, cur.end, rec, cur.base)
        except RamStreamError as exc:
            exc.section = sec.label
            raise
        evs: list = []
        if rec.count:
            if self.ctx.mapped_ram:
                raise RamStreamError(
                    "Unexpected RAM flags: a page record in a mapped-ram stream",
                    offset=cur.base + int(rec.start[0]), section=sec.label, field="flags")
            evs.append(RamPages(sec, rec.copy(), self.rx.view, self.rx.base, self.ctx.block_names))
        cur.pos = pos
        self._commit(cur)
        if status == _ramparse.EOS:
            if self.ctx.multifd_sync is None and self._cur_type == SectionType.SECTION_START:
                # a source syncing per round syncs once in setup (qemu10.md §4.4)
                self.ctx.multifd_sync = "round" if self.ctx.multifd_flushes else "section"
            evs.append(RamEOS(sec, cur.tell() - 8))
            self._state = _S_FOOTER
        elif status == _ramparse.MULTIFD_FLUSH:
            evs.append(self._multifd_flush(cur.tell() - 8, sec))
        elif status == _ramparse.MEM_SIZE:
            if self.ctx.mapped_ram:
                at = cur.tell()
                total = cur.read_be64() & ~(self.ctx.page_size - 1)
                self._mapped = MappedSetupReader(sec, total, at, self.ctx.page_size,
                                                 self.ctx.ignore_shared)
                self._commit(cur)
                self._state = _S_MAPPED
                if not total:
                    return evs + self._read_mapped(cur)
                return evs
            evs.append(self._read_setup(cur, sec))
            self._commit(cur)
        elif status == _ramparse.NEED_DATA and not evs:
            raise NeedData(cur.base + cur.end)
        return evs

    def _multifd_flush(self, at: int, sec: Section) -> RamMultifdFlush:
        """A MULTIFD_FLUSH record, checked against how this stream syncs multifd."""
        if self.ctx.mapped_ram:
            raise RamStreamError("Unexpected RAM flags: MULTIFD_FLUSH in a mapped-ram stream",
                                 offset=at, section=sec.label, field="flags")
        if self.ctx.multifd_sync == "section":
            raise RamStreamError(
                "MULTIFD_FLUSH in a stream whose setup section had none: its source syncs "
                "multifd before every RAM EOS (machine types <= 8.0), never per round",
                offset=at, section=sec.label, field="flags")
        self.ctx.multifd_flushes += 1
        return RamMultifdFlush(sec, at)

    def _read_mapped(self, cur: Cursor) -> list:
        """One piece of a mapped-ram setup record (see :mod:`qmigx.stream.mapped_ram`)."""
        m = self._mapped
        assert m is not None
        evs = m.step(cur, self.rx.eof)
        self._commit(cur)
        if m.done:
            blocks = tuple(m.blocks)
            self.ctx.ram_blocks = blocks
            self.ctx.block_names = tuple(b.idstr for b in blocks)
            self.ctx.scanner.set_blocks([b.idstr.encode() for b in blocks],
                                        [b.used_length for b in blocks])
            self._mapped = None
            self._state = _S_RAM
        return evs

    def _read_setup(self, cur: Cursor, sec: Section) -> RamSetup:
        at = cur.tell()
        hdr = cur.read_be64()
        total = hdr & ~(self.ctx.page_size - 1)
        remaining = total
        blocks = []
        while remaining:
            entry_at = cur.tell()
            name = cur.read_str8(what="RAM block name", allow_empty=False)
            used = cur.read_be64()
            page_size = gpa = None
            if self.ctx.postcopy_page_sizes and self._setup_page_size_hook(name):
                page_size = cur.read_be64()
            if self.ctx.ignore_shared:
                gpa = cur.read_be64()
            if used > remaining:
                raise RamStreamError(
                    f"RAM block '{printable_name(name)}' length 0x{used:x} exceeds the remaining total "
                    f"0x{remaining:x}", offset=entry_at, section=sec.label, field="used_length")
            if used % self.ctx.page_size:
                raise RamStreamError(f"RAM block '{printable_name(name)}' length 0x{used:x} not page "
                                     "aligned", offset=entry_at, section=sec.label, field="used_length")
            remaining -= used
            blocks.append(RamBlockInfo(name, used, page_size, gpa))
            if len(blocks) > 4096:
                raise RamStreamError("more than 4096 RAM blocks", offset=entry_at,
                                     section=sec.label)
        self.ctx.ram_blocks = tuple(blocks)
        self.ctx.block_names = tuple(b.idstr for b in blocks)
        self.ctx.scanner.set_blocks([b.idstr.encode() for b in blocks], [b.used_length for b in blocks])
        return RamSetup(sec, total, self.ctx.ram_blocks, at, bytes(cur.buf[at - cur.base : cur.pos]))

    def _setup_page_size_hook(self, name: str) -> bool:
        """Whether a setup entry carries a page size (hugepage blocks only).

        QEMU's destination decides by its own block's page size; a
        destination tells the context its huge-page blocks. A file reader
        cannot know them, so for it no entry carries one.
        """
        return name in self.ctx.huge_page_blocks

    def _read_after_eof(self, cur: Cursor) -> list:
        if cur.remaining() == 0:
            if not self.rx.eof:
                raise NeedData(cur.base + cur.end)
            self._state = _S_DONE
            return [EndOfStream(cur.tell())]
        at = cur.tell()
        t = cur.read_u8()
        if t != SectionType.VMDESCRIPTION:
            raise StreamError(f"Expected vmdescription section, but got {t}", offset=at,
                              field="type")
        n = cur.read_be32()
        text = bytes(cur.read_bytes(n))
        self._commit(cur)
        self._state = _S_END
        return [VMDescription(text, at)]

    def _read_end(self, cur: Cursor) -> list:
        if cur.remaining():
            raise StreamError(f"{cur.remaining()} unexpected bytes after the vmdesc",
                              offset=cur.tell())
        if not self.rx.eof:
            raise NeedData(cur.base + cur.end)
        self._state = _S_DONE
        return [EndOfStream(cur.tell())]
