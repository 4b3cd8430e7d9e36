"""Cross-check qmigx.control against a live QEMU 7.2 over QMP.

The same migrate-set-capabilities / migrate-set-parameters requests go
to QEMU and to qmigx; the error texts and the resulting query replies
(as JSON text, so key order counts) must be identical. A short real
migration then checks query-migrate's layout and the event sequence.

Known, deliberate differences are left out of the comparison: qmigx
stores ``multifd-zlib-level`` / ``multifd-zstd-level`` (7.2 ignores them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest

from qemu_support.qmp import QMPClient, QMPCommandError, QMPError
from qmigx.control import Capabilities, MigrationStats, Parameters, StateMachine, query_migrate
from qmigx.errors import MigrationError

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu(qemu_bin):
    """A paused QEMU (pc, 32M, no devices) and a QMP session with it, every read bounded."""
    sockdir = tempfile.mkdtemp(prefix="qmigx-ctl-")  # short: unix socket paths are limited
    path = os.path.join(sockdir, "qmp.sock")
    proc = subprocess.Popen(
        [qemu_bin, "-M", "pc", "-m", "32", "-S", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = QMPClient(path, timeout=10.0)
    try:
        client.connect(alive=lambda: proc.poll() is None)
        yield client
    finally:
        if client.connected:
            try:
                client.execute("quit")
            except QMPError:
                pass
        client.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


def _theirs(qemu: QMPClient, execute: str, arguments: Any) -> tuple[str, Any]:
    """('return', value) or ('error', desc); the value keeps QEMU's key order."""
    try:
        return "return", qemu.execute_raw(execute, arguments)
    except QMPCommandError as e:
        return "error", e.desc


def _ours(fn, *args) -> tuple[str, Any]:
    try:
        fn(*args)
    except MigrationError as e:
        return "error", e.message
    return "return", {}


PARAMETER_REQUESTS = [
    {"compress-level": 10}, {"compress-level": 256}, {"compress-level": -1}, {"compress-level": "a"},
    {"compress-level": 1.5}, {"compress-level": True}, {"compress-threads": 0}, {"decompress-threads": 0},
    {"throttle-trigger-threshold": 0}, {"throttle-trigger-threshold": 101}, {"throttle-trigger-threshold": 100},
    {"cpu-throttle-initial": 0}, {"cpu-throttle-increment": 100}, {"max-bandwidth": -1},
    {"max-bandwidth": 18446744073709551616}, {"max-bandwidth": 1 << 30},
    {"downtime-limit": 2000001}, {"downtime-limit": -1}, {"downtime-limit": 2000000},
    {"x-checkpoint-delay": -1}, {"x-checkpoint-delay": 4294967296}, {"x-checkpoint-delay": 4294967295},
    {"multifd-channels": 0}, {"multifd-channels": 255},
    {"xbzrle-cache-size": 4095}, {"xbzrle-cache-size": 12288}, {"xbzrle-cache-size": 4096},
    {"max-cpu-throttle": 19}, {"max-cpu-throttle": 100}, {"cpu-throttle-initial": 50},
    {"max-cpu-throttle": 49}, {"cpu-throttle-initial": 99, "max-cpu-throttle": 99},
    {"announce-initial": 100001}, {"announce-max": 100001}, {"announce-rounds": 1001},
    {"announce-step": 0}, {"announce-step": 10001}, {"announce-step": 10000},
    {"multifd-compression": "lz4"}, {"multifd-compression": 1}, {"multifd-compression": "zstd"},
    {"tls-creds": 5}, {"tls-creds": None}, {"tls-hostname": "h"}, {"tls-authz": "x"},
    {"compress-wait-thread": 1}, {"compress-wait-thread": False}, {"bogus": 1}, {"bogus": 1, "compress-level": "x"},
    {"block-bitmap-mapping": 5}, {"block-bitmap-mapping": [{"node-name": "a", "alias": "1b", "bitmaps": []}]},
    {"block-bitmap-mapping": [{"node-name": "a", "alias": "b", "bitmaps": [
        {"name": "x", "alias": "y"}, {"name": "z", "alias": "y"}]}]},
    {"block-bitmap-mapping": [{"node-name": "a", "alias": "b"}]},
    {"block-bitmap-mapping": [{"node-name": "a", "alias": "b", "bitmaps": [
        {"name": "x", "alias": "y", "transform": {"persistent": True}}]}]},
    {"compress-level": 10, "compress-threads": 0},
]

