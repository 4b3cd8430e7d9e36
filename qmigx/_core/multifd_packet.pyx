# cython: language_level=3, embedsignature=True
"""Multifd packet framing: the 64-byte init packet and the page packets.

Every multifd channel carries one init packet and then a stream of
packets, each a fixed header area (``320 + 8 * pages_alloc`` bytes) and
its page data (spec multifd.md §3-4). Headers arrive once per 512 KiB of
pages, so packing and validating one must cost a small fraction of
copying those pages: the per-offset work runs in C without the GIL, and
everything that can be checked on the fixed fields is checked first,
with the GIL held, so the loops never read or write out of bounds.

The plain-Python twin is :mod:`qmigx.reference.multifd_packet`; both give
identical results and raise identical errors for every input.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.long cimport PyLong_Check, PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memset
from qmigx._core.byteorder cimport (load_be32 as _load_be32, load_be64 as _load_be64,
                                     store_be32 as _store_be32, store_be64 as _store_be64)

import numpy as np

from qmigx.errors import MultifdPacketError, printable_name
from qmigx.wire import MULTIFD_MAGIC, MULTIFD_VERSION

cnp.import_array()

cdef uint32_t _MAGIC = MULTIFD_MAGIC
cdef uint32_t _VERSION = MULTIFD_VERSION

__all__ = [
    "HEADER_FIXED_SIZE",
    "DEFAULT_MAX_PAGES",
    "LAYOUTS",
    "header_size",
    "PacketHeader",
    "PacketHeader41",
    "PacketHeader10",
    "pack_packet_header",
    "pack_packet",
    "unpack_packet_header",
    "place_pages",
    "gather_pages",
]

#: Bytes before the offsets array: the fixed fields, 32 unused, the name.
HEADER_FIXED_SIZE = 320
#: 512 KiB of 4 KiB pages: the capacity QEMU gives every packet.
DEFAULT_MAX_PAGES = 128
#: Accepted values of ``version=``: 4.1 only renames the page count field;
#: 10.0 adds ``zero_pages`` (be32 at +32) and its offsets after the normal ones.
LAYOUTS = ("7.2", "4.1", "10.0")

cdef enum:
    _FIXED = 320
    _NAME_OFF = 64
    _NAME_LEN = 256
    _ZERO_OFF = 32
    _MASK_72 = 0xE
    _MASK_10 = 0x3E
    _L72 = 0
    _L41 = 1
    _L10 = 2

# (field, offset, size) of the fixed header fields, in wire order.
_FIELDS = (
    ("magic", 0, 4),
    ("version", 4, 4),
    ("flags", 8, 4),
    ("pages_alloc", 12, 4),
    ("normal_pages", 16, 4),
    ("next_packet_size", 20, 4),
    ("packet_num", 24, 8),
    ("unused", 32, 32),
    ("ramblock", 64, 256),
)
cdef uint64_t _U32 = 0xFFFFFFFF
cdef uint64_t _U64 = 0xFFFFFFFFFFFFFFFF


cdef enum Status:
    OK = 0
    ERR_MISALIGNED = -1
    ERR_BEYOND_BLOCK = -2



cdef int _decode_offsets(const unsigned char* src, Py_ssize_t n, uint64_t mask,
                         uint64_t limit, bint bounded, uint64_t* dst,
                         Py_ssize_t* bad) noexcept nogil:
    """Byte-swap ``n`` be64 offsets into ``dst`` and check them all.

    The loop only accumulates (OR of all values, largest value) so it has
    no branch per entry; the rare failing packet is scanned again to find
    the first bad index.
    """
    cdef Py_ssize_t i
    cdef uint64_t v, any_bits = 0, largest = 0
    for i in range(n):
        v = _load_be64(src + 8 * i)
        dst[i] = v
        any_bits |= v
        largest = v if v > largest else largest
    if not (any_bits & mask) and not (bounded and largest > limit):
        return OK
    for i in range(n):
        v = dst[i]
        if v & mask:
            bad[0] = i
            return ERR_MISALIGNED
        if bounded and v > limit:
            bad[0] = i
            return ERR_BEYOND_BLOCK
    return OK


cdef int _check_offsets(const uint64_t* offs, Py_ssize_t n, uint64_t mask,
                        uint64_t limit, Py_ssize_t* bad) noexcept nogil:
    """Check that every page ``[off, off + page)`` lies in a buffer (``limit`` = len - page)."""
    cdef Py_ssize_t i
    for i in range(n):
        if offs[i] & mask:
            bad[0] = i
            return ERR_MISALIGNED
        if offs[i] > limit:
            bad[0] = i
            return ERR_BEYOND_BLOCK
    return OK


cdef void _copy_pages(const unsigned char* src, unsigned char* dst,
                      const uint64_t* offs, Py_ssize_t n, Py_ssize_t page,
                      bint scatter) noexcept nogil:
    cdef Py_ssize_t i
    if scatter:
        for i in range(n):
            memcpy(dst + offs[i], src + i * page, page)
    else:
        for i in range(n):
            memcpy(dst + i * page, src + offs[i], page)


cdef object _offset_error(int status, Py_ssize_t i, object cls, uint64_t value,
                          Py_ssize_t page_size, object length, str what):
    """The one place that turns an offsets status code into an exception."""
    field = f"offsets[{i}]"
    where = _FIXED + 8 * i
    if status == ERR_MISALIGNED:
        msg = f"page offset 0x{value:x} is not a multiple of the page size {page_size}"
    else:
        msg = f"page offset 0x{value:x} + {page_size} lies beyond the {length}-byte {what}"
    if cls is MultifdPacketError:
        return MultifdPacketError(msg, field=field, offset=where)
    return cls(f"{msg} ({field})")


cdef const unsigned char[::1] _readable(object obj, str name):
    """A byte view of any C-contiguous buffer, whatever its format or shape."""
    cdef const unsigned char[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        mv = memoryview(obj)
        if not mv.c_contiguous:
            raise TypeError(f"{name} must be a C-contiguous buffer") from None
        view = mv.cast("B")
    return view


cdef unsigned char[::1] _writable(object obj, str name):
    cdef unsigned char[::1] view
    try:
        view = obj
    except (TypeError, ValueError, BufferError):
        mv = memoryview(obj)
        if mv.readonly or not mv.c_contiguous:
            raise TypeError(f"{name} must be a writable C-contiguous buffer") from None
        view = mv.cast("B")
    return view


cdef int _get_buffer(object obj, Py_buffer* view, bint writable, str name) except -1:
    """Acquire ``obj``'s bytes; cheaper than a typed memoryview for the 1 KiB header."""
    try:
        PyObject_GetBuffer(obj, view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    except (ValueError, BufferError):
        # numpy reports non-contiguous or read-only arrays as ValueError
        if writable:
            raise TypeError(f"{name} must be a writable C-contiguous buffer") from None
        raise TypeError(f"{name} must be a C-contiguous buffer") from None
    return 0


cdef cnp.ndarray _offsets_array(object offsets):
    """``offsets`` as a native C-contiguous uint64 array, copied only if it is not one."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(offsets):
        a = <cnp.ndarray>offsets
        if (cnp.PyArray_TYPE(a) == cnp.NPY_UINT64 and cnp.PyArray_IS_C_CONTIGUOUS(a)
                and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a)):
            return a
    return np.ascontiguousarray(offsets, dtype=np.uint64)


cdef Py_ssize_t _check_page_size(object page_size) except -1:
    cdef uint64_t ps = _as_uint(page_size, "page_size", 1 << 30)
    if ps == 0 or (ps & (ps - 1)):
        raise ValueError(f"page_size must be a power of two up to 1 GiB, not {ps}")
    return <Py_ssize_t>ps


cdef uint64_t _as_uint(object value, str name, uint64_t top) except? 0xFFFFFFFFFFFFFFFF:
    """``operator.index(value)`` as a C integer in ``0..top`` (else OverflowError)."""
    cdef uint64_t x
    if not PyLong_CheckExact(value):
        value = PyNumber_Index(value)
    try:
        x = value
    except OverflowError:
        raise OverflowError(f"{name} must be in 0..{top}, not {value}") from None
    if x > top:
        raise OverflowError(f"{name} must be in 0..{top}, not {value}")
    return x


cdef uint32_t _compression_bits(object compression) except? 0xFFFFFFFF:
    if isinstance(compression, str):
        if compression == "none":
            return 0
        if compression == "zlib":
            return 0x2
        if compression == "zstd":
            return 0x4
    elif PyLong_Check(compression) and not isinstance(compression, bool):
        if compression == 0 or compression == 0x2 or compression == 0x4:
            return compression
    raise ValueError(f"unknown multifd compression {compression!r}")


cdef object _truncated(Py_ssize_t n, tuple fields, Py_ssize_t need):
    for name, where, size in fields:
        if n < where + size:
            return MultifdPacketError(
                f"packet truncated: {n} bytes, the header needs {need}",
                field=name, offset=where)
    return MultifdPacketError(f"packet truncated: {n} bytes", offset=n)


def header_size(pages_alloc):
    """Bytes of a packet's header area: ``320 + 8 * pages_alloc`` (1344 for 128 pages)."""
    return _FIXED + 8 * <Py_ssize_t>_as_uint(pages_alloc, "pages_alloc", _U32)


# --------------------------------------------------------------------------
# Page packets


@cython.freelist(16)
cdef class _PacketHeaderBase:
    cdef readonly uint32_t flags
    cdef readonly uint32_t pages_alloc
    cdef uint32_t _npages
    cdef readonly uint32_t next_packet_size
    cdef readonly uint64_t packet_num
    cdef readonly str ramblock
    cdef readonly object offsets
    cdef readonly uint64_t data_size

    def __init__(self, *, flags, pages_alloc, next_packet_size, packet_num,
                 ramblock, offsets, data_size, _npages):
        arr = np.array(offsets, dtype=np.uint64).reshape(-1)
        arr.flags.writeable = False
        self.flags = flags
        self.pages_alloc = pages_alloc
        self._npages = _npages
        self.next_packet_size = next_packet_size
        self.packet_num = packet_num
        self.ramblock = str(ramblock)
        self.offsets = arr
        self.data_size = data_size

    @property
    def sync(self):
        """True if the packet carries ``MULTIFD_FLAG_SYNC``."""
        return bool(self.flags & 0x1)

    @property
    def compression_bits(self):
        """``flags & 0x0E``: 0 none, 0x2 zlib, 0x4 zstd (only meaningful with pages)."""
        return self.flags & 0xE

    @property
    def header_size(self):
        """Bytes of the header area on the wire: ``320 + 8 * pages_alloc``."""
        return _FIXED + 8 * <Py_ssize_t>self.pages_alloc

    def _fields(self, str count_name):
        return {
            "flags": self.flags,
            "pages_alloc": self.pages_alloc,
            count_name: self._npages,
            "next_packet_size": self.next_packet_size,
            "packet_num": self.packet_num,
            "ramblock": self.ramblock,
            "offsets": self.offsets.tolist(),
            "data_size": self.data_size,
        }

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self):
        d = self.to_dict()
        n = len(d["offsets"])
        d["offsets"] = f"<{n} offsets>"
        inner = ", ".join(f"{k}={v!r}" for k, v in d.items())
        return f"{type(self).__name__}({inner})"


