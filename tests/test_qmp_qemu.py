"""``qmigx serve`` against a real QEMU 7.2: migrations both ways, and reply parity.

* A served qmigx ``--load``-ing a stream saved from a paused QEMU (pc,
  64M, ``harness.save_stream``) migrates live to a real QEMU destination
  driven over QMP; the destination's RAM equals the saved guest's, byte
  for byte.
* A real QEMU holding that guest migrates to a served qmigx destination
  (``--incoming defer``); qmigx's copy of guest RAM hashes the same.
* The same requests sent to a real QEMU and to a served qmigx get the
  same replies, byte for byte (timestamps and version strings aside):
  greeting shape, errors (class and text), id echo, runstate commands,
  events, and ``quit``.

QMP is driven with the tests' own client (``qemu_support.qmp``) on both
sides, and with raw sockets where the exact bytes matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qemu_support import streams
from qemu_support.harness import Qemu
from qemu_support.qmp import QMPClient
from test_qmp import PARSE_CASES, Raw, Served

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qmigx-qq-")  # short: unix socket paths are limited
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


def _events_until(client: QMPClient, status: str, timeout: float = 120) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "MIGRATION" and e["data"]["status"] == status for e in seen):
        ev = client.pull_event(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(ev)
        assert not (ev["event"] == "MIGRATION" and ev["data"]["status"] == "failed"), seen
    return seen


def _statuses(events: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def test_served_source_to_real_qemu(served, sockdir, tmp_path):
    info = streams.get_stream("pc-paused")
    src = served("src", "--load", info.stream)
    uri = f"unix:{os.path.join(sockdir, 'mig.sock')}"
    with Qemu(machine=info.machine, ram=info.ram, kernel=info.kernel, mem_path=tmp_path / "dst.ram",
              devices=info.devices, paused=True, incoming=True, workdir=tmp_path, name="dst") as dst:
        dst.set_capabilities(events=True)
        dst.migrate_incoming(uri)
        with QMPClient(src.sock) as s:
            s.connect()
            assert s.execute("query-status")["status"] == "paused"  # the runstate the stream recorded
            s.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            assert s.execute("migrate", uri=uri) == {}
            events = _events_until(s, "completed")
            assert _statuses(events) == ["setup", "active", "completed"]
            assert "STOP" not in [e["event"] for e in events]  # it was not running
            q = s.execute("query-migrate")
            blocks = streams.ram_setup(Path(info.stream).read_bytes(), ignore_shared=False)[1]
            assert q["status"] == "completed"
            assert q["ram"]["total"] == sum(b.length for b in blocks) > info.ram_bytes
            assert s.execute("query-status")["status"] == "postmigrate"
            s.execute("quit")
        assert src.wait() == 0
        dst.wait_migration(60)
        assert dst.status() == "paused"
        assert (tmp_path / "dst.ram").read_bytes() == Path(info.mem).read_bytes()


def test_real_qemu_to_served_destination(served, sockdir, tmp_path):
    info = streams.get_stream("pc-paused")
    dst = served("dst", "--incoming", "defer")
    uri = f"unix:{os.path.join(sockdir, 'mig.sock')}"
    with Qemu(machine=info.machine, ram=info.ram, kernel=info.kernel, mem_path=tmp_path / "vm.ram",
              devices=info.devices, paused=True, incoming=True, workdir=tmp_path, name="vm") as vm:
        vm.migrate_incoming("exec:cat " + info.stream)  # the real QEMU now holds the saved guest
        vm.wait_migration(60)
        with QMPClient(dst.sock) as d:
            d.connect()
            d.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            d.execute("migrate-incoming", uri=uri)
            vm.migrate(uri)
            vm.wait_migration(60)
            events = _events_until(d, "completed")
            assert _statuses(events) == ["setup", "active", "completed"]
            assert d.execute("query-status")["status"] == "paused"  # the source's runstate
            ram = {b["id"]: b for b in d.execute("x-query-qmigx-ram")}
            want = hashlib.sha256(Path(info.mem).read_bytes()).hexdigest()
            assert ram["mem0"]["size"] == info.ram_bytes and ram["mem0"]["sha256"] == want
            d.execute("quit")
        assert dst.wait() == 0


# --- reply parity ---------------------------------------------------------------------------------

_STAMP = re.compile(rb'"timestamp": \{"seconds": \d+, "microseconds": \d+\}')
_VERSION = re.compile(rb'"micro": \d+|"package": "[^"]*"')

#: Requests (after negotiation) whose replies must match; parse cases come from test_qmp.
PARITY_REQUESTS = [raw for raw, _ in PARSE_CASES if b"resume" not in raw] + [
    b'{"execute":"query-status","id":{"b":1,"a":2,"status":3,"return":4}}',
    b'{"execute":"query-status","id":[1, 2.5, true, false, null, "\\u00e9\\/\\u007f", 1e400]}',
    b'{"execute":"query-version","id":"v"}',
    b'{"execute":"query-migrate"}',
    b'{"execute":"query-migrate-parameters"}',
    b'{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":-5,"downtime-limit":1000}}',
    b'{"execute":"query-migrate-parameters"}',
    b'{"execute":"migrate-set-parameters","arguments":{"xbzrle-cache-size":1000}}',
    b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}',
    b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-preempt","state":true}]}}',
    b'{"execute":"stop"}',
    b'{"execute":"query-status"}',
    b'{"execute":"cont"}',
    b'{"execute":"cont"}',
    b'{"execute":"query-status"}',
    b'{"execute":"stop"}',
    b'{"execute":"stop"}',
    b'{"execute":"query-status"}',
    b'{"execute":"migrate","arguments":{"uri":"bogus:x"}}',
    b'{"execute":"query-migrate"}',
    b'{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}',
    b'\xfe{"execute":"query-status"}',
    b'{"execute":"query-status"}\r\n{"execute":"query-status","id":2}',
    b'{"exec-oob":"query-status","id":1}',
    b'{"exec-oob":"migrate-pause","id":1}',
    b'{"exec-oob":"nope","id":1}',
    b'{"execute":"query-status","exec-oob":"query-status","id":1}',
]

#: Requests before capabilities negotiation (then ``qmp_capabilities`` with OOB).
PRE_NEGOTIATION = [
    b'{"execute":"query-status"}',
    b'{"execute":"query-status","id":5}',
    b"[]",
    b'{"exec-oob":"query-status"}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}',
    b'{"execute":"qmp_capabilities","arguments":{"x":1}}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
]


_SYNC = b'{"execute":"x-no-such-command","id":"sync"}'


def _replies(path: str, requests: list[bytes]) -> list[list[bytes]]:
    """Each request's reply lines (events included), timestamps and version masked.

    A request's replies end where the reply to a following unknown command
    with id "sync" starts (every request here leaves the parser clean).
    """
    c = Raw(path)
    try:
        out = [[c.line()]]
        for raw in PRE_NEGOTIATION + requests:
            c.s.sendall(raw + b"\n" + _SYNC + b"\n")
            lines = []
            while b'"id": "sync"' not in (line := c.line(timeout=10) or b'"id": "sync" (timeout)'):
                lines.append(line)
            out.append(lines)
        c.s.sendall(b'{"execute":"quit"}\n')
        lines = []
        while (line := c.line(timeout=3)) is not None:
            lines.append(line)
        out.append(lines)
        return out
    finally:
        c.close()


def _masked(replies: list[list[bytes]]) -> list[list[bytes]]:
    return [[_VERSION.sub(b"V", _STAMP.sub(b"T", line)) for line in lines] for lines in replies]


def test_replies_match_real_qemu(served, sockdir, qemu_bin):
    qsock = os.path.join(sockdir, "qemu.sock")
    proc = subprocess.Popen(
        [qemu_bin, "-qmp", f"unix:{qsock},server=on,wait=off", "-S", "-nodefaults", "-nographic",
         "-display", "none", "-M", "pc", "-m", "32"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(qsock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ours = served("vm", "--ram", "32M", "-S")
        theirs = _replies(qsock, PARITY_REQUESTS)
        mine = _replies(ours.sock, PARITY_REQUESTS)
        assert proc.wait(10) == 0 and ours.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    greeting_q, greeting_o = json.loads(theirs[0][0]), json.loads(mine[0][0])
    assert greeting_q["QMP"]["capabilities"] == greeting_o["QMP"]["capabilities"] == ["oob"]
    assert greeting_o["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert greeting_q["QMP"]["version"]["qemu"]["major"] == 7
    theirs, mine = _masked(theirs), _masked(mine)
    assert theirs[0] == mine[0]  # same shape, key order and line ending
    requests = [b"(greeting)"] + PRE_NEGOTIATION + PARITY_REQUESTS + [b"quit"]
    diffs = [(r, q, o) for r, q, o in zip(requests, theirs, mine) if q != o]
    assert not diffs, "\n".join(f"{r!r}\n  qemu:  {q}\n  qmigx: {o}" for r, q, o in diffs)
    assert len(theirs) == len(mine) == len(requests)
    assert any(b"JSON parse error" in line for lines in mine for line in lines)
    assert mine[-1][0].startswith(b'{T, "event": "SHUTDOWN"')
