"""libvirt save images built the way libvirt 9.0's qemu_saveimage.c builds them.

Written from libvirt's layout, not from qmigx: a 92-byte header (magic
``LibvirtQemudPart`` while writing, version 2, data_len, was_running, the
format number, cookieOffset, 14 unused u32s, host endian), the domain XML
and the save cookie, each NUL-terminated, 64 KiB of zeros after them,
then the QEMU stream piped through the real compression program with
libvirt's arguments (``gzip -c``, ``bzip2 -c``, ``xz -c -3``,
``lzop -c``); finally the magic is rewritten as ``LibvirtQemudSave``.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

FORMATS = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4}
PROGRAM_ARGS = {"gzip": ["-c"], "bzip2": ["-c"], "xz": ["-c", "-3"], "lzop": ["-c"]}

DOMAIN_XML = """<domain type='kvm'>
  <name>qmigx-test</name>
  <uuid>4ad2a9a8-5e0b-4c1e-9d2f-3f3d1f8c9a01</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
</domain>
"""
COOKIE = "<cookie>\n  <cpu mode='custom' match='exact' check='full'/>\n</cookie>\n"


def program_available(fmt: str) -> bool:
    return fmt == "raw" or shutil.which(fmt) is not None


def header(fmt: str, xml: str, cookie: str | None, was_running: bool, *, partial: bool,
           data_len: int | None = None) -> bytes:
    xml_b = xml.encode() + b"\0"
    cookie_b = cookie.encode() + b"\0" if cookie is not None else b""
    if data_len is None:
        data_len = len(xml_b) + len(cookie_b) + 64 * 1024
    magic = b"LibvirtQemudPart" if partial else b"LibvirtQemudSave"
    head = magic + struct.pack("<5I", 2, data_len, int(was_running), FORMATS[fmt],
                               len(xml_b) if cookie is not None else 0) + bytes(56)
    return head + xml_b + cookie_b + bytes(data_len - len(xml_b) - len(cookie_b))


def make_image(stream: Path, out: Path, fmt: str, *, xml: str = DOMAIN_XML,
               cookie: str | None = COOKIE, was_running: bool = True) -> Path:
    """Wrap the QEMU stream file ``stream`` into a libvirt save image at ``out``."""
    with open(out, "wb") as f:
        f.write(header(fmt, xml, cookie, was_running, partial=True))
        f.flush()
        with open(stream, "rb") as src:
            if fmt == "raw":
                shutil.copyfileobj(src, f)
            else:
                subprocess.run([shutil.which(fmt), *PROGRAM_ARGS[fmt]], stdin=src, stdout=f,
                               check=True)
    with open(out, "r+b") as f:
        f.write(b"LibvirtQemudSave")
    return out


def body_offset(xml: str = DOMAIN_XML, cookie: str | None = COOKIE) -> int:
    return 92 + len(xml.encode()) + 1 + (len(cookie.encode()) + 1 if cookie else 0) + 64 * 1024
