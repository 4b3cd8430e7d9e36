"""Named real QEMU 7.2 migration streams, generated once and shared by tests.

Each stream takes QEMU a few seconds to produce, and several test files
need the same ones, so :func:`get_stream` makes each named stream on
first use and caches it (with a JSON description, :class:`StreamInfo`)
in a directory: ``$QMIGX_STREAM_CACHE`` if set (persists across runs;
an entry is remade when its recipe or the guest code changed), else the
directory set by :func:`set_default_cache_dir` (the test files point it
into pytest's session temp dir), else a private temp dir removed at exit.

The module also has a few deliberately tiny stream scans (header, RAM
setup record, first page record, vmdesc trailer) written from the spec
independently of qmigx, so tests can check qmigx's output against them.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from .guest import build_guest
from .harness import DEVICE_NAMES, StreamInfo, parse_size, qemu10_binary, save_stream

__all__ = [
    "RECIPES",
    "STREAM_NAMES",
    "RECIPES10",
    "STREAM_NAMES10",
    "get_stream",
    "cache_dir",
    "set_default_cache_dir",
    "RamBlock",
    "read_header",
    "ram_setup",
    "first_page_record",
    "vmdesc",
]

RAM = "64M"


@dataclasses.dataclass(frozen=True)
class Recipe:
    machine: str = "pc"
    live: bool = False
    caps: tuple[tuple[str, bool], ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    devices: tuple[str, ...] = ()
    seed: int = 0x5EED
    #: which QEMU makes it: "7.2" (the system's) or "10.0" ($QMIGX_QEMU10)
    qemu: str = "7.2"
    #: QEMU 10 writes the file itself through ``file:PATH[,offset=N]`` (mapped-ram)
    file_offset: int | None = None


#: name -> how to make it
RECIPES: dict[str, Recipe] = {
    "pc-paused": Recipe(seed=0x5EED0001),
    "q35-paused": Recipe(machine="q35", seed=0x5EED0002),
    "pc-live": Recipe(live=True, seed=0x5EED0003),
    "pc-xbzrle": Recipe(live=True, caps=(("xbzrle", True),), params=(("xbzrle-cache-size", 1 << 20),),
                        seed=0x5EED0004),
    "pc-compress": Recipe(caps=(("compress", True),), seed=0x5EED0005),
    "pc-ignore-shared": Recipe(caps=(("x-ignore-shared", True),), seed=0x5EED0006),
    "pc-devices": Recipe(devices=DEVICE_NAMES, seed=0x5EED0007),
}
STREAM_NAMES = tuple(RECIPES)

#: streams QEMU 10.0 writes: its own machine types (pc = pc-i440fx-10.0, q35 =
#: pc-q35-10.0), a 7.2 machine type, each zero-page-detection, and mapped-ram files
RECIPES10: dict[str, Recipe] = {
    "q10-pc-paused": Recipe(qemu="10.0", seed=0x5EED1001),
    "q10-q35-paused": Recipe(machine="q35", qemu="10.0", seed=0x5EED1002),
    "q10-pc-live": Recipe(live=True, qemu="10.0", seed=0x5EED1003),
    "q10-q35-live": Recipe(machine="q35", live=True, qemu="10.0", seed=0x5EED100A),
    "q10-pc-xbzrle": Recipe(live=True, caps=(("xbzrle", True),),
                            params=(("xbzrle-cache-size", 1 << 20),), qemu="10.0", seed=0x5EED1004),
    "q10-pc-zpd-none": Recipe(params=(("zero-page-detection", "none"),), qemu="10.0",
                              seed=0x5EED1005),
    "q10-pc-zpd-legacy": Recipe(live=True, params=(("zero-page-detection", "legacy"),),
                                qemu="10.0", seed=0x5EED100B),
    "q10-pc72-paused": Recipe(machine="pc-i440fx-7.2", qemu="10.0", seed=0x5EED1006),
    "q10-pc-mapped": Recipe(caps=(("mapped-ram", True),), qemu="10.0", file_offset=0,
                            seed=0x5EED1007),
    "q10-pc-mapped-live": Recipe(live=True, caps=(("mapped-ram", True),), qemu="10.0",
                                 file_offset=0, seed=0x5EED1008),
    "q10-pc-mapped-multifd": Recipe(caps=(("mapped-ram", True), ("multifd", True)),
                                    params=(("multifd-channels", 2),), qemu="10.0",
                                    file_offset=0x1000, seed=0x5EED1009),
}
STREAM_NAMES10 = tuple(RECIPES10)

_default_dir: Path | None = None
_memo: dict[tuple[str, str], StreamInfo] = {}


def set_default_cache_dir(path: str | os.PathLike[str]) -> None:
    """Where streams go when ``$QMIGX_STREAM_CACHE`` is not set (first call wins)."""
    global _default_dir
    if _default_dir is None:
        _default_dir = Path(path)


def cache_dir() -> Path:
    global _default_dir
    env = os.environ.get("QMIGX_STREAM_CACHE")
    if env:
        d = Path(env)
    else:
        if _default_dir is None:
            _default_dir = Path(tempfile.mkdtemp(prefix="qmigx-streams-"))
            atexit.register(shutil.rmtree, _default_dir, True)
        d = _default_dir
    d.mkdir(parents=True, exist_ok=True)
    return d


def _fingerprint(name: str, recipe: Recipe) -> str:
    """Changes whenever the recipe or the guest's code changes."""
    h = hashlib.sha256(repr((name, recipe, RAM)).encode())
    h.update(build_guest(recipe.seed, parse_size(RAM), dirty=recipe.live))
    return h.hexdigest()[:16]


