"""Postcopy with real QEMU 10.0, both directions, plain and preempt.

QEMU 10 changed postcopy on the wire for its own machine types
(``x-preempt-pre-7-2`` off): the preempt channel is connected when
postcopy starts rather than during setup, and no final RAM EOS is written
on it. Machine type pc-i440fx-7.2 keeps 7.2's behaviour, so both are run.

* QEMU 10 source (running, dirtying guest, precopy throttled so that it
  cannot converge) -> ``qmigx incoming --touch``: QEMU's
  ``postcopy-requests`` must be non-zero, requested pages come on the
  preempt channel exactly when it is on, and qmigx's RAM must equal QEMU's
  memory file byte for byte at the end. Recovery after a proxy dies.
* ``qmigx send --start-postcopy`` of streams QEMU 10 saved -> QEMU 10
  destination on tmpfs RAM: QEMU runs the guest while pages arrive and
  ends with the stream's RAM. Recovery through ``migrate-recover``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qemu_support import streams
from qemu_support.guest import build_guest, read_marker
from qemu_support.harness import Qemu, parse_size, qemu10_binary
from qemu_support.live import QmigxIncoming, Uris, first_difference, qmigx_argv, qmigx_env

#: gated by tests/conftest.py: QEMU 10 is $QMIGX_QEMU10 (.ci/install-qemu10.sh)
pytestmark = [pytest.mark.qemu10]

RAM = "64M"
RAM_BYTES = parse_size(RAM)
SEED = 0x10FE0C09
PC10, PC72 = "pc-i440fx-10.0", "pc-i440fx-7.2"
MODES = [pytest.param(False, id="plain"), pytest.param(True, id="preempt")]


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("guest") / "guest.bin"
    p.write_bytes(build_guest(SEED, RAM_BYTES, dirty=True))
    return p


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")
    return streams.get_stream("q10-pc-live")


def _wait_status(vm: Qemu, want: set, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.query_migrate()
        if q.get("status") in want:
            return q
        if q.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"QEMU migration {q.get('status')}: {q.get('error-desc')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU migration still {q.get('status')} after {timeout} s")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("preempt", MODES)
@pytest.mark.parametrize("machine", [PC10, PC72])
def test_qemu10_postcopy_to_qmigx(machine, preempt, tmp_path, uris, guest):
    uri = uris.make("unix")
    caps = {"postcopy-ram": True, "postcopy-blocktime": True}
    if preempt:
        caps["postcopy-preempt"] = True
    rd = tmp_path / "rd"
    report = tmp_path / "report.json"
    inc = QmigxIncoming(uri, tmp_path, caps=caps, ram_dir=rd, report=report,
                        extra=["--touch", "2000"])
    with Qemu(machine=machine, ram=RAM, kernel=guest, workdir=tmp_path, name="src",
              binary=qemu10_binary()) as vm:
        before = vm.wait_guest_ready(60, min_counter=1000)
        with inc:
            vm.set_capabilities({"postcopy-ram": True, "postcopy-preempt": preempt})
            vm.set_parameters({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 4 << 20,
                               "downtime-limit": 1})
            vm.migrate(uri)
            _wait_status(vm, {"active"})
            time.sleep(0.5)
            vm.cmd("migrate-start-postcopy")
            _wait_status(vm, {"postcopy-active", "completed"})
            stats = _wait_status(vm, {"completed"}, timeout=120)
            rc, err = inc.wait(120)
        assert rc == 0, f"qmigx incoming exited {rc}:\n{err[-3000:]}"
        assert vm.status() == "postmigrate"
        src = vm.read_ram()
    assert read_marker(src).counter > before.counter, "the guest did not run"
    assert stats["ram"]["postcopy-requests"] > 0, stats["ram"]
    pc = json.loads(report.read_text())["postcopy"]
    assert pc["requests"] > 0 and pc["served"] > 0 and pc["touched"] > 0, pc
    assert (pc["preempt_pages"] > 0) == preempt, pc
    diff = first_difference((rd / "mem0.bin").read_bytes(), src)
    assert diff is None, f"mem0 after postcopy from QEMU 10: {diff}"


@pytest.mark.parametrize("preempt", MODES)
def test_qmigx_postcopy_to_qemu10(preempt, tmp_path, uris, saved):
    """The dirtying guest QEMU 10 saved runs on QEMU 10 while its pages still arrive."""
    uri = uris.make("unix")
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pc10-", dir="/dev/shm"))
    report = tmp_path / "send.json"
    try:
        with Qemu(machine=saved.machine, ram=RAM, kernel=saved.kernel, mem_path=shm / "dst.ram",
                  incoming=True, workdir=tmp_path, name="dst", binary=qemu10_binary()) as dst:
            dst.set_capabilities(caps)
            dst.migrate_incoming(uri)
            argv = qmigx_argv("send", saved.stream, uri, "--start-postcopy", "-v",
                              "--report", report,
                              "--param", f"max-postcopy-bandwidth={8 << 20}",
                              *[a for k, v in caps.items() if v for a in ("--cap", f"{k}=on")])
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=qmigx_env())
            assert r.returncode == 0, f"qmigx send exited {r.returncode}:\n{r.stderr[-3000:]}\n" \
                                      f"{dst.log_tail()}"
            st = dst.wait_migration(60)
            assert st["status"] == "completed"
            assert dst.status() == "running"
            time.sleep(0.5)
            ram = (shm / "dst.ram").read_bytes()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    pc = json.loads(report.read_text())["postcopy"]
    assert pc["requests"] > 20 and pc["served"] > 0, pc
    assert (pc["preempt_pages"] > 0) == preempt, pc
    assert read_marker(ram).counter > read_marker(Path(saved.mem).read_bytes()).counter


@pytest.mark.parametrize("preempt", MODES)
def test_qemu10_postcopy_recovery_to_qmigx(preempt, tmp_path, guest):
    """A proxy dies mid-postcopy: QEMU 10 pauses, qmigx listens again, QEMU 10 resumes
    with ``migrate resume=true`` (on a 10.0 machine the preempt channel comes again too)."""
    from qemu_support.proxy import Proxy

    port = _free_port()
    uri = f"tcp:127.0.0.1:{port}"
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    rd = tmp_path / "rd"
    inc = QmigxIncoming(uri, tmp_path, caps={k: v for k, v in caps.items() if v}, ram_dir=rd,
                        report=tmp_path / "report.json", extra=["--touch", "2000"])
    with Qemu(machine=PC10, ram=RAM, kernel=guest, workdir=tmp_path, name="src",
              binary=qemu10_binary()) as vm:
        vm.wait_guest_ready(60, min_counter=1000)
        with inc:
            proxy = Proxy(port)
            vm.set_capabilities(caps)
            vm.set_parameters({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 2 << 20,
                               "downtime-limit": 1})
            vm.migrate(f"tcp:127.0.0.1:{proxy.port}")
            _wait_status(vm, {"active"})
            time.sleep(0.3)
            vm.cmd("migrate-start-postcopy")
            _wait_status(vm, {"postcopy-active"})
            time.sleep(1.0)
            proxy.cut()
            _wait_status(vm, {"postcopy-paused"})
            deadline = time.monotonic() + 30  # qmigx listens again on the same URI
            while "waiting for the source to resume" not in inc.stderr():
                assert time.monotonic() < deadline, inc.stderr()
                time.sleep(0.05)
            vm.cmd("migrate", uri=uri, resume=True)
            stats = _wait_status(vm, {"completed"}, timeout=120)
            rc, err = inc.wait(120)
        assert rc == 0, f"qmigx incoming exited {rc}:\n{err[-3000:]}"
        src = vm.read_ram()
    assert stats["ram"]["postcopy-requests"] > 0, stats["ram"]
    diff = first_difference((rd / "mem0.bin").read_bytes(), src)
    assert diff is None, f"mem0 after a recovered postcopy from QEMU 10: {diff}"


@pytest.mark.parametrize("preempt", MODES)
def test_qmigx_postcopy_recovery_to_qemu10(preempt, tmp_path, saved):
    """``qmigx send`` through a proxy that dies mid-postcopy: QEMU 10 pauses; after
    ``migrate-recover`` (QEMU 10 passes postcopy-recover-setup) qmigx's retries resume it."""
    from qemu_support.proxy import Proxy

    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pc10-", dir="/dev/shm"))
    qport, pport = _free_port(), _free_port()
    try:
        with Qemu(machine=saved.machine, ram=RAM, kernel=saved.kernel, mem_path=shm / "dst.ram",
                  incoming=True, paused=True, workdir=tmp_path, name="dst",
                  binary=qemu10_binary()) as dst:
            dst.set_capabilities(caps)
            dst.migrate_incoming(f"tcp:127.0.0.1:{qport}")
            proxy = Proxy(qport, port=pport)
            argv = qmigx_argv("send", saved.stream, f"tcp:127.0.0.1:{pport}", "--start-postcopy",
                              "-v", "--param", f"max-postcopy-bandwidth={8 << 20}",
                              *[a for k, v in caps.items() if v for a in ("--cap", f"{k}=on")])
            send = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=qmigx_env())
            try:
                _wait_status(dst, {"postcopy-active"})
                time.sleep(1.0)
                proxy.cut()
                _wait_status(dst, {"postcopy-paused"})
                qport2 = _free_port()
                dst.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{qport2}")
                proxy = Proxy(qport2, port=pport)  # the address qmigx keeps retrying
                out, err = send.communicate(timeout=120)
            finally:
                if send.poll() is None:
                    send.kill()
                proxy.cut()
            assert send.returncode == 0, f"qmigx send exited {send.returncode}:\n{err[-3000:]}"
            st = dst.wait_migration(60)
            assert st["status"] == "completed"
            ram = (shm / "dst.ram").read_bytes()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    diff = first_difference(ram, Path(saved.mem).read_bytes())
    assert diff is None, f"QEMU 10's RAM after a recovered postcopy: {diff}"
