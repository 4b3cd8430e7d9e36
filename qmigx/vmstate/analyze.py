"""Decoding device sections with the stream's own vmdesc (vmstate.md §8.1).

A receiver that does not know a device's description can still decode a
precopy stream's FULL sections by walking the vmdesc entry QEMU wrote for
them. :func:`walk_with_vmdesc` does that and returns a tree whose leaves
keep their raw bytes, so that

* :func:`analyze_value` renders it exactly as QEMU 7.2's
  ``scripts/analyze-migration.py -d state`` does (hex strings for ints,
  ``"0x... (-N)"`` for negative signed ones, booleans, space-separated hex
  bytes for everything else, ``index`` arrays as lists, subsections as
  keys named by the wire name), and :func:`dumps_analyze` serialises it
  with the script's encoder settings;
* :func:`encode_with_vmdesc` re-emits the payload byte for byte (after
  leaves were possibly changed with :meth:`Leaf.set`).

The walker follows the script's reading rules (compressed arrays are
unfolded, unknown types are opaque ``size`` bytes, the first element of an
``array_len`` entry is read even for a length of 0 or 1) but refuses what
the script would crash on, with a :class:`~qmigx.errors.VMStateError`
naming the absolute offset, the section and the field path.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Union

from qmigx.errors import TruncatedStreamError, VMStateError
from qmigx.qemufile import Cursor, NeedData
from qmigx.qjson import JSONPairs
from qmigx.wire import SectionType

__all__ = [
    "Leaf",
    "StructValue",
    "Subsection",
    "walk_with_vmdesc",
    "encode_with_vmdesc",
    "analyze_value",
    "dumps_analyze",
    "ANALYZE_ENCODER",
    "SIGNED_TYPES",
    "UNSIGNED_TYPES",
]

_SUBSECTION = int(SectionType.SUBSECTION)

#: Types the script reads as signed big-endian ints (note the ``*equal``
#: types of unsigned width among them: the script's choice).
SIGNED_TYPES = frozenset({
    "int8", "int16", "int32", "int32 equal", "int32 le", "int64", "int64 equal",
    "uint8 equal", "uint16 equal",
})
#: Types the script reads as unsigned big-endian ints.
UNSIGNED_TYPES = frozenset({"uint8", "uint16", "uint32", "uint32 equal", "uint64"})

#: The script's encoder: ``json.JSONEncoder(indent=4, separators=(',', ': '))``.
ANALYZE_ENCODER = json.JSONEncoder(indent=4, separators=(",", ": "))


class Leaf:
    """One non-struct element: its vmdesc type and the raw bytes it covered."""

    __slots__ = ("type", "raw")

    def __init__(self, type_: str, raw: bytes) -> None:
        self.type = type_
        self.raw = raw

    @property
    def value(self) -> Union[int, bool, bytes]:
        """int for the int types, bool for ``bool``, else the raw bytes."""
        t = self.type
        if t in SIGNED_TYPES:
            return int.from_bytes(self.raw, "big", signed=True)
        if t in UNSIGNED_TYPES:
            return int.from_bytes(self.raw, "big")
        if t == "bool":
            return self.raw[0] != 0
        return self.raw

    def set(self, value: Union[int, bool, bytes]) -> None:
        """Replace the value, keeping the element's size."""
        n = len(self.raw)
        t = self.type
        if t in SIGNED_TYPES or t in UNSIGNED_TYPES:
            signed = t in SIGNED_TYPES
            try:
                self.raw = int(value).to_bytes(n, "big", signed=signed and int(value) < 0)
            except OverflowError:
                raise ValueError(f"{value} does not fit {n} bytes of {t!r}") from None
        elif t == "bool":
            self.raw = bytes([1 if value else 0]) + self.raw[1:]
        else:
            raw = bytes(value)
            if len(raw) != n:
                raise ValueError(f"{t!r} element holds {n} bytes, got {len(raw)}")
            self.raw = raw

    def analyze(self) -> Union[str, bool]:
        """The value as analyze-migration.py prints it."""
        t = self.type
        raw = self.raw
        if t in SIGNED_TYPES or t in UNSIGNED_TYPES:
            u = int.from_bytes(raw, "big")
            text = "0x%0*x" % (2 * len(raw), u)
            if t in SIGNED_TYPES:
                s = int.from_bytes(raw, "big", signed=True)
                if s < 0:
                    return f"{text} ({s})"
            return text
        if t == "bool":
            return raw[0] != 0
        return " ".join(f"{c:02x}" for c in raw)

    def encode(self, out: bytearray) -> None:
        out += self.raw

    def __repr__(self) -> str:
        return f"Leaf({self.type!r}, {self.analyze()!r})"


