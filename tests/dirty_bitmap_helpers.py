"""Helpers for the dirty-bitmap tests: the source's output, the grammar, raw records, the CLI, QEMU peers.

Raw records (:func:`start_rec`, :func:`bits_rec`) are written from the
format description with ``struct``, never with qmigx's source, so
bad-input tests do not depend on the code they test.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np

from qemu_support.bitmaps import Disk, expected_bitmaps, query_bitmaps, run_steps
from qemu_support.harness import Qemu
from qemu_support.live import REPO, QmigxIncoming, cap_args, param_args, qmigx_argv, qmigx_env
from qmigx.block_bitmaps import DirtyBitmapSet
from qmigx.block_dirty_bitmap import DirtyBitmapDestination, DirtyBitmapHandler, DirtyBitmapSource
from qmigx.qemufile import BytesSink, Cursor, QEMUFile
from qmigx.savevm import Section

SECTION = Section(3, "dirty-bitmap", 0, 1)


def bitmap_set(spec: dict) -> DirtyBitmapSet:
    return DirtyBitmapSet.from_json(json.loads(json.dumps(spec)))


def sent(source: DirtyBitmapSource, parts: int = 1) -> tuple[bytes, list[bytes], bytes]:
    """START, PART and END payloads as the source writes them."""
    sink = BytesSink()
    f = QEMUFile(sink)
    out = []
    for step in [source.save_setup] + [source.save_live_iterate] * parts + [source.save_complete_precopy]:
        step(f)
        f.flush()
        out.append(bytes(sink.data))
        sink.data.clear()
    return out[0], out[1:-1], out[-1]


def records(payload: bytes, section: Section = SECTION) -> list:
    """Read one payload with the grammar, to its EOS (which must end it exactly)."""
    cur = Cursor(payload)
    grammar = DirtyBitmapHandler()
    out = []
    while True:
        rec, last = grammar.read_record(cur, section)
        out.append(rec)
        if last:
            assert cur.remaining() == 0, "bytes after EOS"
            return out


def load(dst: DirtyBitmapDestination, *payloads: bytes, section: Section = SECTION) -> None:
    dst.load_setup()
    for p in payloads:
        for rec in records(p, section):
            dst.load_record(rec, section)


def roundtrip(spec: dict, **dst_kw) -> DirtyBitmapDestination:
    start, parts, end = sent(DirtyBitmapSource(bitmap_set(spec)))
    dst = DirtyBitmapDestination(**dst_kw)
    load(dst, start, *parts, end)
    dst.load_cleanup(True)
    return dst


# raw records, written from the format description (not with the source)
def start_rec(flags=0x1C, node=b"d0", bitmap=b"b", gran=65536, bflags=1) -> bytes:
    out = bytes([flags])
    if flags & 0x08:
        out += bytes([len(node)]) + node
    if flags & 0x04:
        out += bytes([len(bitmap)]) + bitmap
    return out + struct.pack(">IB", gran, bflags)


def bits_rec(first, nr, buf=None, flags=0x40, node=None, bitmap=None) -> bytes:
    out = bytes([flags | (0x08 if node else 0) | (0x04 if bitmap else 0) | (0 if buf is not None else 0x02)])
    if node:
        out += bytes([len(node)]) + node
    if bitmap:
        out += bytes([len(bitmap)]) + bitmap
    out += struct.pack(">QI", first, nr)
    if buf is not None:
        out += struct.pack(">Q", len(buf)) + buf
    return out


EOS = b"\x01"
COMPLETE = b"\x20"


def words(*granules: int, n: int = 4) -> bytes:
    w = np.zeros(n, "<u8")
    for g in granules:
        w[g // 64] |= np.uint64(1) << np.uint64(g % 64)
    return w.tobytes()


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(qmigx_argv(*args), capture_output=True, text=True, env=qmigx_env(),
                          cwd=REPO, timeout=120)


def send_cli(stream, uri, *, caps=None, params=None, bitmaps=None,
             extra=()) -> subprocess.CompletedProcess:
    args = ["send", stream, uri] + (["--bitmaps", bitmaps] if bitmaps else []) + list(extra)
    return subprocess.run(qmigx_argv(*args) + cap_args(caps) + param_args(params),
                          capture_output=True, text=True, timeout=120, env=qmigx_env(), cwd=REPO)


def incoming_cli(uri, tmp_path, out, *, params=None, name="inc", extra=()) -> QmigxIncoming:
    inc = QmigxIncoming(uri, tmp_path, params=params, report=tmp_path / f"{name}.json", name=name)
    inc.argv += ["--bitmaps", str(out), *extra]
    return inc


# --- QEMU 7.2 peers (qemu_support does the work) ---------------------------------------------

#: a disk that ends 3 sectors into a 64 KiB granule, and bitmaps of four granularities
DISK_SIZE = (8 << 20) + 1536
STEPS = [
    ["add", "disk0", "fine", 512],
    ["add", "disk0", "wide", 1 << 20],
    ["write", "disk0", 0, 4096],
    ["write", "disk0", 3 << 20, 70000],
    ["add", "disk0", "late", 65536],  # sees only what follows
    ["write", "disk0", 4190208, 8192],  # across the first 4 MiB chunk of "fine"
    ["write", "disk0", 123456, 1],
    ["disable", "disk0", "wide"],
    ["add", "disk0", "mid", 4096],
    ["write", "disk0", DISK_SIZE - 512, 512],  # the last, partial granule
]
MAPPING_OUT = [{"node-name": "node0", "alias": "vol", "bitmaps": [
    {"name": "fine", "alias": "f", "transform": {"persistent": True}},
    {"name": "late", "alias": "l"}]}]


def qemu_vm(workdir: Path, name: str, *, paused: bool = False, incoming: bool = False):
    disk = Disk(workdir / f"{name}.raw", DISK_SIZE).create()
    return Qemu(ram="64M", paused=paused, incoming=incoming, workdir=workdir, name=name,
                extra=disk.args())


def save_base_stream(workdir: Path) -> Path:
    """A paused QEMU 7.2 with the test disk, saved without bitmaps: what ``qmigx send`` replays."""
    from qemu_support.bitmaps import migrate_to_file

    with qemu_vm(workdir, "base", paused=True) as vm:
        migrate_to_file(vm, workdir / "base.mig")
    return workdir / "base.mig"


def want_bitmaps(steps=STEPS) -> dict:
    return expected_bitmaps(steps, {"disk0": DISK_SIZE})


def qemu_to_qmigx(tmp_path, uris, *, src_params=None, dst_params=None, name="inc"):
    """QEMU (running, :data:`STEPS` applied) -> ``qmigx incoming --bitmaps``; (out, stderr, report, qemu's view)."""
    uri = uris.make("unix")
    out = tmp_path / f"{name}.out.json"
    with qemu_vm(tmp_path, f"{name}-src") as vm:
        run_steps(vm, STEPS)
        before = query_bitmaps(vm)
        with incoming_cli(uri, tmp_path, out, params=dst_params, name=name) as inc:
            vm.set_capabilities({"dirty-bitmaps": True})
            vm.set_parameters(src_params or {})
            vm.migrate(uri)
            vm.wait_migration(60)
            rc, err = inc.wait(60)
        assert rc == 0, err
        assert vm.status() == "postmigrate"
        assert query_bitmaps(vm) == before, "the source keeps its bitmaps"
    return json.loads(out.read_text()), err, json.loads((tmp_path / f"{name}.json").read_text()), before


def qmigx_to_qemu(tmp_path, uris, base_stream, bitmaps: dict, *, src_params=None, dst_params=None):
    """``qmigx send --bitmaps`` -> a paused QEMU (-incoming defer); its bitmaps and its log."""
    (tmp_path / "in.json").write_text(json.dumps(bitmaps))
    uri = uris.make("unix")
    with qemu_vm(tmp_path, "dst", paused=True, incoming=True) as dst:
        dst.set_parameters(dst_params or {})
        dst.migrate_incoming(uri)
        r = send_cli(base_stream, uri, caps={"dirty-bitmaps": True}, bitmaps=tmp_path / "in.json",
                     params={k: json.dumps(v) for k, v in (src_params or {}).items()})
        assert r.returncode == 0, f"{r.stderr}\n{dst.log_tail()}"
        assert dst.wait_migration(60)["status"] == "completed"
        return query_bitmaps(dst), dst.log_path.read_text()
