"""``qmigx extract FILE --elf`` against QEMU 7.2's own ``dump-guest-memory``.

Each case pauses one VM, lets QEMU dump its memory (paging off), then
migrates the same paused VM into a stream file; qmigx's ELF written from
the stream alone must equal QEMU's dump byte for byte: ELF and program
headers, the per-vCPU NT_PRSTATUS and QEMU CPU-state notes, every range's
bytes and the string table. The cases cover both chipsets, SMP, a VGA (its
legacy window hides RAM, its VRAM sits at its BAR) and a VM paused before
the firmware ran (the chipset still maps the ROMs below 1 MiB).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qmigx
from qmigx.errors import MachineLayoutError, StreamError
from qmigx.tools.memdump import extract_elf, physical_ranges
from qmigx.tools.savedstate import saved_state

from qemu_support.dumps import dump_and_save, read_elf

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "pc-smp2": dict(machine="pc", smp=2),
    "q35-smp2": dict(machine="q35", smp=2),
    "pc-vga": dict(machine="pc", devices=("VGA",)),
    "q35-vga-unbooted": dict(machine="q35", ram="64M", devices=("VGA",), run_firmware=False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    return request.param, dump_and_save(tmp_path_factory.mktemp(request.param),
                                        **CASES[request.param])


def qmigx_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qmigx", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)


def test_the_elf_equals_qemus_dump(pair, tmp_path):
    name, p = pair
    out = tmp_path / "mine.elf"
    r = qmigx_cli("extract", p.stream, "--elf", out)
    assert r.returncode == 0, r.stderr
    ref = read_elf(p.dump)
    mine = read_elf(out)
    assert mine.machine == ref.machine == 3  # EM_386: the guests run in 32-bit mode
    assert mine.loads == ref.loads
    assert mine.notes == ref.notes
    assert len([n for n in ref.notes if n[0] == b"CORE"]) == CASES[name].get("smp", 1)
    assert out.stat().st_size == p.dump.stat().st_size
    assert out.read_bytes() == p.dump.read_bytes()


def test_zero_pages_are_holes(pair, tmp_path):
    _, p = pair
    out = tmp_path / "sparse.elf"
    extract_elf(str(p.stream), str(out))
    size = out.stat().st_size
    allocated = out.stat().st_blocks * 512
    assert allocated < size - (256 << 10), (allocated, size)
    # and the holes read as the zeros QEMU wrote
    fd = os.open(out, os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert hole < size
        assert os.pread(fd, 4096, hole) == bytes(4096)
    finally:
        os.close(fd)


def test_physical_memory_reads_what_the_dump_holds(pair):
    _, p = pair
    ref = read_elf(p.dump)
    mem = qmigx.physical_memory(str(p.stream))
    assert [(r.start, r.size) for r in mem.ranges] == [(a, n) for a, _, n in ref.loads]
    for paddr, off, size in ref.loads:
        for at in (0, size // 2, size - 8192):
            assert mem.read(paddr + at, 8192) == ref.data[off + at : off + at + 8192]
    # the first range is followed by a gap: a read across its end fails there
    first_end = ref.loads[0][0] + ref.loads[0][2]
    assert all(a != first_end for a, _, _ in ref.loads)
    with pytest.raises(IndexError, match=f"0x{first_end:x}"):
        mem.read(first_end - 16, 32)


def test_the_layout_is_refused_without_a_vmdesc(pair, tmp_path):
    _, p = pair
    data = p.stream.read_bytes()
    cut = data.rfind(b'\x06', 0, data.rfind(b'{"page_size"'))  # keep everything up to EOF
    short = tmp_path / "novmdesc.mig"
    short.write_bytes(data[:cut])
    with pytest.raises(MachineLayoutError) as exc:
        physical_ranges(saved_state(str(short)))
    assert "vmdesc" in str(exc.value)


def test_a_cut_stream_leaves_no_elf(pair, tmp_path):
    _, p = pair
    data = p.stream.read_bytes()
    cut = tmp_path / "cut.mig"
    cut.write_bytes(data[: len(data) // 2] + data[data.rfind(b"\x00\x06\x00"):])
    out = tmp_path / "cut.elf"
    r = qmigx_cli("extract", cut, "--elf", out)
    assert r.returncode == 1
    assert r.stderr.startswith("qmigx: error: ") and "offset 0x" in r.stderr
    assert not out.exists() and not Path(str(out) + ".part").exists()
    with pytest.raises(StreamError):
        extract_elf(str(cut), str(out))


def test_an_x_ignore_shared_stream_takes_the_template_file(tmp_path):
    """The stream carries no page of the shared RAM; given the RAM file it is the same core."""
    p = dump_and_save(tmp_path / "vm", machine="pc", ram="64M", caps=("x-ignore-shared",))
    state = saved_state(str(p.stream))
    assert state.configuration.capabilities == ["x-ignore-shared"]
    assert {b.idstr: b.gpa for b in state.ram_setup.blocks}["pc.bios"] == 0xFFFC0000
    out = tmp_path / "mine.elf"
    r = qmigx_cli("extract", p.stream, "--elf", out, "--shared-ram", f"mem0={p.ram_file}")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == p.dump.read_bytes()
    # without the file the RAM ranges read as zeros, everything else is the same
    bare = tmp_path / "bare.elf"
    extract_elf(str(p.stream), str(bare))
    ref = read_elf(p.dump)
    data = bare.read_bytes()
    for paddr, off, size in ref.loads:
        if paddr == 0xFFFC0000:
            assert data[off : off + size] == ref.data[off : off + size]
        else:
            assert data[off : off + size].count(0) == size


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QMIGX_BIG_GUESTS") != "1",
                    reason="a 3 GiB guest; set QMIGX_BIG_GUESTS=1 to run it")
def test_ram_above_4g_on_q35(tmp_path):
    """3 GiB on q35: 2 GiB below the PCI hole, 1 GiB from 4 GiB up (only 64 MiB filled)."""
    p = dump_and_save(tmp_path / "vm", machine="q35", ram="3G", fill="64M", smp=2)
    out = tmp_path / "mine.elf"
    extract_elf(str(p.stream), str(out))
    ref = read_elf_headers(p.dump)
    assert ref == read_elf_headers(out)
    assert any(paddr == 4 << 30 for paddr, _, _ in ref)
    with open(out, "rb") as a, open(p.dump, "rb") as b:
        while True:
            x, y = a.read(64 << 20), b.read(64 << 20)
            assert x == y
            if not x:
                break


def read_elf_headers(path) -> list:
    """The PT_LOAD (paddr, offset, size) triples, read without loading the file."""
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    out = []
    for i in range(phnum):
        p_type, _, off, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", head,
                                                                    phoff + i * phentsize)
        if p_type == 1:
            out.append((paddr, off, filesz))
    return out
