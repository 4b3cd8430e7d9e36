"""Small synthetic streams for tests, built with qmigx's own writers.

They carry every RAM record kind (setup, ZERO, PAGE, XBZRLE, COMPRESS_PAGE,
EOS, CONTINUE and named records), a command, device sections with
footers, EOF and a vmdesc, and stay a few KiB so that tests can afford to
parse every prefix.
"""

from __future__ import annotations

import numpy as np

from qmigx import xbzrle
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.ram import RamWriter, compress_page
from qmigx.stream import RamBlockInfo, Section, StreamWriter
from qmigx.wire import MigCmd, SectionType

PS = 4096

DEV_DESC = ('{"name": "dev0", "instance_id": 0, "vmsd_name": "dev0", "version": 1, '
            '"fields": [{"name": "x", "type": "uint16", "size": 2}, '
            '{"name": "y", "type": "uint32", "size": 4}]}')


def expected_memory() -> dict[str, np.ndarray]:
    """Final block contents of :func:`small_stream`."""
    return dict(_pages()[1])


def _pages():
    rng = np.random.default_rng(42)
    a = np.zeros(6 * PS, np.uint8)
    b = np.zeros(2 * PS, np.uint8)
    a[PS : 2 * PS] = rng.integers(0, 256, PS)
    a[3 * PS : 4 * PS] = 0x5A
    b[:PS] = rng.integers(0, 256, PS)
    first = {"pc.ram": a.copy(), "pc.rom": b.copy()}
    final = {"pc.ram": a.copy(), "pc.rom": b.copy()}
    final["pc.ram"][PS + 10 : PS + 20] = 0xEE  # becomes an XBZRLE delta
    final["pc.ram"][4 * PS : 5 * PS] = rng.integers(0, 256, PS)  # a compressed page
    return first, final


def small_stream(*, vmdesc: bool = True, footers: bool = True, command: bool = True) -> bytes:
    """A complete precopy stream of two blocks and one device."""
    first, final = _pages()
    sink = BytesSink()
    f = QEMUFile(sink)
    w = StreamWriter(f, footers=footers)
    ram = RamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2")
    if command:
        w.command(MigCmd.OPEN_RETURN_PATH)
        w.command(MigCmd.PING, b"\0\0\0\1")
    sec = Section(2, "ram", 0, 4)
    w.section_header(SectionType.SECTION_START, sec)
    ram.setup([RamBlockInfo("pc.ram", 6 * PS), RamBlockInfo("pc.rom", 2 * PS)])
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_PART, sec)
    for name, mem in first.items():
        for i in range(len(mem) // PS):
            page = mem[i * PS : (i + 1) * PS]
            if page.any():
                ram.page(name, i * PS, page)
            else:
                ram.zero(name, i * PS)
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_PART, sec)
    delta = np.zeros(PS, np.uint8)
    n = xbzrle.encode_buffer(first["pc.ram"][PS : 2 * PS], final["pc.ram"][PS : 2 * PS], delta)
    assert n > 0
    ram.xbzrle("pc.ram", PS, delta[:n])
    ram.compressed("pc.ram", 4 * PS, compress_page(final["pc.ram"][4 * PS : 5 * PS]))
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_END, sec)
    ram.eos()
    w.footer(sec)
    w.section(SectionType.SECTION_FULL, Section(3, "dev0", 0, 1), b"\x12\x34\x00\x00\x00\x05")
    w.eof()
    if vmdesc:
        w.vmdesc(('{"page_size": 4096, "devices": [%s]}' % DEV_DESC).encode())
    f.flush()
    return bytes(sink.data)
