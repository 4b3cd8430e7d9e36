"""XBZRLE page cache (compiled kernel), with QEMU's page_cache semantics.

The source keeps the bytes it last sent for a page so the next
transmission can be an XBZRLE delta against them (xbzrle.md §6-7). Which
pages stay cached decides which pages get delta-encoded, so the rules are
QEMU's exactly: a direct-mapped table indexed by
``(addr / page_size) & (entries - 1)``, a hit refreshes the slot's age to
the current bitmap generation, and a different page may only evict a slot
that has not been touched for ``CACHED_PAGE_LIFETIME`` generations.

The batch methods serve the RAM engine: one call per batch of pages, the
loop over pages runs without the GIL.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

from qmigx.errors import ParameterError

__all__ = ["PageCache", "CACHED_PAGE_LIFETIME", "EMPTY_KEY", "SIZE_ERROR"]

#: A cached page cannot be replaced by another page for this many generations.
CACHED_PAGE_LIFETIME = 2
#: Key of an empty slot (QEMU's ``-1``); not a valid page address here.
EMPTY_KEY = 0xFFFFFFFFFFFFFFFF
#: QEMU's message for a cache size that is not a power of two >= page size.
SIZE_ERROR = (
    "Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size"
)

cdef uint64_t EMPTY = 0xFFFFFFFFFFFFFFFF
cdef uint64_t LIFETIME = 2

cdef enum:
    PC_OK = 0
    PC_ERR_EMPTY_KEY = -1


cdef int _log2_exact(uint64_t v) noexcept:
    """log2(v) if v is a power of two, else -1."""
    cdef int s = 0
    if v == 0 or (v & (v - 1)) != 0:
        return -1
    while (v >> s) != 1:
        s += 1
    return s


cdef const unsigned char[::1] _as_bytes(object buf) except *:
    cdef const unsigned char[::1] view
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        view = memoryview(buf).cast("B")
    return view


cdef object _read_only(object arr):
    view = arr.view()
    view.flags.writeable = False
    return view


cdef _raise_status(int status, Py_ssize_t index):
    """The one place that turns a kernel status code into an exception."""
    if status == PC_ERR_EMPTY_KEY:
        raise ParameterError(
            "address 0xffffffffffffffff is the empty-slot key and cannot be cached",
            offset=index,
            field="addrs",
        )
    raise ParameterError(f"page cache kernel failed with status {status}", offset=index)


cdef int _find_empty_key(const uint64_t *addrs, Py_ssize_t n, Py_ssize_t *where) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if addrs[i] == EMPTY:
            where[0] = i
            return PC_ERR_EMPTY_KEY
    return PC_OK


cdef class PageCache:
    """Direct-mapped cache of page copies for XBZRLE (QEMU's page_cache).

    Args:
        cache_size: size in bytes (parameter ``xbzrle-cache-size``); a power
            of two no less than ``page_size``, else :class:`ParameterError`
            with QEMU's message. ``entries = cache_size // page_size``.
        page_size: target page size, a power of two (4096 on x86).

    Memory: one ``(entries, page_size)`` uint8 array (``data``) allocated
    up front with ``numpy.empty``; the OS commits its pages only when a slot
    is first written, so an idle 64 MiB cache costs address space, not RAM.

    Generations: the caller passes the current bitmap generation (QEMU's
    ``dirty-sync-count``) to every call that can touch ages, rather than the
    cache holding it, so one number owned by the RAM engine drives both the
    bitmap and the cache.

    Statistics (``stats()``) use QEMU 7.2's ``xbzrle-cache`` semantics: the
    cache counts ``pages`` (lookup hits) and ``cache-miss`` itself; the
    engine adds ``bytes`` and ``overflow`` with :meth:`count_encoded` and
    :meth:`count_overflow`, and computes the rates with
    :meth:`update_rates` at each bitmap sync.
    """

    cdef readonly Py_ssize_t page_size
    cdef readonly Py_ssize_t entries
    cdef readonly Py_ssize_t num_items
    cdef int _shift
    cdef uint64_t _mask
    cdef object _data_arr
    cdef object _keys_arr
    cdef object _ages_arr
    cdef unsigned char[:, ::1] _data
    cdef uint64_t[::1] _keys
    cdef uint64_t[::1] _ages
    cdef uint64_t _pages
    cdef uint64_t _misses
    cdef uint64_t _bytes
    cdef uint64_t _overflow
    cdef uint64_t _prev_pages
    cdef uint64_t _prev_misses
    cdef uint64_t _prev_bytes
    cdef double _miss_rate
    cdef double _encoding_rate

    def __init__(self, cache_size, page_size=4096):
        ps = int(page_size)
        if ps <= 0 or _log2_exact(<uint64_t>ps) < 0:
            raise ParameterError(
                f"target page size must be a power of two, not {page_size}", field="page_size"
            )
        self.page_size = ps
        self._shift = _log2_exact(<uint64_t>ps)
        self._allocate(self._entries_for(cache_size))
        self._reset_counters()

    cdef Py_ssize_t _entries_for(self, object cache_size) except -1:
        size = int(cache_size)
        if size < self.page_size or size & (size - 1) or size >= (1 << 63):
            raise ParameterError(SIZE_ERROR, field="xbzrle-cache-size")
        return size // self.page_size

    cdef _allocate(self, Py_ssize_t entries):
        self.entries = entries
        self._mask = <uint64_t>(entries - 1)
        self._data_arr = np.empty((entries, self.page_size), dtype=np.uint8)
        self._keys_arr = np.full(entries, EMPTY_KEY, dtype=np.uint64)
        self._ages_arr = np.zeros(entries, dtype=np.uint64)
        self._data = self._data_arr
        self._keys = self._keys_arr
        self._ages = self._ages_arr
        self.num_items = 0

    cdef _reset_counters(self):
        self._pages = self._misses = self._bytes = self._overflow = 0
        self._prev_pages = self._prev_misses = self._prev_bytes = 0
        self._miss_rate = 0.0
        self._encoding_rate = 0.0

    cdef inline Py_ssize_t _slot(self, uint64_t addr) noexcept nogil:
        return <Py_ssize_t>((addr >> self._shift) & self._mask)

    # -- single pages -------------------------------------------------------

    def slot_of(self, uint64_t addr):
        """The slot index ``addr`` maps to (whether or not it is cached)."""
        return self._slot(addr)

    def is_cached(self, uint64_t addr, uint64_t generation):
        """Look ``addr`` up (QEMU's ``cache_is_cached``).

        A hit refreshes the slot's age to ``generation`` and counts in
        ``pages``; a miss counts in ``cache-miss``. Call it once per page
        handled, as QEMU does.
        """
        cdef Py_ssize_t s = self._slot(addr)
        if addr != EMPTY and self._keys[s] == addr:
            self._ages[s] = generation
            self._pages += 1
            return True
        self._misses += 1
        return False

    def get(self, uint64_t addr):
        """The cached copy of ``addr`` as a writable numpy view, or None.

        No statistics, no age refresh. The view aliases the slot: it is
        overwritten when another page takes the slot, and it no longer
        belongs to the cache after :meth:`resize`.
        """
        cdef Py_ssize_t s = self._slot(addr)
        if addr != EMPTY and self._keys[s] == addr:
            return self._data_arr[s]
        return None

    def insert(self, uint64_t addr, data, uint64_t generation):
        """Store a copy of one page (QEMU's ``cache_insert``); True if stored.

        Refused (False) when the slot holds a different page whose age +
        ``CACHED_PAGE_LIFETIME`` > ``generation``. ``data`` is any buffer of
        exactly ``page_size`` bytes; read the stored copy with :meth:`get`.
        """
        cdef const unsigned char[::1] src = _as_bytes(data)
        if src.shape[0] != self.page_size:
            raise ParameterError(
                f"page has {src.shape[0]} bytes, the cache holds {self.page_size}-byte pages",
                field="data",
            )
        if addr == EMPTY:
            _raise_status(PC_ERR_EMPTY_KEY, 0)
        return self._store(addr, &src[0], generation) >= 0

    def insert_zero(self, uint64_t addr, uint64_t generation):
        """Store a zero page for ``addr`` (a page just sent as a ZERO record)."""
        if addr == EMPTY:
            _raise_status(PC_ERR_EMPTY_KEY, 0)
        return self._store(addr, NULL, generation) >= 0

    cdef Py_ssize_t _store(self, uint64_t addr, const unsigned char *src,
                           uint64_t generation) noexcept nogil:
        """Insert under QEMU's rule; the slot, or -1 if refused. NULL src = zeros."""
        cdef Py_ssize_t s = self._slot(addr)
        cdef uint64_t key = self._keys[s]
        if key != EMPTY and key != addr and self._ages[s] + LIFETIME > generation:
            return -1
        if key == EMPTY:
            self.num_items += 1
        if src == NULL:
            memset(&self._data[s, 0], 0, <size_t>self.page_size)
        else:
            memcpy(&self._data[s, 0], src, <size_t>self.page_size)
        self._keys[s] = addr
        self._ages[s] = generation
        return s

    # -- batches ------------------------------------------------------------

    def lookup_batch(self, const uint64_t[::1] addrs, uint64_t generation,
                     int64_t[::1] out_slots):
        """Look up ``addrs`` in order, as ``is_cached`` would one by one.

        ``addrs``: uint64 array of n page addresses. ``out_slots``: int64
        array of at least n entries; ``out_slots[i]`` receives the slot index
        of a hit (read the page as ``data[slot]``) or -1 for a miss.
        Entries past n are not touched. Returns the number of hits.
        """
        cdef Py_ssize_t n = addrs.shape[0]
        cdef Py_ssize_t i, s, hits = 0
        cdef uint64_t a
        if out_slots.shape[0] < n:
            raise ParameterError(
                f"out_slots has {out_slots.shape[0]} entries for {n} addresses",
                field="out_slots",
            )
        with nogil:
            for i in range(n):
                a = addrs[i]
                s = self._slot(a)
                if self._keys[s] == a and a != EMPTY:
                    self._ages[s] = generation
                    out_slots[i] = s
                    hits += 1
                else:
                    out_slots[i] = -1
        self._pages += <uint64_t>hits
        self._misses += <uint64_t>(n - hits)
        return hits

    def insert_batch(self, const uint64_t[::1] addrs, pages, uint64_t generation,
                     int64_t[::1] out_slots):
        """Insert n pages in order, as ``insert`` would one by one.

        ``pages``: any C-contiguous buffer of exactly ``n * page_size`` bytes
        (e.g. an ``(n, page_size)`` uint8 array); page i goes with
        ``addrs[i]``. ``out_slots[i]`` receives the slot it was stored in or -1
        if refused. All arguments are checked before anything is stored.
        Returns the number of pages stored.
        """
        cdef const unsigned char[::1] src = _as_bytes(pages)
        cdef Py_ssize_t n = addrs.shape[0]
        cdef Py_ssize_t i, stored = 0, bad = 0
        cdef Py_ssize_t ps = self.page_size
        cdef int status
        if out_slots.shape[0] < n:
            raise ParameterError(
                f"out_slots has {out_slots.shape[0]} entries for {n} addresses",
                field="out_slots",
            )
        if src.shape[0] != n * ps:
            raise ParameterError(
                f"pages has {src.shape[0]} bytes, {n} pages need {n * ps}", field="pages"
            )
        if n == 0:
            return 0
        with nogil:
            status = _find_empty_key(&addrs[0], n, &bad)
        if status != PC_OK:
            _raise_status(status, bad)
        with nogil:
            for i in range(n):
                out_slots[i] = self._store(addrs[i], &src[i * ps], generation)
                if out_slots[i] >= 0:
                    stored += 1
        return stored

    # -- whole cache --------------------------------------------------------

    def resize(self, new_size):
        """Change the size in bytes, keeping what fits (QEMU's ``cache_resize``).

        Same validation as the constructor; the same number of entries is a
        no-op. Entries move to their slot in the new table in old-slot order;
        when two land in the same slot the one already there stays if its age
        is >= the newcomer's, otherwise the newcomer replaces it. Views from
        :meth:`get` or ``data`` taken before a resize no longer belong to
        the cache.
        """
        cdef Py_ssize_t new_entries = self._entries_for(new_size)
        cdef Py_ssize_t i, s, ps = self.page_size
        cdef uint64_t key, new_mask
        cdef unsigned char[:, ::1] old_data = self._data
        cdef uint64_t[::1] old_keys = self._keys
        cdef uint64_t[::1] old_ages = self._ages
        cdef Py_ssize_t old_entries = self.entries
        if new_entries == old_entries:
            return
        self._allocate(new_entries)
        new_mask = self._mask
        with nogil:
            for i in range(old_entries):
                key = old_keys[i]
                if key == EMPTY:
                    continue
                s = <Py_ssize_t>((key >> self._shift) & new_mask)
                if self._keys[s] != EMPTY:
                    if self._ages[s] >= old_ages[i]:
                        continue
                else:
                    self.num_items += 1
                memcpy(&self._data[s, 0], &old_data[i, 0], <size_t>ps)
                self._keys[s] = key
                self._ages[s] = old_ages[i]

    def reset(self):
        """Empty every slot and zero the statistics (a fresh migration)."""
        self._keys_arr[:] = EMPTY_KEY
        self._ages_arr[:] = 0
        self.num_items = 0
        self._reset_counters()

    # -- statistics ---------------------------------------------------------

    def count_encoded(self, Py_ssize_t encoded_len, name_len=None):
        """Account one XBZRLE record (7.2 ``bytes``).

        Adds ``encoded_len`` + 3 (flag byte and be16 length) + 1 +
        ``name_len`` if the block name was written (``None`` when the record
        had CONTINUE). The 8-byte header is not counted.
        """
        cdef Py_ssize_t extra = 0
        if encoded_len < 0:
            raise ParameterError(f"negative encoded length {encoded_len}", field="encoded_len")
        if name_len is not None:
            extra = name_len
            if extra < 0 or extra > 255:
                raise ParameterError(f"block name length {name_len} not in 0..255", field="name_len")
            extra += 1
        self._bytes += <uint64_t>(encoded_len + 3 + extra)

    def count_overflow(self):
        """Account one encoding that overflowed (7.2: ``bytes`` += page size)."""
        self._overflow += 1
        self._bytes += <uint64_t>self.page_size

    def update_rates(self, pages_handled):
        """Recompute ``cache-miss-rate`` and ``encoding-rate`` for a period.

        ``pages_handled``: target pages the RAM engine handled since the
        previous call (QEMU computes the rates at a bitmap sync at least 1 s
        after the previous one). With 0 pages nothing changes, as in QEMU.
        """
        cdef uint64_t handled = pages_handled
        cdef uint64_t dpages, dbytes
        if handled == 0:
            return
        self._miss_rate = <double>(self._misses - self._prev_misses) / <double>handled
        dpages = self._pages - self._prev_pages
        dbytes = self._bytes - self._prev_bytes
        if dpages == 0 or dbytes == 0:
            self._encoding_rate = 0.0
        else:
            self._encoding_rate = <double>dpages * self.page_size / <double>dbytes
        self._prev_misses = self._misses
        self._prev_pages = self._pages
        self._prev_bytes = self._bytes

    def stats(self):
        """The ``xbzrle-cache`` block of query-migrate (QEMU 7.2 names)."""
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
    def cache_size(self):
        """Size in bytes (entries × page size)."""
        return self.entries * self.page_size

    @property
    def bytes(self):
        return self._bytes

    @property
    def pages(self):
        return self._pages

    @property
    def cache_miss(self):
        return self._misses

    @property
    def cache_miss_rate(self):
        return self._miss_rate

    @property
    def encoding_rate(self):
        return self._encoding_rate

    @property
    def overflow(self):
        return self._overflow

    @property
    def data(self):
        """All slots as one writable ``(entries, page_size)`` uint8 array."""
        return self._data_arr

    @property
    def keys(self):
        """Read-only view of the slot keys (``EMPTY_KEY`` for empty slots)."""
        return _read_only(self._keys_arr)

    @property
    def ages(self):
        """Read-only view of the slot ages (generation of last fill or hit)."""
        return _read_only(self._ages_arr)

    def __len__(self):
        return self.num_items

    def __repr__(self):
        return (
            f"PageCache(cache_size={self.cache_size}, page_size={self.page_size}, "
            f"num_items={self.num_items})"
        )
