"""QEMU 10 as a peer, and multifd against single channel, as ratios to memcpy (one run).

* 1 GiB paused test guest (RAM in /dev/shm): QEMU 10 -> QEMU 10, QEMU 10
  -> ``qmigx incoming`` and qmigx -> QEMU 10, single channel and 4-channel
  multifd (pc-i440fx-10.0: per-round sync, zero pages in packets); QEMU
  7.2 -> QEMU 7.2, QEMU 7.2 -> ``qmigx incoming`` and qmigx -> QEMU 7.2
  with 4 channels. ``extra_info["vs_qemu"]`` divides each qmigx case by
  the same case between two QEMUs of that version (target >= 1).
* qmigx -> qmigx over TCP, 1 GiB, one channel and 4 multifd channels
  (``extra_info["vs_single"]``: target >= 1).
* Reading a 1 GiB mapped-ram file QEMU 10 wrote (``load_stream``) against
  ``cp`` of the same file to /dev/shm (target >= 0.5).

Every round starts its destination untimed and is timed from ``migrate``
to the source's ``completed`` (return-path on: the destination has loaded
everything by then). Run: ``python -m pytest benchmarks/test_qemu10.py
--benchmark-enable -q -s``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from qmigx.control import Capabilities, Parameters
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.synthetic import fill_pages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_support.guest import build_guest  # noqa: E402
from qemu_support.harness import Qemu, qemu10_binary, qemu_binary  # noqa: E402
from qemu_support.live import QmigxIncoming, Uris, first_difference  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
BANDWIDTH = 100 << 30
ROUNDS = 3
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
RATIOS: dict[str, float] = {}
MF4 = ({"multifd": True}, {"multifd-channels": 4})
ONE = ({}, {})

needs_qemu10 = pytest.mark.skipif(qemu10_binary() is None, reason="QEMU 10 ($QMIGX_QEMU10) absent")
needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 absent")


def record(benchmark, name: str, base: str | None = None) -> None:
    ratio = benchmark.extra_info.get("ratio_to_memcpy")
    if ratio is None:
        return
    RATIOS[name] = ratio
    if base and RATIOS.get(base):
        benchmark.extra_info["vs_" + base] = round(ratio / RATIOS[base], 3)
        print(f"{name}: {ratio / RATIOS[base]:.2f}x {base} ({ratio:.3f} vs {RATIOS[base]:.3f})")


def timed_rounds(vs_memcpy, benchmark, monkeypatch, setup, run, teardown, nbytes) -> None:
    """``benchmark.pedantic`` with an untimed setup and teardown around each timed round."""
    pedantic = benchmark.pedantic
    pending: list = []

    def s():
        args = setup()
        pending.append(args)
        return args

    def t(*a, **k):
        pending.pop()
        teardown(*a, **k)

    def patched(target, **kw):
        try:
            return pedantic(target, setup=s, teardown=t, **kw)
        finally:
            while pending:
                a, k = pending.pop()
                teardown(*a, **k)

    monkeypatch.setattr(benchmark, "pedantic", patched)
    vs_memcpy(run, nbytes, cold=True, rounds=ROUNDS)


def wait_completed(vm: Qemu, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.qmp.execute("query-migrate")
        if q.get("status") == "completed":
            return q
        assert q.get("status") not in ("failed", "cancelled"), q
        assert time.monotonic() < deadline, q
        time.sleep(0.002)


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


def _source(tmp_path_factory, binary: str | None, machine: str, tag: str):
    d = tmp_path_factory.mktemp(f"src-{tag}")
    shm = Path(SHM) if SHM else d
    mem = shm / f"qmigx-bench10-{os.getpid()}-{tag}.ram"
    mem.unlink(missing_ok=True)
    kernel = d / "guest.bin"
    kernel.write_bytes(build_guest(0xB10C, GIB, dirty=False))
    vm = Qemu(machine=machine, ram=GIB, kernel=kernel, mem_path=mem, workdir=d, name="src",
              timeout=60, binary=binary).start()
    try:
        vm.wait_guest_ready(240)
        vm.stop()
        yield SimpleNamespace(vm=vm, mem=mem, image=mem.read_bytes(), shm=shm, kernel=kernel,
                              binary=binary, machine=machine, dir=d)
    finally:
        vm.close()
        mem.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def q10(tmp_path_factory):
    if qemu10_binary() is None:
        pytest.skip("QEMU 10 ($QMIGX_QEMU10) absent")
    yield from _source(tmp_path_factory, qemu10_binary(), "pc-i440fx-10.0", "q10")


@pytest.fixture(scope="module")
def q72(tmp_path_factory):
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 absent")
    yield from _source(tmp_path_factory, None, "pc-i440fx-7.2", "q72")


def _rearm(vm: Qemu) -> None:
    """QEMU refuses to migrate a VM a finished migration paused; a halted guest may run a moment."""
    vm.cont()
    vm.stop()


def _set(vm, caps: dict, params: dict) -> None:
    """Every capability a case uses, set each time: QEMU keeps them between migrations."""
    base = {"multifd": False, "return-path": True}
    if vm.binary == qemu10_binary():
        base["mapped-ram"] = False  # QEMU 10's
    vm.set_capabilities({**base, **caps})
    vm.set_parameters({"max-bandwidth": BANDWIDTH, **params})


def _qemu_dest(src, tmp_path, uri: str, caps: dict, params: dict) -> Qemu:
    dst_mem = src.shm / f"qmigx-bench10-{os.getpid()}-dst.ram"
    dst_mem.unlink(missing_ok=True)
    dst = Qemu(machine=src.machine, ram=GIB, mem_path=dst_mem, paused=True, incoming=True,
               workdir=tmp_path, name="dst", timeout=60, binary=src.binary).start()
    _set(dst, caps, {k: v for k, v in params.items() if k != "max-bandwidth"})
    dst.migrate_incoming(uri)
    return dst


def _check_dest(dst: Qemu, image: bytes) -> None:
    try:
        assert dst.wait_migration(120)["status"] == "completed"
        diff = first_difference(dst.mem_path.read_bytes(), image)
        assert diff is None, diff
    finally:
        dst.close()
        dst.mem_path.unlink(missing_ok=True)


def qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, src, uris, tmp_path, settings, name):
    caps, params = settings

    def setup():
        uri = uris.make("unix")
        dst = _qemu_dest(src, tmp_path, uri, caps, params)
        _set(src.vm, caps, params)
        return (dst, uri), {}

    def run(dst, uri):
        src.vm.migrate(uri)
        wait_completed(src.vm)

    def teardown(dst, uri):
        try:
            _check_dest(dst, src.image)
        finally:
            _rearm(src.vm)

    timed_rounds(vs_memcpy, benchmark, monkeypatch, setup, run, teardown, GIB)
    record(benchmark, name)


def qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, src, uris, tmp_path, settings, name, base):
    caps, params = settings
    rd = Path(tempfile.mkdtemp(prefix="qmigx-bench10-rd-", dir=src.shm))

    def setup():
        uri = uris.make("unix")
        dparams = {k: v for k, v in params.items() if k.startswith("multifd")}
        inc = QmigxIncoming(uri, tmp_path, caps={"return-path": True, **caps}, params=dparams,
                            ram_dir=rd).start()
        _set(src.vm, caps, params)
        return (inc,), {}

    def run(inc):
        src.vm.migrate(inc.uri)
        wait_completed(src.vm)

    def teardown(inc):
        try:
            rc, err = inc.wait(120)
            assert rc == 0, err
            diff = first_difference((rd / "mem0.bin").read_bytes(), src.image)
            assert diff is None, diff
        finally:
            shutil.rmtree(rd, ignore_errors=True)
            _rearm(src.vm)

    try:
        timed_rounds(vs_memcpy, benchmark, monkeypatch, setup, run, teardown, GIB)
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    record(benchmark, name, base)


@pytest.fixture(scope="module")
def states(uris, tmp_path_factory):
    """Each QEMU source's state received by ``qmigx incoming --save``, loaded (one per version)."""
    from qmigx.tools.streams import load_stream

    cache: dict[str, Any] = {}

    def get(src):
        if src.machine not in cache:
            d = tmp_path_factory.mktemp("state")
            uri = uris.make("unix")
            with QmigxIncoming(uri, d, caps={"return-path": True}, save=d / "state.mig") as inc:
                _set(src.vm, {}, {})
                src.vm.migrate(uri)
                wait_completed(src.vm)
                rc, err = inc.wait(120)
            _rearm(src.vm)
            assert rc == 0, err
            cache[src.machine] = load_stream(str(d / "state.mig"))
        return cache[src.machine]

    return get


def qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, src, loaded, uris, tmp_path, settings, name,
                  base):
    caps, params = settings
    blocks = RAMBlockList()
    for info in loaded.ram_setup.blocks:
        blocks.add(loaded.blocks[info.idstr])

    def setup():
        uri = uris.make("unix")
        dst = _qemu_dest(src, tmp_path, uri, caps, params)
        c = Capabilities(qemu_version=None)
        c.set_many([("return-path", True), *caps.items()])
        p = Parameters(capabilities=c, qemu_version=None)
        p.set({"max-bandwidth": BANDWIDTH, **params})
        s = MigrationSource(blocks, devices=loaded.sections, vmdesc=loaded.vmdesc,
                            machine_type=loaded.configuration.machine_type, capabilities=c,
                            parameters=p, globalstate=False, guest=SimpleGuest(running=False),
                            ram_section_id=loaded.ram_setup.section.section_id)
        return (s, dst, uri), {}

    def run(s, dst, uri):
        s.migrate(uri)
        assert s.wait(180).value == "completed", s.error

    def teardown(s, dst, uri):
        _check_dest(dst, src.image)

    timed_rounds(vs_memcpy, benchmark, monkeypatch, setup, run, teardown, GIB)
    record(benchmark, name, base)


# --- QEMU 10 ---------------------------------------------------------------------------------------


