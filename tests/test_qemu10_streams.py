"""Interop: every kind of stream QEMU 10.0 writes, read by qmigx; bridging 7.2 and 10.0.

QEMU 10 (``$QMIGX_QEMU10``, installed by .ci/install-qemu10.sh) saves
its own machine types (pc-i440fx-10.0, pc-q35-10.0) paused and live,
with XBZRLE, with each ``zero-page-detection``, a 7.2 machine type, and
``mapped-ram`` files (at offset 0 and 0x1000, with multifd writing the
file). For each the CLI must extract guest RAM byte-identical to the
source's memory file, decode every device section the (10.0) vmdesc
describes, verify it, and convert it into a stream QEMU 10 loads into
exactly the source's RAM. ``convert --for`` bridges the versions: a 7.2
stream with compressed pages loads into QEMU 10, a 7.2-machine stream
made by QEMU 10 loads into QEMU 7.2, both with RAM and device state
exact, and a 10.0-machine stream is refused for 7.2 with the reason.

Reference data never comes from qmigx: RAM is the source's memory file;
block lists, mapped-ram headers and command positions come from the
small scans below, written from the spec (qemu10.md); device state is
what a real QEMU saves again after loading the converted stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from qemu_support import streams
from qemu_support.harness import load_stream, qemu10_binary, qemu_binary

#: gated by tests/conftest.py: QEMU 10 is $QMIGX_QEMU10 (.ci/install-qemu10.sh)
pytestmark = [pytest.mark.qemu, pytest.mark.qemu10]

REPO = Path(__file__).resolve().parent.parent
NAMES = streams.STREAM_NAMES10
MAPPED = [n for n in NAMES if "mapped" in n]


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


def qmigx(*args, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "qmigx", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"qmigx {r.args[3:]} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


# --- small scans of QEMU 10 streams, from the spec (qemu10.md §3, §5) ---------------------------


def stream_start(data: bytes) -> int:
    """Where ``QEVM`` is: 0, or N for ``file:PATH,offset=N`` (N zero bytes first, §5.1)."""
    n = len(data) - len(data.lstrip(b"\0"))
    assert data[n : n + 4] == b"QEVM"
    return n


def machine_of(data: bytes) -> str:
    s = stream_start(data)
    assert data[s + 8] == 0x07
    (n,) = struct.unpack_from(">I", data, s + 9)
    return data[s + 13 : s + 13 + n].decode()


def mapped_blocks(data: bytes) -> list[dict]:
    """The mapped-ram setup entries and headers, following QEMU's layout (§5.2)."""
    i = data.index(b"\x01\x00\x00\x00\x01\x03ram\x00\x00\x00\x00\x00\x00\x00\x04")  # START sid 1
    pos = i + 17
    (hdr,) = struct.unpack_from(">Q", data, pos)
    assert hdr & 0xFFF == 0x4
    total = hdr & ~0xFFF
    pos += 8
    out = []
    while total:
        n = data[pos]
        name = data[pos + 1 : pos + 1 + n].decode()
        pos += 1 + n
        used, version, page, bitmap, pages = struct.unpack_from(">QIQQQ", data, pos)
        out.append(dict(name=name, used=used, version=version, page=page, bitmap=bitmap,
                        pages=pages, header_end=pos + 36))
        total -= used
        pos = pages + used
    return out


