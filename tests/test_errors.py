"""Error messages stay on one line whatever the input.

A corrupted length byte can turn binary data into a "name" (an idstr that
runs into device state, a block name running into page data). Such names
must reach neither the terminal raw (newlines, escape sequences) nor the
command line's one-line report at full length.
"""

from __future__ import annotations

import pickle
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import errors
from qmigx._backend import load_compiled, load_reference
from qmigx.errors import (
    NAME_LIMIT,
    MigrationError,
    StreamError,
    UnknownSectionError,
    one_line,
    printable_name,
)
from qmigx.qemufile import BytesSink, QEMUFile
from qmigx.stream import Section, StreamWriter
from qmigx.wire import SectionType

NASTY = "dev0\n\r\x00\x1b[2J\x1b]0;title\x07\u2028\x85\udcff\udc80" + "A" * 300 + " (7)"

# --- the escaping functions -----------------------------------------------------------------


def test_printable_name_escapes_like_ascii_and_undecoded_bytes_as_hex():
    assert printable_name("pc.ram") == "pc.ram"
    assert printable_name("a\nb\rc\x00d\x1be\x7f") == r"a\nb\rc\x00d\x1be\x7f"
    assert printable_name("\u2028\x85é") == r"\u2028\x85\xe9"
    # bytes that did not decode (surrogateescape) show as the bytes they were
    raw = b"x\xff\x80y"
    assert printable_name(raw.decode("utf-8", "surrogateescape")) == r"x\xff\x80y"


def test_printable_name_cuts_long_names_keeping_head_and_tail():
    shown = printable_name(NASTY)
    assert len(shown) <= NAME_LIMIT
    assert shown.startswith(r"dev0\n\r\x00\x1b") and shown.endswith("AAA (7)")
    assert "..." in shown
    assert printable_name("x" * NAME_LIMIT) == "x" * NAME_LIMIT
    assert len(printable_name("x" * (NAME_LIMIT + 1))) == NAME_LIMIT
    assert len(printable_name("y" * 1000, limit=20)) == 20


def test_a_cut_never_splits_an_escape():
    for n in range(50, 90):
        shown = printable_name("\x00" * n)
        assert len(shown) <= NAME_LIMIT
        head, _, tail = shown.partition("...")
        assert head == r"\x00" * (len(head) // 4) and tail == r"\x00" * (len(tail) // 4)


def test_one_line_keeps_printable_text_and_escapes_the_rest():
    assert one_line("file /home/josé/a b.mig") == "file /home/josé/a b.mig"
    assert one_line("a\nb\r\n\x1b[31m\u2028\udcfe") == r"a\nb\r\n\x1b[31m\u2028\xfe"


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.text(), st.integers(0, 2**64))
def test_str_of_any_error_is_one_printable_line(message, section, field, offset):
    err = StreamError(message, offset=offset, section=section, field=field)
    text = str(err)
    assert text.isprintable()  # no line break, no control or format character
    assert len(text.splitlines()) <= 1
    assert str(pickle.loads(pickle.dumps(err))) == text
    for name in (section, field):
        assert len(printable_name(name)) <= NAME_LIMIT
        assert printable_name(printable_name(name)) == printable_name(name)
    assert one_line(one_line(message)) == one_line(message)


def test_error_keeps_its_attributes_and_shows_them_escaped():
    err = UnknownSectionError("bad\nthing", offset=0x10, section=NASTY, field="f\x00")
    assert err.message == "bad\nthing" and err.section == NASTY and err.field == "f\x00"
    text = str(err)
    assert text.startswith(r"bad\nthing (at offset 0x10, section dev0\n\r\x00")
    assert text.endswith(r"AAA (7), field f\x00)")
    assert len(text) < 120


def test_a_location_set_after_construction_is_escaped_too():
    err = MigrationError("m")
    err.section = "x\ny"
    assert str(err) == r"m (at section x\ny)"


# --- streams whose idstr length byte was corrupted --------------------------------------------

GARBAGE = b"\n\r\x00\x1b[2J\x1b]0;title\x07" + random.Random(7).randbytes(400)