@needs_qemu10
@pytest.mark.parametrize("mode", ["single", "multifd4"])
def test_qemu10_to_qemu10(mode, vs_memcpy, benchmark, monkeypatch, q10, uris, tmp_path):
    qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, q10, uris, tmp_path,
                 ONE if mode == "single" else MF4, f"qemu10_to_qemu10_{mode}")


@needs_qemu10
@pytest.mark.parametrize("mode", ["single", "multifd4"])
def test_qemu10_to_qmigx(mode, vs_memcpy, benchmark, monkeypatch, q10, uris, tmp_path):
    qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, q10, uris, tmp_path,
                  ONE if mode == "single" else MF4, f"qemu10_to_qmigx_{mode}",
                  f"qemu10_to_qemu10_{mode}")


@needs_qemu10
@pytest.mark.parametrize("mode", ["single", "multifd4"])
def test_qmigx_to_qemu10(mode, vs_memcpy, benchmark, monkeypatch, q10, states, uris, tmp_path):
    qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, q10, states(q10), uris, tmp_path,
                  ONE if mode == "single" else MF4, f"qmigx_to_qemu10_{mode}",
                  f"qemu10_to_qemu10_{mode}")


# --- QEMU 7.2's multifd --------------------------------------------------------------------------


@needs_qemu
def test_qemu72_to_qemu72_multifd4(vs_memcpy, benchmark, monkeypatch, q72, uris, tmp_path):
    qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, q72, uris, tmp_path, MF4,
                 "qemu72_to_qemu72_multifd4")


@needs_qemu
def test_qemu72_to_qmigx_multifd4(vs_memcpy, benchmark, monkeypatch, q72, uris, tmp_path):
    qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, q72, uris, tmp_path, MF4,
                  "qemu72_to_qmigx_multifd4", "qemu72_to_qemu72_multifd4")


