"""Postcopy with real QEMU 7.2, both directions (QEMU's /postcopy/plain and /postcopy/preempt/plain).

* QEMU source (running, dirtying guest, bandwidth so low that precopy
  cannot converge) -> ``qmigx incoming --cap postcopy-ram=on --touch``:
  ``migrate-start-postcopy``; the background stream is throttled with
  ``max-postcopy-bandwidth`` so that the pages the toucher reads are
  requested: QEMU's own ``postcopy-requests`` counter must be non-zero.
  At the end QEMU's memory-backend-file (the source stops the guest at
  switch-over) must equal what qmigx holds, byte for byte.
* ``qmigx send --start-postcopy`` -> QEMU 7.2 destination whose RAM is a
  memory-backend-file on tmpfs (userfaultfd missing mode needs shmem):
  QEMU must reach ``running`` (it runs the guest while pages arrive) and
  its RAM must equal the stream's.

Both directions also run with QEMU 10.0 (``$QMIGX_QEMU10``), which changed
postcopy on the wire for its own machine types (``x-preempt-pre-7-2``
off): the preempt channel is connected when postcopy starts rather than
during setup, and no final RAM EOS is written on it. Machine type
pc-i440fx-7.2 keeps 7.2's behaviour on QEMU 10, so both are run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qemu_support.guest import build_guest, read_marker
from qemu_support.harness import Qemu, parse_size, qemu10_binary
from qemu_support.live import QmigxIncoming, Uris, first_difference, qmigx_argv, qmigx_env

pytestmark = pytest.mark.qemu

RAM = "64M"
RAM_BYTES = parse_size(RAM)
SEED = 0x11FE0009
PC10, PC72 = "pc-i440fx-10.0", "pc-i440fx-7.2"
MODES = [pytest.param(False, id="plain"), pytest.param(True, id="preempt")]


def peer(version: str, machine: str = "pc", *more):
    """A QEMU source (its version and machine type), and the test's further arguments."""
    name = "qemu72" if version == "7.2" else f"qemu10-{machine}"
    marks = pytest.mark.qemu10 if version == "10.0" else ()
    return pytest.param((version, machine), *more, id="-".join([name, *more]), marks=marks)


def binary(version):
    return qemu10_binary() if version == "10.0" else None


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


@pytest.mark.parametrize("preempt", MODES)
@pytest.mark.parametrize(("source", "transport"), [
    peer("7.2", "pc", "unix"), peer("7.2", "pc", "tcp"), peer("10.0", PC10, "unix"),
    peer("10.0", PC72, "unix")])
def test_qemu_postcopy_to_qmigx(source, transport, preempt, tmp_path, uris, guest):
    version, machine = source
    uri = uris.make(transport)
    caps = {"postcopy-ram": True, "postcopy-blocktime": True}
    if preempt:
        caps["postcopy-preempt"] = True
    rd = tmp_path / "rd"
    report = tmp_path / "report.json"
    inc = QmigxIncoming(uri, tmp_path, caps=caps, ram_dir=rd, save=tmp_path / "state.mig",
                        report=report, extra=["--touch", "2000"])
    with Qemu(machine=machine, ram=RAM, kernel=guest, workdir=tmp_path, name="src",
              binary=binary(version)) as vm:
        before = vm.wait_guest_ready(60, min_counter=1000)
        with inc:
            vm.set_capabilities({"postcopy-ram": True, "postcopy-preempt": preempt})
            # precopy cannot converge at 8 MiB/s with a guest dirtying its RAM; the
            # background stream after switch-over is slow enough that the toucher's
            # reads hit missing pages, which QEMU must serve on request
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
    # requested pages come on the preempt channel when it is on, never otherwise
    assert (pc["preempt_pages"] > 0) == preempt, pc
    got = (rd / "mem0.bin").read_bytes()
    diff = first_difference(got, src)
    assert diff is None, f"mem0 after postcopy: {diff}"


# --- qmigx send --start-postcopy -> QEMU 7.2 destination ------------------------------------------


@pytest.fixture(scope="module")
def saved_streams(tmp_path_factory):
    """Streams QEMU saved: a paused idle guest, a dirtying guest migrated live (7.2), and
    a dirtying guest QEMU 10 migrated live on its own machine type."""
    from qemu_support import streams

    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")
    names = {"idle": "pc-paused", "dirtying": "pc-live", "dirtying10": "q10-pc-live"}

    class Saved(dict):
        def __missing__(self, kind):  # made when first asked for (QEMU 10's only with it)
            self[kind] = streams.get_stream(names[kind])
            return self[kind]

    return Saved()


@pytest.mark.parametrize("preempt", MODES)
@pytest.mark.parametrize(("transport", "guest_kind"),
                         [("unix", "idle"), ("tcp", "idle"), ("unix", "dirtying"),
                          pytest.param("unix", "dirtying10", marks=pytest.mark.qemu10)])