@cython.final
cdef class PacketHeader(_PacketHeaderBase):
    """An unpacked, validated packet header, with QEMU 7.2's field names.

    ``ramblock`` and ``offsets`` (a read-only native ``uint64`` array of
    ``normal_pages`` entries, copied out of the packet) are only filled for
    packets that carry pages: in page-less packets QEMU leaves stale values
    there, so they are reported as ``""`` and an empty array.
    ``next_packet_size`` is the raw field (stale in 7.2's page-less
    packets); ``data_size`` is the number of data bytes that follow the
    header: 0 without pages, ``normal_pages * page_size`` uncompressed,
    ``next_packet_size`` compressed.
    """

    def __init__(self, *, flags, pages_alloc, normal_pages, next_packet_size,
                 packet_num, ramblock, offsets, data_size):
        _PacketHeaderBase.__init__(
            self, flags=flags, pages_alloc=pages_alloc, _npages=normal_pages,
            next_packet_size=next_packet_size, packet_num=packet_num,
            ramblock=ramblock, offsets=offsets, data_size=data_size)

    @property
    def normal_pages(self):
        """Number of pages the packet carries (4.1 called it ``pages_used``)."""
        return self._npages

    def to_dict(self):
        """The fields as a plain dict, ``offsets`` as a list of ints."""
        return self._fields("normal_pages")