@needs_qemu
def test_qmigx_to_qemu72_multifd4(vs_memcpy, benchmark, monkeypatch, q72, states, uris, tmp_path):
    qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, q72, states(q72), uris, tmp_path, MF4,
                  "qmigx_to_qemu72_multifd4", "qemu72_to_qemu72_multifd4")


# --- qmigx -> qmigx: N channels against one ----------------------------------------------------------


@pytest.fixture(scope="module")
def pair_blocks():
    mem = np.empty(GIB, np.uint8)
    fill_pages(mem, seed=11)
    dst = np.empty(GIB, np.uint8)
    dst[:] = 0xA5
    return RAMBlockList([RAMBlock("pc.ram", mem)]), RAMBlockList([RAMBlock("pc.ram", dst)])


@pytest.mark.parametrize("mode", ["single", "multifd2", "multifd4"])
def test_qmigx_to_qmigx_tcp(mode, vs_memcpy, benchmark, monkeypatch, pair_blocks):
    guest, target = pair_blocks
    caps, params = ({}, {}) if mode == "single" else (
        {"multifd": True}, {"multifd-channels": int(mode[-1])})

    def settings():
        c = Capabilities(qemu_version="10.0")
        if caps:
            c.set_many(list(caps.items()))
        p = Parameters(capabilities=c, qemu_version="10.0")
        p.set({"max-bandwidth": BANDWIDTH, **params})
        return c, p

    def setup():
        target["pc.ram"].memory[::4096] = 0xA5
        c, p = settings()
        dst = MigrationDestination(target, capabilities=c, parameters=p)
        dst.incoming("tcp:127.0.0.1:0")
        c, p = settings()
        src = MigrationSource(guest, capabilities=c, parameters=p, guest=SimpleGuest(running=True),
                              machine_type="pc-i440fx-10.0")
        return (src, dst), {}

    def run(src, dst):
        src.migrate(dst.connect_uri)
        assert src.wait(120).value == "completed", src.error
        assert dst.wait(120).value == "completed", dst.error

    def teardown(src, dst):
        assert dst.state.state.value == "completed", dst.error

    timed_rounds(vs_memcpy, benchmark, monkeypatch, setup, run, teardown, GIB)
    assert np.array_equal(target["pc.ram"].memory, guest["pc.ram"].memory)
    record(benchmark, f"qmigx_to_qmigx_tcp_{mode}", None if mode == "single"
           else "qmigx_to_qmigx_tcp_single")


# --- reading a mapped-ram file ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapped_file(q10):
    path = q10.shm / f"qmigx-bench10-{os.getpid()}-mapped.mig"
    path.unlink(missing_ok=True)
    vm = q10.vm
    vm.set_capabilities({"mapped-ram": True, "return-path": False, "multifd": False})
    vm.migrate(f"file:{path}")
    wait_completed(vm)
    vm.set_capabilities({"mapped-ram": False, "return-path": True})
    _rearm(vm)
    yield path
    path.unlink(missing_ok=True)


@needs_qemu10
def test_cp_mapped_ram_file(vs_memcpy, benchmark, mapped_file):
    out = Path(mapped_file).with_suffix(".cp")

    def run():
        subprocess.run(["cp", str(mapped_file), str(out)], check=True)
        out.unlink()

    vs_memcpy(run, GIB, cold=True, rounds=ROUNDS)
    record(benchmark, "cp_mapped_ram")


@needs_qemu10
def test_read_mapped_ram_file(vs_memcpy, benchmark, mapped_file, q10):
    from qmigx.tools.streams import load_stream

    got = {}

    def run():
        got["s"] = load_stream(str(mapped_file))

    vs_memcpy(run, GIB, cold=True, rounds=ROUNDS)
    assert first_difference(bytes(got["s"].blocks["mem0"].memory), q10.image) is None
    record(benchmark, "read_mapped_ram", "cp_mapped_ram")