def test_qmigx_postcopy_to_qemu(transport, guest_kind, preempt, tmp_path, uris, saved_streams):
    """QEMU runs the guest while pages still arrive.

    Idle guest: QEMU's RAM (on tmpfs: shmem) ends equal to the stream's.
    Dirtying guest: it writes all over its RAM once running, so most of
    its pages are requested (on the preempt channel when it is on) and it
    goes on counting from where the stream left it.
    """
    info = saved_streams[guest_kind]
    uri = uris.make(transport)
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pc-", dir="/dev/shm"))
    report = tmp_path / "send.json"
    try:
        with Qemu(machine=info.machine, ram=RAM, kernel=info.kernel, mem_path=shm / "dst.ram",
                  incoming=True, workdir=tmp_path, name="dst", binary=info.binary) as dst:
            dst.set_capabilities(caps)
            dst.migrate_incoming(uri)
            argv = qmigx_argv("send", info.stream, uri, "--start-postcopy", "-v",
                              "--report", report,
                              "--param", f"max-postcopy-bandwidth={8 << 20}",
                              *[a for k, v in caps.items() if v for a in ("--cap", f"{k}=on")])
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=qmigx_env())
            assert r.returncode == 0, f"qmigx send exited {r.returncode}:\n{r.stderr[-3000:]}\n" \
                                      f"{dst.log_tail()}"
            st = dst.wait_migration(60)
            assert st["status"] == "completed"
            assert dst.status() == "running"
            if guest_kind != "idle":
                time.sleep(0.5)
            ram = (shm / "dst.ram").read_bytes()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    rep = json.loads(report.read_text())
    assert rep["query-migrate"]["status"] == "completed"
    pc = rep["postcopy"]
    if guest_kind != "idle":
        # the running guest asked for pages it wrote before the background stream got there
        # (an idle guest may find every page it touches already sent in precopy)
        assert pc["requests"] > 0 and pc["served"] > 0, pc
    want = Path(info.mem).read_bytes()
    if guest_kind == "idle":
        diff = first_difference(ram, want)
        assert diff is None, f"QEMU's RAM after postcopy: {diff}"
    else:
        assert pc["requests"] > 20, pc
        assert (pc["preempt_pages"] > 0) == preempt, pc
        assert read_marker(ram).counter > read_marker(want).counter


# --- qmigx serve driven over QMP, both ways -------------------------------------------------------


def _events_until(client, status: str, timeout: float = 120) -> list:
    seen: list = []
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "MIGRATION" and e["data"]["status"] == status for e in seen):
        ev = client.pull_event(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(ev)
        assert not (ev["event"] == "MIGRATION" and ev["data"]["status"] == "failed"), seen
    return seen


def _statuses(events) -> list:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def test_served_source_postcopy_to_qemu(tmp_path, saved_streams):
    """``qmigx serve --load`` as source, QMP migrate + migrate-start-postcopy, into a running QEMU."""
    from qemu_support.qmp import QMPClient
    from test_qmp import Served

    info = saved_streams["idle"]
    sockdir = tempfile.mkdtemp(prefix="qmigx-pq-")
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pc-", dir="/dev/shm"))
    uri = f"unix:{sockdir}/mig.sock"
    src = Served("src", "--load", info.stream, sockdir=sockdir)
    try:
        with Qemu(ram=RAM, kernel=info.kernel, mem_path=shm / "dst.ram", incoming=True,
                  workdir=tmp_path, name="dst") as dst:
            dst.set_capabilities({"postcopy-ram": True})
            dst.migrate_incoming(uri)
            with QMPClient(src.sock) as s:
                s.connect()
                with pytest.raises(Exception, match="Enable postcopy with migrate_set_capability"):
                    s.execute("migrate-start-postcopy")
                s.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "events", "state": True},
                    {"capability": "postcopy-ram", "state": True}])
                with pytest.raises(Exception, match="Postcopy must be started after migration"):
                    s.execute("migrate-start-postcopy")
                s.execute("migrate-set-parameters", **{"max-postcopy-bandwidth": 8 << 20})
                s.execute("migrate", uri=uri)
                s.execute("migrate-start-postcopy")
                events = _events_until(s, "postcopy-active")
                # the stopped guest may touch nothing new while it runs; QEMU's own
                # monitor reading the last page (the background stream sends it last,
                # seconds from now) faults on it, and QEMU must request it from qmigx.
                # Only once QEMU took LISTEN: read before, the page would be made
                # there and then, and the page qmigx sends later could not be placed.
                deadline = time.monotonic() + 60
                while dst.query_migrate().get("status") != "postcopy-active":
                    assert time.monotonic() < deadline, dst.query_migrate()
                    time.sleep(0.01)
                dst.cmd("human-monitor-command", **{"command-line": f"xp /1xg {RAM_BYTES - 4096:#x}"})
                events += _events_until(s, "completed")
                assert _statuses(events) == ["setup", "active", "postcopy-active", "completed"]
                q = s.execute("query-migrate")
                assert q["status"] == "completed" and q["ram"]["postcopy-requests"] > 0, q
                assert s.execute("query-status")["status"] == "postmigrate"
                s.execute("quit")
            assert src.wait() == 0
            dst.wait_migration(60)
            assert dst.status() == "running"
            ram = (shm / "dst.ram").read_bytes()
    finally:
        src.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    diff = first_difference(ram, Path(info.mem).read_bytes())
    assert diff is None, f"QEMU's RAM after postcopy from qmigx serve: {diff}"


