"""Interop: the qmigx CLI on real QEMU 7.2 streams, and QEMU 7.2 on what qmigx writes.

For every named stream (qemu_support.streams) the CLI must extract guest
RAM byte-identical to the source's memory file, decode every section the
vmdesc describes, copy a stream unchanged, re-encode it in each RAM
encoding so that a real QEMU 7.2 destination loads it into exactly the
source's RAM, verify it, and reject corrupted copies with one error line.
Reference data never comes from qmigx: guest RAM is the source's
memory-backend-file, block lists and the vmdesc come from tiny scans in
qemu_support.streams written from the spec.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from qemu_support import streams
from qemu_support.harness import load_stream

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
NAMES = streams.STREAM_NAMES
ENCODINGS = ("page", "zero", "xbzrle", "compress")
#: Where Debian's QEMU finds the SeaBIOS image it loads into the ``pc.bios`` block.
BIOS_FILES = ("/usr/share/qemu/bios-256k.bin", "/usr/share/seabios/bios-256k.bin")


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


def qmigx(*args: str | os.PathLike[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "qmigx", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"qmigx {r.args[3:]} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def setup_of(info):
    data = Path(info.stream).read_bytes()
    sid, blocks, _ = streams.ram_setup(data, ignore_shared=info.ignore_shared)
    return data, sid, blocks


def block_file(idstr: str) -> str:
    return urllib.parse.quote(idstr, safe="") + ".bin"


# --- (a) extract ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_extract(name, tmp_path):
    info = streams.get_stream(name)
    _, _, blocks = setup_of(info)
    out = tmp_path / "blocks"
    ok(qmigx("extract", info.stream, out))
    files = {p.name for p in out.iterdir() if p.name.endswith(".bin")}  # other files (e.g. state.json) may exist
    expected = {block_file(b.name) for b in blocks}
    assert files <= expected, f"unexpected block files {files - expected}"
    for b in blocks:
        path = out / block_file(b.name)
        if b.name == "mem0" and info.ignore_shared:
            # ram.md §8: listed in the setup record, but no page of it is ever sent
            if path.exists():
                assert path.stat().st_size == b.length
                assert path.read_bytes().count(0) == b.length
            continue
        assert path.exists(), f"block {b.name} not extracted"
        assert path.stat().st_size == b.length, b.name
    if not info.ignore_shared:
        assert (out / "mem0.bin").read_bytes() == Path(info.mem).read_bytes()
    bios = next((Path(p) for p in BIOS_FILES if Path(p).is_file()), None)
    if bios is not None and (out / "pc.bios.bin").exists() and bios.stat().st_size == (out / "pc.bios.bin").stat().st_size:
        assert (out / "pc.bios.bin").read_bytes() == bios.read_bytes()  # read-only, sent verbatim


# --- (b) analyze -----------------------------------------------------------------------------


def _hexbytes(v) -> bytes:
    if isinstance(v, str):
        return bytes.fromhex(v.replace(" ", ""))
    if isinstance(v, list):
        return bytes(int(x, 16) if isinstance(x, str) else x for x in v)
    raise TypeError(v)


@pytest.mark.parametrize("name", NAMES)
def test_analyze(name):
    info = streams.get_stream(name)
    data, sid, blocks = setup_of(info)

    desc = json.loads(ok(qmigx("analyze", "-f", info.stream, "-d", "desc")).stdout)
    assert desc == streams.vmdesc(data)

    state = json.loads(ok(qmigx("analyze", "-f", info.stream)).stdout)
    assert isinstance(state, dict)
    ram_key = f"ram ({sid})"
    assert ram_key in state
    sizes = state[ram_key]["section sizes"]
    assert list(sizes) == [b.name for b in blocks]
    for b in blocks:
        v = sizes[b.name]
        assert (int(v, 16) if isinstance(v, str) else v) == b.length, b.name

    key_re = re.compile(r"^(.*) \((\d+)\)$")
    parsed = [key_re.match(k) for k in state]
    assert all(parsed), [k for k, m in zip(state, parsed) if not m]
    in_state = collections.Counter(m.group(1) for m in parsed if m.group(1) != "ram")
    in_desc = collections.Counter(d["name"] for d in desc["devices"])
    assert in_state == in_desc
    assert len({m.group(2) for m in parsed}) == len(parsed)  # section ids are unique

    # the decoded device state says what the source's run state was
    (gs_key,) = [k for k in state if k.startswith("globalstate (")]
    runstate = _hexbytes(state[gs_key]["runstate"]).split(b"\0")[0]
    assert runstate == (b"running" if info.live else b"paused")


# --- (c) convert, keep -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_keep_is_identity(name, tmp_path):
    info = streams.get_stream(name)
    out = tmp_path / "same.stream"
    ok(qmigx("convert", info.stream, out))
    assert out.read_bytes() == Path(info.stream).read_bytes()


# --- (d) convert, re-encode, load into QEMU 7.2 ---------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", NAMES)
def test_convert_loads_into_qemu(name, encoding, tmp_path):
    info = streams.get_stream(name)
    out = tmp_path / f"{encoding}.stream"
    ok(qmigx("convert", info.stream, out, "--ram-encoding", encoding))
    assert out.read_bytes()[:8] == b"QEVM\x00\x00\x00\x03"
    caps = {"compress": True} if encoding == "compress" else {}
    ram = load_stream(out, like=info, caps=caps, workdir=tmp_path / "dst")
    assert ram == Path(info.mem).read_bytes()


# --- (e) verify -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_verify(name):
    info = streams.get_stream(name)
    ok(qmigx("verify", info.stream))


def _corrupt(info, kind: str, tmp_path: Path) -> Path:
    data = bytearray(Path(info.stream).read_bytes())
    if kind == "flipped-page-header":
        pos, _ = streams.first_page_record(bytes(data), ignore_shared=info.ignore_shared)
        data[pos + 7] ^= 0xFF  # low byte of the flags: several record kinds at once
    else:
        del data[len(data) // 2:]
    bad = tmp_path / f"{kind}.stream"
    bad.write_bytes(data)
    return bad


@pytest.mark.parametrize("kind", ["flipped-page-header", "truncated"])
@pytest.mark.parametrize("name", NAMES)
def test_verify_rejects_corruption(name, kind, tmp_path):
    info = streams.get_stream(name)
    r = qmigx("verify", _corrupt(info, kind, tmp_path))
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmigx: error:"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
