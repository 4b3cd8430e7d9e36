"""libvirt save images (``virsh save``, managedsave): read and write.

libvirt 9.0 (``qemu_saveimage.c``) lays an image out as:

=================  ======================================================
header, 92 bytes   ``magic`` 16 bytes: ``LibvirtQemudSave`` (``...Part``
                   while the save is still running), then host-endian
                   u32s: ``version`` (2), ``data_len``, ``was_running``,
                   ``compressed`` (the format: 0 raw, 1 gzip, 2 bzip2,
                   3 xz, 4 lzop), ``cookieOffset``, 14 unused
data, data_len     the domain XML, NUL-terminated; at ``cookieOffset``
                   (when non-zero) the save cookie, NUL-terminated; zeros
                   to the end (libvirt leaves 64 KiB for XML edits)
body               the QEMU migration stream, raw or piped through
                   ``gzip -c``, ``bzip2 -c``, ``xz -c -3`` or ``lzop -c``
=================  ======================================================

A header whose version is above 2 is read byte-swapped (an image made on
a host of the other endianness), as libvirt does. libvirt 9.0 knows no
other format: its ``zstd`` setting is refused as invalid, and a format
number of 5 or more is "Invalid compressed save format". Errors on a
bad header use libvirt's own texts.

Bodies are read through a decompressor as a stream (:class:`ImageBody`),
never held whole: gzip, bzip2 and xz by Python's zlib, bz2 and lzma;
lzop, which Python lacks, by the ``lzop`` program, as libvirt itself
runs it (``lzop -dc --ignore-warn``). A compressed body that ends before
its compressed stream does is a :class:`~qmigx.errors.SaveImageError`.
"""

from __future__ import annotations

import contextlib

import bz2
import io
import lzma
import os
import struct
import zlib
from typing import BinaryIO, Optional

from qmigx.errors import SaveImageError
from qmigx.records import Record, replace

__all__ = [
    "SAVE_MAGIC", "PARTIAL_MAGIC", "FORMATS", "SaveImageHeader", "ImageBody",
    "is_save_image", "read_save_image_header", "open_body", "open_stream", "ImageWriter",
]

SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
SAVE_VERSION = 2
#: libvirt 9.0's format numbers (the ``compressed`` field).
FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop")
HEADER_SIZE = 92
#: What libvirt leaves after the XML and cookie for later edits.
XML_PADDING = 64 * 1024
_CHUNK = 4 << 20


class SaveImageHeader(Record, mutable=True):
    """The header and data section of an image."""

    version: int = SAVE_VERSION
    data_len: int = 0
    was_running: int = 0
    compressed: int = 0
    cookie_offset: int = 0
    unused: tuple = (0,) * 14
    xml: str = ""
    cookie: Optional[str] = None
    byteorder: str = "<"
    #: where the body starts in the file
    body_offset: int = 0
    magic: bytes = SAVE_MAGIC

    @property
    def format(self) -> str:
        return FORMATS[self.compressed] if self.compressed < len(FORMATS) else str(
            self.compressed)

    def describe(self) -> dict:
        """The header as ``analyze`` shows it."""
        return {"magic": self.magic.decode(), "version": self.version,
                "data_len": self.data_len, "was_running": self.was_running,
                "format": self.format, "cookie_offset": self.cookie_offset,
                "xml": self.xml, "cookie": self.cookie}

    def pack(self, *, partial: bool = False) -> bytes:
        """Header and data section as libvirt writes them (``data_len`` must be set)."""
        xml = self.xml.encode() + b"\0"
        cookie = b"" if self.cookie is None else self.cookie.encode() + b"\0"
        if len(xml) + len(cookie) > self.data_len:
            raise SaveImageError("new xml too large to fit in file", field="data_len")
        cookie_offset = len(xml) if self.cookie is not None else 0
        head = (PARTIAL_MAGIC if partial else SAVE_MAGIC) + struct.pack(
            self.byteorder + "5I14I", self.version, self.data_len, self.was_running,
            self.compressed, cookie_offset, *self.unused)
        return head + xml + cookie + bytes(self.data_len - len(xml) - len(cookie))