def device_stream(vmdesc: bool = True) -> bytes:
    """One device section whose payload is binary garbage, with a vmdesc describing it."""
    sink = BytesSink()
    f = QEMUFile(sink)
    w = StreamWriter(f)
    w.header()
    w.configuration("pc-i440fx-7.2")
    w.section(SectionType.SECTION_FULL, Section(3, "dev0", 0, 1), GARBAGE)
    w.eof()
    if vmdesc:
        w.vmdesc(b'{"page_size": 4096, "devices": [{"name": "dev0", "instance_id": 0, '
                 b'"vmsd_name": "dev0", "version": 1, "fields": [{"name": "x", '
                 b'"type": "buffer", "size": %d}]}]}' % len(GARBAGE))
    f.flush()
    return bytes(sink.data)


def corrupted(n: int, vmdesc: bool = True) -> bytes:
    data = bytearray(device_stream(vmdesc))
    i = data.index(b"\x04dev0")
    data[i] = n  # the idstr now runs into the instance id, version and payload
    return bytes(data)


def verify(tmp_path, data: bytes) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    return subprocess.run([sys.executable, "-m", "qmigx", "verify", str(path)],
                          capture_output=True, timeout=120)


def test_the_intact_stream_verifies(tmp_path):
    r = verify(tmp_path, device_stream())
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("n", [0x10, 0x11, 0x1B, 0x80, 0xFF])
def test_verify_reports_a_binary_idstr_on_one_line(tmp_path, n):
    r = verify(tmp_path, corrupted(n))
    assert r.returncode == 1
    err = r.stderr.decode("ascii")  # raw bytes would not decode (or would be control chars)
    lines = err.split("\n")
    assert len(lines) == 2 and lines[1] == ""  # one line and its newline
    line = lines[0]
    assert line.startswith("qmigx: error: ") and "Traceback" not in line
    assert line.isprintable() and "\r" not in line
    assert r"dev0\x00\x00" in line  # the idstr, escaped
    if n >= 0x11:  # long enough to take in the payload's first bytes
        assert r"\x01\n\r\x00" in line
    if n == 0x11:  # short enough to be shown whole, with the escape byte
        assert r"\n\r\x00\x1b[ (3))" in line
    assert len(line) < 200  # 255 bytes of garbage are cut


def test_verify_reports_a_stream_ending_inside_a_binary_idstr_on_one_line(tmp_path):
    # no configuration and no vmdesc: the parser looks for the section's end
    # and reports the stream ending first, naming the section
    header = struct.pack(">II", 0x5145564D, 3)
    rec = (b"\x04" + struct.pack(">I", 7) + b"\xff" + b"dev0" + struct.pack(">II", 0, 1)
           + GARBAGE + b"\x1f")
    r = verify(tmp_path, header + rec)
    assert r.returncode == 1
    line, rest = r.stderr.decode("ascii").split("\n", 1)
    assert rest == "" and line.startswith("qmigx: error: ") and line.isprintable()
    assert r"section dev0\x00\x00\x00\x00\x00\x00\x00\x01\n\r\x00" in line


# --- block names -------------------------------------------------------------------------------


@pytest.mark.parametrize("mod", [load_compiled("ramparse"), load_reference("ramparse")],
                         ids=["compiled", "reference"])
def test_unknown_block_name_is_escaped_and_cut_by_both_scanners(mod):
    name = b"pc\n\x1b[1m\xff" + bytes(range(256))[:200]
    name = name[:255]
    record = struct.pack(">Q", 0x08) + bytes([len(name)]) + name + bytes(4096)
    sc = mod.RamScanner(4096, [b"pc.ram"], [4096])
    out = mod.RamRecords(4)
    with pytest.raises(errors.RamStreamError) as ei:
        sc.scan(record, 0, len(record), out, 1000)
    text = str(ei.value)
    assert text.isprintable() and r"Can't find block 'pc\n\x1b[1m\xff" in text
    assert len(text) < 64 + NAME_LIMIT
