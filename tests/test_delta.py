"""Incremental saved states on a template: ``qmigx diff``, ``--apply``, ``--base``.

With QEMU 7.2: one VM whose guest keeps rewriting a few hundred pages is
saved three times (BASE, NEW1, NEW2), its RAM file copied each time. A
delta must restore in a QEMU 7.2 whose RAM is the older state's RAM file
mapped ``share=off`` and end with the newer RAM byte for byte (read back
through QEMU's own ``dump-guest-memory``), the chain BASE -> D1 -> D2
must hold, a delta over the wrong base must be refused, and ``--apply``
must give a full stream QEMU loads. Without QEMU, the same rules on
streams made from the stored QEMU 7.2 vector.
"""

from __future__ import annotations

import gzip
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qmigx.errors import StreamError
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.tools.delta import DELTA_KEY, apply_delta, delta_info, diff_streams, load_delta
from qmigx.tools.streams import load_stream, save_stream, verify_stream

from qemu_support.dumps import read_elf
from qemu_support.guest import build_guest
from qemu_support.harness import Qemu, parse_size

REPO = Path(__file__).resolve().parent.parent
VECTOR = REPO / "tests" / "data" / "qemu72-pc-paused.mig.gz"
PS = 4096


def qmigx(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qmigx", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# --- without QEMU: streams grown from the stored vector ---------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """BASE, NEW1 (a few pages changed, one zeroed, one bit flipped), NEW2 (more changes)."""
    d = tmp_path_factory.mktemp("delta")
    vec = load_stream(gzip.decompress(VECTOR.read_bytes()))
    rng = np.random.default_rng(5)
    mems = []
    base = np.array(vec.blocks["mem0"].memory)
    base[:] = rng.integers(0, 256, len(base), dtype=np.uint8)
    base[:: 3 * PS] = 0
    new1 = base.copy()
    new1[10 * PS : 20 * PS] = 7
    new1[100 * PS + 5] ^= 1
    new1[200 * PS : 201 * PS] = 0
    new2 = new1.copy()
    new2[300 * PS : 340 * PS] = rng.integers(0, 256, 40 * PS, dtype=np.uint8)
    new2[100 * PS + 9] ^= 0x80
    paths = []
    for name, mem in (("base", base), ("new1", new1), ("new2", new2)):
        blocks = RAMBlockList([RAMBlock(b.idstr, mem.copy() if b.idstr == "mem0"
                                        else np.array(b.memory)) for b in vec.blocks])
        path = d / f"{name}.mig"
        with open(path, "wb") as f:
            save_stream(f.write, blocks, vec.sections, vmdesc=vec.vmdesc,
                        configuration=vec.configuration)
        paths.append(path)
        mems.append(mem)
    return d, paths, mems


@pytest.mark.parametrize("encoding", ["page", "xbzrle"])
def test_a_delta_holds_only_changed_template_pages(synthetic, tmp_path, encoding):
    d, (base, new1, _), (_, mem1, _) = synthetic
    out = tmp_path / "d.mig"
    with open(out, "wb") as f:
        stats = diff_streams(str(base), str(new1), f.write, encoding=encoding)
    assert stats.changed_pages == 12 and stats.zero_pages == 1
    assert stats.xbzrle_pages == (1 if encoding == "xbzrle" else 0)  # the flipped bit
    assert out.stat().st_size < new1.stat().st_size // 20
    assert verify_stream(str(out))["vmdesc"]
    info = delta_info(load_stream(str(out)).vmdesc)
    assert info["blocks"] == ["mem0"] and info["encoding"] == encoding
    got = load_delta(str(out), str(base))
    assert bytes(got.blocks["mem0"].memory) == mem1.tobytes()
    full = load_stream(str(new1))
    for b in full.blocks:  # ROMs and ACPI tables travel whole
        assert bytes(got.blocks[b.idstr].memory) == bytes(b.memory), b.idstr


def test_the_chain_and_the_wrong_base(synthetic, tmp_path):
    d, (base, new1, new2), (_, _, mem2) = synthetic
    d1, d2 = tmp_path / "d1.mig", tmp_path / "d2.mig"
    ok(qmigx("diff", base, new1, d1))
    ok(qmigx("diff", new1, new2, d2, "--ram-encoding", "xbzrle"))
    out = tmp_path / "x"
    ok(qmigx("extract", d2, out, "--base", base, "--base", d1))
    assert (out / "mem0.bin").read_bytes() == mem2.tobytes()
    assert (out / "state.json").exists()
    assert bytes(load_stream(str(d2), base=str(base), chain=[str(d1)]).blocks["mem0"].memory) \
        == mem2.tobytes()
    r = qmigx("extract", d2, tmp_path / "y", "--base", base)
    assert r.returncode == 1 and "delta made against another base" in r.stderr
    with pytest.raises(StreamError, match="another base"):
        load_delta(str(d1), str(new1))
    full = tmp_path / "full.mig"
    ok(qmigx("diff", "--apply", base, d2, full, "--chain", d1))
    back = load_stream(str(full))
    assert bytes(back.blocks["mem0"].memory) == mem2.tobytes()
    assert delta_info(back.vmdesc) is None and DELTA_KEY.encode() not in back.vmdesc


def test_a_delta_is_no_base_for_diff(synthetic, tmp_path):
    _, (base, new1, _), _ = synthetic
    d1 = tmp_path / "d1.mig"
    ok(qmigx("diff", base, new1, d1))
    r = qmigx("diff", base, d1, tmp_path / "x.mig")
    assert r.returncode == 1 and "itself a delta" in r.stderr
    assert not (tmp_path / "x.mig").exists() and not (tmp_path / "x.mig.part").exists()


# --- with QEMU 7.2 --------------------------------------------------------------------


RAM = "64M"


def _save(vm: Qemu, path: Path) -> None:
    vm.migrate("exec:cat > " + shlex.quote(str(path)))
    vm.wait_migration(90)
    last = -1
    while path.stat().st_size != last:  # exec:cat may still be writing
        last = path.stat().st_size
        time.sleep(0.2)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Three saves of one running VM (BASE, NEW1, NEW2) with its RAM file after each."""
    d = tmp_path_factory.mktemp("template")
    kernel = d / "guest.kernel"
    kernel.write_bytes(build_guest(0x5EED00D1, parse_size(RAM), dirty=True))
    saves = {}
    with Qemu(ram=RAM, kernel=kernel, workdir=d, name="vm") as vm:
        vm.wait_guest_ready(60, min_counter=100)
        for i, name in enumerate(("base", "new1", "new2")):
            if i:
                vm.cont()
                start = vm.marker().counter
                deadline = time.monotonic() + 30
                while vm.marker().counter < start + 3000 and time.monotonic() < deadline:
                    time.sleep(0.05)
            vm.stop()
            _save(vm, d / f"{name}.mig")
            shutil.copyfile(vm.mem_path, d / f"{name}.ram")
            saves[name] = (d / f"{name}.mig", d / f"{name}.ram")
        vm.quit()
    return d, kernel, saves


def _restore(d: Path, kernel: Path, stream: Path, ram_file: Path, name: str) -> bytes:
    """Load ``stream`` into a QEMU whose RAM is a private copy-on-write map of ``ram_file``;
    return guest RAM as QEMU's dump shows it (the file itself must stay unchanged)."""
    before = ram_file.read_bytes()
    wd = d / name
    with Qemu(ram=RAM, kernel=kernel, mem_path=ram_file, mem_share=False, paused=True,
              incoming=True, workdir=wd, name="dst") as vm:
        vm.migrate_incoming("exec:cat " + shlex.quote(str(stream)))
        vm.wait_migration(90)
        dump = wd / "dst.elf"
        vm.cmd("dump-guest-memory", paging=False, detach=True, protocol=f"file:{dump}")
        while vm.cmd("query-dump")["status"] == "active":
            time.sleep(0.05)
        vm.quit()
    assert ram_file.read_bytes() == before, "share=off: the template file must not change"
    elf = read_elf(dump)
    paddr, off, size = elf.loads[0]
    assert paddr == 0 and size == parse_size(RAM)
    return elf.data[off : off + size]


@pytest.mark.qemu
@pytest.mark.parametrize("encoding", ["page", "xbzrle"])
def test_qemu_restores_a_delta_over_the_template_file(template, tmp_path, encoding):
    d, kernel, saves = template
    base, base_ram = saves["base"]
    new1, new1_ram = saves["new1"]
    delta = tmp_path / "d1.mig"
    r = ok(qmigx("diff", base, new1, delta, "--ram-encoding", encoding))
    assert " template pages differ" in r.stdout
    assert delta.stat().st_size < new1.stat().st_size // 4
    assert new1_ram.read_bytes() != base_ram.read_bytes()
    private = tmp_path / "template.ram"
    shutil.copyfile(base_ram, private)
    assert _restore(tmp_path, kernel, delta, private, "dst") == new1_ram.read_bytes()


@pytest.mark.qemu
def test_qemu_follows_the_chain_and_loads_applied_deltas(template, tmp_path):
    d, kernel, saves = template
    (base, _), (new1, new1_ram), (new2, new2_ram) = saves["base"], saves["new1"], saves["new2"]
    d1, d2 = tmp_path / "d1.mig", tmp_path / "d2.mig"
    ok(qmigx("diff", base, new1, d1, "--ram-encoding", "xbzrle"))
    ok(qmigx("diff", new1, new2, d2, "--ram-encoding", "xbzrle"))
    # NEW1's RAM file, made by qmigx from BASE + D1, is the template for D2
    ok(qmigx("extract", d1, tmp_path / "n1", "--base", base))
    assert (tmp_path / "n1" / "mem0.bin").read_bytes() == new1_ram.read_bytes()
    got = _restore(tmp_path, kernel, d2, tmp_path / "n1" / "mem0.bin", "dst2")
    assert got == new2_ram.read_bytes()
    # --apply writes a full stream a QEMU with fresh RAM loads
    full = tmp_path / "full.mig"
    ok(qmigx("diff", "--apply", base, d2, full, "--chain", d1))
    fresh = tmp_path / "fresh.ram"
    with open(fresh, "wb") as f:
        f.truncate(parse_size(RAM))  # zeros, as an empty RAM file would be
    assert _restore(tmp_path, kernel, full, fresh, "dst3") == new2_ram.read_bytes()
    r = qmigx("extract", d2, tmp_path / "wrong", "--base", base)
    assert r.returncode == 1 and "another base" in r.stderr


def test_diff_reads_libvirt_save_images(synthetic, tmp_path):
    from qemu_support.libvirt_image import make_image, program_available

    if not (program_available("gzip") and program_available("xz")):
        pytest.skip("needs gzip and xz")
    _, (base, new1, _), (_, mem1, _) = synthetic
    base_img = make_image(base, tmp_path / "base.save", "gzip")
    new_img = make_image(new1, tmp_path / "new.save", "xz")
    delta = tmp_path / "d.mig"
    ok(qmigx("diff", base_img, new_img, delta))
    with open(delta, "rb") as f, open(tmp_path / "plain.mig", "wb") as g:
        diff_streams(str(base), str(new1), g.write)
        assert f.read() == (tmp_path / "plain.mig").read_bytes()
    ok(qmigx("extract", delta, tmp_path / "x", "--base", base_img))
    assert (tmp_path / "x" / "mem0.bin").read_bytes() == mem1.tobytes()
