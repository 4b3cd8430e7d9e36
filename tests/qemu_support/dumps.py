"""QEMU 7.2's own memory dump and a migration stream of the same paused VM.

``dump-guest-memory`` (paging off) is the reference for ``qmigx extract
--elf``: both are taken from one VM, paused, first the dump, then
``migrate "exec:cat > FILE"``, so the two describe exactly the same state.
A small independent ELF reader (:func:`read_elf`) lets tests look inside
the reference without qmigx.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import struct
import time
from pathlib import Path
from typing import Sequence

from .guest import build_guest
from .harness import Qemu, parse_size

__all__ = ["DumpPair", "dump_and_save", "read_elf", "ElfFile"]


@dataclasses.dataclass
class DumpPair:
    dump: Path  # QEMU's dump-guest-memory output
    stream: Path  # the migration stream of the same paused VM
    ram_file: Path  # a copy of guest RAM (mem0) taken after both
    machine: str
    ram: str
    argv: list


def dump_and_save(workdir: Path, *, machine: str = "pc", ram: str = "128M", smp: int = 1,
                  devices: Sequence[str] = (), guest: bool = True, run_firmware: bool = True,
                  fill: str | None = None, caps: Sequence[str] = (),
                  timeout: float = 90) -> DumpPair:
    """Boot (or not), pause, dump, migrate to a file; return the paths.

    ``run_firmware=False`` pauses the VM before its first instruction (the
    chipset then still maps the ROMs below 1 MiB). ``devices`` are extra
    ``-device`` arguments (e.g. ``VGA``). ``fill`` limits how much RAM the
    guest fills (default: all of ``ram``). ``caps`` are migration
    capabilities to enable (e.g. ``x-ignore-shared``: guest RAM is a shared
    file, so the stream leaves it out).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    kernel = None
    if guest and run_firmware:
        kernel = workdir / "guest.kernel"
        kernel.write_bytes(build_guest(0x5EED00E1, parse_size(fill or ram), dirty=False))
    extra = ["-smp", str(smp)]
    for dev in devices:
        extra += ["-device", dev]
    dump = workdir / "qemu.elf"
    stream = workdir / "state.mig"
    copy = workdir / "ram.copy"
    with Qemu(machine=machine, ram=ram, kernel=kernel, workdir=workdir, name="vm",
              paused=not run_firmware, extra=extra, timeout=30) as vm:
        if kernel is not None:
            vm.wait_guest_ready(timeout=timeout)
        if run_firmware:
            vm.stop()
        vm.cmd("dump-guest-memory", paging=False, detach=True, protocol=f"file:{dump}")
        deadline = time.monotonic() + timeout
        while vm.cmd("query-dump")["status"] == "active":
            if time.monotonic() > deadline:
                raise vm._error("dump-guest-memory did not finish")
            time.sleep(0.05)
        status = vm.cmd("query-dump")["status"]
        if status != "completed":
            raise vm._error(f"dump-guest-memory ended {status}")
        vm.set_capabilities({c: True for c in caps})
        vm.migrate("exec:cat > " + shlex.quote(str(stream)))
        vm.wait_migration(timeout)
        _wait_for_vmdesc(stream, timeout)
        os.system(f"cp --sparse=always {shlex.quote(str(vm.mem_path))} {shlex.quote(str(copy))}")
        argv = vm.argv
        vm.quit()
    return DumpPair(dump, stream, copy, machine, ram, argv)


def _wait_for_vmdesc(path: Path, timeout: float) -> None:
    """exec:cat may still be writing when QEMU reports completion."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size and size == last:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} still growing")
        last = size
        time.sleep(0.2)


@dataclasses.dataclass
class ElfFile:
    elf_class: int
    machine: int
    loads: list  # (paddr, file offset, size)
    notes: list  # (name, type, desc)
    data: bytes


def read_elf(path: Path) -> ElfFile:
    """Program headers and notes of an ELF64 core (written from the ELF spec)."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    machine, = struct.unpack_from("<H", data, 18)
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads, notes = [], []
    for i in range(phnum):
        p_type, _, off, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data,
                                                                    phoff + i * phentsize)
        if p_type == 1:
            loads.append((paddr, off, filesz))
        elif p_type == 4:
            pos, end = off, off + filesz
            while pos < end:
                namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
                pos += 12
                name = data[pos : pos + namesz].rstrip(b"\0")
                pos += -(-namesz // 4) * 4
                notes.append((name, ntype, data[pos : pos + descsz]))
                pos += -(-descsz // 4) * 4
    return ElfFile(2, machine, loads, notes, data)
