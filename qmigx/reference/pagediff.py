"""Plain-Python twin of ``qmigx._core.pagediff``: the readable reference.

Pages are given where they lie: page ``i`` of a block is the
``page_size`` bytes of a buffer at ``off[i]``, or a page of zeros when
``off[i]`` is negative (a ZERO record). That is how ``qmigx diff``
reads two saved streams in place, without loading either.

* :func:`changed_pages` marks the pages that differ between two such
  views of one block.
* :class:`XXH64` digests a block's content page by page, in page order:
  the standard XXH64 (seed 0) of the bytes the pages hold, so the digest
  of a block read in place from a stream equals that of the same block
  loaded into memory.
"""

from __future__ import annotations

__all__ = ["changed_pages", "zero_pages", "gather_pages", "xbzrle_records", "XXH64"]

_M = (1 << 64) - 1
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & _M
    return (_rotl(acc, 31) * P1) & _M


def _merge(acc: int, v: int) -> int:
    acc ^= _round(0, v)
    return (acc * P1 + P4) & _M


def _check(view: memoryview, off, page_size: int, what: str) -> list[int]:
    if page_size <= 0 or page_size % 32:
        raise ValueError(f"page size {page_size} is not a positive multiple of 32")
    offs = [int(o) for o in off]
    for i, o in enumerate(offs):
        if o >= 0 and o + page_size > len(view):
            raise ValueError(f"{what} page {i} at {o} lies outside the buffer of "
                             f"{len(view)} bytes")
    return offs


def _page(view: memoryview, o: int, page_size: int) -> bytes:
    return bytes(page_size) if o < 0 else bytes(view[o : o + page_size])


def changed_pages(a, a_off, b, b_off, changed, page_size: int = 4096) -> int:
    """Set ``changed[i]`` to 1 where page ``i`` differs between the two views, else 0.

    Returns how many pages differ. Raises ValueError for views of different
    page counts, a ``changed`` too short, or a page outside its buffer
    (checked before anything is compared).
    """
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    oa = _check(va, a_off, page_size, "first")
    ob = _check(vb, b_off, page_size, "second")
    if len(oa) != len(ob):
        raise ValueError("the two views differ in page count")
    out = memoryview(changed).cast("B")
    if len(out) < len(oa):
        raise ValueError(f"changed holds {len(out)} entries; {len(oa)} pages need as many")
    count = 0
    for i, (x, y) in enumerate(zip(oa, ob)):
        diff = not (x < 0 and y < 0) and _page(va, x, page_size) != _page(vb, y, page_size)
        out[i] = int(diff)
        count += diff
    return count


def zero_pages(data, off, zero, page_size: int = 4096) -> int:
    """Set ``zero[i]`` to 1 where page ``i`` holds only zero bytes (a negative
    offset is a ZERO record), else 0; returns how many are zero."""
    view = memoryview(data).cast("B")
    offs = _check(view, off, page_size, "a")
    out = memoryview(zero).cast("B")
    if len(out) < len(offs):
        raise ValueError(f"zero holds {len(out)} entries; {len(offs)} pages need as many")
    count = 0
    for i, o in enumerate(offs):
        z = not any(_page(view, o, page_size))
        out[i] = int(z)
        count += z
    return count


def gather_pages(data, off, out) -> None:
    """Copy page ``i`` (at ``off[i]``; negative: zeros) into row ``i`` of ``out`` (2-D)."""
    view = memoryview(data).cast("B")
    rows = memoryview(out)
    page_size = rows.shape[1]
    offs = _check(view, off, page_size, "a")
    if rows.shape[0] < len(offs):
        raise ValueError(f"out holds {rows.shape[0]} rows; {len(offs)} pages need as many")
    if not offs:
        return
    flat = rows.cast("B")
    for i, o in enumerate(offs):
        flat[i * page_size : (i + 1) * page_size] = _page(view, o, page_size)


def xbzrle_records(offs, deltas, lengths, out) -> int:
    """CONTINUE XBZRLE records into ``out``, one per row of ``deltas``; the bytes written.

    Record ``i``: be64(``offs[i]`` | XBZRLE | CONTINUE), the encoding byte
    0x01, be16(``lengths[i]``), then the first ``lengths[i]`` bytes of
    ``deltas[i]`` (ram.md §2.3).
    """
    offs = [int(o) for o in offs]
    lengths = [int(k) for k in lengths]
    rows = memoryview(deltas)
    if len(lengths) != len(offs) or (offs and rows.shape[0] < len(offs)):
        raise ValueError("offs, deltas and lengths differ in length")
    width = rows.shape[1] if rows.ndim == 2 else 0
    for i, k in enumerate(lengths):
        if k <= 0 or k > width or k > 0xFFFF:
            raise ValueError(f"record {i}: delta length {k}")
    dst = memoryview(out).cast("B")
    need = sum(11 + k for k in lengths)
    if len(dst) < need:
        raise ValueError(f"out has {len(dst)} bytes; the records need {need}")
    flat = rows.cast("B") if need else b""
    w = 0
    for i, (o, k) in enumerate(zip(offs, lengths)):
        dst[w : w + 8] = (o | 0x40 | 0x20).to_bytes(8, "big")
        dst[w + 8] = 0x01
        dst[w + 9 : w + 11] = k.to_bytes(2, "big")
        dst[w + 11 : w + 11 + k] = flat[i * width : i * width + k]
        w += 11 + k
    return w


class XXH64:
    """XXH64 (seed 0) fed whole pages, read in place (see the module docstring)."""

    def __init__(self) -> None:
        self._v = [(P1 + P2) & _M, P2, 0, (-P1) & _M]
        self.length = 0

    def update_pages(self, data, off, page_size: int = 4096) -> None:
        """Feed the pages of ``data`` at ``off`` (negative: zeros), in order."""
        view = memoryview(data).cast("B")
        for o in _check(view, off, page_size, "a"):
            page = _page(view, o, page_size)
            v = self._v
            for s in range(0, page_size, 32):
                for k in range(4):
                    lane = int.from_bytes(page[s + 8 * k : s + 8 * k + 8], "little")
                    v[k] = _round(v[k], lane)
            self.length += page_size

    def intdigest(self) -> int:
        if self.length >= 32:
            v1, v2, v3, v4 = self._v
            h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
            for v in (v1, v2, v3, v4):
                h = _merge(h, v)
        else:
            h = P5
        h = (h + self.length) & _M
        h ^= h >> 33
        h = (h * P2) & _M
        h ^= h >> 29
        h = (h * P3) & _M
        h ^= h >> 32
        return h

    def hexdigest(self) -> str:
        return f"{self.intdigest():016x}"