@cython.final
cdef class PacketHeader41(_PacketHeaderBase):
    """The same header with QEMU 4.1's name ``pages_used`` for the page count."""

    def __init__(self, *, flags, pages_alloc, pages_used, next_packet_size,
                 packet_num, ramblock, offsets, data_size):
        _PacketHeaderBase.__init__(
            self, flags=flags, pages_alloc=pages_alloc, _npages=pages_used,
            next_packet_size=next_packet_size, packet_num=packet_num,
            ramblock=ramblock, offsets=offsets, data_size=data_size)

    @property
    def pages_used(self):
        """Number of pages the packet carries (7.2 calls it ``normal_pages``)."""
        return self._npages

    def to_dict(self):
        """The fields as a plain dict, ``offsets`` as a list of ints."""
        return self._fields("pages_used")


@cython.final
cdef class PacketHeader10(_PacketHeaderBase):
    """QEMU 10's header: besides ``normal_pages``, ``zero_pages`` pages to be zeroed.

    ``zero_offsets`` (read-only ``uint64`` array) lists them; they follow
    the normal pages' offsets on the wire and carry no data (qemu10.md
    §4.2). The compression mask is 10.0's wider ``0x3E``.
    """

    cdef readonly uint32_t zero_pages
    cdef readonly object zero_offsets

    def __init__(self, *, flags, pages_alloc, normal_pages, zero_pages, next_packet_size,
                 packet_num, ramblock, offsets, zero_offsets, data_size):
        _PacketHeaderBase.__init__(
            self, flags=flags, pages_alloc=pages_alloc, _npages=normal_pages,
            next_packet_size=next_packet_size, packet_num=packet_num,
            ramblock=ramblock, offsets=offsets, data_size=data_size)
        arr = np.array(zero_offsets, dtype=np.uint64).reshape(-1)
        arr.flags.writeable = False
        self.zero_pages = zero_pages
        self.zero_offsets = arr

    @property
    def normal_pages(self):
        """Number of pages whose data follow the header."""
        return self._npages

    @property
    def compression_bits(self):
        """``flags & 0x3E``: QEMU 10's wider compression mask."""
        return self.flags & _MASK_10

    def to_dict(self):
        """The fields as a plain dict, offsets as lists of ints."""
        d = self._fields("normal_pages")
        d["zero_pages"] = self.zero_pages
        d["zero_offsets"] = self.zero_offsets.tolist()
        return d


