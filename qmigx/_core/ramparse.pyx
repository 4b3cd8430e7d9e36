# cython: language_level=3
"""Compiled RAM record scanner; see ``qmigx.reference.ramparse`` for the twin.

The scan loop runs without the GIL over the input buffer and stops only
to look up a block name (rare: once per block switch), when the batch is
full, at EOS, at a setup record, at the end of the input, or on an error.
"""

from array import array
from itertools import accumulate
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int32_t

from qmigx.errors import RamStreamError, printable_name


KIND_ZERO = 0
KIND_PAGE = 1
KIND_XBZRLE = 2
KIND_COMPRESS = 3

FULL = 0
NEED_DATA = 1
EOS = 2
MEM_SIZE = 3
MULTIFD_FLUSH = 4

cdef enum:
    F_ZERO = 0x002
    F_MEM_SIZE = 0x004
    F_PAGE = 0x008
    F_EOS = 0x010
    F_CONTINUE = 0x020
    F_XBZRLE = 0x040
    F_HOOK = 0x080
    F_COMPRESS = 0x100
    F_MULTIFD_FLUSH = 0x200

# internal stop reasons of the nogil loop
cdef enum:
    S_FULL = 0
    S_NEED = 1
    S_EOS = 2
    S_MEMSIZE = 3
    S_FLUSH = 4
    E_FLAGS = -1
    E_HOOK = -2
    E_NOBLOCK = -3
    E_BLOCK = -8
    E_OFFSET = -4
    E_XBZ_FLAG = -5
    E_XBZ_LEN = -6
    E_CLEN = -7
    E_FLUSH = -9


cpdef long compress_bound(long n):
    """zlib's compressBound: the largest valid COMPRESS_PAGE body length."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40) |
            (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) |
            (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


class RamRecords:
    """A batch of scanned page records, as parallel typed arrays.

    Same layout as the reference twin: ``kind``, ``block``, ``offset``,
    ``pos``, ``length``, ``fill``, ``start`` and ``count``.
    """

    def __init__(self, capacity=65536):
        self.capacity = capacity
        self.count = 0
        self.kind = array("B", bytes(capacity))
        self.block = array("i", bytes(4 * capacity))
        self.offset = array("Q", bytes(8 * capacity))
        self.pos = array("q", bytes(8 * capacity))
        self.length = array("i", bytes(4 * capacity))
        self.fill = array("B", bytes(capacity))
        self.start = array("q", bytes(8 * capacity))

    def copy(self):
        """A batch holding copies of this one's filled rows only."""
        new = RamRecords.__new__(RamRecords)
        n = self.count
        new.capacity = new.count = n
        for name in ("kind", "block", "offset", "pos", "length", "fill", "start"):
            setattr(new, name, getattr(self, name)[:n])
        return new

    def clear(self):
        self.count = 0


