"""QMP's wire format as QEMU 7.2 speaks it: JSON in, JSON out, errors.

Management tools compare QEMU's replies as text (libvirt logs them,
tests diff them), so qmigx reproduces QEMU's JSON exactly, in both
directions:

* Input is a stream of bytes, not lines: QEMU's lexer finds tokens
  (including its extensions: single-quoted strings, ``\\'`` escapes,
  modified UTF-8 with ``\\xC0\\x80`` for NUL), a streamer cuts the token
  stream into messages wherever braces and brackets balance, and a parser
  builds the values. Bad input gives the same ``JSON parse error, ...``
  texts, and the lexer resynchronises after an error the same way (it
  skips to the next structural character or line end), so a client that
  sent garbage sees the same sequence of errors it would see from QEMU.
  Limits (64 MiB per message, 2 Mi tokens, nesting 1024) are QEMU's.
* Output is QEMU's JSON writer: ``", "`` and ``": "`` separators, keys
  in the order they are given (callers build dicts with
  :func:`qmigx.control._qdict.qdict`, QEMU's own key order), non-ASCII
  and DEL as upper-case ``\\uXXXX`` (surrogate pairs beyond the BMP),
  doubles as ``%.17g``, and each message ends with ``\\r\\n``.
* Errors are ``{"error": {"class": ..., "desc": ...}}`` with QEMU's
  classes; :class:`QMPError` carries one through the command handlers.

Parsed JSON objects are dicts whose key order is QEMU's QDict order for
the same input (what QEMU iterates, and so reports first, and echoes).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

from qmigx.control._qdict import qdict
from qmigx.errors import MigrationError

__all__ = [
    "QMPError",
    "GENERIC_ERROR",
    "COMMAND_NOT_FOUND",
    "DEVICE_NOT_ACTIVE",
    "DEVICE_NOT_FOUND",
    "JSONStreamer",
    "parse_json",
    "dumps",
    "encode_message",
    "error_response",
    "return_response",
    "MAX_TOKEN_SIZE",
    "MAX_TOKEN_COUNT",
    "MAX_NESTING",
]

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"

#: QEMU's per-message limits (json-streamer).
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10


class QMPError(MigrationError):
    """A QMP error reply: QEMU's error ``class`` and its ``desc`` text.

    ``desc`` is exactly what the client sees (``message``, without the
    location suffix other qmigx errors add to ``str()``).
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR, *,
                 field: Optional[str] = None) -> None:
        super().__init__(desc, field=field)
        self.error_class = error_class

    @property
    def desc(self) -> str:
        return self.message


# --- lexer --------------------------------------------------------------------

# token types
T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COMMA, T_COLON = "{", "}", "[", "]", ",", ":"
T_STRING, T_INTEGER, T_FLOAT, T_KEYWORD, T_ERROR = "string", "integer", "float", "keyword", "error"

_STRUCTURAL = {ord(c): c for c in "{}[],:"}
_WS = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_LOWER = frozenset(range(ord("a"), ord("z") + 1))
# bytes that end error recovery (and are then read again as new input)
_RESYNC = frozenset(set(range(0x20)) - {0x09} | {0xFE, 0xFF} | set(b"[]{}:,"))

# lexer states
(_START, _RECOVERY, _DQ, _DQ_ESC, _SQ, _SQ_ESC, _ZERO, _SIGN, _DIGITS_ST, _MANT, _MANT_DIGITS,
 _EXP_E, _EXP_SIGN, _EXP_DIGITS, _KEYWORD) = range(15)

# states that end a token when the next byte does not continue it (that byte is re-read)
_TERMINAL = {_ZERO: T_INTEGER, _DIGITS_ST: T_INTEGER, _MANT_DIGITS: T_FLOAT,
             _EXP_DIGITS: T_FLOAT, _KEYWORD: T_KEYWORD}