def get_stream(name: str) -> StreamInfo:
    """The named stream (see :data:`RECIPES`), made on first use."""
    if name not in RECIPES and name not in RECIPES10:
        raise KeyError(f"unknown stream {name!r}; known: {', '.join(STREAM_NAMES + STREAM_NAMES10)}")
    d = cache_dir()
    key = (str(d), name)
    if key in _memo:
        return _memo[key]
    recipe = RECIPES.get(name) or RECIPES10[name]
    binary = None
    if recipe.qemu != "7.2":
        binary = qemu10_binary()
        if binary is None:
            raise KeyError(f"stream {name!r} needs QEMU 10 ($QMIGX_QEMU10)")
    uri_of = None
    if recipe.file_offset is not None:
        off = recipe.file_offset
        uri_of = lambda p: f"file:{p}" + (f",offset={off:#x}" if off else "")  # noqa: E731
    fp = _fingerprint(name, recipe)
    info_path = d / f"{name}.json"
    with open(d / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel workers make each stream once
        info = _load_cached(info_path, fp)
        if info is None:
            info = save_stream(
                d / f"{name}.stream", name=name, machine=recipe.machine, ram=RAM, seed=recipe.seed,
                caps=dict(recipe.caps), params=dict(recipe.params), devices=recipe.devices,
                live=recipe.live, workdir=d, binary=binary, uri_of=uri_of,
            )
            tmp = info_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": fp, "info": json.loads(info.to_json())}, indent=1))
            os.replace(tmp, info_path)
    _memo[key] = info
    return info


def _load_cached(info_path: Path, fp: str) -> StreamInfo | None:
    try:
        doc = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("fingerprint") != fp:
        return None
    info = StreamInfo.from_json(json.dumps(doc["info"]))
    needed = [info.stream, info.mem] + [p for p in (info.kernel, info.disk) if p]
    if not all(os.path.exists(p) for p in needed):
        return None
    return info


# --- tiny independent stream scans (spec: stream.md §2-4, ram.md §2-4, vmstate.md §8) ---


@dataclasses.dataclass(frozen=True)
class RamBlock:
    name: str
    length: int
    gpa: int | None  # only with x-ignore-shared


def read_header(data: bytes) -> tuple[int, int, str]:
    """(magic, version, machine type) from the file header and configuration section."""
    magic, version = struct.unpack_from(">II", data, 0)
    machine = ""
    if data[8] == 0x07:
        (n,) = struct.unpack_from(">I", data, 9)
        machine = data[13:13 + n].decode()
    return magic, version, machine


_RAM_START = re.compile(rb"\x01(....)\x03ram\x00\x00\x00\x00\x00\x00\x00\x04", re.S)


def ram_setup(data: bytes, *, ignore_shared: bool) -> tuple[int, list[RamBlock], int]:
    """Parse the ``ram`` START section: (section id, blocks, offset just after its footer)."""
    m = _RAM_START.search(data, 0, 4096)
    if m is None:
        raise ValueError("no ram START section near the start of the stream")
    (sid,) = struct.unpack(">I", m.group(1))
    pos = m.end()
    (hdr,) = struct.unpack_from(">Q", data, pos)
    pos += 8
    if hdr & 0xFFF != 0x04:
        raise ValueError(f"ram setup record has flags {hdr & 0xfff:#x}, not MEM_SIZE")
    total = hdr & ~0xFFF
    blocks = []
    while total > 0:
        n = data[pos]
        name = data[pos + 1:pos + 1 + n].decode()
        pos += 1 + n
        (length,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        gpa = None
        if ignore_shared:
            (gpa,) = struct.unpack_from(">Q", data, pos)
            pos += 8
        blocks.append(RamBlock(name, length, gpa))
        total -= length
    (eos,) = struct.unpack_from(">Q", data, pos)
    if total != 0 or eos != 0x10:
        raise ValueError("ram setup record does not add up / lacks its EOS")
    pos += 8
    if data[pos] != 0x7E or struct.unpack_from(">I", data, pos + 1)[0] != sid:
        raise ValueError("ram START section lacks its footer")
    return sid, blocks, pos + 5


def first_page_record(data: bytes, *, ignore_shared: bool) -> tuple[int, int]:
    """(offset, flags) of the be64 header of the first page record after the RAM setup.

    Skips PART sections of ``ram`` that hold only an EOS; stops at the
    first record whose flags carry ZERO, PAGE, XBZRLE or COMPRESS_PAGE.
    """
    sid, _, pos = ram_setup(data, ignore_shared=ignore_shared)
    while True:
        if data[pos] != 0x02 or struct.unpack_from(">I", data, pos + 1)[0] != sid:
            raise ValueError(f"expected a PART of the ram section at {pos:#x}")
        pos += 5
        (hdr,) = struct.unpack_from(">Q", data, pos)
        flags = hdr & 0xFFF
        if flags & (0x02 | 0x08 | 0x40 | 0x100):
            return pos, flags
        if flags != 0x10:
            raise ValueError(f"unexpected RAM record flags {flags:#x} at {pos:#x}")
        pos += 8 + 5  # EOS, footer


def vmdesc(data: bytes) -> dict[str, Any]:
    """The JSON trailer (QEMU_VM_VMDESCRIPTION), which must end exactly at end of file.

    7.2's starts with ``{"page_size"``, 10.0's with ``{"configuration"``.
    """
    pos = max(data.rfind(b'{"page_size"'), data.rfind(b'{"configuration"'))
    if pos < 5 or data[pos - 5] != 0x06 or struct.unpack_from(">I", data, pos - 4)[0] != len(data) - pos:
        raise ValueError("no vmdesc trailer at the end of the stream")
    return json.loads(data[pos:])