cdef class RamScanner:
    """Scans RAM records; remembers the last block across calls (CONTINUE).

    Block names are matched in C against a table built by ``set_blocks``,
    so the whole scan runs without the GIL.
    """

    cdef public long page_size
    cdef public long last_block
    cdef public list names
    cdef public object lengths
    cdef const int64_t[::1] _lengths
    cdef bytes _blob
    cdef const int64_t[::1] _name_off
    cdef object _name_off_arr

    def __init__(self, long page_size, names, lengths):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self.last_block = -1
        self.set_blocks(names, lengths)

    @property
    def index(self):
        return {n: i for i, n in enumerate(self.names)}

    def set_blocks(self, names, lengths):
        """Replace the block table (after a setup record)."""
        self.names = [bytes(n) for n in names]
        self.lengths = array("q", [int(n) for n in lengths])
        if len(self.lengths) != len(self.names):
            raise ValueError("names and lengths differ in length")
        self._lengths = self.lengths
        self._blob = b"".join(self.names) + b"\0"
        self._name_off_arr = array("q", [0] + list(accumulate(map(len, self.names))))
        self._name_off = self._name_off_arr

    def reset_last_block(self):
        self.last_block = -1

    def scan(self, buf, Py_ssize_t pos, Py_ssize_t end, out, long long base=0):
        """Scan ``buf[pos:end]`` into ``out``; return ``(new_pos, status)``.

        ``base`` is the absolute stream offset of ``buf[0]``, used in errors.
        """
        cdef const uint8_t[::1] mv = buf
        cdef uint8_t[::1] kind = out.kind
        cdef int32_t[::1] block_a = out.block
        cdef uint64_t[::1] offset_a = out.offset
        cdef int64_t[::1] pos_a = out.pos
        cdef int32_t[::1] len_a = out.length
        cdef uint8_t[::1] fill_a = out.fill
        cdef int64_t[::1] start_a = out.start
        cdef Py_ssize_t cap = min(<Py_ssize_t>out.capacity, kind.shape[0])
        cdef Py_ssize_t count = out.count
        cdef Py_ssize_t nblocks = self._lengths.shape[0]
        cdef const int64_t* lengths = &self._lengths[0] if nblocks else NULL
        cdef const int64_t* noff = &self._name_off[0]
        cdef const char* blob = self._blob
        cdef const uint8_t* p = &mv[0] if mv.shape[0] else NULL
        cdef uint64_t ps = <uint64_t>self.page_size
        cdef uint64_t mask = ps - 1
        cdef uint64_t cbound = <uint64_t>compress_bound(self.page_size)
        cdef long last = self.last_block
        cdef int status = S_NEED
        cdef Py_ssize_t err_at = 0
        cdef uint64_t err_val = 0
        cdef Py_ssize_t q, start, body, nlen, i
        cdef uint64_t hdr, flags, kf, addr, blen
        cdef long blk
        cdef int k
        cdef uint8_t fill
        if end > mv.shape[0] or pos < 0 or pos > end:
            raise ValueError("scan range outside the buffer")
        if self._name_off_arr is None or len(self._name_off_arr) != nblocks + 1:
            raise ValueError("the block table is not set")
        with nogil:
            while True:
                if count >= cap:
                    status = S_FULL
                    break
                start = pos
                if end - pos < 8:
                    status = S_NEED
                    break
                hdr = be64(p + pos)
                flags = hdr & mask
                addr = hdr & ~mask
                q = pos + 8
                kf = flags & ~(<uint64_t>F_CONTINUE)
                if kf == F_EOS:
                    pos = q
                    status = S_EOS
                    break
                if kf == F_MEM_SIZE:
                    status = S_MEMSIZE
                    break
                if kf == F_MULTIFD_FLUSH:
                    if hdr != F_MULTIFD_FLUSH:
                        status = E_FLUSH
                        err_at = start
                        err_val = hdr
                        break
                    pos = q
                    status = S_FLUSH
                    break
                if kf != F_ZERO and kf != F_PAGE and kf != F_XBZRLE and kf != F_COMPRESS:
                    status = E_HOOK if (kf & F_HOOK) else E_FLAGS
                    err_at = start
                    err_val = flags
                    break
                if flags & F_CONTINUE:
                    if last < 0:
                        status = E_NOBLOCK
                        err_at = start
                        break
                    blk = last
                else:
                    if end - q < 1:
                        status = S_NEED
                        break
                    nlen = p[q]
                    if end - q < 1 + nlen:
                        status = S_NEED
                        break
                    blk = -1
                    for i in range(nblocks):
                        if noff[i + 1] - noff[i] == nlen and \
                                memcmp(blob + noff[i], p + q + 1, nlen) == 0:
                            blk = i
                            break
                    if blk < 0:
                        status = E_BLOCK
                        err_at = start
                        break
                    q += 1 + nlen
                if addr >= <uint64_t>lengths[blk]:
                    status = E_OFFSET
                    err_at = start
                    err_val = addr
                    last = blk
                    break
                fill = 0
                if kf == F_ZERO:
                    if end - q < 1:
                        status = S_NEED
                        break
                    fill = p[q]
                    body = q + 1
                    blen = 0
                    q += 1
                    k = 0
                elif kf == F_PAGE:
                    if <uint64_t>(end - q) < ps:
                        status = S_NEED
                        break
                    body = q
                    blen = ps
                    q += ps
                    k = 1
                elif kf == F_XBZRLE:
                    if end - q < 3:
                        status = S_NEED
                        break
                    if p[q] != 0x01:
                        status = E_XBZ_FLAG
                        err_at = q
                        err_val = p[q]
                        break
                    blen = (<uint64_t>p[q + 1] << 8) | p[q + 2]
                    if blen > ps:
                        status = E_XBZ_LEN
                        err_at = q + 1
                        err_val = blen
                        break
                    if <uint64_t>(end - q) < 3 + blen:
                        status = S_NEED
                        break
                    body = q + 3
                    q += 3 + blen
                    k = 2
                else:
                    if end - q < 4:
                        status = S_NEED
                        break
                    blen = be32(p + q)
                    if blen > cbound:
                        status = E_CLEN
                        err_at = q
                        err_val = blen
                        break
                    if <uint64_t>(end - q) < 4 + blen:
                        status = S_NEED
                        break
                    body = q + 4
                    q += 4 + blen
                    k = 3
                kind[count] = k
                block_a[count] = blk
                offset_a[count] = addr
                pos_a[count] = body
                len_a[count] = <int32_t>blen
                fill_a[count] = fill
                start_a[count] = start
                count += 1
                last = blk
                pos = q
        out.count = count
        self.last_block = last
        if status == S_FULL:
            return pos, FULL
        if status == S_NEED:
            return pos, NEED_DATA
        if status == S_EOS:
            return pos, EOS
        if status == S_MEMSIZE:
            return pos, MEM_SIZE
        if status == S_FLUSH:
            return pos, MULTIFD_FLUSH
        self._raise(status, base + err_at, err_val, last, mv, err_at)

    def _raise(self, int status, long long at, uint64_t val, long blk, mv, Py_ssize_t rel):
        if status == E_FLAGS:
            raise RamStreamError(f"Unknown combination of migration flags: 0x{val:x}",
                                 offset=at, field="flags")
        if status == E_HOOK:
            raise RamStreamError("RAM_SAVE_FLAG_HOOK record: RDMA hooks are not supported",
                                 offset=at, field="flags")
        if status == E_NOBLOCK:
            raise RamStreamError(
                "CONTINUE flag with no previous block (Ack, bad migration stream!)",
                offset=at, field="flags")
        if status == E_BLOCK:
            n = mv[rel + 8]
            name = bytes(mv[rel + 9:rel + 9 + n])
            raise RamStreamError(
                f"Can't find block '{printable_name(name.decode('utf-8', 'surrogateescape'))}'",
                offset=at, field="block")
        if status == E_OFFSET:
            raise RamStreamError(
                f"Illegal RAM offset 0x{val:x} in block "
                f"{self.names[blk].decode('utf-8', 'replace')!r} "
                f"(used length 0x{int(self.lengths[blk]):x})",
                offset=at, field="offset")
        if status == E_XBZ_FLAG:
            raise RamStreamError(
                f"Failed to load XBZRLE page - wrong compression (flag 0x{val:x})",
                offset=at, field="xbzrle.encoding")
        if status == E_XBZ_LEN:
            raise RamStreamError(
                f"Failed to load XBZRLE page - len overflow ({val} > {self.page_size})",
                offset=at, field="xbzrle.len")
        if status == E_FLUSH:
            raise RamStreamError(
                f"MULTIFD_FLUSH record 0x{val:016x}: it is the bare word 0x200 "
                f"(no offset, no CONTINUE)", offset=at, field="flags")
        if status == E_CLEN:
            raise RamStreamError(f"Invalid compressed data length: {val}",
                                 offset=at, field="compress.len")
        raise AssertionError(f"unexpected scanner status {status}")


