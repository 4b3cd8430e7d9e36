"""QEMU's JSON text writers, reproduced byte for byte.

The vmdesc trailer of a migration stream (vmstate.md §8) is JSON text that
QEMU builds incrementally while it saves device state, and tools compare
it textually, so qmigx must produce *the same characters*, not merely an
equivalent document. Two writers exist:

* **7.2** (``JSONWriter`` in qobject/json-writer.c, non-pretty): ``{"k": v,
  "k2": v2}``, ``", "`` between items, keys and strings quoted with
  escapes (``\\"``, ``\\\\``, ``\\b \\f \\n \\r \\t``, every other code point
  below U+0020 or from U+007F up as ``\\uXXXX`` with upper-case hex,
  code points beyond the BMP as a surrogate pair, malformed UTF-8 as
  ``\\uFFFD``; the input is a C string, so it ends at the first NUL);
* **4.1** (``QJSON`` in migration/qjson.c): ``{ "k" : v, "k2" : v2 }``,
  containers opened with ``"{ "``/``"[ "`` and closed with ``" }"``/``" ]"``,
  strings copied verbatim (no escaping at all).

Both writers are streaming (start/end calls, like QEMU's) because the
vmdesc may legitimately contain duplicate keys inside one object (the
``tmp``/``qtailq`` quirk), which no dict-based serialiser can express.

:func:`loads_pairs` parses JSON keeping every key/value pair of each object
in order (:class:`JSONPairs`), and :func:`dumps` re-emits such a tree (or
plain dicts/lists) in either form, so a real vmdesc can be checked to
round-trip character for character.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

__all__ = [
    "FORM_72",
    "FORM_41",
    "JSONWriter",
    "JSONPairs",
    "quote_str",
    "dumps",
    "loads_pairs",
]

#: QEMU 7.2's JSONWriter text form.
FORM_72 = "7.2"
#: QEMU 4.1's QJSON text form.
FORM_41 = "4.1"

_SHORT_ESCAPES = {
    0x22: '\\"',
    0x5C: "\\\\",
    0x08: "\\b",
    0x0C: "\\f",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}

#: Smallest code point each multi-byte length may encode (longer is overlong).
_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _to_bytes(s: Union[str, bytes, bytearray, memoryview]) -> bytes:
    if isinstance(s, str):
        # surrogateescape recovers the raw bytes of names that were decoded
        # from the wire with the same handler.
        return s.encode("utf-8", "surrogateescape")
    return bytes(s)


def _mod_utf8_codepoint(b: bytes, i: int) -> tuple[int, int]:
    """Decode one modified-UTF-8 sequence at ``b[i]`` (``b[i]`` is not NUL).

    Returns ``(code point or -1 if invalid, index after the sequence)``,
    following the consumption rules of QEMU's ``mod_utf8_codepoint`` with
    a 6-byte window: an impossible or continuation lead byte consumes one
    byte; a short sequence consumes the lead and the continuation bytes
    actually present.
    """
    n = len(b)
    lead = b[i]
    if lead < 0x80:
        return lead, i + 1
    if lead >= 0xFE or not lead & 0x40:
        return -1, i + 1
    length = 0
    mask = 0x80
    while lead & mask:
        length += 1
        mask >>= 1
    cp = lead & (mask - 1)
    p = i + 1
    for k in range(1, length):
        byte = b[p] if (k < 6 and p < n) else 0
        if byte & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = (cp << 6) | (byte & 0x3F)
    if cp > 0x10FFFF:
        return -1, p
    if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
        return -1, p
    if 0xD800 <= cp <= 0xDFFF:
        return -1, p
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, p
    return cp, p


def quote_str(s: Union[str, bytes]) -> str:
    """``s`` as QEMU 7.2's JSONWriter quotes it (including the quotes)."""
    b = _to_bytes(s)
    nul = b.find(b"\0")
    if nul >= 0:
        b = b[:nul]
    if b.isascii() and all(0x20 <= c < 0x7F for c in b):
        text = b.decode("ascii")
        if '"' not in text and "\\" not in text:
            return f'"{text}"'
    out = ['"']
    i = 0
    n = len(b)
    while i < n:
        cp, i = _mod_utf8_codepoint(b, i)
        esc = _SHORT_ESCAPES.get(cp)
        if esc is not None:
            out.append(esc)
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(chr(cp))
    out.append('"')
    return "".join(out)


def _raw41(s: Union[str, bytes]) -> str:
    """4.1 QJSON copies the C string verbatim: up to the first NUL, unescaped."""
    if isinstance(s, str):
        nul = s.find("\0")
        return s if nul < 0 else s[:nul]
    b = bytes(s)
    nul = b.find(b"\0")
    if nul >= 0:
        b = b[:nul]
    return b.decode("utf-8", "surrogateescape")


