"""Helpers for the dirty-bitmap tests: the source's output, the grammar, raw records, the CLI.

Raw records (:func:`start_rec`, :func:`bits_rec`) are written from the
format description with ``struct``, never with qmigx's source, so
bad-input tests do not depend on the code they test.
"""

from __future__ import annotations

import json
import struct
import subprocess

import numpy as np
from qemu_support.live import (
    REPO,
    QmigxIncoming,
    cap_args,
    param_args,
    qmigx_argv,
    qmigx_env,
)

from qmigx.block_bitmaps import DirtyBitmapSet
from qmigx.block_dirty_bitmap import (
    DirtyBitmapDestination,
    DirtyBitmapHandler,
    DirtyBitmapSource,
)
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


def send_cli(stream, uri, *, caps=None, params=None, bitmaps=None) -> subprocess.CompletedProcess:
    args = ["send", stream, uri] + (["--bitmaps", bitmaps] if bitmaps else [])
    return subprocess.run(qmigx_argv(*args) + cap_args(caps) + param_args(params),
                          capture_output=True, text=True, timeout=120, env=qmigx_env(), cwd=REPO)


def incoming_cli(uri, tmp_path, out, *, params=None, name="inc", extra=()) -> QmigxIncoming:
    inc = QmigxIncoming(uri, tmp_path, params=params, report=tmp_path / f"{name}.json", name=name)
    inc.argv += ["--bitmaps", str(out), *extra]
    return inc