cdef inline bint _page_is_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef const uint64_t* w = <const uint64_t*>p
    for i in range(n // 8):
        if w[i]:
            return False
    return True


def apply_records(records, Py_ssize_t first, data, list blocks, Py_ssize_t page_size=4096,
                  Py_ssize_t stop=-1):
    """Apply ZERO and PAGE records ``first..`` of a batch to block memory.

    ``blocks`` holds one writable uint8 buffer per block-table entry (any
    buffer: numpy, mmap, bytearray). Stops at the first XBZRLE or
    COMPRESS record, which the caller applies, and returns its index
    (``records.count`` when all are done). Bounds were checked by the
    scanner against the block table; they are checked again here against
    the buffers actually given, so a short buffer can never be overrun.
    ``stop`` (if >= 0) ends the run before that record.
    """
    cdef const uint8_t[::1] mv = data
    cdef const uint8_t[::1] kind = records.kind
    cdef const int32_t[::1] block_a = records.block
    cdef const uint64_t[::1] offset_a = records.offset
    cdef const int64_t[::1] pos_a = records.pos
    cdef const uint8_t[::1] fill_a = records.fill
    cdef Py_ssize_t count = records.count
    cdef Py_ssize_t nb = len(blocks)
    if 0 <= stop < count:
        count = stop
    cdef Py_ssize_t ps = page_size
    cdef uint8_t[::1] view
    cdef list views = []
    cdef uint8_t** bases = NULL
    cdef Py_ssize_t* sizes = NULL
    cdef Py_ssize_t i, b, off
    cdef int bad = 0
    if count == 0 or first >= count:
        return count
    bases = <uint8_t**>malloc(sizeof(uint8_t*) * (nb + 1))
    sizes = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nb + 1))
    try:
        for b in range(nb):
            view = blocks[b]
            views.append(view)
            sizes[b] = view.shape[0]
            bases[b] = &view[0] if view.shape[0] else NULL
        i = first
        with nogil:
            while i < count:
                if kind[i] > 1:
                    break
                b = block_a[i]
                off = <Py_ssize_t>offset_a[i]
                if b < 0 or b >= nb or off < 0 or off + ps > sizes[b]:
                    bad = 1
                    break
                if kind[i] == 1:
                    memcpy(bases[b] + off, &mv[pos_a[i]], ps)
                elif fill_a[i] != 0 or not _page_is_zero(bases[b] + off, ps):
                    memset(bases[b] + off, fill_a[i], ps)
                i += 1
        if bad:
            raise RamStreamError(
                f"record {i} lies outside its RAM block buffer", field="offset")
        return i
    finally:
        free(bases)
        free(sizes)