class JSONWriter:
    """Incremental JSON text writer with QEMU's exact output.

    The API mirrors QEMU's ``json_writer_*`` calls: every value-producing
    method takes the member ``name`` first, which must be given inside an
    object and is ignored inside an array (as QEMU does).

    Args:
        form: :data:`FORM_72` (default) or :data:`FORM_41`.
    """

    __slots__ = ("form", "_parts", "_need_comma", "_stack")

    def __init__(self, form: str = FORM_72) -> None:
        if form not in (FORM_72, FORM_41):
            raise ValueError(f"unknown JSON form {form!r} (expected '7.2' or '4.1')")
        self.form = form
        self._parts: list[str] = []
        self._need_comma = False
        self._stack: list[bool] = []  # True = array

    # -- structure -----------------------------------------------------------
    def _element(self, name: Optional[str]) -> None:
        parts = self._parts
        if self._need_comma:
            parts.append(", ")
        else:
            self._need_comma = True
        if self._stack and not self._stack[-1]:
            if name is None:
                raise ValueError("a member of a JSON object needs a name")
            if self.form == FORM_72:
                parts.append(quote_str(name))
                parts.append(": ")
            else:
                parts.append(f'"{_raw41(name)}" : ')

    def start_object(self, name: Optional[str] = None) -> None:
        self._element(name)
        self._parts.append("{" if self.form == FORM_72 else "{ ")
        self._stack.append(False)
        self._need_comma = False

    def end_object(self) -> None:
        if not self._stack or self._stack[-1]:
            raise ValueError("end_object without a matching start_object")
        self._stack.pop()
        self._parts.append("}" if self.form == FORM_72 else " }")
        self._need_comma = True

    def start_array(self, name: Optional[str] = None) -> None:
        self._element(name)
        self._parts.append("[" if self.form == FORM_72 else "[ ")
        self._stack.append(True)
        self._need_comma = False

    def end_array(self) -> None:
        if not self._stack or not self._stack[-1]:
            raise ValueError("end_array without a matching start_array")
        self._stack.pop()
        self._parts.append("]" if self.form == FORM_72 else " ]")
        self._need_comma = True

    # -- scalars -------------------------------------------------------------
    def int64(self, name: Optional[str], value: int) -> None:
        self._element(name)
        self._parts.append(str(int(value)))

    uint64 = int64

    def bool(self, name: Optional[str], value: bool) -> None:
        self._element(name)
        self._parts.append("true" if value else "false")

    def null(self, name: Optional[str]) -> None:
        self._element(name)
        self._parts.append("null")

    def double(self, name: Optional[str], value: float) -> None:
        self._element(name)
        self._parts.append("%.17g" % value)

    def str(self, name: Optional[str], value: Union[str, bytes]) -> None:
        self._element(name)
        if self.form == FORM_72:
            self._parts.append(quote_str(value))
        else:
            self._parts.append(f'"{_raw41(value)}"')

    # -- result --------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of containers currently open."""
        return len(self._stack)

    def getvalue(self) -> str:
        """The text written so far; every container must be closed."""
        if self._stack:
            raise ValueError(f"{len(self._stack)} JSON container(s) still open")
        return "".join(self._parts)


class JSONPairs(list):
    """A JSON object as the ordered list of its ``(key, value)`` pairs.

    Unlike a dict it keeps duplicate keys, which QEMU's vmdesc contains.
    """

    def get(self, key: str, default: Any = None) -> Any:
        """The value of the *last* pair named ``key`` (what a dict would keep)."""
        for k, v in reversed(self):
            if k == key:
                return v
        return default

    def to_dict(self) -> dict:
        """Convert recursively to dicts; duplicate keys keep the last value."""
        return {k: _pairs_to_plain(v) for k, v in self}


def _pairs_to_plain(v: Any) -> Any:
    if isinstance(v, JSONPairs):
        return v.to_dict()
    if isinstance(v, list):
        return [_pairs_to_plain(x) for x in v]
    return v


def loads_pairs(text: Union[str, bytes]) -> Any:
    """Parse JSON text; objects become :class:`JSONPairs` (duplicates kept)."""
    return json.loads(text, object_pairs_hook=JSONPairs)


def _emit(w: JSONWriter, name: Optional[str], v: Any) -> None:
    if isinstance(v, JSONPairs):
        w.start_object(name)
        for k, x in v:
            _emit(w, k, x)
        w.end_object()
    elif isinstance(v, dict):
        w.start_object(name)
        for k, x in v.items():
            _emit(w, k, x)
        w.end_object()
    elif isinstance(v, (list, tuple)):
        w.start_array(name)
        for x in v:
            _emit(w, None, x)
        w.end_array()
    elif v is None:
        w.null(name)
    elif v is True or v is False:
        w.bool(name, v)
    elif isinstance(v, int):
        w.int64(name, v)
    elif isinstance(v, float):
        w.double(name, v)
    elif isinstance(v, (str, bytes)):
        w.str(name, v)
    else:
        raise TypeError(f"cannot write {type(v).__name__} as JSON")


def dumps(value: Any, form: str = FORM_72) -> str:
    """Serialise ``value`` (dicts, :class:`JSONPairs`, lists, scalars) as QEMU would."""
    w = JSONWriter(form)
    _emit(w, None, value)
    return w.getvalue()