def pack_packet_header(out, *, flags, pages_alloc, next_packet_size, packet_num,
                       ramblock, offsets, normal_pages=None, pages_used=None,
                       zero_offsets=None):
    """Write a packet's header area into ``out`` and return its size.

    ``out`` is any writable C-contiguous buffer of at least
    ``header_size(pages_alloc)`` bytes; nothing is allocated when
    ``offsets`` is a native ``uint64`` numpy array and ``ramblock`` an
    ASCII str. Give the page count as ``normal_pages`` (7.2 name) or
    ``pages_used`` (4.1 name), not both. ``offsets`` holds between
    ``normal_pages`` and ``pages_alloc`` entries; the rest of the array,
    the unused bytes and the name padding are written as zeros.
    ``ramblock`` (str or bytes) must be shorter than 256 bytes so that a
    NUL follows it. Offsets are not checked here (see :func:`gather_pages`).
    ``zero_offsets`` (QEMU 10) lists pages to be zeroed: written after the
    normal pages' offsets, their count in ``zero_pages`` (+32); ``offsets``
    then holds exactly the ``normal_pages`` entries.

    Raises:
        TypeError / OverflowError / ValueError: bad arguments; ``out`` is
            not touched then.
    """
    if normal_pages is None:
        if pages_used is None:
            raise TypeError("give normal_pages (or its 4.1 name pages_used)")
        normal_pages = pages_used
    elif pages_used is not None:
        raise TypeError("give normal_pages or pages_used, not both")
    cdef uint32_t c_flags = <uint32_t>_as_uint(flags, "flags", _U32)
    cdef uint32_t c_alloc = <uint32_t>_as_uint(pages_alloc, "pages_alloc", _U32)
    cdef uint32_t c_pages = <uint32_t>_as_uint(normal_pages, "normal_pages", _U32)
    cdef uint32_t c_next = <uint32_t>_as_uint(next_packet_size, "next_packet_size", _U32)
    cdef uint64_t c_num = _as_uint(packet_num, "packet_num", _U64)
    if c_pages > c_alloc:
        raise ValueError(f"normal_pages {c_pages} exceeds pages_alloc {c_alloc}")
    cdef const char* name_ptr = NULL
    cdef Py_ssize_t name_len = 0
    cdef bytes name_bytes
    if PyUnicode_CheckExact(ramblock):
        try:
            name_ptr = PyUnicode_AsUTF8AndSize(ramblock, &name_len)
        except UnicodeEncodeError:
            name_ptr = NULL  # lone surrogates, as decoded by unpack: below
    elif not isinstance(ramblock, (str, bytes)):
        raise TypeError("ramblock must be str or bytes")
    if name_ptr == NULL:
        if isinstance(ramblock, str):
            name_bytes = (<str>ramblock).encode("utf-8", "surrogateescape")
        else:
            name_bytes = bytes(ramblock)
        name_ptr = name_bytes
        name_len = len(name_bytes)
    if name_len >= _NAME_LEN:
        raise ValueError(f"ramblock name is {name_len} bytes; at most 255 fit")
    if memchr(name_ptr, 0, name_len) != NULL:
        raise ValueError("ramblock name contains a NUL byte")
    cdef cnp.ndarray offs = _offsets_array(offsets)
    cdef Py_ssize_t n_offs = cnp.PyArray_SIZE(offs)
    cdef uint32_t c_zero = 0
    if zero_offsets is not None:
        zoffs = _offsets_array(zero_offsets)
        c_zero = <uint32_t>cnp.PyArray_SIZE(zoffs)
        if n_offs != c_pages:
            raise ValueError(f"offsets has {n_offs} entries; with zero_offsets it holds "
                             f"exactly the {c_pages} normal pages")
        if <uint64_t>c_pages + c_zero > c_alloc:
            raise ValueError(f"{c_pages} normal and {c_zero} zero pages exceed "
                             f"pages_alloc {c_alloc}")
        offs = np.ascontiguousarray(np.concatenate([offs, zoffs]), dtype=np.uint64)
        n_offs = cnp.PyArray_SIZE(offs)
    if n_offs < c_pages or n_offs > c_alloc:
        raise ValueError(f"offsets has {n_offs} entries; need {c_pages}..{c_alloc}")
    cdef Py_ssize_t size = _FIXED + 8 * <Py_ssize_t>c_alloc
    cdef Py_buffer view
    _get_buffer(out, &view, True, "out")
    try:
        if view.len < size:
            raise ValueError(f"out has {view.len} bytes; the header needs {size}")
        # ~1.3 KiB of stores: cheaper than releasing and retaking the GIL
        _write_header(<unsigned char*>view.buf, c_flags, c_alloc, c_pages, c_next,
                      c_num, name_ptr, name_len,
                      <const uint64_t*>cnp.PyArray_DATA(offs), n_offs)
        _store_be32(<unsigned char*>view.buf + _ZERO_OFF, c_zero)
    finally:
        PyBuffer_Release(&view)
    return size