def test_qemu_postcopy_to_served_destination(tmp_path, guest):
    """A running QEMU migrates in postcopy to ``qmigx serve --incoming defer``, whose guest
    stand-in reads memory once it runs: QEMU serves its page requests."""
    from qemu_support.qmp import QMPClient
    from test_qmp import Served

    sockdir = tempfile.mkdtemp(prefix="qmigx-pq-")
    uri = f"unix:{sockdir}/mig.sock"
    dst = Served("dst", "--incoming", "defer", sockdir=sockdir)
    try:
        with Qemu(ram=RAM, kernel=guest, workdir=tmp_path, name="src") as vm, \
                QMPClient(dst.sock) as d:
            vm.wait_guest_ready(60, min_counter=1000)
            d.connect()
            d.execute("migrate-set-capabilities", capabilities=[
                {"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": True}])
            d.execute("migrate-incoming", uri=uri)
            vm.set_capabilities({"postcopy-ram": True})
            vm.set_parameters({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 2 << 20,
                               "downtime-limit": 1})
            vm.migrate(uri)
            _wait_status(vm, {"active"})
            time.sleep(0.3)
            vm.cmd("migrate-start-postcopy")
            stats = _wait_status(vm, {"completed"}, timeout=120)
            events = _events_until(d, "completed")
            assert _statuses(events) == ["setup", "active", "postcopy-active", "completed"]
            assert stats["ram"]["postcopy-requests"] > 0, stats["ram"]
            assert d.execute("query-status")["status"] == "running"
            ram = {b["id"]: b for b in d.execute("x-query-qmigx-ram")}
            import hashlib

            want = hashlib.sha256(vm.read_ram()).hexdigest()
            assert ram["mem0"]["sha256"] == want
            d.execute("quit")
        assert dst.wait() == 0
    finally:
        dst.close()
        shutil.rmtree(sockdir, ignore_errors=True)


# --- pause and recovery (QEMU's /postcopy/recovery/plain and /postcopy/preempt/recovery/plain) ---


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("preempt", MODES)
@pytest.mark.parametrize("source", [peer("7.2"), peer("10.0", PC10)])
def test_qemu_postcopy_recovery_to_qmigx(source, preempt, tmp_path, guest):
    """The connection is cut mid-postcopy (a proxy dies): QEMU pauses, qmigx incoming listens
    again on its URI, QEMU resumes there with ``migrate resume=true``; nothing is lost."""
    from qemu_support.proxy import Proxy

    port = _free_port()
    uri = f"tcp:127.0.0.1:{port}"
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    rd = tmp_path / "rd"
    report = tmp_path / "report.json"
    inc = QmigxIncoming(uri, tmp_path, caps={k: v for k, v in caps.items() if v}, ram_dir=rd,
                        report=report, extra=["--touch", "2000"])
    version, machine = source
    with Qemu(machine=machine, ram=RAM, kernel=guest, workdir=tmp_path, name="src",
              binary=binary(version)) as vm:
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
    assert diff is None, f"mem0 after a recovered postcopy: {diff}"


@pytest.mark.parametrize("preempt", MODES)
@pytest.mark.parametrize("guest_kind", ["dirtying",
                                        pytest.param("dirtying10", marks=pytest.mark.qemu10)])
def test_qmigx_postcopy_recovery_to_qemu(guest_kind, preempt, tmp_path, saved_streams):
    """``qmigx send`` through a proxy that dies mid-postcopy: QEMU pauses; after
    ``migrate-recover`` and a new proxy on the same address, qmigx's retries resume it."""
    from qemu_support.proxy import Proxy

    info = saved_streams[guest_kind]
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pc-", dir="/dev/shm"))
    report = tmp_path / "send.json"
    qport, pport = _free_port(), _free_port()
    try:
        with Qemu(machine=info.machine, ram=RAM, kernel=info.kernel, mem_path=shm / "dst.ram",
                  incoming=True, paused=True, workdir=tmp_path, name="dst",
                  binary=info.binary) as dst:
            dst.set_capabilities(caps)
            dst.migrate_incoming(f"tcp:127.0.0.1:{qport}")
            proxy = Proxy(qport, port=pport)
            argv = qmigx_argv("send", info.stream, f"tcp:127.0.0.1:{pport}", "--start-postcopy",
                              "-v", "--report", report,
                              "--param", f"max-postcopy-bandwidth={8 << 20}",
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
    diff = first_difference(ram, Path(info.mem).read_bytes())
    assert diff is None, f"QEMU's RAM after a recovered postcopy: {diff}"
