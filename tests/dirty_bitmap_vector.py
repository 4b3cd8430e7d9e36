"""A real QEMU 7.2 ``dirty-bitmap`` section, kept as a test vector.

``tests/data/qemu72-dirty-bitmap.json`` holds what QEMU 7.2 sent for the
:data:`STEPS` below (two disks, four bitmaps of four granularities, one
disabled after some writes, a disk that is not a whole number of chunks):
the START payload, one PART payload and the END payload (section bytes
between header and footer), and what QEMU's own ``query-block`` and
``x-debug-block-dirty-bitmap-sha256`` said about each bitmap before it
migrated. :func:`capture` makes it again (``python tests/dirty_bitmap_vector.py``
rewrites the file); a QEMU test checks that the stored one is still what
QEMU sends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_support.bitmaps import Disk, migrate_to_file, query_bitmaps, run_steps
from qemu_support.harness import Qemu, qemu_binary

PATH = Path(__file__).resolve().parent / "data" / "qemu72-dirty-bitmap.json"

#: (device, node, size): the second disk ends 3 sectors into a 64 KiB granule
DISKS = [("disk0", "node0", (20 << 20) + 1536), ("disk1", "node1", 1 << 20)]
STEPS: list[list[Any]] = [
    ["add", "disk0", "fine", 512],
    ["add", "disk0", "mid", 4096],
    ["add", "disk1", "solo", 65536],
    ["add", "disk1", "coarse", 131072],
    ["write", "disk0", 0, 4096],
    ["write", "disk0", 4190208, 16384],  # across the first 4 MiB chunk of "fine"
    ["write", "disk0", 1000, 100],  # not sector-aligned
    ["write", "disk1", 65536, 65536],
    ["disable", "disk0", "mid"],
    ["write", "disk0", 20971520, 1536],  # the partial last granule; "mid" misses it
]


def sections(data: bytes) -> dict[str, list[bytes]]:
    """Payloads of the ``dirty-bitmap`` sections of a stream, by kind."""
    from qmigx.stream import SectionEnd, SectionStart, StreamParser

    parser = StreamParser()
    parser.feed(data)
    parser.feed_eof()
    out: dict[str, list[bytes]] = {"start": [], "part": [], "end": []}
    start = None
    for ev in parser.events():
        if isinstance(ev, SectionStart) and ev.section.idstr == "dirty-bitmap":
            start = ev
        elif isinstance(ev, SectionEnd) and start is not None:
            header = 5 if ev.type in (2, 3) else 5 + 1 + len("dirty-bitmap") + 8
            kind = {1: "start", 2: "part", 3: "end"}[int(ev.type)]
            out[kind].append(data[start.offset + header : ev.offset])
            start = None
    return out


def capture(workdir: Path) -> dict[str, Any]:
    """Run :data:`STEPS` on a paused QEMU 7.2 and migrate it to a file; the vector."""
    disks = [Disk(workdir / f"{dev}.raw", size, dev, node).create() for dev, node, size in DISKS]
    extra = [a for d in disks for a in d.args()]
    with Qemu(ram="64M", paused=True, workdir=workdir, name="vector", extra=extra) as vm:
        run_steps(vm, STEPS)
        query = query_bitmaps(vm)
        vm.set_capabilities({"dirty-bitmaps": True})
        migrate_to_file(vm, workdir / "vector.mig")
    secs = sections((workdir / "vector.mig").read_bytes())
    version = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True).stdout
    return {
        "qemu": version.splitlines()[0],
        "disks": DISKS,
        "steps": STEPS,
        "query": query,
        "start": secs["start"][0].hex(),
        "part": secs["part"][0].hex(),
        "parts": len(secs["part"]),
        "end": secs["end"][0].hex(),
    }


def load() -> dict[str, Any]:
    return json.loads(PATH.read_text())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vector = capture(Path(tmp))
    PATH.write_text(json.dumps(vector, indent=1) + "\n")
    print(f"wrote {PATH}")