cdef void _write_header(unsigned char* p, uint32_t flags, uint32_t alloc,
                        uint32_t npages, uint32_t next_size, uint64_t num,
                        const char* name, Py_ssize_t name_len,
                        const uint64_t* offs, Py_ssize_t n_offs) noexcept nogil:
    cdef Py_ssize_t i
    _store_be32(p, _MAGIC)
    _store_be32(p + 4, _VERSION)
    _store_be32(p + 8, flags)
    _store_be32(p + 12, alloc)
    _store_be32(p + 16, npages)
    _store_be32(p + 20, next_size)
    _store_be64(p + 24, num)
    memset(p + 32, 0, _FIXED - 32)
    memcpy(p + _NAME_OFF, name, name_len)
    for i in range(n_offs):
        _store_be64(p + _FIXED + 8 * i, offs[i])
    memset(p + _FIXED + 8 * n_offs, 0, 8 * (alloc - n_offs))


def pack_packet(*, flags, pages_alloc, packet_num, ramblock, offsets, data=b"",
                next_packet_size=None, normal_pages=None, pages_used=None, zero_offsets=None):
    """A whole packet as bytes: the header area followed by ``data``.

    ``next_packet_size`` defaults to ``len(data)`` (in bytes); the page
    count defaults to the number of offsets.
    """
    if normal_pages is None and pages_used is None:
        normal_pages = cnp.PyArray_SIZE(_offsets_array(offsets))
    payload = memoryview(_readable(data, "data"))
    if next_packet_size is None:
        next_packet_size = len(payload)
    size = header_size(pages_alloc)
    out = bytearray(size + len(payload))
    pack_packet_header(out, flags=flags, pages_alloc=pages_alloc,
                       normal_pages=normal_pages, pages_used=pages_used,
                       next_packet_size=next_packet_size, packet_num=packet_num,
                       ramblock=ramblock, offsets=offsets, zero_offsets=zero_offsets)
    out[size:] = payload
    return bytes(out)


