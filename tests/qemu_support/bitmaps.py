"""Block dirty bitmaps on a real QEMU 7.2: disks, bitmaps, writes, and what QEMU reports.

The reference for every dirty-bitmap interop test is QEMU itself: bitmaps
are made with ``block-dirty-bitmap-add``, dirtied by ``qemu-io`` writes
through HMP, and read back with ``query-block`` and
``x-debug-block-dirty-bitmap-sha256`` (SHA-256 of the bitmap's words).
The expected dirty ranges of a list of writes are computed here from the
writes alone, independently of qmigx.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .harness import Qemu, QemuError

__all__ = [
    "Disk",
    "drive_args",
    "qemu_io",
    "add_bitmap",
    "query_bitmaps",
    "expected_ranges",
    "run_steps",
    "expected_bitmaps",
    "migrate_to_file",
]


class Disk:
    """A raw image attached as virtio-blk: BlockBackend ``device``, format node ``node``."""

    def __init__(self, path: str | os.PathLike[str], size: int, device: str = "disk0",
                 node: str = "node0") -> None:
        self.path = Path(path)
        self.size = size
        self.device = device
        self.node = node

    def create(self) -> "Disk":
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        return self

    def args(self) -> list[str]:
        return drive_args(self.path, self.device, self.node)


def drive_args(path: str | os.PathLike[str], device: str, node: str) -> list[str]:
    return ["-drive", f"file={path},format=raw,if=none,id={device},node-name={node}",
            "-device", f"virtio-blk-pci,drive={device},id=blk-{device}"]


def qemu_io(vm: Qemu, device: str, command: str) -> None:
    """Run one qemu-io command on ``device`` through HMP; QEMU's complaints raise."""
    out = vm.cmd("human-monitor-command",
                 **{"command-line": f'qemu-io {device} "{command}"'})
    if out.strip():
        raise QemuError(f"qemu-io {device} {command!r}: {out.strip()}")


def add_bitmap(vm: Qemu, node: str, name: str, granularity: int, *, disabled: bool = False) -> None:
    vm.cmd("block-dirty-bitmap-add", node=node, name=name, granularity=granularity,
           disabled=disabled)


def query_bitmaps(vm: Qemu) -> dict[str, dict[str, dict[str, Any]]]:
    """Every named bitmap by device (or node, for unattached nodes), with QEMU's SHA-256."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dev in vm.cmd("query-block"):
        ins = dev.get("inserted")
        if not ins:
            continue
        owner = dev.get("device") or ins["node-name"]
        for bm in ins.get("dirty-bitmaps", ()):
            info = {k: bm[k] for k in ("granularity", "count", "recording", "persistent")}
            info["sha256"] = vm.cmd("x-debug-block-dirty-bitmap-sha256", node=ins["node-name"],
                                    name=bm["name"])["sha256"]
            out.setdefault(owner, {})[bm["name"]] = info
    return out


def expected_ranges(writes: Iterable[Sequence[int]], granularity: int, size: int) -> list[list[int]]:
    """Byte ranges a bitmap of ``granularity`` marks for ``writes`` [(offset, length)]."""
    granules = sorted({g for off, length in writes if length
                       for g in range(off // granularity, (off + length - 1) // granularity + 1)})
    out: list[list[int]] = []
    for g in granules:
        if out and out[-1][0] + out[-1][1] == g * granularity:
            out[-1][1] += granularity
        else:
            out.append([g * granularity, granularity])
    if out and out[-1][0] + out[-1][1] > size:
        out[-1][1] = size - out[-1][0]
    return out


def run_steps(vm: Qemu, steps: Iterable[Sequence[Any]]) -> None:
    """Apply ``("add", device, name, granularity)``, ``("write", device, offset, length)``
    and ``("disable", device, name)`` steps in order."""
    for step in steps:
        if step[0] == "add":
            add_bitmap(vm, step[1], step[2], step[3])
        elif step[0] == "write":
            qemu_io(vm, step[1], f"write {step[2]} {step[3]}")
        elif step[0] == "disable":
            vm.cmd("block-dirty-bitmap-disable", node=step[1], name=step[2])
        else:
            raise ValueError(f"unknown step {step!r}")


def expected_bitmaps(steps: Iterable[Sequence[Any]], sizes: dict[str, int]) -> dict[str, dict]:
    """The bitmaps file (node -> name -> entry) the steps leave, newest bitmap first per node.

    Worked out from the steps alone: a write dirties every enabled bitmap of
    its device, and QEMU lists (and sends) a node's bitmaps newest first.
    """
    made: dict[str, list[tuple[str, int]]] = {}
    enabled: dict[tuple[str, str], bool] = {}
    writes: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for step in steps:
        if step[0] == "add":
            made.setdefault(step[1], []).insert(0, (step[2], step[3]))
            enabled[step[1], step[2]] = True
            writes[step[1], step[2]] = []
        elif step[0] == "write":
            for name, _ in made.get(step[1], ()):
                if enabled[step[1], name]:
                    writes[step[1], name].append((step[2], step[3]))
        elif step[0] == "disable":
            enabled[step[1], step[2]] = False
    return {dev: {name: {"granularity": gran, "size": sizes[dev], "persistent": False,
                         "enabled": enabled[dev, name],
                         "dirty": expected_ranges(writes[dev, name], gran, sizes[dev])}
                  for name, gran in bitmaps}
            for dev, bitmaps in made.items()}


def migrate_to_file(vm: Qemu, path: str | os.PathLike[str], timeout: float = 60.0) -> dict:
    """``migrate exec:cat > path`` and wait until the file holds the whole stream."""
    path = Path(path)
    path.unlink(missing_ok=True)
    vm.migrate("exec:cat > " + shlex.quote(str(path)))
    info = vm.wait_migration(timeout)
    deadline = time.monotonic() + 10
    while True:  # the stream ends with the vmdesc JSON object
        data = path.read_bytes() if path.exists() else b""
        if data.rstrip().endswith(b"}") and data.rfind(b'{"page_size"') > 0:
            return info
        if time.monotonic() > deadline:
            raise QemuError(f"{path} incomplete after migration ({len(data)} bytes)")
        time.sleep(0.05)