def is_save_image(path) -> bool:
    """Whether ``path`` starts with a libvirt save image magic (complete or not)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(16) in (SAVE_MAGIC, PARTIAL_MAGIC)
    except OSError:
        return False


def read_save_image_header(f: BinaryIO) -> SaveImageHeader:
    """Read and check the header and data section; leaves ``f`` at the body."""
    raw = _read_exact(f, HEADER_SIZE)
    if len(raw) != HEADER_SIZE:
        raise SaveImageError("failed to read qemu header", offset=0, field="header")
    magic = raw[:16]
    if magic != SAVE_MAGIC:
        if magic == PARTIAL_MAGIC:
            raise SaveImageError("save image is incomplete", offset=0, field="magic")
        raise SaveImageError("image magic is incorrect", offset=0, field="magic")
    order = "<"
    fields = struct.unpack_from("<5I14I", raw, 16)
    if fields[0] > SAVE_VERSION:  # written on a host of the other endianness
        order = ">"
        fields = struct.unpack_from(">5I14I", raw, 16)
    version, data_len, was_running, compressed, cookie_offset = fields[:5]
    if version > SAVE_VERSION:
        raise SaveImageError(f"image version is not supported ({version} > {SAVE_VERSION})",
                             offset=16, field="version")
    if data_len == 0:
        raise SaveImageError("invalid header data length: 0", offset=20, field="data_len")
    if version == SAVE_VERSION and compressed >= len(FORMATS):
        raise SaveImageError(f"Invalid compressed save format {compressed}", offset=28,
                             field="compressed")
    if cookie_offset > data_len:
        raise SaveImageError(f"cookie offset {cookie_offset} lies past the data ({data_len})",
                             offset=32, field="cookieOffset")
    xml_len = cookie_offset or data_len
    if data_len > _remaining(f):
        raise SaveImageError(f"failed to read domain XML (data length {data_len} runs past "
                             "the end of the image)", offset=HEADER_SIZE, field="xml")
    xml = _read_exact(f, xml_len)
    if len(xml) != xml_len:
        raise SaveImageError("failed to read domain XML", offset=HEADER_SIZE, field="xml")
    cookie = None
    if cookie_offset:
        raw_cookie = _read_exact(f, data_len - xml_len)
        if len(raw_cookie) != data_len - xml_len:
            raise SaveImageError("failed to read cookie", offset=HEADER_SIZE + xml_len,
                                 field="cookie")
        cookie = _c_string(raw_cookie).decode("utf-8", "replace")
    return SaveImageHeader(version, data_len, was_running, compressed, cookie_offset,
                           tuple(fields[5:]), _c_string(xml).decode("utf-8", "replace"),
                           cookie, order, HEADER_SIZE + data_len, magic)


def _remaining(f) -> int:
    """Bytes left in ``f`` (unbounded when it cannot tell)."""
    try:
        return os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return 1 << 62


def _c_string(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class ImageBody(io.RawIOBase):
    """The QEMU stream inside an image, decompressed as it is read.

    Offsets (``tell``) count stream bytes. Raw bodies are seekable; the
    others are not (a reader then delimits device sections without
    looking for the vmdesc first).
    """

    def __init__(self, path, header: SaveImageHeader) -> None:
        super().__init__()
        self.header = header
        self._f = open(path, "rb", buffering=0)
        self._f.seek(header.body_offset)
        self._pos = 0
        self._dec = None
        self._proc = None  # the lzop program, for lzop bodies
        self._pending = b""
        self._done = False
        fmt = header.format if header.version == SAVE_VERSION else "raw"
        self.format = fmt
        if fmt == "gzip":
            self._dec = zlib.decompressobj(wbits=47)
        elif fmt == "bzip2":
            self._dec = bz2.BZ2Decompressor()
        elif fmt == "xz":
            self._dec = lzma.LZMADecompressor()
        elif fmt == "lzop":
            import shutil
            import subprocess

            prog = shutil.which("lzop")
            if prog is None:
                self._f.close()
                raise SaveImageError("Compression program for lzop image format is not "
                                     "available (the lzop program reads these bodies)",
                                     offset=header.body_offset, field="compressed")
            self._proc = subprocess.Popen([prog, "-dc", "--ignore-warn"], stdin=self._f,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.format == "raw"

    def tell(self) -> int:
        if self.format == "raw":
            return self._f.tell() - self.header.body_offset
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.format != "raw":
            raise io.UnsupportedOperation("a compressed body cannot seek")
        if whence == io.SEEK_SET:
            offset += self.header.body_offset
        pos = self._f.seek(offset, whence)
        if pos < self.header.body_offset:
            pos = self._f.seek(self.header.body_offset)
        return pos - self.header.body_offset

    def readinto(self, b) -> int:
        if self.format == "raw":
            return self._f.readinto(b)
        if self._proc is not None:
            n = self._proc.stdout.readinto(b)
            if n == 0:
                self._finish_program()
            self._pos += n
            return n
        view = memoryview(b)
        while not self._pending and not self._done:
            self._feed()
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def _feed(self) -> None:
        dec = self._dec
        if dec.eof:
            self._done = True
            return
        chunk = self._f.read(_CHUNK)
        if not chunk:
            raise SaveImageError(
                f"the {self.format} body ends before its compressed stream does (the image "
                f"is cut)", offset=self._f.tell(), field="body")
        try:
            out = dec.decompress(chunk)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
            raise SaveImageError(f"the {self.format} body is damaged: {exc}",
                                 offset=self._f.tell(), field="body") from None
        if dec.eof and getattr(dec, "unused_data", b""):
            pass  # bytes after the compressed stream are ignored, as the programs do
        self._pending = out

    def _finish_program(self) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.stdout.close()
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stderr.close()
        rc = proc.wait()
        self._proc = None
        if rc not in (0, 2):  # 2: warnings only (--ignore-warn)
            raise SaveImageError(f"the lzop body is damaged or cut: lzop exited {rc}: {err}",
                                 offset=self.header.body_offset, field="body")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdout.close()
            self._proc.stderr.close()
            self._proc = None
        self._f.close()
        super().close()


def open_body(path) -> ImageBody:
    """Read the header of the image at ``path`` and open its body."""
    with open(path, "rb") as f:
        header = read_save_image_header(f)
    return ImageBody(path, header)


class ImageWriter:
    """Writes an image: header (as partial), data, the body compressed as it comes.

    ``write`` takes stream bytes; ``close`` flushes the compressor and
    marks the image complete by rewriting the magic, as libvirt does.
    """

    def __init__(self, path, header: SaveImageHeader) -> None:
        if header.compressed >= len(FORMATS):
            raise SaveImageError(f"Invalid compressed save format {header.compressed}",
                                 field="compressed")
        xml_len = len(header.xml.encode()) + 1
        cookie_len = 0 if header.cookie is None else len(header.cookie.encode()) + 1
        if header.data_len == 0:
            header = replace(header, data_len=xml_len + cookie_len + XML_PADDING)
        self.header = header
        self.path = path
        self._f = open(path, "wb")
        self._f.write(header.pack(partial=True))
        self._comp = None
        self._proc = None
        fmt = FORMATS[header.compressed]
        if fmt == "gzip":
            self._comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif fmt == "bzip2":
            self._comp = bz2.BZ2Compressor(9)
        elif fmt == "xz":
            self._comp = lzma.LZMACompressor(preset=3)
        elif fmt == "lzop":
            import shutil
            import subprocess

            prog = shutil.which("lzop")
            if prog is None:
                raise SaveImageError("Compression program for lzop image format is not "
                                     "available", field="compressed")
            self._f.flush()
            self._proc = subprocess.Popen([prog, "-c"], stdin=subprocess.PIPE, stdout=self._f)

    def write(self, data) -> None:
        if self._proc is not None:
            self._proc.stdin.write(data)
        elif self._comp is not None:
            self._f.write(self._comp.compress(data))
        else:
            self._f.write(data)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            if self._proc.wait() != 0:
                raise SaveImageError("lzop failed to compress the body", field="body")
            self._proc = None
        elif self._comp is not None:
            self._f.write(self._comp.flush())
        self._f.seek(0)
        self._f.write(SAVE_MAGIC)
        self._f.close()

    def abort(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._f.close()


def open_stream(source):
    """What stream readers should read for ``source``: an image's body, or ``source`` itself."""
    if is_save_image(source):
        return open_body(source)
    return source


@contextlib.contextmanager
def opened_stream(source):
    """The stream of ``source``: a libvirt save image's body, opened afresh, or itself."""
    src = open_stream(source)
    try:
        yield src
    finally:
        if src is not source:
            src.close()