cdef inline void _put_be64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <uint8_t>(v >> (56 - 8 * k))


def encode_pages(mem, pages, out, Py_ssize_t page_size=4096):
    """Encode pages of one block as CONTINUE records, zero pages as ZERO.

    ``mem`` is the block's memory, ``pages`` an int64 array of page
    numbers, ``out`` a writable buffer of at least ``len(pages) * (8 +
    page_size)`` bytes. Each page becomes ``be64(offset | ZERO | CONTINUE)
    + 0x00`` if all its bytes are zero, else ``be64(offset | PAGE |
    CONTINUE) + page``, copied straight from ``mem`` (one pass, without the
    GIL). The caller writes a record naming the block first when the block
    changes (ram.md §2.1). Returns ``(nbytes, zero_pages, normal_pages)``.
    """
    cdef const uint8_t[::1] m = mem
    cdef const int64_t[::1] pg = pages
    cdef uint8_t[::1] o = out
    cdef Py_ssize_t n = pg.shape[0]
    cdef Py_ssize_t npages_mem = m.shape[0] // page_size if page_size > 0 else 0
    cdef Py_ssize_t i, w = 0, zeros = 0
    cdef int64_t p
    cdef const uint8_t* src
    cdef const uint64_t* words
    cdef Py_ssize_t k, nwords = page_size // 8
    cdef bint zero
    if page_size <= 0 or page_size % 8:
        raise ValueError(f"bad page size {page_size}")
    if o.shape[0] < n * (8 + page_size):
        raise ValueError(f"out has {o.shape[0]} bytes; {n} pages need {n * (8 + page_size)}")
    for i in range(n):
        if pg[i] < 0 or pg[i] >= npages_mem:
            raise ValueError(f"page {pg[i]} outside the block ({npages_mem} pages)")
    if n == 0:
        return 0, 0, 0
    with nogil:
        for i in range(n):
            p = pg[i]
            src = &m[p * page_size]
            zero = True
            if (<const uint64_t*>src)[0] == 0 and (<const uint64_t*>(src + page_size - 8))[0] == 0:
                words = <const uint64_t*>src
                for k in range(nwords):
                    if words[k]:
                        zero = False
                        break
            else:
                zero = False
            if zero:
                _put_be64(&o[w], <uint64_t>(p * page_size) | F_ZERO | F_CONTINUE)
                o[w + 8] = 0
                w += 9
                zeros += 1
            else:
                _put_be64(&o[w], <uint64_t>(p * page_size) | F_PAGE | F_CONTINUE)
                memcpy(&o[w + 8], src, page_size)
                w += 8 + page_size
    return w, zeros, n - zeros