class _Lexer:
    """Byte-at-a-time tokenizer with QEMU's states, lookahead and error recovery."""

    def __init__(self) -> None:
        self.state = _START
        self.token = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        for ch in data:
            yield from self._char(ch)

    def _char(self, ch: int) -> Iterator[tuple[str, bytes]]:
        while True:  # loops only when a byte ends a token and must be read again
            st = self.state
            if st == _START:
                if ch in _WS:
                    return
                s = _STRUCTURAL.get(ch)
                if s is not None:
                    yield s, bytes((ch,))
                    return
                nxt = (_DQ if ch == 0x22 else _SQ if ch == 0x27 else _ZERO if ch == 0x30
                       else _DIGITS_ST if ch in _DIGITS else _SIGN if ch == 0x2D
                       else _KEYWORD if ch in _LOWER else None)
                if nxt is None:
                    yield from self._error(ch)
                    return
                self.token.append(ch)
                self.state = nxt
                return
            if st == _RECOVERY:
                if ch in _RESYNC:
                    self.state = _START
                    continue
                return
            if st in (_DQ, _SQ):
                if not 0x20 <= ch <= 0xFD:
                    yield from self._error(ch)
                    return
                self.token.append(ch)
                if ch == 0x5C:
                    self.state = _DQ_ESC if st == _DQ else _SQ_ESC
                elif ch == (0x22 if st == _DQ else 0x27):
                    yield from self._emit(T_STRING)
                return
            if st in (_DQ_ESC, _SQ_ESC):
                if not 0x20 <= ch <= 0xFD:
                    yield from self._error(ch)
                    return
                self.token.append(ch)
                self.state = _DQ if st == _DQ_ESC else _SQ
                return
            nxt = self._number_or_keyword(st, ch)
            if nxt is not None:
                self.token.append(ch)
                self.state = nxt
                return
            kind = _TERMINAL.get(st)
            if kind is None or (st == _ZERO and ch in _DIGITS):
                yield from self._error(ch)
                return
            yield from self._emit(kind)
            # the byte that ended the token starts the next one

    @staticmethod
    def _number_or_keyword(st: int, ch: int) -> Optional[int]:
        """The next state when ``ch`` continues the current token, else None."""
        if st == _ZERO:
            return _MANT if ch == 0x2E else None
        if st == _SIGN:
            return _ZERO if ch == 0x30 else _DIGITS_ST if ch in _DIGITS else None
        if st == _DIGITS_ST:
            if ch in _DIGITS:
                return _DIGITS_ST
            return _EXP_E if ch in (0x65, 0x45) else _MANT if ch == 0x2E else None
        if st == _MANT:
            return _MANT_DIGITS if ch in _DIGITS else None
        if st == _MANT_DIGITS:
            if ch in _DIGITS:
                return _MANT_DIGITS
            return _EXP_E if ch in (0x65, 0x45) else None
        if st == _EXP_E:
            if ch in (0x2B, 0x2D):
                return _EXP_SIGN
            return _EXP_DIGITS if ch in _DIGITS else None
        if st in (_EXP_SIGN, _EXP_DIGITS):
            return _EXP_DIGITS if ch in _DIGITS else None
        if st == _KEYWORD:
            return _KEYWORD if ch in _LOWER else None
        return None

    def _emit(self, kind: str) -> Iterator[tuple[str, bytes]]:
        tok = bytes(self.token)
        self.token.clear()
        self.state = _START
        yield kind, tok

    def _error(self, ch: int) -> Iterator[tuple[str, bytes]]:
        """The offending byte belongs to the error token; then skip to a resync point."""
        self.token.append(ch)
        tok = bytes(self.token)
        self.token.clear()
        self.state = _RECOVERY
        yield T_ERROR, tok


# --- streamer -----------------------------------------------------------------


class JSONStreamer:
    """Cuts a byte stream into JSON messages exactly where QEMU's monitor does.

    :meth:`feed` yields ``(value, None)`` for each complete message and
    ``(None, error_text)`` for each malformed one, in input order. A
    message ends when its braces and brackets balance (a top-level
    scalar is a message by itself) or go negative.
    """

    def __init__(self) -> None:
        self._lexer = _Lexer()
        self._tokens: list[tuple[str, bytes]] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def feed(self, data: bytes) -> Iterator[tuple[Any, Optional[str]]]:
        for kind, text in self._lexer.feed(data):
            out = self._token(kind, text)
            if out is not None:
                yield out

    def _token(self, kind: str, text: bytes) -> Optional[tuple[Any, Optional[str]]]:
        if kind == T_LCURLY:
            self._braces += 1
        elif kind == T_RCURLY:
            self._braces -= 1
        elif kind == T_LSQUARE:
            self._brackets += 1
        elif kind == T_RSQUARE:
            self._brackets -= 1
        elif kind == T_ERROR:
            self._reset()
            text = text.split(b"\0", 1)[0]  # QEMU prints the token as a C string
            return None, "JSON parse error, stray '%s'" % text.decode("utf-8", "replace")
        if self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._reset()
            return None, "JSON token size limit exceeded"
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._reset()
            return None, "JSON token count limit exceeded"
        if self._braces + self._brackets > MAX_NESTING:
            self._reset()
            return None, "JSON nesting depth limit exceeded"
        self._tokens.append((kind, text))
        self._size += len(text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return None
        tokens = self._tokens
        self._reset()
        try:
            return _Parser(tokens).parse(), None
        except _ParseError as exc:
            return None, "JSON parse error, " + str(exc)


def parse_json(data: bytes | str) -> Any:
    """Parse one JSON text as QEMU does (its extensions included).

    Raises :class:`QMPError` with QEMU's text for malformed input, or if
    ``data`` holds more or less than one message.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    results = list(JSONStreamer().feed(raw + b"\n"))
    if len(results) != 1:
        raise QMPError(f"expected one JSON value, found {len(results)}")
    value, err = results[0]
    if err is not None:
        raise QMPError(err)
    return value


# --- parser -------------------------------------------------------------------


class _ParseError(Exception):
    pass


_NOTHING = object()
_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1


def _valid_codepoint(cp: int) -> bool:
    """QEMU's rule: in range, not a surrogate, not a noncharacter."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE)


def _utf8_char(raw: bytes, i: int) -> tuple[int, int]:
    """Decode one modified-UTF-8 character at ``raw[i]``: (codepoint, next index); -1 if invalid."""
    b0 = raw[i]
    if b0 < 0x80:
        return (b0, i + 1) if b0 else (-1, i + 1)
    if b0 == 0xC0 and i + 1 < len(raw) and raw[i + 1] == 0x80:
        return 0, i + 2  # modified UTF-8's NUL
    if 0xC2 <= b0 <= 0xDF:
        n, cp, low = 1, b0 & 0x1F, 0x80
    elif 0xE0 <= b0 <= 0xEF:
        n, cp, low = 2, b0 & 0x0F, 0x800
    elif 0xF0 <= b0 <= 0xF4:
        n, cp, low = 3, b0 & 0x07, 0x10000
    else:
        return -1, i + 1
    j = i + 1
    for _ in range(n):
        if j >= len(raw) or raw[j] & 0xC0 != 0x80:
            return -1, j
        cp = (cp << 6) | (raw[j] & 0x3F)
        j += 1
    if cp < low or not _valid_codepoint(cp):
        return -1, j
    return cp, j


def _hex4(raw: bytes, i: int) -> int:
    digits = raw[i:i + 4]
    if len(digits) != 4 or any(chr(c) not in "0123456789abcdefABCDEF" for c in digits):
        return -1
    return int(digits, 16)


_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}


def _parse_string(raw: bytes) -> str:
    quote = raw[0]
    out: list[str] = []
    i = 1
    end = len(raw) - 1  # the closing quote
    while i < end:
        c = raw[i]
        if c == 0x5C:
            beg = i
            esc = raw[i + 1]
            i += 2
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                continue
            if esc != ord("u"):
                raise _ParseError("invalid escape sequence in string")
            cp = _hex4(raw, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and raw[i:i + 2] == b"\\u":
                trail = _hex4(raw, i + 2)
                if 0xDC00 <= trail <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF)
                    i += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                text = raw[beg:i].decode("utf-8", "replace")
                raise _ParseError(f"{text} is not a valid Unicode character")
            out.append(chr(cp))
            continue
        if c == quote:  # an escaped quote never gets here; a bare one ends the token
            break
        cp, i = _utf8_char(raw, i)
        if cp < 0:
            raise _ParseError("invalid UTF-8 sequence in string")
        out.append(chr(cp))
    return "".join(out)


class _Parser:
    """Recursive descent over one message's tokens; the first error found wins."""

    def __init__(self, tokens: list[tuple[str, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> Optional[tuple[str, bytes]]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _pop(self) -> tuple[str, bytes]:
        tok = self._peek()
        if tok is None:
            raise _ParseError("premature EOI")
        self.pos += 1
        return tok

    def parse(self) -> Any:
        return self._value()

    def _value(self) -> Any:
        tok = self._peek()
        if tok is None:
            raise _ParseError("premature EOI")
        kind, text = tok
        if kind == T_LCURLY:
            return self._object()
        if kind == T_LSQUARE:
            return self._array()
        self.pos += 1
        if kind == T_STRING:
            return _parse_string(text)
        if kind == T_INTEGER:
            value = int(text)
            if _I64_MIN <= value <= _U64_MAX:
                return value
            return float(text)
        if kind == T_FLOAT:
            return float(text)
        if kind == T_KEYWORD:
            word = text.decode("ascii")
            if word in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[word]
            raise _ParseError(f"invalid keyword '{word}'")
        raise _ParseError("expecting value")

    def _object(self) -> dict:
        self.pos += 1  # '{'
        items: dict[str, Any] = {}
        nxt = self._peek()
        if nxt is None:
            raise _ParseError("premature EOI")
        if nxt[0] == T_RCURLY:
            self.pos += 1
            return {}
        self._pair(items)
        kind, _ = self._pop()
        while kind != T_RCURLY:
            if kind != T_COMMA:
                raise _ParseError("expected separator in dict")
            self._pair(items)
            kind, _ = self._pop()
        return qdict(items)

    def _pair(self, items: dict) -> None:
        if self._peek() is None:
            raise _ParseError("premature EOI")
        key = self._value()
        if not isinstance(key, str):
            raise _ParseError("key is not a string in object")
        kind, _ = self._pop()
        if kind != T_COLON:
            raise _ParseError("missing : in object pair")
        value = self._value()
        if key in items:
            raise _ParseError("duplicate key")
        items[key] = value

    def _array(self) -> list:
        self.pos += 1  # '['
        items: list[Any] = []
        nxt = self._peek()
        if nxt is None:
            raise _ParseError("premature EOI")
        if nxt[0] == T_RSQUARE:
            self.pos += 1
            return items
        items.append(self._value())
        kind, _ = self._pop()
        while kind != T_RSQUARE:
            if kind != T_COMMA:
                raise _ParseError("expected separator in list")
            items.append(self._value())
            kind, _ = self._pop()
        return items


# --- writer -------------------------------------------------------------------

_OUT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                "\t": "\\t"}


def _quote(s: str) -> str:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    out = ['"']
    for ch in s:
        esc = _OUT_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0xFFFD  # a lone surrogate is not a character: QEMU's replacement
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _double(v: float) -> str:
    if math.isnan(v):
        return "-nan" if math.copysign(1.0, v) < 0 else "nan"
    return "%.17g" % v


def _write(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_quote(obj))
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(_double(obj))
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for k, v in obj.items():
            if not first:
                out.append(", ")
            first = False
            out.append(_quote(str(k)))
            out.append(": ")
            _write(v, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(", ")
            _write(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot write {type(obj).__name__} as QMP JSON")


def dumps(obj: Any) -> str:
    """``obj`` as QEMU's (non-pretty) JSON writer prints it; dict order is kept."""
    out: list[str] = []
    _write(obj, out)
    return "".join(out)


def encode_message(obj: Any) -> bytes:
    """One QMP message on the wire: the JSON text and QEMU's ``\\r\\n``."""
    return dumps(obj).encode("ascii") + b"\r\n"


def error_response(desc: str, error_class: str = GENERIC_ERROR, id: Any = _NOTHING) -> dict:
    """``{"error": {"class", "desc"}}`` (plus the request's ``id`` if it had one)."""
    rsp = {"error": qdict({"class": error_class, "desc": desc})}
    if id is not _NOTHING:
        rsp["id"] = id
    return qdict(rsp)


def return_response(value: Any, id: Any = _NOTHING) -> dict:
    """``{"return": value}`` (plus ``id``)."""
    rsp = {"return": value}
    if id is not _NOTHING:
        rsp["id"] = id
    return qdict(rsp)
