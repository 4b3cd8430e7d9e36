"""``qmigx serve --qemu-version 10.0`` against a real QEMU 10.0: reply parity, and migrations.

The same requests sent to a real QEMU 10 (``-M pc`` = pc-i440fx-10.0) and
to ``qmigx serve --qemu-version 10.0`` get the same replies, byte for byte
(timestamps and version strings aside): the 7.2 parity requests, plus what
10.0 changed -- its capabilities (no ``compress``; ``switchover-ack``,
``dirty-limit``, ``mapped-ram`` and their refusals), its parameters (the
new ones, their defaults, key order and range errors), ``migrate`` with
``channels`` (and without ``blk``), ``query-migrationthreads``. Then a
served 10.0 destination with ``exit-on-error`` false survives a bad
stream as QEMU 10 does, and a real QEMU 10 migrates into a served one
given its ``channels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qemu_support import streams
from qemu_support.harness import Qemu, qemu10_binary
from test_qmp import Served
from test_qmp_qemu import PARITY_REQUESTS, PRE_NEGOTIATION, _masked, _replies

#: gated by tests/conftest.py: QEMU 10 is $QMIGX_QEMU10 (.ci/install-qemu10.sh)
pytestmark = [pytest.mark.qemu10]

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qmigx-q10-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(sockdir):
    procs: list[Served] = []

    def start(name: str, *args: str) -> Served:
        s = Served(name, *args, sockdir=sockdir)
        procs.append(s)
        return s

    yield start
    for s in procs:
        s.close()


def _caps(*pairs) -> bytes:
    body = ",".join(f'{{"capability":"{c}","state":{"true" if on else "false"}}}' for c, on in pairs)
    return b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":[' + body.encode() + b"]}}"


_FILE = b'{"transport":"file","filename":"/nonexistent/qmigx/x.mig","offset":0}'

#: what QEMU 10.0 answers differently from 7.2 (after the 7.2 parity requests)
PARITY_10 = PARITY_REQUESTS + [
    b'{"execute":"query-migrate-capabilities"}',
    _caps(("compress", True)),
    _caps(("block", True)),
    _caps(("switchover-ack", True)),
    _caps(("return-path", True), ("switchover-ack", True)),
    _caps(("dirty-limit", True)),
    _caps(("multifd", True), ("xbzrle", True)),
    _caps(("mapped-ram", True), ("xbzrle", True)),
    _caps(("mapped-ram", True)),
    b'{"execute":"query-migrate-capabilities"}',
    b'{"execute":"migrate-set-parameters","arguments":{"compress-level":1}}',
    b'{"execute":"migrate-set-parameters","arguments":{"block-incremental":true}}',
    b'{"execute":"migrate-set-parameters","arguments":{"zero-page-detection":"bogus"}}',
    b'{"execute":"migrate-set-parameters","arguments":{"multifd-compression":"qpl"}}',
    b'{"execute":"migrate-set-parameters","arguments":{"vcpu-dirty-limit":0}}',
    b'{"execute":"migrate-set-parameters","arguments":{"x-vcpu-dirty-limit-period":0}}',
    b'{"execute":"migrate-set-parameters","arguments":{"multifd-qatzip-level":10}}',
    b'{"execute":"migrate-set-parameters","arguments":{"zero-page-detection":"legacy",'
    b'"direct-io":true,"avail-switchover-bandwidth":12345,"mode":"cpr-reboot"}}',
    b'{"execute":"query-migrate-parameters"}',
    b'{"execute":"migrate"}',
    b'{"execute":"migrate","arguments":{"uri":"unix:/x","blk":true}}',
    b'{"execute":"migrate","arguments":{"channels":[]}}',
    b'{"execute":"migrate","arguments":{"uri":"unix:/x","channels":[{"channel-type":"main","addr":'
    + _FILE + b"}]}}",
    b'{"execute":"migrate","arguments":{"channels":[{"channel-type":"main","addr":' + _FILE
    + b'},{"channel-type":"main","addr":' + _FILE + b"}]}}",
    b'{"execute":"migrate","arguments":{"channels":[{"channel-type":"main"}]}}',
    b'{"execute":"migrate","arguments":{"channels":[{"channel-type":"main","addr":'
    b'{"transport":"bogus"}}]}}',
    b'{"execute":"migrate","arguments":{"channels":[{"channel-type":"main","addr":'
    b'{"transport":"file","filename":"/x"}}]}}',
    b'{"execute":"query-migrationthreads"}',
]


def test_replies_match_real_qemu10(served, sockdir):
    qsock = os.path.join(sockdir, "qemu.sock")
    proc = subprocess.Popen(
        [qemu10_binary(), "-qmp", f"unix:{qsock},server=on,wait=off", "-S", "-nodefaults",
         "-nographic", "-display", "none", "-M", "pc", "-m", "32"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(qsock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ours = served("vm", "--ram", "32M", "-S", "--qemu-version", "10.0")
        theirs = _replies(qsock, PARITY_10)
        mine = _replies(ours.sock, PARITY_10)
        assert proc.wait(10) == 0 and ours.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    greeting_o = json.loads(mine[0][0])
    assert greeting_o["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 0, "major": 10}
    assert json.loads(theirs[0][0])["QMP"]["version"]["qemu"]["major"] == 10
    theirs, mine = _masked(theirs), _masked(mine)
    requests = [b"(greeting)"] + PRE_NEGOTIATION + PARITY_10 + [b"quit"]
    diffs = [(r, q, o) for r, q, o in zip(requests, theirs, mine) if q != o]
    assert not diffs, "\n".join(f"{r!r}\n  qemu:  {q}\n  qmigx: {o}" for r, q, o in diffs)
    assert len(theirs) == len(mine) == len(requests)


def test_exit_on_error_false_keeps_the_destination(served, sockdir):
    """QEMU 10: a failed load with exit-on-error false leaves it up, failed, saying why."""
    dst = served("dst", "--incoming", "defer", "--qemu-version", "10.0")
    with QEMUMonitorProtocol(dst.sock) as d:
        d.connect()
        d.cmd("migrate-incoming", channels=[{"channel-type": "main", "addr": {
            "transport": "exec", "args": ["/bin/sh", "-c", "echo garbage"]}}],
              **{"exit-on-error": False})
        deadline = time.monotonic() + 30
        while (q := d.cmd("query-migrate")).get("status") != "failed":
            assert time.monotonic() < deadline, q
            time.sleep(0.05)
        assert q["error-desc"].startswith("load of migration failed: ")
        assert d.cmd("query-status")["status"] == "inmigrate"
        d.cmd("quit")
    assert dst.wait() == 0


def test_real_qemu10_to_served_destination_by_channels(served, sockdir, tmp_path):
    info = streams.get_stream("q10-pc-paused")
    dst = served("dst", "--incoming", "defer", "--qemu-version", "10.0")
    path = os.path.join(sockdir, "mig.sock")
    channels = [{"channel-type": "main",
                 "addr": {"transport": "socket", "type": "unix", "path": path}}]
    with Qemu(machine="pc", ram=info.ram, kernel=info.kernel, mem_path=tmp_path / "vm.ram",
              paused=True, incoming=True, workdir=tmp_path, name="vm",
              binary=qemu10_binary()) as vm:
        vm.migrate_incoming("exec:cat " + info.stream)  # the real QEMU 10 now holds the saved guest
        vm.wait_migration(60)
        with QEMUMonitorProtocol(dst.sock) as d:
            d.connect()
            caps = [{"capability": "multifd", "state": True}]
            for side in (d, vm):
                side.cmd("migrate-set-capabilities", capabilities=caps)
            d.cmd("migrate-incoming", channels=channels)
            vm.cmd("migrate", channels=channels)
            vm.wait_migration(60)
            deadline = time.monotonic() + 60
            while d.cmd("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ram = {b["id"]: b for b in d.cmd("x-query-qmigx-ram")}
            want = hashlib.sha256(Path(info.mem).read_bytes()).hexdigest()
            assert ram["mem0"]["sha256"] == want
            d.cmd("quit")
        assert dst.wait() == 0
