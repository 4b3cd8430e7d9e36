"""XBZRLE page cache, plain Python (test oracle for ``qmigx._core.page_cache``).

Same class, names and results as the compiled kernel; the batch methods
are loops over the single-page methods, which is their definition.
"""

from __future__ import annotations

import numpy as np

from qmigx.errors import ParameterError

__all__ = ["PageCache", "CACHED_PAGE_LIFETIME", "EMPTY_KEY", "SIZE_ERROR"]

CACHED_PAGE_LIFETIME = 2
EMPTY_KEY = 0xFFFFFFFFFFFFFFFF
SIZE_ERROR = (
    "Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size"
)


def _u64(value, name: str) -> int:
    """An unsigned 64-bit argument, refused like the compiled kernel refuses it."""
    value = int(value)
    if not 0 <= value <= EMPTY_KEY:
        raise OverflowError(f"{name}={value} does not fit an unsigned 64-bit integer")
    return value


def _as_bytes(buf) -> np.ndarray:
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


def _words(buf, kind: str, name: str, *, writable: bool = False) -> memoryview:
    """A 1-D contiguous buffer of 64-bit integers, as the compiled kernel demands."""
    view = memoryview(buf)
    if writable and view.readonly:
        raise ValueError(f"{name} is read-only")
    if view.ndim != 1 or view.itemsize != 8 or view.format.lstrip("@=<") not in kind:
        raise ValueError(f"{name} must be a 1-D {'uint64' if kind == 'QL' else 'int64'} array")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    return view


def _empty_key_error(index: int) -> ParameterError:
    return ParameterError(
        "address 0xffffffffffffffff is the empty-slot key and cannot be cached",
        offset=index,
        field="addrs",
    )


