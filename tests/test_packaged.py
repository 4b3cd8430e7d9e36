"""verify and convert decode the device sections inside PACKAGED commands.

A postcopy stream carries its device sections in a ``MIG_CMD_PACKAGED``
command (no vmdesc; the sections are delimited by their footers). The
package here holds the real QEMU 7.2 device sections of the stored test
vector, with PING and RUN as QEMU packs them: ``verify`` must count and
delimit every one, ``convert`` must write them back record by record (the
same bytes), and a damaged section inside the package must be reported
at its offset in the file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from qmigx.errors import StreamError
from qmigx.qemufile import QEMUFile
from qmigx.ram import RamWriter
from qmigx.stream import StreamWriter
from qmigx.tools.streams import convert_stream, load_stream, verify_stream
from qmigx.wire import MigCmd, SectionType

VECTOR = Path(__file__).resolve().parent / "data" / "qemu72-pc-paused.mig.gz"


def postcopy_like(vec) -> tuple[bytes, int, int]:
    """(stream, package start, package end): RAM, then the devices in a package, RAM END."""
    pkg = bytearray()
    pf = QEMUFile(pkg.extend)
    pw = StreamWriter(pf)
    pw.command(MigCmd.POSTCOPY_LISTEN)
    for dev in vec.sections:
        pw.section(SectionType.SECTION_FULL, dev.section, dev.payload)
    pw.command(MigCmd.PING, struct.pack(">I", 3))
    pw.command(MigCmd.POSTCOPY_RUN)
    pf.flush()
    out = bytearray()
    f = QEMUFile(out.extend)
    w = StreamWriter(f)
    ram = RamWriter(f)
    w.header()
    w.raw_configuration(vec.configuration.raw)
    sec = vec.ram_setup.section
    w.section_header(SectionType.SECTION_START, sec)
    ram.setup(vec.ram_setup.blocks)
    ram.eos()
    w.footer(sec)
    w.section_header(SectionType.SECTION_PART, sec)
    for b in vec.blocks:
        import numpy as np

        ram.pages(b.idstr, b.memory, np.arange(0, b.used_length, 4096, dtype=np.uint64))
    ram.eos()
    w.footer(sec)
    f.flush()
    start = len(out)
    w.command(MigCmd.PACKAGED, struct.pack(">I", len(pkg)), bytes(pkg))
    f.flush()
    end = len(out)
    w.section_header(SectionType.SECTION_END, sec)
    ram.eos()
    w.footer(sec)
    w.eof()
    f.flush()
    return bytes(out), start, end


@pytest.fixture(scope="module")
def vec():
    return load_stream(gzip.decompress(VECTOR.read_bytes()))


def test_verify_delimits_every_packaged_section(vec):
    data, _, _ = postcopy_like(vec)
    summary = verify_stream(data)
    assert summary["packaged"] == len(vec.sections) == 30
    assert summary["vmdesc"] is False


def test_convert_writes_the_package_back_from_its_records(vec):
    data, start, end = postcopy_like(vec)
    out = bytearray()
    convert_stream(data, out.extend, "zero")
    assert data[start:end] in out  # the package, rebuilt record by record, is the same
    assert len(out) < len(data)  # zero pages became ZERO records
    assert verify_stream(bytes(out))["packaged"] == 30
    got = load_stream(bytes(out))
    for b in vec.blocks:
        assert bytes(got.blocks[b.idstr].memory) == bytes(b.memory)


def test_a_damaged_packaged_section_is_reported_at_its_file_offset(vec):
    data, start, end = postcopy_like(vec)
    # the last device section's footer: 0x7e + its section id, just before PING's command
    last = vec.sections[-1].section
    footer = bytes((0x7E,)) + struct.pack(">I", last.section_id)
    at = data.rfind(footer, start, end)
    assert at > start
    bad = data[:at] + b"\x00" + data[at + 1 :]
    for run in (lambda: verify_stream(bad), lambda: convert_stream(bad, lambda b: None, "page")):
        with pytest.raises(StreamError) as exc:
            run()
        assert "PACKAGED" in str(exc.value)
        assert start < exc.value.offset <= end