def unpack_packet_header(buf, *, blocks=None, page_size=4096, max_pages=DEFAULT_MAX_PAGES,
                         compression="none", version="7.2"):
    """Unpack and validate the header area at the start of ``buf``.

    Args:
        buf: any C-contiguous buffer starting with the header; bytes after
            the header area (the page data) are ignored.
        blocks: mapping RAM block name -> used length in bytes. With it,
            a packet with pages must name a known block and every offset
            must satisfy ``offset <= used_length - page_size``. ``None``
            skips those two checks (inspection only; :func:`place_pages`
            still bounds-checks against the real buffer).
        page_size: target page size; every offset must be a multiple.
        max_pages: the receiver's own packet capacity; a larger
            ``pages_alloc`` is refused (QEMU 7.2's rule; 4.1 accepted up
            to 100 times its own and reallocated).
        compression: negotiated method, ``"none"``, ``"zlib"``, ``"zstd"``
            or the flag bits 0, 0x2, 0x4. Packets with pages must carry
            exactly these bits; compressed packets must also declare at
            most ``2 * max_pages * page_size`` bytes of data (QEMU's
            senders compress into a buffer of that size), so a reader
            never has to buffer more.
        version: ``"7.2"`` returns a :class:`PacketHeader` (``normal_pages``),
            ``"4.1"`` a :class:`PacketHeader41` (``pages_used``): same bytes,
            same checks. ``"10.0"`` returns a :class:`PacketHeader10`: it
            also reads ``zero_pages`` (at most ``pages_alloc - normal_pages``)
            and their offsets, checks block and offsets whenever any page is
            listed, and masks compression bits with 10.0's ``0x3E``; data
            follows only normal pages.

    Checks run in wire order: magic, version, pages_alloc, normal_pages,
    the header length, then (only when pages are carried) compression
    bits, next_packet_size, ramblock and each offset in turn. Fields QEMU
    leaves stale in page-less packets are not looked at.

    Raises:
        MultifdPacketError: ``field`` names the offending field (for an
            offset, ``offsets[i]``) and ``offset`` its byte offset in the
            packet. A short buffer names the first incomplete field.
    """
    cdef Py_ssize_t psize = _check_page_size(page_size)
    cdef uint32_t c_max = <uint32_t>_as_uint(max_pages, "max_pages", _U32)
    cdef uint32_t want_bits = _compression_bits(compression)
    cdef int layout
    if version == "7.2":
        layout = _L72
    elif version == "4.1":
        layout = _L41
    elif version == "10.0":
        layout = _L10
    else:
        raise ValueError(f"version must be one of {LAYOUTS}, not {version!r}")
    cdef Py_buffer view
    _get_buffer(buf, &view, False, "buf")
    try:
        return _unpack(<const unsigned char*>view.buf, view.len, blocks, psize,
                       c_max, want_bits, layout)
    finally:
        PyBuffer_Release(&view)