class PageCache:
    """Direct-mapped cache of page copies (see the compiled kernel for details)."""

    def __init__(self, cache_size, page_size=4096):
        ps = int(page_size)
        if ps <= 0 or ps & (ps - 1):
            raise ParameterError(
                f"target page size must be a power of two, not {page_size}", field="page_size"
            )
        self.page_size = ps
        self._allocate(self._entries_for(cache_size))
        self._reset_counters()

    def _entries_for(self, cache_size) -> int:
        size = int(cache_size)
        if size < self.page_size or size & (size - 1) or size >= 1 << 63:
            raise ParameterError(SIZE_ERROR, field="xbzrle-cache-size")
        return size // self.page_size

    def _allocate(self, entries: int) -> None:
        self.entries = entries
        self._data = np.empty((entries, self.page_size), dtype=np.uint8)
        self._keys = np.full(entries, EMPTY_KEY, dtype=np.uint64)
        self._ages = np.zeros(entries, dtype=np.uint64)
        self.num_items = 0

    def _reset_counters(self) -> None:
        self._pages = self._misses = self._bytes = self._overflow = 0
        self._prev_pages = self._prev_misses = self._prev_bytes = 0
        self._miss_rate = 0.0
        self._encoding_rate = 0.0

    # -- single pages -------------------------------------------------------

    def slot_of(self, addr) -> int:
        return (_u64(addr, "addr") // self.page_size) % self.entries

    def _holds(self, addr: int) -> int | None:
        slot = self.slot_of(addr)
        if addr != EMPTY_KEY and int(self._keys[slot]) == addr:
            return slot
        return None

    def is_cached(self, addr, generation) -> bool:
        addr = _u64(addr, "addr")
        generation = _u64(generation, "generation")
        slot = self._holds(addr)
        if slot is None:
            self._misses += 1
            return False
        self._ages[slot] = generation
        self._pages += 1
        return True

    def get(self, addr):
        slot = self._holds(_u64(addr, "addr"))
        return None if slot is None else self._data[slot]

    def insert(self, addr, data, generation) -> bool:
        addr = _u64(addr, "addr")
        generation = _u64(generation, "generation")
        page = _as_bytes(data)
        if len(page) != self.page_size:
            raise ParameterError(
                f"page has {len(page)} bytes, the cache holds {self.page_size}-byte pages",
                field="data",
            )
        if addr == EMPTY_KEY:
            raise _empty_key_error(0)
        return self._store(addr, page, generation) >= 0

    def insert_zero(self, addr, generation) -> bool:
        addr = _u64(addr, "addr")
        generation = _u64(generation, "generation")
        if addr == EMPTY_KEY:
            raise _empty_key_error(0)
        return self._store(addr, np.zeros(self.page_size, np.uint8), generation) >= 0

    def _store(self, addr: int, page: np.ndarray, generation: int) -> int:
        """QEMU's insertion rule; the slot used, or -1 if refused."""
        slot = self.slot_of(addr)
        key = int(self._keys[slot])
        occupied = key != EMPTY_KEY
        if occupied and key != addr and int(self._ages[slot]) + CACHED_PAGE_LIFETIME > generation:
            return -1
        if not occupied:
            self.num_items += 1
        self._data[slot] = page
        self._keys[slot] = addr
        self._ages[slot] = generation
        return slot

    # -- batches ------------------------------------------------------------

    def lookup_batch(self, addrs, generation, out_slots) -> int:
        addrs = _words(addrs, "QL", "addrs")
        out = _words(out_slots, "ql", "out_slots", writable=True)
        generation = _u64(generation, "generation")
        n = len(addrs)
        if len(out) < n:
            raise ParameterError(
                f"out_slots has {len(out)} entries for {n} addresses", field="out_slots"
            )
        hits = 0
        for i in range(n):
            slot = self._holds(int(addrs[i]))
            if slot is None:
                out[i] = -1
                self._misses += 1
            else:
                self._ages[slot] = generation
                out[i] = slot
                self._pages += 1
                hits += 1
        return hits

    def insert_batch(self, addrs, pages, generation, out_slots) -> int:
        addrs = _words(addrs, "QL", "addrs")
        out = _words(out_slots, "ql", "out_slots", writable=True)
        generation = _u64(generation, "generation")
        data = _as_bytes(pages)
        n = len(addrs)
        ps = self.page_size
        if len(out) < n:
            raise ParameterError(
                f"out_slots has {len(out)} entries for {n} addresses", field="out_slots"
            )
        if len(data) != n * ps:
            raise ParameterError(f"pages has {len(data)} bytes, {n} pages need {n * ps}", field="pages")
        for i in range(n):
            if int(addrs[i]) == EMPTY_KEY:
                raise _empty_key_error(i)
        stored = 0
        for i in range(n):
            out[i] = self._store(int(addrs[i]), data[i * ps : (i + 1) * ps], generation)
            stored += out[i] >= 0
        return stored

    # -- whole cache --------------------------------------------------------

    def resize(self, new_size) -> None:
        new_entries = self._entries_for(new_size)
        if new_entries == self.entries:
            return
        old = [
            (int(self._keys[i]), int(self._ages[i]), self._data[i])
            for i in range(self.entries)
            if int(self._keys[i]) != EMPTY_KEY
        ]
        self._allocate(new_entries)
        for key, age, page in old:
            slot = self.slot_of(key)
            if int(self._keys[slot]) != EMPTY_KEY:
                if int(self._ages[slot]) >= age:
                    continue  # the page already there is at least as recent
            else:
                self.num_items += 1
            self._data[slot] = page
            self._keys[slot] = key
            self._ages[slot] = age

    def reset(self) -> None:
        self._keys[:] = EMPTY_KEY
        self._ages[:] = 0
        self.num_items = 0
        self._reset_counters()

    # -- statistics ---------------------------------------------------------

    def count_encoded(self, encoded_len, name_len=None) -> None:
        encoded_len = int(encoded_len)
        if encoded_len < 0:
            raise ParameterError(f"negative encoded length {encoded_len}", field="encoded_len")
        extra = 0
        if name_len is not None:
            if not 0 <= int(name_len) <= 255:
                raise ParameterError(f"block name length {name_len} not in 0..255", field="name_len")
            extra = 1 + int(name_len)
        self._bytes += encoded_len + 3 + extra

    def count_overflow(self) -> None:
        self._overflow += 1
        self._bytes += self.page_size

    def update_rates(self, pages_handled) -> None:
        handled = _u64(pages_handled, "pages_handled")
        if handled == 0:
            return
        self._miss_rate = (self._misses - self._prev_misses) / handled
        dpages = self._pages - self._prev_pages
        dbytes = self._bytes - self._prev_bytes
        if dpages == 0 or dbytes == 0:
            self._encoding_rate = 0.0
        else:
            self._encoding_rate = dpages * self.page_size / dbytes
        self._prev_misses = self._misses
        self._prev_pages = self._pages
        self._prev_bytes = self._bytes

    def stats(self) -> dict:
        return {
            "cache-size": self.cache_size,
            "bytes": self._bytes,
            "pages": self._pages,
            "cache-miss": self._misses,
            "cache-miss-rate": self._miss_rate,
            "encoding-rate": self._encoding_rate,
            "overflow": self._overflow,
        }

    @property
    def cache_size(self) -> int:
        return self.entries * self.page_size

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def pages(self) -> int:
        return self._pages

    @property
    def cache_miss(self) -> int:
        return self._misses

    @property
    def cache_miss_rate(self) -> float:
        return self._miss_rate

    @property
    def encoding_rate(self) -> float:
        return self._encoding_rate

    @property
    def overflow(self) -> int:
        return self._overflow

    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def keys(self) -> np.ndarray:
        view = self._keys.view()
        view.flags.writeable = False
        return view

    @property
    def ages(self) -> np.ndarray:
        view = self._ages.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (
            f"PageCache(cache_size={self.cache_size}, page_size={self.page_size}, "
            f"num_items={self.num_items})"
        )