CAPABILITY_REQUESTS = [
    [("xyz", True)], [("postcopy-ram", True), ("x-ignore-shared", True)], [("postcopy-preempt", True)],
    [("postcopy-preempt", True), ("postcopy-ram", True), ("compress", True)],
    [("multifd", True), ("compress", True)], [("zero-copy-send", True)],
    [("background-snapshot", True), ("xbzrle", True)], [("background-snapshot", True), ("events", True)],
    [("background-snapshot", False)], [("xbzrle", True), ("events", True), ("postcopy-ram", True)],
    [("postcopy-preempt", True)], [("multifd", True), ("zero-copy-send", True)],
    [("block", True), ("zero-blocks", True)], [("block", True), ("background-snapshot", True)],
]


def test_parameters_match_qemu(qemu):
    ours = Parameters(capabilities=Capabilities())
    for req in PARAMETER_REQUESTS:
        theirs = _theirs(qemu, "migrate-set-parameters", req)
        mine = _ours(ours.set, req)
        assert mine == theirs, req
    q = qemu.execute("query-migrate-parameters")
    assert json.dumps(ours.as_qmp()) == json.dumps(q)


def test_capabilities_match_qemu(qemu):
    ours = Capabilities()
    Parameters(capabilities=ours).set(qemu.execute("query-migrate-parameters"))  # same TLS / multifd compression
    for req in CAPABILITY_REQUESTS:
        theirs = _theirs(qemu, "migrate-set-capabilities",
                         {"capabilities": [{"capability": c, "state": s} for c, s in req]})
        assert _ours(ours.set_many, req) == theirs, req
    q = qemu.execute("query-migrate-capabilities")
    assert json.dumps(ours.as_qmp()) == json.dumps(q)
    qemu.execute_raw("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": False} for c in ("postcopy-preempt", "postcopy-ram", "zero-copy-send",
                                                   "multifd", "xbzrle", "events", "block",
                                                   "zero-blocks")]})


def _stats_from(reply: dict[str, Any]) -> MigrationStats:
    ram = reply["ram"]
    s = MigrationStats()
    for key, value in ram.items():
        attr = key.replace("-", "_")
        if attr not in ("normal_bytes", "skipped"):
            setattr(s, attr, value)
    for key, value in reply.get("xbzrle-cache", {}).items():
        setattr(s, "xbzrle_" + key.replace("-", "_"), value)
    comp = reply.get("compression", {})
    s.compression_pages, s.compression_busy = comp.get("pages", 0), comp.get("busy", 0)
    s.compression_busy_rate, s.compressed_size = comp.get("busy-rate", 0.0), comp.get("compressed-size", 0)
    s.compression_rate = comp.get("compression-rate", 0.0)
    s.setup_time, s.total_time, s.downtime = reply["setup-time"], reply["total-time"], reply["downtime"]
    return s


def _layout(obj: Any) -> Any:
    if isinstance(obj, dict):
        return [(k, _layout(v)) for k, v in obj.items()]
    if isinstance(obj, float):
        return float(obj)
    return obj


def test_completed_migration_layout_and_events(qemu):
    qemu.execute_raw("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": True} for c in ("events", "xbzrle", "compress")]})
    qemu.events.clear()
    qemu.execute("migrate", uri="exec:cat > /dev/null")
    deadline = time.monotonic() + 60
    while True:
        info = qemu.execute("query-migrate")
        if info.get("status") in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert info["status"] == "completed", info
    caps = Capabilities()
    caps.set_many([("events", True), ("xbzrle", True), ("compress", True)])
    ours = query_migrate(StateMachine("source", "completed"), _stats_from(info), caps)
    assert _layout(ours) == _layout(json.loads(json.dumps(info)))
    # every QEMU number is an int except the 'number' members, which qmigx gives as floats
    assert [k for k in ours] == [k for k in info]
    deadline = time.monotonic() + 5
    while not any(e["data"].get("status") == "completed" for e in qemu.events if e["event"] == "MIGRATION"):
        assert time.monotonic() < deadline, qemu.events
        qemu.poll_events(0.1)
    statuses = [e["data"]["status"] for e in qemu.events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"]
    assert all(list(e) == ["timestamp", "event", "data"] for e in qemu.events)
    passes = [e["data"]["pass"] for e in qemu.events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes
