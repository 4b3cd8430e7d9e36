"""XBZRLE delta encoding and decoding, byte by byte (plain-Python twin).

The test oracle for ``qmigx._core.xbzrle``: the same public names, the
same results and the same errors for every input, written as the
byte-wise algorithm of xbzrle.md §3 and §4 so that it can be checked
against the spec by reading it. Slow; qmigx itself runs the compiled
kernel. Pages of any length, as QEMU's encoder and decoder take them; a
run longer than ``MAX_RUN`` (QEMU's encoder stops on an assertion) gives
-1, so that the caller sends the page whole.
"""

from __future__ import annotations

from qmigx.errors import XbzrleError

__all__ = [
    "MAX_RUN",
    "encode_buffer",
    "decode_buffer",
    "encode_pages",
    "encode_at",
    "decode_pages",
    "simd",
    "uleb_encode",
    "uleb_decode",
]

#: Longest run (unchanged or changed bytes) a delta can hold: 0x3FFF, the
#: largest 1- or 2-byte uleb. Only pages longer than this can have one.
MAX_RUN = 0x3FFF
_MAX_RUN = MAX_RUN
#: QEMU's output capacity is an int: a larger ``out`` holds no more.
_INT_MAX = 2**31 - 1

#: Always ``"python"`` here (the compiled twin names its compare path).
simd = "python"

# message and field of each decoder failure (same table as the compiled twin)
_TRUNCATED_ZRUN = ("fewer than 2 bytes left for a zero-run length", "zrun")
_BAD_ULEB_ZRUN = ("zero-run length is not a 1- or 2-byte uleb", "zrun")
_ZERO_ZRUN = ("zero-run length 0 after the first pair", "zrun")
_ZRUN_PAST_PAGE = ("zero run ends past the end of the page", "zrun")
_TRUNCATED_NZRUN = ("fewer than 2 bytes left for a literal-run length", "nzrun")
_BAD_ULEB_NZRUN = ("literal-run length is not a 1- or 2-byte uleb", "nzrun")
_ZERO_NZRUN = ("literal-run length 0", "nzrun")
_LITERAL_PAST_PAGE = ("literal run ends past the end of the page", "literal")
_LITERAL_PAST_INPUT = ("literal run ends past the end of the delta", "literal")


class _Malformed(Exception):
    """A decoder failure before it is given its page prefix."""

    def __init__(self, what: tuple[str, str], offset: int) -> None:
        super().__init__(what[0])
        self.what = what
        self.offset = offset

    def error(self, prefix: str = "") -> XbzrleError:
        message, field = self.what
        return XbzrleError(prefix + message, offset=self.offset, field=field)


# --- small uleb --------------------------------------------------------------


def uleb_encode(value: int) -> bytes:
    """The 1- or 2-byte uleb of ``value`` (0..0x3FFF)."""
    if not 0 <= value <= _MAX_RUN:
        raise ValueError(f"uleb value {value} is outside 0..0x3FFF")
    if value < 0x80:
        return bytes([value])
    return bytes([0x80 | (value & 0x7F), value >> 7])


def uleb_decode(buf, pos: int) -> tuple[int, int]:
    """``(value, size)`` of the uleb at ``buf[pos]``; ValueError if invalid.

    Like the decoder, it expects two readable bytes when the first has
    bit 7 set, and refuses a second byte with bit 7 set (three bytes).
    """
    first = buf[pos]
    if first < 0x80:
        return first, 1
    second = buf[pos + 1]
    if second & 0x80:
        raise ValueError(f"uleb at {pos} is longer than 2 bytes")
    return (first & 0x7F) | (second << 7), 2


# --- argument coercion (same checks and messages as the compiled twin) -------


def _memview(obj, name: str) -> memoryview:
    try:
        return memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{name} must be a buffer (bytes, bytearray, memoryview, "
            f"numpy array, mmap), not {type(obj).__name__}"
        ) from None


def _flat(obj, name: str, writable: bool = False) -> memoryview:
    view = _memview(obj, name)
    if writable and view.readonly:
        raise TypeError(f"{name} must be a writable buffer")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if view.nbytes == 0:
        return memoryview(bytearray())  # memoryview cannot cast empty views
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _pages(obj, name: str, writable: bool = False) -> tuple[memoryview, int, int]:
    """A flat byte view of a (rows, row_bytes) array, with its two sizes."""
    shape = _memview(obj, name).shape
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be 2-dimensional (pages x bytes), got {len(shape)} dimension(s)"
        )
    view = _flat(obj, name, writable)
    return view, shape[0], shape[1] * _memview(obj, name).itemsize


def _lengths(obj, writable: bool) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"lengths must be a 1-D int32 array, not {type(obj).__name__}") from None
    if view.ndim != 1 or view.format.lstrip("@=") != "i" or view.itemsize != 4:
        raise TypeError(
            f"lengths must be a 1-D int32 array "
            f"(got format {view.format!r}, {view.ndim} dimension(s))"
        )
    if writable and view.readonly:
        raise TypeError("lengths must be a writable buffer")
    if not view.c_contiguous:
        raise ValueError("lengths must be C-contiguous")
    return view.cast("B").cast("i")


# --- encoder -----------------------------------------------------------------


def _encode(old: memoryview, new: memoryview, out: memoryview) -> int:
    """xbzrle.md §3, line by line (an empty page: the loop never runs, 0)."""
    slen, dlen = len(old), min(len(out), _INT_MAX)
    d = i = 0
    while i < slen:
        if d + 2 > dlen:
            return -1
        zrun = 0
        while i < slen and old[i] == new[i]:
            zrun += 1
            i += 1
        if zrun == slen:
            return 0  # page unchanged
        if i == slen:
            return d  # a trailing unchanged run is not encoded
        if zrun > _MAX_RUN:
            return -1  # no uleb for it (QEMU's encoder asserts)
        size = len(enc := uleb_encode(zrun))
        out[d : d + size] = enc
        d += size
        if d + 2 > dlen:
            return -1
        start = i
        while i < slen and old[i] != new[i]:
            i += 1
        nzrun = i - start
        if nzrun > _MAX_RUN:
            return -1  # no uleb for it (QEMU's encoder asserts)
        size = len(enc := uleb_encode(nzrun))
        out[d : d + size] = enc
        d += size
        if d + nzrun > dlen:
            return -1
        out[d : d + nzrun] = new[start:i]
        d += nzrun
    return d


def encode_buffer(old, new, out) -> int:
    """Encode the change from ``old`` to ``new`` into ``out``, as QEMU does.

    Returns the encoded length, 0 if the pages are identical (always for
    empty pages), or -1 if the encoding does not fit in ``len(out)`` or
    holds a run longer than ``MAX_RUN``. Only ``out[:result]`` is
    meaningful.
    """
    a, b, o = _flat(old, "old"), _flat(new, "new"), _flat(out, "out", True)
    if len(a) != len(b):
        raise ValueError(f"old and new differ in length ({len(a)} != {len(b)})")
    return _encode(a, b, o)


def encode_pages(old, new, out, lengths) -> None:
    """Encode each row of ``new`` against the same row of ``old`` into ``out``.

    ``lengths[k]`` receives page k's :func:`encode_buffer` result.
    """
    a, n, slen = _pages(old, "old")
    b, bn, bslen = _pages(new, "new")
    o, on, dlen = _pages(out, "out", True)
    lens = _lengths(lengths, True)
    if (bn, bslen) != (n, slen):
        raise ValueError(f"old and new differ in shape ({n}, {slen}) != ({bn}, {bslen})")
    if on != n or len(lens) != n:
        raise ValueError(f"out has {on} rows and lengths {len(lens)} entries; expected {n}")
    for k in range(n):
        page = slice(k * slen, (k + 1) * slen)
        lens[k] = _encode(a[page], b[page], o[k * dlen : (k + 1) * dlen])