def ram_from_mapped(data: bytes, block: dict) -> bytes:
    """A block's RAM rebuilt from its bitmap and page area (pages whose bit is clear are 0)."""
    npages = block["used"] // 4096
    bits = np.unpackbits(np.frombuffer(data, np.uint8, -(-npages // 64) * 8, block["bitmap"]),
                         bitorder="little")[:npages].astype(bool)
    pages = np.frombuffer(data, np.uint8, block["used"], block["pages"]).reshape(npages, 4096)
    out = np.zeros((npages, 4096), np.uint8)
    out[bits] = pages[bits]
    return out.tobytes()


def commands_before_end(data: bytes) -> list[bytes]:
    """The 5-byte records right before ram's END section header (``03 00 00 00 01``)."""
    end = data.rindex(b"\x03\x00\x00\x00\x01")
    return [data[end - 5 : end]]


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_extract_verify_analyze(name, tmp_path):
    info = streams.get_stream(name)
    data = Path(info.stream).read_bytes()
    out = tmp_path / "blocks"
    ok(qmigx("extract", info.stream, out))
    assert (out / "mem0.bin").read_bytes() == Path(info.mem).read_bytes(), "guest RAM differs"
    line = ok(qmigx("verify", info.stream)).stdout
    assert ": OK:" in line and "vmdesc present" in line

    desc = json.loads(ok(qmigx("analyze", "-f", info.stream, "-d", "desc")).stdout)
    want = streams.vmdesc(data)
    assert desc == want
    assert list(want)[:3] == ["configuration", "page_size", "devices"]  # the 10.0 vmdesc
    assert want["configuration"]["vmsd_name"] == "configuration"
    state = json.loads(ok(qmigx("analyze", "-f", info.stream)).stdout)
    devices = {(d["name"], d["instance_id"]) for d in want["devices"]}
    decoded = [k for k, v in state.items() if not k.startswith("ram (")]
    assert len(decoded) == len(devices)
    assert all(isinstance(state[k], dict) for k in decoded), "a section was not decoded"
    assert "ram (1)" in state  # ram is section 1 in QEMU 10 (qemu10.md §3.4)


@pytest.mark.parametrize("name", NAMES)
def test_switchover_start_follows_the_machine_type(name):
    """Command 11 sits right before ram's END for 10.0 machines, never for 7.2 ones (§3.1)."""
    info = streams.get_stream(name)
    data = Path(info.stream).read_bytes()
    machine = machine_of(data)
    assert machine == ("pc-i440fx-7.2" if "pc72" in name else
                       "pc-q35-10.0" if "q35" in name else "pc-i440fx-10.0")
    cmd11 = b"\x08\x00\x0b\x00\x00"
    if machine.endswith("-10.0"):
        assert commands_before_end(data) == [cmd11]
        assert data.count(cmd11) >= 1
    else:
        assert commands_before_end(data) != [cmd11]


@pytest.mark.parametrize("name", MAPPED)
def test_mapped_ram_layout(name, tmp_path):
    """qmigx rebuilds each block as the spec's layout says, and sees the same headers."""
    from qmigx.stream import RamMappedBlock, StreamReader

    info = streams.get_stream(name)
    data = Path(info.stream).read_bytes()
    want = mapped_blocks(data)
    got = [ev for ev in StreamReader(info.stream).events() if isinstance(ev, RamMappedBlock)]
    assert [(e.info.idstr, e.info.used_length, e.info.mapped.bitmap_offset,
             e.info.mapped.pages_offset) for e in got] == [
        (b["name"], b["used"], b["bitmap"], b["pages"]) for b in want]
    for b in want:
        assert b["version"] == 1 and b["page"] == 4096 and b["bitmap"] == b["header_end"]
        assert b["pages"] % (1 << 20) == 0
    mem0 = next(b for b in want if b["name"] == "mem0")
    assert ram_from_mapped(data, mem0) == Path(info.mem).read_bytes()
    out = tmp_path / "blocks"
    ok(qmigx("extract", info.stream, out))
    for b in want:
        fname = urllib.parse.quote(b["name"], safe="") + ".bin"
        assert (out / fname).read_bytes() == ram_from_mapped(data, b), b["name"]


# --- converting, and loading the result into QEMU 10 ----------------------------------------------


def like(info, machine: str | None = None):
    """The stream's StreamInfo with the exact machine type its configuration names."""
    m = machine or machine_of(Path(info.stream).read_bytes())
    return dataclasses.replace(info, machine=m, caps={k: v for k, v in info.caps.items()
                                                       if k != "mapped-ram"})


@pytest.mark.parametrize("name,encoding", [(n, "zero") for n in NAMES]
                         + [("q10-pc-live", "page"), ("q10-pc-xbzrle", "xbzrle"),
                            ("q10-q35-live", "keep")])
def test_convert_loads_into_qemu10(name, encoding, tmp_path):
    info = streams.get_stream(name)
    out = tmp_path / "out.mig"
    ok(qmigx("convert", info.stream, out, "--ram-encoding", encoding, "--for", "10.0"))
    ok(qmigx("verify", out))
    if "mapped" in name:
        # the output is a plain stream: no mapped-ram capability in its configuration
        assert b"mapped-ram" not in out.read_bytes()[:200]
    ram = load_stream(out, like=like(info), workdir=tmp_path / "dst", binary=qemu10_binary())
    assert ram == Path(info.mem).read_bytes()


@pytest.mark.parametrize("name", ["q10-pc-mapped", "q10-pc-mapped-multifd"])
def test_mapped_ram_file_loads_back_into_qemu10(name, tmp_path):
    """Sanity of the recipe: QEMU 10 loads the mapped-ram file it wrote (file: URI)."""
    info = streams.get_stream(name)
    off = stream_start(Path(info.stream).read_bytes()[:1 << 16])
    uri = f"file:{info.stream}" + (f",offset={off:#x}" if off else "")
    ram = load_stream(info.stream, like=dataclasses.replace(info, caps={"mapped-ram": True}),
                      workdir=tmp_path / "dst", binary=qemu10_binary(), uri=uri)
    assert ram == Path(info.mem).read_bytes()


# --- bridging 7.2 and 10.0 ------------------------------------------------------------------------


def device_states(path) -> dict:
    """Device section payloads keyed by (idstr, instance): ids and order differ by version."""
    from qmigx.stream import SectionData, StreamReader

    return {(ev.section.idstr, ev.section.instance_id): ev for ev in StreamReader(path).events()
            if isinstance(ev, SectionData)}


#: the bytes that are the host's clock at saving time, not guest state: the timer
#: section's offsets, and the RTC's time-of-day registers (CMOS 0x00-0x09) that it
#: refreshes when saved
#: fields that follow the host clock (the RTC recomputes its next update and next
#: alarm from the time at which the state was loaded)
_CLOCK_FIELDS = {"timer": ("cpu_ticks_offset", "cpu_clock_offset"),
                 "mc146818rtc": ("update_timer", "next_alarm_time")}


def same_devices(a: dict, b: dict) -> None:
    """The same device state: every payload byte-identical, clocks apart.

    Payloads are compared as bytes because 10.0's vmdesc renames some fields
    of unchanged wire data (qemu10.md §3.5); the two clock-carrying sections
    are compared decoded, without their clock fields.
    """
    from qmigx.vmstate import analyze_value

    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        name = key[0]
        if name in _CLOCK_FIELDS or name == "mc146818rtc":
            dx, dy = (analyze_value(v.value, by_name=True) for v in (x, y))
            for field in _CLOCK_FIELDS.get(name, ()):
                dx.pop(field)
                dy.pop(field)
            if name == "mc146818rtc":
                for d in (dx, dy):  # the clock registers, and register C's update flag
                    cmos = d["cmos_data"].split()
                    d["cmos_data"] = cmos[10:12] + cmos[13:]
            assert dx == dy, f"device {key} differs"
        elif name == "globalstate":
            # be32 size, then the runstate; QEMU 10 also sets vm_was_suspended's flag
            # in what 7.2 left as zero padding of the same 100 bytes (§3.5)
            assert x.payload[4:36].split(b"\0")[0] == y.payload[4:36].split(b"\0")[0]
        else:
            assert x.payload == y.payload, f"device {key} differs"


def test_compressed_72_stream_loads_into_qemu10_after_convert(tmp_path):
    """QEMU 10 has no compress: it cannot load 7.2's compressed pages, the converted stream it can."""
    info = streams.get_stream("pc-compress")  # QEMU 7.2, pc-i440fx-7.2, COMPRESS_PAGE records
    machine = machine_of(Path(info.stream).read_bytes())
    assert machine == "pc-i440fx-7.2"
    target = like(info, machine)
    target = dataclasses.replace(target, caps={})
    from qemu_support.harness import QemuError

    with pytest.raises(QemuError, match="0x120|flags"):
        load_stream(info.stream, like=target, workdir=tmp_path / "direct", binary=qemu10_binary())
    out = tmp_path / "for10.mig"
    ok(qmigx("convert", info.stream, out, "--for", "10.0"))
    again = tmp_path / "again.mig"
    ram = load_stream(out, like=target, workdir=tmp_path / "dst", binary=qemu10_binary(),
                      resave=again)
    assert ram == Path(info.mem).read_bytes()
    same_devices(device_states(again), device_states(info.stream))


def test_72_machine_stream_from_qemu10_loads_into_qemu72(tmp_path):
    info = streams.get_stream("q10-pc72-paused")
    out = tmp_path / "for72.mig"
    ok(qmigx("convert", info.stream, out, "--for", "7.2"))
    assert b"configuration" not in out.read_bytes()[-200000:][:40]  # 7.2's vmdesc
    again = tmp_path / "again.mig"
    ram = load_stream(out, like=dataclasses.replace(like(info), binary=None),
                      workdir=tmp_path / "dst", binary=qemu_binary(), resave=again)
    assert ram == Path(info.mem).read_bytes()
    same_devices(device_states(again), device_states(info.stream))


@pytest.mark.parametrize("name", ["q10-pc-paused", "q10-q35-live", "q10-pc-mapped"])
def test_10_machine_stream_refused_for_72(name, tmp_path):
    info = streams.get_stream(name)
    out = tmp_path / "for72.mig"
    r = qmigx("convert", info.stream, out, "--for", "7.2")
    assert r.returncode == 1 and not out.exists()
    machine = machine_of(Path(info.stream).read_bytes())
    assert f"QEMU 7.2 lacks machine type '{machine}'" in r.stderr
    assert r.stderr.count("\n") == 1