cdef object _unpack(const unsigned char* p, Py_ssize_t n, object blocks,
                    Py_ssize_t psize, uint32_t c_max, uint32_t want_bits, int layout):
    if n < _FIXED:
        if n >= 4:
            _check_magic(p)
        if n >= 8:
            _check_version(p)
        raise _truncated(n, _FIELDS, _FIXED)
    _check_magic(p)
    _check_version(p)
    cdef uint32_t flags = _load_be32(p + 8)
    cdef uint32_t alloc = _load_be32(p + 12)
    cdef uint32_t npages = _load_be32(p + 16)
    cdef uint32_t next_size = _load_be32(p + 20)
    if alloc > c_max:
        raise MultifdPacketError(
            f"packet has room for {alloc} pages; at most {c_max} accepted",
            field="pages_alloc", offset=12)
    if npages > alloc:
        raise MultifdPacketError(
            f"packet carries {npages} pages but has room for {alloc}",
            field="normal_pages", offset=16)
    cdef Py_ssize_t need = _FIXED + 8 * <Py_ssize_t>alloc
    cdef Py_ssize_t i
    if n < need:
        i = (n - _FIXED) // 8
        raise MultifdPacketError(
            f"packet truncated: {n} bytes, the header needs {need}",
            field=f"offsets[{i}]", offset=_FIXED + 8 * i)
    cdef uint32_t zero = _load_be32(p + _ZERO_OFF) if layout == _L10 else 0
    if zero > alloc - npages:
        raise MultifdPacketError(
            f"packet carries {npages} normal and {zero} zero pages but has room for {alloc}",
            field="zero_pages", offset=_ZERO_OFF)
    cdef _PacketHeaderBase hdr
    cdef PacketHeader10 hdr10 = None
    if layout == _L72:
        hdr = PacketHeader.__new__(PacketHeader)
    elif layout == _L41:
        hdr = PacketHeader41.__new__(PacketHeader41)
    else:
        hdr10 = PacketHeader10.__new__(PacketHeader10)
        hdr = hdr10
    hdr.flags = flags
    hdr.pages_alloc = alloc
    hdr._npages = npages
    hdr.next_packet_size = next_size
    hdr.packet_num = _load_be64(p + 24)
    cdef uint32_t listed = npages + zero
    cdef cnp.npy_intp dim = npages
    cdef cnp.npy_intp zdim = zero
    cdef cnp.npy_intp ldim = listed
    cdef cnp.ndarray arr
    if listed == 0:
        arr = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_UINT64, 0)
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
        hdr.ramblock = ""
        hdr.offsets = arr
        hdr.data_size = 0
        if hdr10 is not None:
            hdr10.zero_pages = 0
            hdr10.zero_offsets = arr
        return hdr
    cdef uint32_t bits = flags & (_MASK_10 if layout == _L10 else _MASK_72)
    if bits != want_bits:
        raise MultifdPacketError(
            f"compression flags 0x{bits:x}, negotiated 0x{want_bits:x}",
            field="flags", offset=8)
    cdef uint64_t data_limit
    if npages == 0:
        hdr.data_size = 0
    elif want_bits:
        data_limit = 2 * <uint64_t>c_max * <uint64_t>psize
        if next_size > data_limit:
            raise MultifdPacketError(
                f"{next_size} bytes of compressed data declared; at most {data_limit} accepted",
                field="next_packet_size", offset=20)
        hdr.data_size = next_size
    else:
        hdr.data_size = <uint64_t>npages * <uint64_t>psize
    cdef const void* nul = memchr(p + _NAME_OFF, 0, _NAME_LEN)
    if nul == NULL:
        raise MultifdPacketError(
            "ramblock name is not NUL-terminated", field="ramblock", offset=_NAME_OFF)
    cdef Py_ssize_t name_len = <const unsigned char*>nul - (p + _NAME_OFF)
    name = PyUnicode_DecodeUTF8(<const char*>(p + _NAME_OFF), name_len, "surrogateescape")
    cdef uint64_t limit = 0
    cdef uint64_t used_length = 0
    cdef bint bounded = False
    if blocks is not None:
        try:
            used = blocks[name]
        except KeyError:
            raise MultifdPacketError(
                f"unknown RAM block '{printable_name(name)}'", field="ramblock", offset=_NAME_OFF) from None
        used_length = _as_uint(used, "a block's used length", _U64)
        bounded = True
    arr = cnp.PyArray_EMPTY(1, &ldim, cnp.NPY_UINT64, 0)
    cdef uint64_t* dst = <uint64_t*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t bad = 0
    cdef int status
    cdef uint64_t mask = <uint64_t>psize - 1
    if bounded and used_length < <uint64_t>psize:
        # no page fits: the first offset fails one way or the other
        status = _decode_offsets(p + _FIXED, 1, mask, 0, False, dst, &bad)
        if status == OK:
            status = ERR_BEYOND_BLOCK
    else:
        limit = used_length - <uint64_t>psize
        with nogil:
            status = _decode_offsets(p + _FIXED, listed, mask, limit, bounded, dst, &bad)
    if status != OK:
        raise _offset_error(status, bad, MultifdPacketError,
                            _load_be64(p + _FIXED + 8 * bad), psize,
                            used_length, f"RAM block {name!r}")
    hdr.ramblock = name
    if hdr10 is None:
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
        hdr.offsets = arr
        return hdr
    normal = arr[:npages]
    zeros = arr[npages:]
    cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    cnp.PyArray_CLEARFLAGS(normal, cnp.NPY_ARRAY_WRITEABLE)
    cnp.PyArray_CLEARFLAGS(zeros, cnp.NPY_ARRAY_WRITEABLE)
    hdr.offsets = normal
    hdr10.zero_pages = zero
    hdr10.zero_offsets = zeros
    return hdr