def encode_at(old, old_off, new, new_off, page_size: int, out, lengths) -> None:
    """:func:`encode_pages` for the pages of ``new`` at ``new_off[k]`` against
    those of ``old`` at ``old_off[k]`` (a negative offset: an all-zero page)."""
    a, b = _flat(old, "old"), _flat(new, "new")
    o, on, dlen = _pages(out, "out", True)
    lens = _lengths(lengths, True)
    ao, bo = list(memoryview(old_off).cast("B").cast("q")), list(memoryview(new_off).cast("B").cast("q"))
    n = len(ao)
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, not {page_size}")
    if len(bo) != n or on != n or len(lens) != n:
        raise ValueError(f"old_off, new_off, out and lengths differ in length "
                         f"({n}, {len(bo)}, {on}, {len(lens)})")
    for k in range(n):
        if ao[k] > len(a) - page_size or bo[k] > len(b) - page_size:
            raise ValueError(f"page {k}: offset past the end of its buffer")
    zero = memoryview(bytes(page_size))
    for k in range(n):
        pa = zero if ao[k] < 0 else a[ao[k] : ao[k] + page_size]
        pb = zero if bo[k] < 0 else b[bo[k] : bo[k] + page_size]
        lens[k] = _encode(pa, pb, o[k * dlen : (k + 1) * dlen])


# --- decoder -----------------------------------------------------------------


def _check(src: memoryview, dlen: int) -> int:
    """xbzrle.md §4 without writing: the final d, or raise _Malformed."""
    slen = len(src)
    i = d = 0
    while i < slen:
        if slen - i < 2:
            raise _Malformed(_TRUNCATED_ZRUN, i)
        try:
            zrun, size = uleb_decode(src, i)
        except ValueError:
            raise _Malformed(_BAD_ULEB_ZRUN, i) from None
        if i != 0 and zrun == 0:
            raise _Malformed(_ZERO_ZRUN, i)
        if d + zrun > dlen:
            raise _Malformed(_ZRUN_PAST_PAGE, i)
        i += size
        d += zrun
        if slen - i < 2:
            raise _Malformed(_TRUNCATED_NZRUN, i)
        try:
            nzrun, size = uleb_decode(src, i)
        except ValueError:
            raise _Malformed(_BAD_ULEB_NZRUN, i) from None
        if nzrun == 0:
            raise _Malformed(_ZERO_NZRUN, i)
        i += size
        if d + nzrun > dlen:
            raise _Malformed(_LITERAL_PAST_PAGE, i)
        if i + nzrun > slen:
            raise _Malformed(_LITERAL_PAST_INPUT, i)
        i += nzrun
        d += nzrun
    return d


def _apply(src: memoryview, dst: memoryview) -> None:
    """Copy each literal run of a delta that _check accepted."""
    i = d = 0
    while i < len(src):
        zrun, size = uleb_decode(src, i)
        i += size
        d += zrun
        nzrun, size = uleb_decode(src, i)
        i += size
        dst[d : d + nzrun] = src[i : i + nzrun]
        d += nzrun
        i += nzrun


def decode_buffer(src, dst) -> int:
    """Apply the delta ``src`` in place on ``dst``; return the final d.

    The delta is validated completely first, so on XbzrleError ``dst``
    is untouched.
    """
    s, p = _flat(src, "src"), _flat(dst, "dst", True)
    try:
        d = _check(s, len(p))
    except _Malformed as bad:
        raise bad.error() from None
    _apply(s, p)
    return d


def decode_pages(deltas, lengths, pages) -> None:
    """Apply row k of ``deltas`` (``lengths[k]`` bytes, 0 = none) to page k.

    All deltas are validated before any page is changed; the error names
    the first bad page.
    """
    s, n, dlen = _pages(deltas, "deltas")
    lens = _lengths(lengths, False)
    p, pn, psize = _pages(pages, "pages", True)
    if len(lens) != n or pn != n:
        raise ValueError(f"lengths has {len(lens)} entries and pages {pn} rows; expected {n}")
    for k in range(n):
        if not 0 <= lens[k] <= dlen:
            raise ValueError(f"lengths[{k}] = {lens[k]} is outside 0..{dlen}")
    for k in range(n):
        if lens[k]:
            try:
                _check(s[k * dlen : k * dlen + lens[k]], psize)
            except _Malformed as bad:
                raise bad.error(f"page {k}: ") from None
    for k in range(n):
        if lens[k]:
            _apply(s[k * dlen : k * dlen + lens[k]], p[k * psize : (k + 1) * psize])