def note_runs(list runs, list tables, list received, Py_ssize_t page_size=4096):
    """Enter where each record of ``runs`` left its page, in order (the last wins).

    ``runs`` holds ``(records, first, stop, shift)``: records ``first..stop-1``
    of a batch, all ZERO or PAGE, whose bodies were written ``shift`` bytes
    from their positions in the scanned buffer. Per block-table entry,
    ``tables`` holds an int64 array (a page's data position, or ``-1 - fill``
    after a ZERO record) and ``received`` a bool array, one entry per page;
    both are updated in place. One call for thousands of runs, where a
    numpy pass per run costs tens of microseconds each.
    """
    cdef Py_ssize_t nb = len(tables)
    cdef int64_t** where = NULL
    cdef uint8_t** got = NULL
    cdef Py_ssize_t* npages = NULL
    cdef int64_t[::1] wv
    cdef uint8_t[::1] gv
    cdef list keep = []
    cdef const uint8_t[::1] kind
    cdef const int32_t[::1] block_a
    cdef const uint64_t[::1] offset_a
    cdef const int64_t[::1] pos_a
    cdef const uint8_t[::1] fill_a
    cdef Py_ssize_t first, stop, i, b, p, bad_at = -1
    cdef int64_t shift
    if page_size <= 0:
        raise ValueError(f"page size {page_size} is not positive")
    if len(received) != nb:
        raise ValueError("tables and received differ in length")
    where = <int64_t**>malloc(sizeof(int64_t*) * (nb + 1))
    got = <uint8_t**>malloc(sizeof(uint8_t*) * (nb + 1))
    npages = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nb + 1))
    if where == NULL or got == NULL or npages == NULL:
        free(where)
        free(got)
        free(npages)
        raise MemoryError()
    try:
        for b in range(nb):
            wv = tables[b]
            gv = received[b].view("u1")
            keep.append((wv, gv))
            npages[b] = min(wv.shape[0], gv.shape[0])
            where[b] = &wv[0] if wv.shape[0] else NULL
            got[b] = &gv[0] if gv.shape[0] else NULL
        for run in runs:
            records, first, stop, shift = run
            kind = records.kind
            block_a = records.block
            offset_a = records.offset
            pos_a = records.pos
            fill_a = records.fill
            if first < 0 or stop > records.count or stop > kind.shape[0]:
                raise ValueError(f"run {first}..{stop} lies outside its batch")
            with nogil:
                for i in range(first, stop):
                    b = block_a[i]
                    p = <Py_ssize_t>(offset_a[i] // <uint64_t>page_size)
                    if b < 0 or b >= nb or p >= npages[b] or kind[i] > 1:
                        bad_at = i
                        break
                    where[b][p] = pos_a[i] + shift if kind[i] == 1 else -1 - <int64_t>fill_a[i]
                    got[b][p] = 1
            if bad_at >= 0:
                raise RamStreamError(f"record {bad_at} of a run is not a PAGE or ZERO record "
                                     f"inside its block's table", field="offset")
    finally:
        free(where)
        free(got)
        free(npages)
