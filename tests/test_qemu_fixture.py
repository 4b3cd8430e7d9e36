"""Known answers from a real QEMU 7.2 stream, kept in tests/data.

``qemu72-pc-paused.mig`` was written by ``qemu-system-x86_64`` 7.2 (``-M pc
-m 64 -S``, RAM on a memory-backend-file, ``migrate exec:cat > FILE``); the
two JSON files are what QEMU 7.2's own ``scripts/analyze-migration.py``
printed for it with ``-d state`` and ``-d desc``. qmigx must print the
very same bytes.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import pytest

from qmigx.tools.analyze import analyze_state, dumps, vmdesc_json
from qmigx.tools.streams import convert_stream, load_stream, verify_stream

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fixture") / "pc-paused.mig"
    path.write_bytes(gzip.decompress((DATA / "qemu72-pc-paused.mig.gz").read_bytes()))
    return path


def expected(name: str) -> str:
    return gzip.decompress((DATA / f"qemu72-pc-paused.{name}.json.gz").read_bytes()).decode()


def test_analyze_state_matches_qemus_script_byte_for_byte(stream):
    assert dumps(analyze_state(str(stream))) + "\n" == expected("state")


def test_analyze_desc_matches_qemus_script_byte_for_byte(stream):
    assert dumps(vmdesc_json(str(stream))) + "\n" == expected("desc")


def test_cli_analyze_output_is_identical(stream):
    r = subprocess.run([sys.executable, "-m", "qmigx", "analyze", "-f", str(stream)],
                       capture_output=True, text=True, check=True)
    assert r.stdout == expected("state")


def test_verify_and_keep_convert(stream):
    data = stream.read_bytes()
    assert verify_stream(str(stream))["bytes"] == len(data)
    out = io.BytesIO()
    convert_stream(str(stream), out.write, "keep")
    assert out.getvalue() == data


def test_zero_encoding_reproduces_qemus_own_bytes(stream):
    """QEMU's default encoding is ZERO/PAGE: re-encoding gives the same stream."""
    out = io.BytesIO()
    convert_stream(str(stream), out.write, "zero")
    assert out.getvalue() == stream.read_bytes()


@pytest.mark.parametrize("encoding", ["page", "xbzrle", "compress"])
def test_other_encodings_keep_ram_and_devices(stream, encoding):
    out = io.BytesIO()
    convert_stream(str(stream), out.write, encoding)
    a = load_stream(str(stream))
    b = load_stream(out.getvalue())
    assert [blk.idstr for blk in a.blocks] == [blk.idstr for blk in b.blocks]
    for blk in a.blocks:
        assert bytes(blk.memory) == bytes(b.blocks[blk.idstr].memory)
    assert [(s.section, s.payload) for s in a.sections] == [(s.section, s.payload)
                                                            for s in b.sections]
    assert a.vmdesc == b.vmdesc
