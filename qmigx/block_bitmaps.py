"""Block dirty bitmaps: the bits, their wire serialization, and the bitmaps file.

A block dirty bitmap (QEMU's ``BdrvDirtyBitmap`` over an ``HBitmap``)
has one bit per *granule* of ``granularity`` bytes of a disk of ``size``
bytes. What dirty-bitmap migration moves is exactly QEMU's serialization
of the bottom level of that bitmap: little-endian 64-bit words, bit k of
word w being granule ``64 w + k``, cut into chunks of 1 KiB (8192
granules) per BITS record.

Storage is sparse by chunk: a dict from chunk index to its 128 words,
holding only chunks that were ever written. A chunk is therefore both the
unit the source serializes and the unit the destination can be made to
allocate, so memory follows the bits that really arrived, never a size a
peer claims (a ZEROES record over an exabyte costs nothing). Conversions
between byte ranges and words are numpy operations over all ranges at
once; no Python loop runs per bit or per word.

The bitmaps file (``--bitmaps``) is JSON::

    {"<node>": {"<bitmap>": {"granularity": 65536, "size": 67108864,
                              "persistent": false, "enabled": true,
                              "dirty": [[0, 65536], [1048576, 131072]]}}}

``size`` is the length of the disk the bitmap covers, in bytes. It is a
multiple of 512 because QEMU measures block nodes in sectors (the bitmap
of a node covers ``bdrv_getlength``, which is whole sectors), and it is
what the wire lets a receiver learn: BITS records carry sector ranges,
and in precopy the source sends every chunk up to the node's last sector,
so the end of the last chunk is the disk size. ``dirty`` lists byte
ranges, merged, sorted, granule-aligned, the last one cut at ``size``;
on input any ranges are accepted and mark every granule they touch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from qmigx.errors import BitmapError
from qmigx.wire import BDRV_SECTOR_SIZE, DIRTY_BITMAP_BUF_ALIGN, DIRTY_BITMAP_CHUNK_SIZE

__all__ = [
    "BlockDirtyBitmap",
    "DirtyBitmapSet",
    "CHUNK_GRANULES",
    "CHUNK_WORDS",
    "check_granularity",
    "wire_name",
    "serialization_words",
    "align_bufsize",
]

#: granules per chunk: 1 KiB of bitmap
CHUNK_GRANULES = DIRTY_BITMAP_CHUNK_SIZE * 8
#: 64-bit words per chunk
CHUNK_WORDS = DIRTY_BITMAP_CHUNK_SIZE // 8
_CHUNK_SHIFT = CHUNK_WORDS.bit_length() - 1
_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_U64 = np.dtype("<u8")
#: QEMU's bitmap names are at most this long (BDRV_BITMAP_MAX_NAME_SIZE)
BITMAP_NAME_MAX = 1023
_MAX_GRANULARITY = 1 << 31
#: byte offsets must stay below this (QEMU keeps disk lengths in int64)
_MAX_BYTES = 1 << 63
_KEYS = {"granularity", "size", "persistent", "enabled", "dirty"}


def wire_name(name: str) -> bytes:
    """A node or bitmap name as bytes: names from a stream need not be UTF-8, and keep their bytes."""
    return name.encode("utf-8", "surrogateescape")


def check_granularity(granularity: Any, *, field: str = "granularity") -> int:
    """A granularity QEMU can create: a power of two from 512 to 2^31 bytes."""
    if (isinstance(granularity, bool) or not isinstance(granularity, int)
            or granularity < BDRV_SECTOR_SIZE or granularity > _MAX_GRANULARITY
            or granularity & (granularity - 1)):
        raise BitmapError(f"Granularity must be power of 2 and at least 512 "
                          f"(and at most 2^31), not {granularity!r}", field=field)
    return granularity


def serialization_words(granularity: int, start: int, count: int) -> tuple[int, int]:
    """QEMU's serialization chunk of bytes ``[start, start + count)``: (first word, words).

    Alignment and bounds are the caller's to check (:meth:`BlockDirtyBitmap.check_range`).
    """
    if count == 0:
        return start >> (granularity.bit_length() - 1) >> 6, 0
    shift = granularity.bit_length() - 1 + 6
    first = start >> shift
    return first, ((start + count - 1) >> shift) - first + 1


def align_bufsize(nbytes: int) -> int:
    """A BITS buffer size as QEMU's sender rounds it (to four host longs)."""
    return -(-nbytes // DIRTY_BITMAP_BUF_ALIGN) * DIRTY_BITMAP_BUF_ALIGN


def _mask(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Words with bits ``lo..hi`` (inclusive) set."""
    return (_ONES >> (63 - hi).astype(np.uint64)) & (_ONES << lo.astype(np.uint64))


def _merge(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open intervals ``[a, b)`` (non-empty) merged into sorted disjoint runs."""
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    new = np.empty(a.size, bool)
    new[0] = True
    new[1:] = a[1:] > reach[:-1]
    heads = np.flatnonzero(new)
    return a[heads], reach[np.append(heads[1:] - 1, a.size - 1)]


def _bit_positions(words: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Granule numbers of the set bits of ``words`` (word numbers ``index``), ascending."""
    nz = np.flatnonzero(words)
    if not nz.size:
        return np.empty(0, np.int64)
    bits = np.unpackbits(words[nz].astype(_U64).view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little")
    row, col = np.nonzero(bits)
    return index[nz[row]] * 64 + col


class BlockDirtyBitmap:
    """One named dirty bitmap of a block node.

    Args:
        name: the bitmap's name (QEMU's rules: non-empty, at most 1023 bytes).
        granularity: bytes per bit, a power of two from 512 to 2^31.
        size: bytes of disk covered, a multiple of 512; None while a
            destination still learns it from the records.
        persistent, enabled: QEMU's flags (``recording`` is ``enabled``).
    """

    __slots__ = ("name", "granularity", "size", "persistent", "enabled", "shift", "_chunks")

    def __init__(self, name: str, granularity: int, size: Optional[int], *,
                 persistent: bool = False, enabled: bool = True) -> None:
        if not isinstance(name, str) or not name:
            raise BitmapError("Bitmap name cannot be empty", field="name")
        if len(wire_name(name)) > BITMAP_NAME_MAX:
            raise BitmapError(f"Bitmap name too long: {name}", field="name")
        self.name = name
        self.granularity = check_granularity(granularity)
        self.shift = granularity.bit_length() - 1
        self._chunks: dict[int, np.ndarray] = {}
        self.size: Optional[int] = None
        if size is not None:
            self.set_size(size)
        self.persistent = bool(persistent)
        self.enabled = bool(enabled)

    def __repr__(self) -> str:
        return (f"BlockDirtyBitmap({self.name!r}, granularity={self.granularity}, size={self.size}, "
                f"persistent={self.persistent}, enabled={self.enabled}, "
                f"dirty_granules={self.dirty_granules()})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockDirtyBitmap):
            return NotImplemented
        return (self.name, self.granularity, self.size, self.persistent, self.enabled) == (
            other.name, other.granularity, other.size, other.persistent, other.enabled
        ) and self.dirty_ranges() == other.dirty_ranges()

    __hash__ = None  # type: ignore[assignment]

    # -- geometry ---------------------------------------------------------------------
    def set_size(self, size: Any) -> None:
        """Fix the covered length (bytes, a multiple of 512); bits past it are dropped."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size >= _MAX_BYTES:
            raise BitmapError(f"size must be a byte count, not {size!r}", field="size")
        if size % BDRV_SECTOR_SIZE:
            raise BitmapError(f"size {size} is not a multiple of {BDRV_SECTOR_SIZE} "
                              "(QEMU measures disks in sectors)", field="size")
        self.size = size
        self._trim()

    @property
    def granules(self) -> int:
        """Bits in the bitmap: granules of the disk, the last one possibly partial."""
        if self.size is None:
            raise BitmapError(f"bitmap {self.name!r} has no size yet", field="size")
        return -(-self.size >> self.shift)

    @property
    def total_sectors(self) -> int:
        """The node's length in sectors, as the source's chunk loop counts it."""
        return (self.size or 0) // BDRV_SECTOR_SIZE

    @property
    def sectors_per_chunk(self) -> int:
        """Sectors covered by one 1 KiB chunk of this bitmap (QEMU's sectors_per_chunk)."""
        return CHUNK_GRANULES * (self.granularity // BDRV_SECTOR_SIZE)

    def check_range(self, start: int, count: int) -> Optional[str]:
        """Why bytes ``[start, start + count)`` cannot be (de)serialized, or None.

        QEMU's rule: the range starts on a 64-granule boundary and ends on
        one or at the end of the bitmap, inside the bitmap.
        """
        if count == 0:
            return None
        align = 64 << self.shift
        if start % align:
            return f"range starting at byte {start} is not aligned to {align} bytes (64 granules)"
        end = start + count
        if end >= _MAX_BYTES:
            return f"range ending at byte {end} lies beyond any disk"
        if self.size is not None:
            if ((end - 1) >> self.shift) >= self.granules:
                return f"range ending at byte {end} lies past the bitmap's {self.size} bytes"
            if end % align and end != self.size:
                return f"range ending at byte {end} is neither aligned nor the bitmap's end"
        return None

    # -- bits ----------------------------------------------------------------------------
    def chunk(self, index: int) -> Optional[np.ndarray]:
        """The 128 words of chunk ``index`` (granules from ``index * 8192``), or None if clear."""
        return self._chunks.get(index)

    def chunk_indices(self) -> list[int]:
        return sorted(self._chunks)

    def clear(self) -> None:
        self._chunks.clear()

    def set_dirty(self, ranges: Iterable[Any]) -> None:
        """Mark every granule that byte ranges ``[[offset, length], ...]`` touch."""
        arr = np.asarray(list(ranges) if not isinstance(ranges, np.ndarray) else ranges,
                         dtype=np.int64).reshape(-1, 2)
        arr = arr[arr[:, 1] > 0]
        if not arr.size:
            return
        g0 = arr[:, 0] >> self.shift
        g1 = ((arr[:, 0] + arr[:, 1] - 1) >> self.shift) + 1
        self._set_granules(*_merge(g0, g1))

    def _set_granules(self, a: np.ndarray, b: np.ndarray) -> None:
        """Set granules of disjoint runs ``[a, b)``: edge words by mask, inner words whole."""
        w0, w1 = a >> 6, (b - 1) >> 6
        single = w0 == w1
        edge_w = np.concatenate([w0, w1[~single]])
        edge_m = np.concatenate([_mask(a & 63, np.where(single, (b - 1) & 63, 63)),
                                 _mask(np.zeros(int((~single).sum()), np.int64),
                                       ((b - 1) & 63)[~single])])
        inner_n = np.maximum(w1 - w0 - 1, 0)
        total = int(inner_n.sum())
        inner = (np.repeat(w0 + 1 - (np.cumsum(inner_n) - inner_n), inner_n)
                 + np.arange(total, dtype=np.int64)) if total else np.empty(0, np.int64)
        keys = np.unique(np.concatenate([edge_w, inner]) >> _CHUNK_SHIFT)
        block = np.zeros((keys.size, CHUNK_WORDS), np.uint64)
        if total:
            block[np.searchsorted(keys, inner >> _CHUNK_SHIFT), inner & (CHUNK_WORDS - 1)] = _ONES
        np.bitwise_or.at(block, (np.searchsorted(keys, edge_w >> _CHUNK_SHIFT),
                                 edge_w & (CHUNK_WORDS - 1)), edge_m)
        for i, key in enumerate(keys.tolist()):
            have = self._chunks.get(key)
            if have is None:
                self._chunks[key] = block[i]
            else:
                have |= block[i]
        self._trim()

    def write_words(self, first: int, words: np.ndarray) -> None:
        """Overwrite words ``first...`` with ``words`` (a deserialized BITS buffer, copied)."""
        pos, n = 0, len(words)
        while pos < n:
            key, col = divmod(first + pos, CHUNK_WORDS)
            take = min(CHUNK_WORDS - col, n - pos)
            part = words[pos : pos + take]
            have = self._chunks.get(key)
            if have is not None:
                have[col : col + take] = part
            elif take == CHUNK_WORDS:  # stored as sent: memory stays within what arrived
                self._chunks[key] = part.astype(np.uint64)
            elif part.any():
                have = self._chunks[key] = np.zeros(CHUNK_WORDS, np.uint64)
                have[col : col + take] = part
            pos += take
        if self.size is not None and (first + n) * 64 > self.granules:
            self._trim()

    def clear_words(self, first: int, count: int) -> None:
        """Zero words ``[first, first + count)`` (a ZEROES record), touching only stored chunks."""
        if count <= 0:
            return
        end = first + count
        lo, hi = first // CHUNK_WORDS, (end - 1) // CHUNK_WORDS
        span = range(lo, hi + 1)
        if len(span) > len(self._chunks):  # a huge range: look only at what is stored
            span = [k for k in self._chunks if lo <= k <= hi]
        for key in [k for k in span if k in self._chunks]:
            base = key * CHUNK_WORDS
            self._chunks[key][max(first - base, 0) : min(end - base, CHUNK_WORDS)] = 0

    def _trim(self) -> None:
        """Drop bits past the last granule (a peer's stray bits never count)."""
        if self.size is None:
            return
        granules = self.granules
        limit_key = granules >> (6 + _CHUNK_SHIFT)
        for key in [k for k in self._chunks if k >= limit_key]:
            arr = self._chunks[key]
            first_bit = granules - key * CHUNK_GRANULES
            if first_bit <= 0:
                del self._chunks[key]
                continue
            w, b = divmod(first_bit, 64)
            if w < CHUNK_WORDS:
                if b:
                    arr[w] &= (np.uint64(1) << np.uint64(b)) - np.uint64(1)
                    w += 1
                arr[w:] = 0

    def serialize_chunk(self, first_sector: int, nr_sectors: int) -> bytes:
        """The BITS buffer QEMU's sender makes for these sectors: words, zero-padded to 32 bytes."""
        start, count = first_sector * BDRV_SECTOR_SIZE, nr_sectors * BDRV_SECTOR_SIZE
        first, n = serialization_words(self.granularity, start, count)
        if n == CHUNK_WORDS and not first % CHUNK_WORDS:  # a whole chunk, as the source sends them
            have = self._chunks.get(first // CHUNK_WORDS)
            return bytes(DIRTY_BITMAP_CHUNK_SIZE) if have is None else have.astype(_U64).tobytes()
        out = np.zeros(align_bufsize(n * 8) // 8, _U64)
        pos = 0
        while pos < n:
            key, col = divmod(first + pos, CHUNK_WORDS)
            take = min(CHUNK_WORDS - col, n - pos)
            have = self._chunks.get(key)
            if have is not None:
                out[pos : pos + take] = have[col : col + take]
            pos += take
        return out.tobytes()

    # -- views ------------------------------------------------------------------------------
    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.array(sorted(self._chunks), np.int64)
        words = (np.stack([self._chunks[k] for k in keys.tolist()]) if keys.size
                 else np.zeros((0, CHUNK_WORDS), np.uint64))
        return keys, words

    def dirty_granules(self) -> int:
        """Set bits (QEMU's ``count`` is this times the granularity)."""
        _, words = self._stacked()
        return int(np.bitwise_count(words).sum()) if words.size else 0

    def dirty_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Maximal runs of set granules as arrays ``(first, end)`` (end exclusive)."""
        keys, words = self._stacked()
        if not keys.size:
            empty = np.empty(0, np.int64)
            return empty, empty
        flat = words.reshape(-1)
        index = (keys[:, None] * CHUNK_WORDS + np.arange(CHUNK_WORDS)).reshape(-1)
        prev = np.zeros_like(flat)
        prev[1:] = flat[:-1] >> np.uint64(63)
        nxt = np.zeros_like(flat)
        nxt[:-1] = flat[1:] & np.uint64(1)
        gap = np.flatnonzero(np.diff(keys) != 1)  # chunks not adjacent: no carry between them
        prev[(gap + 1) * CHUNK_WORDS] = 0
        nxt[(gap + 1) * CHUNK_WORDS - 1] = 0
        starts = flat & ~((flat << np.uint64(1)) | prev)
        ends = flat & ~((flat >> np.uint64(1)) | (nxt << np.uint64(63)))
        return _bit_positions(starts, index), _bit_positions(ends, index) + 1

    def dirty_ranges(self) -> list[list[int]]:
        """Dirty byte ranges ``[[offset, length], ...]``: merged, sorted, cut at ``size``."""
        first, end = self.dirty_runs()
        off = first << self.shift
        stop = end << self.shift
        if self.size is not None:
            stop = np.minimum(stop, self.size)
        return np.stack([off, stop - off], axis=1).tolist()

    def sha256(self) -> str:
        """QEMU's ``x-debug-block-dirty-bitmap-sha256``: SHA-256 of the bottom-level words."""
        nwords = max((self.granules + 63) >> 6, 1)
        h = hashlib.sha256()
        zeros = bytes(1 << 20)
        pos = 0

        def pad(upto: int) -> None:
            nonlocal pos
            while pos < upto:
                step = min(upto - pos, len(zeros) // 8)
                h.update(zeros[: step * 8])
                pos += step

        for key in sorted(self._chunks):
            base = key * CHUNK_WORDS
            if base >= nwords:
                break
            pad(base)
            take = min(CHUNK_WORDS, nwords - base)
            h.update(self._chunks[key][:take].astype(_U64).tobytes())
            pos = base + take
        pad(nwords)
        return h.hexdigest()

    # -- the file form -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"granularity": self.granularity, "size": self.size, "persistent": self.persistent,
                "enabled": self.enabled, "dirty": self.dirty_ranges()}

    @classmethod
    def from_json(cls, name: str, obj: Any, *, where: str = "") -> "BlockDirtyBitmap":
        where = where or name
        if not isinstance(obj, dict):
            raise BitmapError(f"{where}: expected an object", field=where)
        unknown = set(obj) - _KEYS
        if unknown:
            raise BitmapError(f"{where}: unknown keys {sorted(unknown)}", field=where)
        for key in ("granularity", "size"):
            if key not in obj:
                raise BitmapError(f"{where}: '{key}' is missing", field=f"{where}/{key}")
        flags = {}
        for key, default in (("persistent", False), ("enabled", True)):
            v = obj.get(key, default)
            if not isinstance(v, bool):
                raise BitmapError(f"{where}/{key}: expected true or false", field=f"{where}/{key}")
            flags[key] = v
        try:
            bm = cls(name, obj["granularity"], obj["size"], **flags)
        except BitmapError as exc:
            raise BitmapError(f"{where}: {exc.message}",
                              field=f"{where}/{exc.field or 'name'}") from None
        bm.set_dirty(_ranges(obj.get("dirty", []), bm.size, f"{where}/dirty"))
        return bm


def _ranges(value: Any, size: int, where: str) -> np.ndarray:
    """``[[offset, length], ...]`` checked: integers, inside ``[0, size]``."""
    if not isinstance(value, list):
        raise BitmapError(f"{where}: expected a list of [offset, length]", field=where)
    ok = all(isinstance(r, list) and len(r) == 2
             and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in value)
    if not ok:
        raise BitmapError(f"{where}: expected a list of [offset, length] integer pairs",
                          field=where)
    arr = np.array(value, dtype=object).reshape(-1, 2)
    if arr.size:
        bad = [i for i, (o, n) in enumerate(value) if o < 0 or n < 0 or o + n > size]
        if bad:
            o, n = value[bad[0]]
            raise BitmapError(f"{where}[{bad[0]}]: range [{o}, {n}] is outside the disk's "
                              f"{size} bytes", field=f"{where}[{bad[0]}]")
    return arr.astype(np.int64)


class DirtyBitmapSet:
    """Named bitmaps by block node, in order: what ``--bitmaps`` files hold.

    Node order and bitmap order are kept as given (a source sends them in
    this order; a destination records them in arrival order).
    """

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, BlockDirtyBitmap]] = {}

    def add(self, node: str, bitmap: BlockDirtyBitmap) -> BlockDirtyBitmap:
        """Add ``bitmap`` to ``node``; a name may be used once per node, as in QEMU."""
        bitmaps = self.nodes.setdefault(node, {})
        if bitmap.name in bitmaps:
            raise BitmapError(f"Bitmap already exists: {bitmap.name}", field=f"{node}/{bitmap.name}")
        bitmaps[bitmap.name] = bitmap
        return bitmap

    def get(self, node: str, name: str) -> Optional[BlockDirtyBitmap]:
        return self.nodes.get(node, {}).get(name)

    def __iter__(self) -> Iterator[tuple[str, BlockDirtyBitmap]]:
        for node, bitmaps in self.nodes.items():
            for bm in bitmaps.values():
                yield node, bm

    def __len__(self) -> int:
        return sum(len(b) for b in self.nodes.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmapSet):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict:
        return {node: {name: bm.to_json() for name, bm in bitmaps.items()}
                for node, bitmaps in self.nodes.items()}

    @classmethod
    def from_json(cls, obj: Any) -> "DirtyBitmapSet":
        """Build from the file's JSON value; every refusal names where it is."""
        if not isinstance(obj, dict):
            raise BitmapError("bitmaps file: expected an object of block nodes", field="")
        out = cls()
        for node, bitmaps in obj.items():
            if not isinstance(bitmaps, dict):
                raise BitmapError(f"{node}: expected an object of bitmaps", field=node)
            sizes = set()
            for name, spec in bitmaps.items():
                bm = out.add(node, BlockDirtyBitmap.from_json(name, spec, where=f"{node}/{name}"))
                sizes.add(bm.size)
            if len(sizes) > 1:
                raise BitmapError(f"{node}: bitmaps of one node must cover the same disk size, "
                                  f"not {sorted(sizes)}", field=f"{node}")
        return out

    @classmethod
    def load(cls, path: str) -> "DirtyBitmapSet":
        try:
            with open(path) as f:
                obj = json.load(f)
        except ValueError as exc:
            raise BitmapError(f"{path}: not JSON: {exc}", field=path) from None
        return cls.from_json(obj)

    def dumps(self) -> str:
        """The file's text: one node, bitmap and range per line."""
        lines = ["{"]
        nodes = list(self.nodes.items())
        for i, (node, bitmaps) in enumerate(nodes):
            lines.append(f" {json.dumps(node)}: {{")
            for j, (name, bm) in enumerate(bitmaps.items()):
                head = {"granularity": bm.granularity, "size": bm.size,
                        "persistent": bm.persistent, "enabled": bm.enabled}
                ranges = bm.dirty_ranges()
                body = json.dumps(head)[:-1]
                if ranges:
                    body += ', "dirty": [\n' + ",\n".join(f"   [{o}, {n}]" for o, n in ranges)
                    body += "]}"
                else:
                    body += ', "dirty": []}'
                lines.append(f"  {json.dumps(name)}: {body}" + ("," if j < len(bitmaps) - 1 else ""))
            lines.append(" }" + ("," if i < len(nodes) - 1 else ""))
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.dumps())
