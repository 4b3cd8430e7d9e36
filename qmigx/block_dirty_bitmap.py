"""Dirty-bitmap migration: the ``dirty-bitmap`` live section
(QEMU's migration/block-dirty-bitmap.c).

Three pieces, one per role:

* the record grammar, :class:`DirtyBitmapHandler` ``read_record``: a
  flags byte, the node and bitmap aliases when they change, then a START,
  COMPLETE or BITS body; EOS ends a payload. Names carry over from record
  to record, so the grammar keeps in each record only what it read, never
  state in the handler: the parser may read a record twice.
* :class:`DirtyBitmapSource` writes the section as QEMU 7.2's source
  does, byte for byte: START records in setup, bare EOS in every PART of
  a precopy migration, and at completion every 1 KiB chunk (all-clear
  ones as ZEROES records) then COMPLETE per bitmap.
* :class:`DirtyBitmapDestination` applies records as QEMU's loader does,
  including its two kinds of failure: errors that end the migration
  (raised as :class:`~qmigx.errors.DirtyBitmapError`), and errors after
  which QEMU *cancels* the bitmap migration but keeps loading the stream
  (the bitmaps are dropped, the reason is logged, and the migration
  succeeds). Where QEMU would abort on an assertion (a granularity that is
  not a power of two, a range outside the bitmap or not on a 64-granule
  boundary), qmigx ends the migration with a typed error and writes
  nothing.

Aliases: without ``block-bitmap-mapping`` a node travels under its own
name and a bitmap under its name; with it, only mapped nodes and bitmaps
are sent, under their aliases, and a destination accepts only aliases its
mapping knows (``construct_alias_map`` in QEMU; the transform may
override persistence on either side).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, NamedTuple, Optional

import numpy as np

from qmigx.block_bitmaps import (
    BlockDirtyBitmap,
    DirtyBitmapSet,
    align_bufsize,
    serialization_words,
    wire_name,
)
from qmigx.errors import BitmapError, DirtyBitmapError
from qmigx.qemufile import Cursor, QEMUFile
from qmigx.savevm import SaveVMHandler, Section
from qmigx.wire import (
    BDRV_SECTOR_SIZE,
    DIRTY_BITMAP_MAX_BUFSIZE,
    DirtyBitmapFlag,
)
from qmigx.wire import (
    DirtyBitmapStartFlag as SF,
)

__all__ = [
    "DirtyBitmapRecord",
    "DirtyBitmapHandler",
    "DirtyBitmapSource",
    "DirtyBitmapDestination",
    "AliasMap",
    "construct_alias_map",
]

_ALIAS_MAX = 255
_START = struct.Struct(">IB")  #: granularity, bitmap flags
_BITS_RANGE = struct.Struct(">QI")  #: first sector, sectors
_BITS_DATA = struct.Struct(">QIQ")  #: first sector, sectors, buffer size
#: the record flags as plain ints: IntFlag arithmetic costs microseconds per record
F = SimpleNamespace(**{flag.name: int(flag) for flag in DirtyBitmapFlag})
_U64 = np.dtype("<u8")


class DirtyBitmapRecord(NamedTuple):
    """One ``dirty-bitmap`` record, as read (names only when present).

    A tuple rather than a dataclass: a bitmap of a large disk is thousands
    of records, and a tuple is several times cheaper to make.
    """

    flags: int
    node: Optional[str] = None
    bitmap: Optional[str] = None
    granularity: Optional[int] = None  #: START
    bitmap_flags: Optional[int] = None  #: START
    first_sector: Optional[int] = None  #: BITS
    nr_sectors: Optional[int] = None  #: BITS
    bits: Optional[bytes] = None  #: BITS without ZEROES
    offset: Optional[int] = None  #: stream offset of the flags byte

    @property
    def is_eos(self) -> bool:
        return bool(self.flags & F.EOS)

    @property
    def kind(self) -> str:
        """What the loader does with it: QEMU tests START, then COMPLETE, then BITS."""
        for flag, name in ((F.START, "start"), (F.COMPLETE, "complete"), (F.BITS, "bits")):
            if self.flags & flag:
                return name
        return "eos" if self.flags & F.EOS else "none"


# -- aliases -------------------------------------------------------------------------------------


class AliasMap(NamedTuple):
    """One direction of ``block-bitmap-mapping``: node key -> (node target, bitmaps by key).

    Outgoing maps are keyed by names and give aliases; incoming maps the
    reverse. Each bitmap entry is the mapping's own dict (``name``,
    ``alias``, optional ``transform``).
    """

    nodes: dict[str, tuple[str, dict[str, dict]]]


def construct_alias_map(mapping: list[dict], name_to_alias: bool) -> AliasMap:
    """The lookup table QEMU builds from a (validated) ``block-bitmap-mapping``."""
    nodes: dict[str, tuple[str, dict[str, dict]]] = {}
    for node in mapping:
        key, target = ((node["node-name"], node["alias"]) if name_to_alias
                       else (node["alias"], node["node-name"]))
        bitmaps = {(bm["name"] if name_to_alias else bm["alias"]): bm for bm in node["bitmaps"]}
        nodes[key] = (target, bitmaps)
    return AliasMap(nodes)


def _mapping(parameters: Any, mapping: Any) -> Optional[list[dict]]:
    """The mapping in force: an explicit one (checked as QEMU checks it) or the parameter."""
    if mapping is not None:
        from qmigx.control import Parameters

        checked = Parameters()
        checked.set({"block-bitmap-mapping": mapping})
        return checked.get("block-bitmap-mapping")
    if parameters is not None:
        return parameters.get("block-bitmap-mapping")
    return None


def _persistent(entry: Optional[dict], default: bool) -> bool:
    transform = (entry or {}).get("transform") or {}
    return bool(transform["persistent"]) if "persistent" in transform else default


# -- the grammar ---------------------------------------------------------------------------------


class DirtyBitmapHandler(SaveVMHandler):
    """The ``dirty-bitmap`` section's record grammar (what every reader needs)."""

    idstr = "dirty-bitmap"
    version_id = 1
    section_id = 3

    def read_record(self, cur: Cursor, section: Section) -> tuple[Any, bool]:
        at = cur.tell()
        flags = cur.read_u8()

        def bad(message: str, field: str, offset: int = at) -> DirtyBitmapError:
            return DirtyBitmapError(message, offset=offset, section=section.label, field=field)

        if flags & F.EXTRA_FLAGS:
            raise bad("dirty-bitmap extra flags are not supported", "flags")
        if not flags:
            raise bad("dirty-bitmap record with no flags", "flags")
        names = {}
        for flag, key, what in ((F.DEVICE_NAME, "node", "node alias"),
                                (F.BITMAP_NAME, "bitmap", "bitmap alias")):
            if flags & flag:
                name_at = cur.tell()
                raw = cur.read_str8_bytes()
                if not raw:
                    raise bad(f"Unable to read {what} string", key, name_at)
                names[key] = raw.decode("utf-8", "surrogateescape")
        kw: dict = {}
        if flags & F.START:
            kw["granularity"] = cur.read_be32()
            kw["bitmap_flags"] = cur.read_u8()
        elif flags & F.COMPLETE:
            pass
        elif flags & F.BITS:
            kw["first_sector"] = cur.read_be64()
            kw["nr_sectors"] = cur.read_be32()
            if not flags & F.ZEROES:
                size_at = cur.tell()
                bufsize = cur.read_be64()
                if bufsize > DIRTY_BITMAP_MAX_BUFSIZE:
                    raise bad("Bitmap migration stream buffer allocation request is too large "
                              f"({bufsize} bytes)", "bufsize", size_at)
                kw["bits"] = bytes(cur.read_bytes(bufsize))
        rec = DirtyBitmapRecord(flags, offset=at, **names, **kw)
        return rec, bool(flags & F.EOS)

    def describe(self, record: DirtyBitmapRecord) -> Any:
        out: dict = {"type": record.kind,
                     "flags": "|".join(f.name for f in DirtyBitmapFlag if record.flags & f) or "0"}
        for k in ("node", "bitmap", "granularity"):
            v = getattr(record, k)
            if v is not None:
                out[k] = v
        if record.bitmap_flags is not None:
            out["enabled"] = bool(record.bitmap_flags & SF.ENABLED)
            out["persistent"] = bool(record.bitmap_flags & SF.PERSISTENT)
            if record.bitmap_flags & ~(SF.ENABLED | SF.PERSISTENT):
                out["bitmap_flags"] = f"0x{record.bitmap_flags:02x}"
        if record.first_sector is not None:
            out["first_sector"] = record.first_sector
            out["nr_sectors"] = record.nr_sectors
            out["zeroes"] = record.bits is None
        if record.bits is not None:
            out["bufsize"] = len(record.bits)
            words = np.frombuffer(record.bits[: len(record.bits) // 8 * 8], _U64)
            out["dirty_bits"] = int(np.bitwise_count(words).sum())
        return out


# -- source --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _SaveBitmapState:
    """One bitmap being sent (QEMU's SaveBitmapState)."""

    node: str
    node_alias: str
    bitmap: BlockDirtyBitmap
    bitmap_alias: str
    flags: int
    total_sectors: int
    sectors_per_chunk: int
    cur_sector: int = 0
    bulk_completed: bool = False


class DirtyBitmapSource(DirtyBitmapHandler):
    """Sends ``bitmaps`` as QEMU 7.2's source sends a VM's named bitmaps.

    Args:
        bitmaps: the bitmaps by node; each node's name plays the part of
            QEMU's device (BlockBackend) name when there is no mapping.
        capabilities: this side's capabilities; the section is active only
            with ``dirty-bitmaps`` (None: active).
        parameters: where ``block-bitmap-mapping`` is read at setup, as QEMU
            reads it when the migration starts.
        mapping: an explicit ``block-bitmap-mapping`` instead (checked with
            QEMU's rules).
        running: whether the guest runs. QEMU writes PART sections only
            while it does not (its ``is_active_iterate``); default: paused,
            as for a recorded state.
    """

    def __init__(self, bitmaps: DirtyBitmapSet, *, capabilities: Any = None,
                 parameters: Any = None, mapping: Optional[list] = None,
                 running: Optional[Callable[[], bool]] = None) -> None:
        self.bitmaps = bitmaps
        self.capabilities = capabilities
        self.parameters = parameters
        self.mapping = mapping
        self.running = running or (lambda: False)
        self.states: list[_SaveBitmapState] = []
        self.no_bitmaps = False
        self.bulk_completed = False
        #: after a postcopy switch-over: chunks go in PART sections, within ``limit``
        self.in_postcopy = False
        self.limit: Optional[Callable[[], bool]] = None
        self._prev_node: Optional[str] = None
        self._prev_bitmap: Optional[_SaveBitmapState] = None

    # -- setup ------------------------------------------------------------------------------------
    def _init(self) -> list[_SaveBitmapState]:
        """The bitmaps to send, with QEMU's refusals (each fails the migration)."""
        mapping = _mapping(self.parameters, self.mapping)
        aliases = construct_alias_map(mapping, True) if mapping is not None else None
        out = []
        for node, bitmaps in self.bitmaps.nodes.items():
            if not bitmaps:
                continue
            first = next(iter(bitmaps))
            if not node:
                raise self._refuse(f"Bitmap '{first}' in unnamed node can't be migrated", node)
            if aliases is not None:
                if node not in aliases.nodes:
                    continue  # nodes without an alias stay behind
                node_alias, bitmap_aliases = aliases.nodes[node]
            else:
                node_alias, bitmap_aliases = node, None
            if node_alias.startswith("#"):
                raise self._refuse(f"Bitmap '{first}' in a node with auto-generated name "
                                   f"'{node_alias}' can't be migrated", node)
            if len(wire_name(node_alias)) > _ALIAS_MAX:  # QEMU's node names cannot be this long
                raise self._refuse(f"Cannot migrate bitmaps of node '{node_alias}': "
                                   f"Name is longer than {_ALIAS_MAX} bytes", node)
            for name, bm in bitmaps.items():
                entry = None
                if bitmap_aliases is not None:
                    entry = bitmap_aliases.get(name)
                    if entry is None:
                        continue  # bitmaps without an alias stay behind
                    alias = entry["alias"]
                elif len(wire_name(name)) > _ALIAS_MAX:
                    raise self._refuse(f"Cannot migrate bitmap '{name}' on node '{node}': "
                                       f"Name is longer than {_ALIAS_MAX} bytes", f"{node}/{name}")
                else:
                    alias = name
                if bm.size is None:
                    raise self._refuse(f"bitmap '{name}' on node '{node}' has no size",
                                       f"{node}/{name}")
                flags = SF.ENABLED if bm.enabled else 0
                if _persistent(entry, bm.persistent):
                    flags |= SF.PERSISTENT
                out.append(_SaveBitmapState(node, node_alias, bm, alias, int(flags),
                                            bm.total_sectors, bm.sectors_per_chunk))
        return out

    @staticmethod
    def _refuse(reason: str, field: str) -> BitmapError:
        return BitmapError(f"Failed to initialize dirty tracking bitmap for blocks: {reason}",
                           field=field)

    # -- records -------------------------------------------------------------------------------
    def _header(self, st: _SaveBitmapState, flags: int) -> bytes:
        """Flags and the names that changed since the previous record (QEMU's send_bitmap_header)."""
        names = b""
        if st.node != self._prev_node:
            self._prev_node = st.node
            flags |= F.DEVICE_NAME
            alias = wire_name(st.node_alias)
            names = bytes((len(alias),)) + alias
        if st is not self._prev_bitmap:
            self._prev_bitmap = st
            flags |= F.BITMAP_NAME
            alias = wire_name(st.bitmap_alias)
            names += bytes((len(alias),)) + alias
        return bytes((flags,)) + names

    def _bits(self, st: _SaveBitmapState, first: int, nr: int) -> bytes:
        """One BITS record: ZEROES when the (padded) buffer is all clear."""
        buf = st.bitmap.serialize_chunk(first, nr)
        if buf.count(0) == len(buf):
            return self._header(st, F.BITS | F.ZEROES) + _BITS_RANGE.pack(first, nr)
        return self._header(st, F.BITS) + _BITS_DATA.pack(first, nr, len(buf)) + buf

    def _bulk_phase(self, f: QEMUFile, limit: Optional[Callable[[], bool]] = None) -> None:
        """The chunks not sent yet, a bitmap at a time; with ``limit``, until it says stop.

        ``limit`` (postcopy's rate limit) is asked after each bitmap's
        chunks so far are written, as QEMU asks its file's rate limit.
        """
        for st in self.states:
            out = []
            while not st.bulk_completed:
                nr = min(st.total_sectors - st.cur_sector, st.sectors_per_chunk)
                out.append(self._bits(st, st.cur_sector, nr))
                st.cur_sector += nr
                st.bulk_completed = st.cur_sector >= st.total_sectors
                if limit is not None and len(out) >= 64:
                    f.write(b"".join(out))
                    out = []
                    if limit():
                        return
            f.write(b"".join(out))
            if limit is not None and limit():
                self.bulk_completed = all(s.bulk_completed for s in self.states)
                return
        self.bulk_completed = True

    # -- SaveVMHandlers --------------------------------------------------------------------------
    def is_active(self) -> bool:
        caps = self.capabilities
        return (caps is None or bool(caps.get("dirty-bitmaps"))) and not self.no_bitmaps

    def is_active_iterate(self) -> bool:
        return self.is_active() and not self.running()

    def save_setup(self, f: QEMUFile) -> None:
        self._prev_node = self._prev_bitmap = None
        self.bulk_completed = False
        self.in_postcopy = False
        self.states = self._init()
        self.no_bitmaps = not self.states
        for st in self.states:
            f.write(self._header(st, F.START) + _START.pack(st.bitmap.granularity, st.flags))
        f.put_u8(F.EOS)

    def save_pending(self, max_size: int = 0) -> tuple[int, int]:
        """Nothing that iterating could send: in precopy the bits all wait for completion.

        QEMU 7.2 reports the granules not yet sent, as if each were a byte,
        and its loop keeps iterating while that exceeds what the measured
        bandwidth moves within ``downtime-limit``. Since precopy iterations
        never send bits, the figure never shrinks: an idle or paused source
        then spins through empty rounds until the bandwidth of those rounds
        alone is high enough (14274 rounds for the test vector's 46k
        granules) or forever (a 512-byte-granularity bitmap of a 1 GiB
        disk: still iterating after 20 s). qmigx counts nothing here, so
        convergence is decided by RAM alone; the bits are sent in END, as
        QEMU sends them.
        """
        return (0, 0)

    def has_postcopy(self) -> bool:
        """Bitmaps go on after a postcopy switch-over, as QEMU's do (postcopy.md §8)."""
        return self.is_active()

    def save_live_iterate(self, f: QEMUFile) -> bool:
        """Precopy: nothing (the bits wait for completion); postcopy: chunks within ``limit``."""
        if self.in_postcopy and not self.bulk_completed:
            self._bulk_phase(f, self.limit)
        f.put_u8(F.EOS)
        return self.bulk_completed

    def save_complete_precopy(self, f: QEMUFile) -> None:
        self._bulk_phase(f)
        f.write(b"".join(self._header(st, F.COMPLETE) for st in self.states) + bytes((F.EOS,)))
        self.save_cleanup()

    def save_complete_postcopy(self, f: QEMUFile) -> None:
        self.save_complete_precopy(f)

    def save_cleanup(self) -> None:
        self.states = []


# -- destination ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _LoadBitmapState:
    """One bitmap being received (QEMU's LoadBitmapState), with what its records reached."""

    node: str
    bitmap: BlockDirtyBitmap
    migrated: bool = False
    extent: int = 0  #: end of the furthest range received, in bytes


class DirtyBitmapDestination(DirtyBitmapHandler):
    """Receives bitmaps as QEMU 7.2's destination does; :attr:`result` is what arrived.

    Args:
        nodes: the block nodes bitmaps may land on, name -> size in bytes
            (None: unknown, learnt from the records). Without it every
            node is accepted and each bitmap's size is learnt from its
            records. With it, an unknown node cancels the bitmap migration
            as in QEMU ("Cannot find device=… nor node-name=…").
        parameters, mapping: ``block-bitmap-mapping`` as for the source.
        warn: called with each message QEMU would log (cancellations,
            bitmaps that never completed); they are also in :attr:`warnings`.

    Attributes:
        cancelled: the :class:`DirtyBitmapError` that cancelled the bitmap
            migration (every bitmap it created is dropped), or None.
    """

    def __init__(self, *, nodes: Optional[Mapping[str, Optional[int]]] = None,
                 parameters: Any = None, mapping: Optional[list] = None,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.nodes = dict(nodes) if nodes is not None else None
        for name, size in (self.nodes or {}).items():
            if size is not None:
                BlockDirtyBitmap("check", BDRV_SECTOR_SIZE, size)  # refuses what no disk can be
        self.parameters = parameters
        self.mapping = mapping
        self.warn = warn
        self.warnings: list[str] = []
        self.cancelled: Optional[DirtyBitmapError] = None
        self.bitmaps = DirtyBitmapSet()
        self._loading: list[_LoadBitmapState] = []
        self._aliases: Optional[AliasMap] = None
        self._aliases_read = False
        self._node_alias: Optional[str] = None
        self._node: Optional[str] = None
        self._bitmap: Optional[_LoadBitmapState] = None
        self._bitmap_name = ""
        self._bmap_inner: Optional[dict] = None

    @property
    def result(self) -> DirtyBitmapSet:
        """The bitmaps that arrived complete, by node and in arrival order."""
        out = DirtyBitmapSet()
        for st in self._loading:
            if st.migrated:
                out.add(st.node, st.bitmap)
        return out

    # -- failures ---------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        self.warnings.append(message)
        if self.warn is not None:
            self.warn(message)

    def _error(self, message: str, rec: DirtyBitmapRecord, section: Section,
               field: str) -> DirtyBitmapError:
        return DirtyBitmapError(message, offset=rec.offset, section=section.label, field=field)

    def _cancel(self, err: Optional[DirtyBitmapError] = None, *, log: bool = True) -> None:
        """QEMU's cancel_incoming: drop every bitmap this migration made, ignore the rest."""
        if self.cancelled is not None:
            return
        if err is not None and log:
            self._log(err.message)
        self.cancelled = err or DirtyBitmapError("bitmap migration cancelled")
        self._node = None
        self._bitmap = None
        for st in self._loading:
            self.bitmaps.nodes.get(st.node, {}).pop(st.bitmap.name, None)
        self._loading = []

    def _fatal(self, message: str, rec: DirtyBitmapRecord, section: Section,
               field: str) -> DirtyBitmapError:
        err = self._error(message, rec, section, field)
        self._cancel(err, log=False)  # raised, not logged
        return err

    # -- lookups -----------------------------------------------------------------------------------
    def _alias_map(self) -> Optional[AliasMap]:
        if not self._aliases_read:
            mapping = _mapping(self.parameters, self.mapping)
            self._aliases = construct_alias_map(mapping, False) if mapping is not None else None
            self._aliases_read = True
        return self._aliases

    def _lookup(self, device: str, node_name: str) -> Optional[str]:
        """QEMU's bdrv_lookup_bs over this side's nodes (any node when none were given)."""
        for name in (device, node_name):
            if name and (self.nodes is None or name in self.nodes):
                return name
        return None

    def _find(self, node: str, name: str) -> Optional[_LoadBitmapState]:
        for st in self._loading:
            if st.node == node and st.bitmap.name == name:
                return st
        return None

    # -- SaveVMHandlers ----------------------------------------------------------------------------
    def load_setup(self) -> None:
        self._alias_map()

    def load_record(self, record: DirtyBitmapRecord, section: Section) -> None:
        if section.version_id != 1:
            raise self._fatal(f"dirty-bitmap: unsupported version {section.version_id}",
                              record, section, "version_id")
        self._header(record, section)
        kind = record.kind
        if kind == "start":
            self._start(record, section)
        elif kind == "complete":
            self._complete()
        elif kind == "bits":
            self._bits(record, section)

    def load_cleanup(self, ok: bool) -> None:
        if not ok:
            self._cancel(None)
            return
        for st in self._loading:
            if not st.migrated:
                self._log(f"dirty bitmap '{st.bitmap.name}' on node '{st.node}' did not "
                          "complete; dropped")

    # -- the loader's steps (QEMU's dirty_bitmap_load_*) -------------------------------------------
    def _header(self, rec: DirtyBitmapRecord, section: Section) -> None:
        flags = rec.flags
        nothing = flags == flags & F.EOS
        aliases = self._alias_map()
        bitmap_aliases = None
        if flags & F.DEVICE_NAME:
            self._node_alias = rec.node
            if self.cancelled is None:
                problem = None
                if aliases is not None:
                    found = aliases.nodes.get(rec.node)
                    if found is None:
                        self._node, problem = None, f"Error: Unknown node alias '{rec.node}'"
                    else:
                        bitmap_aliases = found[1]
                        self._node = self._lookup("", found[0])
                        if self._node is None:
                            problem = f"Cannot find device='' nor node-name='{found[0]}'"
                else:
                    self._node = self._lookup(rec.node, rec.node)
                    if self._node is None:
                        problem = f"Cannot find device='{rec.node}' nor node-name='{rec.node}'"
                if problem:
                    self._cancel(self._error(problem, rec, section, "node"))
        elif self._node is not None:
            if aliases is not None:
                bitmap_aliases = aliases.nodes[self._node_alias][1]
        elif not nothing and self.cancelled is None:
            self._cancel(self._error("Error: block device name is not set", rec, section, "node"))

        if flags & F.BITMAP_NAME:
            name = rec.bitmap
            if self.cancelled is None and bitmap_aliases is not None:
                entry = bitmap_aliases.get(rec.bitmap)
                if entry is None:
                    self._cancel(self._error(
                        f"Error: Unknown bitmap alias '{rec.bitmap}' on node '{self._node}' "
                        f"(alias '{self._node_alias}')", rec, section, "bitmap"))
                else:
                    name = entry["name"]
                self._bmap_inner = entry
            if self.cancelled is None:
                assert self._node is not None
                self._bitmap_name = name
                self._bitmap = self._find(self._node, name)
                if self._bitmap is None and not flags & F.START:
                    self._cancel(self._error(
                        f"Error: unknown dirty bitmap '{name}' for block device '{self._node}'",
                        rec, section, "bitmap"))
        elif self._bitmap is None and not nothing and self.cancelled is None:
            self._cancel(self._error("Error: block device name is not set", rec, section,
                                     "bitmap"))

    def _start(self, rec: DirtyBitmapRecord, section: Section) -> None:
        if self.cancelled is not None:
            return
        if self._bitmap is not None:
            raise self._fatal(f"Bitmap with the same name ('{self._bitmap.bitmap.name}') "
                              "already exists on destination", rec, section, "bitmap")
        assert self._node is not None
        size = self.nodes.get(self._node) if self.nodes is not None else None
        try:
            bm = BlockDirtyBitmap(self._bitmap_name, rec.granularity, size,
                                  enabled=bool(rec.bitmap_flags & SF.ENABLED))
        except BitmapError as exc:
            raise self._fatal(exc.message, rec, section, exc.field or "granularity") from None
        if rec.bitmap_flags & SF.RESERVED:
            raise self._fatal(f"Unknown flags in migrated dirty bitmap header: "
                              f"{rec.bitmap_flags:x}", rec, section, "bitmap_flags")
        bm.persistent = _persistent(self._bmap_inner, bool(rec.bitmap_flags & SF.PERSISTENT))
        self.bitmaps.add(self._node, bm)
        self._bitmap = _LoadBitmapState(self._node, bm)
        self._loading.append(self._bitmap)

    def _complete(self) -> None:
        if self.cancelled is not None:
            return
        st = self._bitmap
        assert st is not None
        if st.bitmap.size is None:
            st.bitmap.set_size(st.extent)
        st.migrated = True

    def _bits(self, rec: DirtyBitmapRecord, section: Section) -> None:
        if self.cancelled is not None:
            return  # read, and ignored
        st = self._bitmap
        assert st is not None
        bm = st.bitmap
        start = rec.first_sector * BDRV_SECTOR_SIZE
        count = rec.nr_sectors * BDRV_SECTOR_SIZE
        end = start + count
        problem = bm.check_range(start, count)
        if not problem and count and bm.size is None and end % (64 << bm.shift):
            # an unaligned end can only be the bitmap's end: that fixes its size
            if end < st.extent:
                raise self._fatal(f"range ending at byte {end} is not on a 64-granule boundary, "
                                  f"yet earlier ranges reached byte {st.extent}",
                                  rec, section, "nr_sectors")
            bm.set_size(end)
        if problem:
            raise self._fatal(f"bitmap '{bm.name}': {problem}", rec, section, "first_sector")
        st.extent = max(st.extent, end)
        first, nwords = serialization_words(bm.granularity, start, count)
        if rec.bits is None:
            bm.clear_words(first, nwords)
            return
        needed = nwords * 8
        if needed > len(rec.bits) or len(rec.bits) > align_bufsize(needed):
            self._cancel(self._error(f"Migrated bitmap granularity doesn't match the destination "
                                     f"bitmap '{bm.name}' granularity", rec, section, "bufsize"))
            return
        bm.write_words(first, np.frombuffer(rec.bits, _U64, nwords))