cdef int _check_magic(const unsigned char* p) except -1:
    cdef uint32_t magic = _load_be32(p)
    if magic != _MAGIC:
        raise MultifdPacketError(
            f"packet magic 0x{magic:08x}, expected 0x{_MAGIC:08x}",
            field="magic", offset=0)
    return 0


cdef int _check_version(const unsigned char* p) except -1:
    cdef uint32_t version = _load_be32(p + 4)
    if version != _VERSION:
        raise MultifdPacketError(
            f"packet version {version}, expected {_VERSION}",
            field="version", offset=4)
    return 0


cdef int _copy_checked(const unsigned char[::1] src, unsigned char[::1] dst,
                       const uint64_t* offs, Py_ssize_t n, Py_ssize_t psize,
                       bint scatter, Py_ssize_t* bad) noexcept nogil:
    """Check every offset against the block, then copy all pages (or none)."""
    cdef Py_ssize_t blen = dst.shape[0] if scatter else src.shape[0]
    cdef uint64_t mask = <uint64_t>(psize - 1)
    cdef int status
    if blen < psize:
        bad[0] = 0
        return ERR_MISALIGNED if offs[0] & mask else ERR_BEYOND_BLOCK
    status = _check_offsets(offs, n, mask, <uint64_t>(blen - psize), bad)
    if status == OK:
        _copy_pages(&src[0], &dst[0], offs, n, psize, scatter)
    return status


def place_pages(packet_data, offsets, block_buffer, page_size):
    """Copy a packet's uncompressed pages to their offsets in a RAM block.

    Page ``i`` of ``packet_data`` goes to
    ``block_buffer[offsets[i] : offsets[i] + page_size]``. Every offset is
    checked (page-aligned, page inside the buffer) before anything is
    written, so a bad packet leaves the block untouched. Returns the
    number of bytes placed.

    Raises:
        MultifdPacketError: a bad offset (``field="offsets[i]"``) or fewer
            than ``len(offsets) * page_size`` bytes of data (``field="data"``).
    """
    cdef Py_ssize_t psize = _check_page_size(page_size)
    cdef cnp.ndarray offs = _offsets_array(offsets)
    cdef const unsigned char[::1] src = _readable(packet_data, "packet_data")
    cdef unsigned char[::1] dst = _writable(block_buffer, "block_buffer")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(offs)
    if n == 0:
        return 0
    if src.shape[0] // psize < n:
        raise MultifdPacketError(
            f"{src.shape[0]} bytes of page data for {n} pages of {psize}", field="data")
    cdef const uint64_t* o = <const uint64_t*>cnp.PyArray_DATA(offs)
    cdef Py_ssize_t bad = 0
    cdef int status
    with nogil:
        status = _copy_checked(src, dst, o, n, psize, True, &bad)
    if status != OK:
        raise _offset_error(status, bad, MultifdPacketError, o[bad], psize,
                            dst.shape[0], "block buffer")
    return n * psize


def gather_pages(block_buffer, offsets, out, page_size):
    """Copy the pages at ``offsets`` of a RAM block, in order, into ``out``.

    The sender's half of :func:`place_pages`: ``out`` receives
    ``len(offsets) * page_size`` bytes, ready to follow the header.
    Returns that number.

    Raises:
        ValueError: an offset not page-aligned or past the block, or
            ``out`` too small (these are the sender's own values).
    """
    cdef Py_ssize_t psize = _check_page_size(page_size)
    cdef cnp.ndarray offs = _offsets_array(offsets)
    cdef const unsigned char[::1] src = _readable(block_buffer, "block_buffer")
    cdef unsigned char[::1] dst = _writable(out, "out")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(offs)
    if n == 0:
        return 0
    if dst.shape[0] // psize < n:
        raise ValueError(f"out has {dst.shape[0]} bytes; {n} pages need {n * psize}")
    cdef const uint64_t* o = <const uint64_t*>cnp.PyArray_DATA(offs)
    cdef Py_ssize_t bad = 0
    cdef int status
    with nogil:
        status = _copy_checked(src, dst, o, n, psize, False, &bad)
    if status != OK:
        raise _offset_error(status, bad, ValueError, o[bad], psize, src.shape[0],
                            "block buffer")
    return n * psize