class Subsection:
    """A subsection as found on the wire: its name, version and content."""

    __slots__ = ("name", "version", "value")

    def __init__(self, name: bytes, version: int, value: "StructValue") -> None:
        self.name = name
        self.version = version
        self.value = value

    @property
    def label(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")

    def encode(self, out: bytearray) -> None:
        out.append(_SUBSECTION)
        out.append(len(self.name))
        out += self.name
        out += self.version.to_bytes(4, "big")
        self.value.encode(out)


class StructValue:
    """A decoded struct or section: its elements and subsections in wire order.

    ``entries`` holds ``(name, index, node)`` with ``index`` None for a
    plain field and the element index for array elements; ``node`` is a
    :class:`Leaf` or a nested :class:`StructValue`.
    """

    __slots__ = ("entries", "subsections")

    def __init__(self) -> None:
        self.entries: list[tuple[str, Optional[int], Union[Leaf, "StructValue"]]] = []
        self.subsections: list[Subsection] = []

    def __getitem__(self, name: str):
        """The node(s) the analyze output shows under ``name`` (last one wins)."""
        found: Any = _MISSING
        for n, idx, node in self.entries:
            if n != name:
                continue
            if idx is None:
                found = node
            else:
                if not isinstance(found, list):
                    found = []
                found.append(node)
        for s in self.subsections:
            if s.label == name:
                found = s.value
        if found is _MISSING:
            raise KeyError(name)
        return found

    def leaves(self) -> Iterator[Leaf]:
        """Every leaf, in wire order."""
        for _, _, node in self.entries:
            if isinstance(node, Leaf):
                yield node
            else:
                yield from node.leaves()
        for s in self.subsections:
            yield from s.value.leaves()

    def encode(self, out: bytearray) -> None:
        for _, _, node in self.entries:
            node.encode(out)
        for s in self.subsections:
            s.encode(out)

    def analyze(self) -> dict:
        return analyze_value(self)


_MISSING = object()


def _desc_get(desc: Any, key: str, default: Any = None) -> Any:
    if isinstance(desc, JSONPairs):
        return desc.get(key, default)
    if isinstance(desc, dict):
        return desc.get(key, default)
    return default


def _int(v: Any) -> Optional[int]:
    """int() of a vmdesc number, as the script does, or None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def _unfold(fields: Any, error) -> Iterator[tuple[Any, Optional[int]]]:
    """Yield ``(field desc, index or None)``, expanding ``array_len`` entries.

    Like the script, an ``array_len`` entry always yields element 0.
    Lazy: a huge ``array_len`` costs nothing until bytes are read for it.
    """
    for f in fields:
        alen = _desc_get(f, "array_len")
        if alen is not None:
            n = _int(alen)
            if n is None:
                raise error(f"array_len is not a number: {alen!r}")
            yield f, 0
            for i in range(1, n):
                yield f, i
            continue
        idx = _desc_get(f, "index")
        if idx is None:
            yield f, None
            continue
        i = _int(idx)
        if i is None:
            raise error(f"index is not a number: {idx!r}")
        yield f, i


def _opaque_struct(sdesc: Any) -> bool:
    """A ``struct`` entry without fields: QEMU writes ``"struct": {}`` for a NULL
    element of an array of pointers (its bytes are the 0x30 marker)."""
    return isinstance(sdesc, (dict, JSONPairs)) and _desc_get(sdesc, "fields") is None


#: Deeper vmdesc nesting than this is refused (QEMU's is a few levels).
MAX_DEPTH = 64
#: Consecutive elements consuming no bytes that one description may declare.
MAX_EMPTY_RUN = 1 << 16


class _Walker:
    def __init__(self, cur: Cursor, section: Optional[str]) -> None:
        self.cur = cur
        self.section = section
        self.where = ""

    def error(self, message: str, offset: int, path: str) -> VMStateError:
        return VMStateError(message, offset=offset, section=self.section, field=path or None)

    def walk(self, desc: Any, path: str, depth: int = 0) -> StructValue:
        cur = self.cur
        if depth > MAX_DEPTH:
            raise self.error(f"vmdesc nested deeper than {MAX_DEPTH} levels", cur.tell(), path)
        if not isinstance(desc, (dict, JSONPairs)):
            raise self.error("vmdesc entry is not a JSON object", cur.tell(), path)
        fields = _desc_get(desc, "fields")
        if not isinstance(fields, list):
            raise self.error("vmdesc entry has no 'fields' array", cur.tell(), path)
        node = StructValue()
        # What the script's dict holds under each name: list length or -1.
        shape: dict[str, int] = {}
        empty_run = 0
        for f, index in _unfold(fields, lambda m: self.error(m, cur.tell(), path)):
            name = _desc_get(f, "name")
            if not isinstance(name, str):
                raise self.error("vmdesc field without a name", cur.tell(), path)
            ftype = _desc_get(f, "type")
            fpath = f"{path}.{name}" if path else name
            if index is not None:
                fpath = f"{fpath}[{index}]"
            at = cur.tell()
            self.where = fpath
            sdesc = _desc_get(f, "struct") if ftype == "struct" else None
            if ftype == "struct" and not _opaque_struct(sdesc):
                if sdesc is None:
                    raise self.error(f"struct field {name!r} has no 'struct' description",
                                     at, fpath)
                value: Union[Leaf, StructValue] = self.walk(sdesc, fpath, depth + 1)
            else:
                size = _int(_desc_get(f, "size"))
                if size is None or size < 0:
                    raise self.error(f"field {name!r} has no valid size", at, fpath)
                tname = ftype if isinstance(ftype, str) else "unknown"
                if size == 0 and (tname == "bool" or tname in SIGNED_TYPES
                                  or tname in UNSIGNED_TYPES):
                    raise self.error(f"'{tname}' field {name!r} of size 0", at, fpath)
                value = Leaf(tname, bytes(cur.read_bytes(size)))
            if index is not None:
                have = shape.get(name)
                if have is None:
                    have = 0
                elif have < 0:
                    raise self.error(f"array element {name!r}[{index}] follows a plain field "
                                     f"of the same name", at, fpath)
                if have != index:
                    raise self.error(
                        f"internal index of data field unmatched ({have}/{index})", at, fpath)
                shape[name] = have + 1
            else:
                shape[name] = -1
            empty_run = empty_run + 1 if cur.tell() == at else 0
            if empty_run > MAX_EMPTY_RUN:
                raise self.error(f"vmdesc describes more than {MAX_EMPTY_RUN} consecutive "
                                 f"elements without bytes", at, fpath)
            node.entries.append((name, index, value))
        subs = _desc_get(desc, "subsections")
        if subs is not None:
            if not isinstance(subs, list):
                raise self.error("'subsections' is not an array", cur.tell(), path)
            for sdesc in subs:
                want = _desc_get(sdesc, "vmsd_name")
                at = cur.tell()
                spath = f"{path}.{want}" if path else str(want)
                self.where = spath
                marker = cur.read_u8()
                if marker != _SUBSECTION:
                    raise self.error(f"Subsection {want} not found (byte 0x{marker:02x})",
                                     at, spath)
                raw = cur.read_str8_bytes()
                if not isinstance(want, str) or raw != want.encode("utf-8", "surrogateescape"):
                    raise self.error(
                        f"subsection {raw.decode('utf-8', 'backslashreplace')!r} where the "
                        f"vmdesc expects {want!r}", at, spath)
                version = cur.read_be32()
                node.subsections.append(
                    Subsection(raw, version, self.walk(sdesc, spath, depth + 1)))
        return node


def walk_with_vmdesc(desc_entry: Any, cursor: Cursor, *, section: Optional[str] = None,
                     eof: bool = True) -> StructValue:
    """Decode one FULL section payload following its vmdesc ``devices`` entry.

    Args:
        desc_entry: the entry (a dict, or :class:`~qmigx.qjson.JSONPairs`).
        cursor: positioned at the payload; left right after it.
        section: label for errors, e.g. ``"fw_cfg (8)"``.
        eof: the cursor's end is the end of the input, so running out of
            bytes is a :class:`~qmigx.errors.TruncatedStreamError` (naming
            the field); with ``eof=False`` the cursor's ``NeedData``
            propagates instead ("feed me more").
    """
    w = _Walker(cursor, section)
    if not eof:
        return w.walk(desc_entry, "")
    try:
        return w.walk(desc_entry, "")
    except NeedData as nd:
        raise TruncatedStreamError("section payload truncated", offset=nd.offset,
                                   section=section, field=w.where or None) from None


def encode_with_vmdesc(desc_entry: Any, value: StructValue) -> bytes:
    """Re-encode a tree from :func:`walk_with_vmdesc`, checking it against the entry."""
    out = bytearray()
    _encode(desc_entry, value, out, "")
    return bytes(out)


def _encode(desc: Any, node: StructValue, out: bytearray, path: str) -> None:
    where = path or None
    if not isinstance(node, StructValue):
        raise VMStateError(f"expected a struct value, got {type(node).__name__}", field=where)
    fields = _desc_get(desc, "fields")
    if not isinstance(fields, list):
        raise VMStateError("vmdesc entry has no 'fields' array", field=where)

    def err(m: str) -> VMStateError:
        return VMStateError(m, field=where)

    entries = iter(node.entries)
    count = 0
    for f, index in _unfold(fields, err):
        entry = next(entries, None)
        if entry is None:
            raise err(f"value has {count} elements, the vmdesc more")
        count += 1
        name, nindex, child = entry
        fpath = f"{path}.{name}" if path else name
        if _desc_get(f, "name") != name or index != nindex:
            raise VMStateError(f"value element {name!r}[{nindex}] does not match vmdesc "
                               f"field {_desc_get(f, 'name')!r}[{index}]", field=fpath)
        if isinstance(child, StructValue) and _desc_get(f, "type") == "struct":
            _encode(_desc_get(f, "struct"), child, out, fpath)
        elif isinstance(child, Leaf) and len(child.raw) == _int(_desc_get(f, "size")):
            out += child.raw
        else:
            raise VMStateError(f"element {name!r} does not fit the vmdesc field (type "
                               f"{_desc_get(f, 'type')!r}, size {_desc_get(f, 'size')})",
                               field=fpath)
    if next(entries, None) is not None:
        raise err(f"value has more than the vmdesc's {count} elements")
    subs = _desc_get(desc, "subsections") or []
    if len(subs) != len(node.subsections):
        raise err(f"value has {len(node.subsections)} subsections, the vmdesc {len(subs)}")
    for sdesc, sub in zip(subs, node.subsections):
        want = _desc_get(sdesc, "vmsd_name")
        if sub.label != want:
            raise err(f"subsection {sub.label!r} where the vmdesc has {want!r}")
        if len(sub.name) > 255:
            raise err("subsection name longer than 255 bytes")
        out.append(_SUBSECTION)
        out.append(len(sub.name))
        out += sub.name
        out += (sub.version & 0xFFFFFFFF).to_bytes(4, "big")
        _encode(sdesc, sub.value, out, f"{path}.{want}" if path else want)


def analyze_value(tree: Union[StructValue, Leaf, list], *, by_name: bool = False) -> Any:
    """The JSON-able structure analyze-migration.py shows for a decoded section.

    QEMU 7.2's script makes a list of the elements that carry an
    ``index``. QEMU 10's vmdesc leaves the index off an array's last
    element (and splits arrays of pointers at NULLs), so its script groups
    by name instead: a name seen once is a value, seen again a list of all
    its values. ``by_name`` selects the 10.0 rule (for a 10.0 vmdesc, the
    one with a ``configuration`` entry).
    """
    if isinstance(tree, Leaf):
        return tree.analyze()
    if isinstance(tree, list):
        return [analyze_value(x, by_name=by_name) for x in tree]
    d: dict[str, Any] = {}
    for name, index, node in tree.entries:
        value = analyze_value(node, by_name=by_name)
        if by_name:
            if name not in d:
                d[name] = value
            elif type(d[name]) is list:
                d[name].append(value)
            else:
                d[name] = [d[name], value]
        elif index is None:
            d[name] = value
        else:
            lst = d.get(name)
            if not isinstance(lst, list):
                lst = d[name] = []
            lst.append(value)
    for s in tree.subsections:
        d[s.name.decode("utf-8", "replace")] = analyze_value(s.value, by_name=by_name)
    return d


def dumps_analyze(obj: Any) -> str:
    """Serialise like the script: 4-space indent, ``','``/``': '`` separators.

    The script ``print``s this text, so its output is this plus ``"\\n"``.
    """
    return ANALYZE_ENCODER.encode(obj)
