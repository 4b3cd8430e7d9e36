"""``qmigx serve``: QMP as QEMU 7.2 speaks it, driven by the tests' client and by ``qemu.qmp``.

The protocol layer is tested in-process (QEMU's JSON quirks and error
texts, as observed on a real QEMU 7.2, and hypothesis properties of the
parser and writer); the server is tested as orchestrators use QEMU:
``qmigx serve`` processes driven over unix sockets by the tests' QMP
client (``qemu_support.qmp``, the one that drives real QEMU too), by a
raw socket where the exact bytes matter, and -- in the two tests that
prove compatibility with a real orchestrator's client library -- by
``qemu.qmp``'s async ``QMPClient`` and its legacy sync wrapper (those two
skip when ``qemu.qmp`` is not installed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx.qmp import JSONStreamer, Machine, QMPError, Session, dispatch, dumps, parse_json
from qmigx.qmp.commands import Context
from qmigx.qmp.machine import BLOCK_INCREMENTAL_REFUSED
from qmigx.qmp.protocol import encode_message

from qemu_support.qmp import QMPClient, QMPCommandError

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": "qmigx 0.1.0"}, "capabilities": ["oob"]}}\r\n')


# --- helpers ----------------------------------------------------------------------------


class Served:
    """A ``qmigx serve`` process on a unix socket; killed at close whatever happened."""

    def __init__(self, name: str, *args: str, sockdir: str) -> None:
        self.name = name
        self.sock = os.path.join(sockdir, f"{name}.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmigx.cli.serve", "--qmp", f"unix:{self.sock}", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self._stderr_line(30)
        if b"listening on" not in line:
            self.close()
            raise AssertionError(f"{name} did not start: {line!r}")

    def _stderr_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stderr], [], [], left)[0]:
                return buf
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                return buf
            buf += chunk
        return buf

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self._stderr_line(0.5).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qmigx-qmp-")  # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(sockdir):
    procs: list[Served] = []

    def start(name: str, *args: str) -> Served:
        s = Served(name, *args, sockdir=sockdir)
        procs.append(s)
        return s

    yield start
    for s in procs:
        s.close()


class Raw:
    """A plain socket client, for the exact bytes of replies."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.buf = b""

    def line(self, timeout: float = 5.0) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.s], [], [], left)[0]:
                return None
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def ask(self, raw: bytes) -> bytes:
        self.s.sendall(raw + b"\n")
        line = self.line()
        assert line is not None, raw
        return line

    def close(self) -> None:
        self.s.close()


# --- protocol, in-process -------------------------------------------------------------------

# (request bytes, replies) as QEMU 7.2 answered them (qemu-system-x86_64 7.2, negotiated monitor)
PARSE_CASES = [
    (b'{"execute": }', ["JSON parse error, expecting value"]),
    (b'{"execute": @}', ["JSON parse error, stray '@'", "JSON parse error, expecting value"]),
    (b"[1,2]", ["QMP input must be a JSON object"]),
    (b'"x"', ["QMP input must be a JSON object"]),
    (b"1", ["QMP input must be a JSON object"]),
    (b"}", ["JSON parse error, expecting value"]),
    (b"[}", ["JSON parse error, expecting value"]),
    (b'{"execute" "query-status"}', ["JSON parse error, missing : in object pair"]),
    (b'{"execute":"query-status",}', ["JSON parse error, expecting value"]),
    (b"{1:2}", ["JSON parse error, key is not a string in object"]),
    (b'{"a":1 "b":2}', ["JSON parse error, expected separator in dict"]),
    (b"[1 2]", ["JSON parse error, expected separator in list"]),
    (b'{"execute":"query-status", "id": tru}', ["JSON parse error, invalid keyword 'tru'"]),
    (b'{"execute":"query-status", "id": 01}',
     ["JSON parse error, stray '01'", "JSON parse error, expecting value"]),
    (b'{"execute":"query-status", "id": "\\x"}', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"execute":"query-status", "id": "\xff"}',
     ["JSON parse error, stray '\"\ufffd'", "JSON parse error, expecting value"]),
    (b'{"execute":"query-status", "id": "a\tb"}',
     ["JSON parse error, stray '\"a\t'", "JSON parse error, expecting value"]),
    (b'{"execute":"query-status", "id": "\\ud800"}',
     ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"execute":"query-status", "id": "\\uZZZZ"}',
     ["JSON parse error, \\uZZZZ is not a valid Unicode character"]),
    (b'{"execute":"query-status", "id": "\xef\xbf\xbf"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"execute":"query-status", "id": -}', ["JSON parse error, stray '-}'"]),
    (b"\x00", ["JSON parse error, stray ''"]),
    (b'{"execute":"query-status","id":"ab\x00c"}',
     ["JSON parse error, stray '\"ab'", "JSON parse error, expecting value"]),
    (b'{"execute":"query-status", "id": 1.}', ["JSON parse error, stray '1.}'"]),
    (b'{"execute":"query-status", "id": 1, "id": 2}', ["JSON parse error, duplicate key"]),
    (b'{"execute":"query-status", "arguments":{}, "control":{}}', ["QMP input member 'control' is unexpected"]),
    (b"{}", ["QMP input lacks member 'execute'"]),
    (b'{"execute":1}', ["QMP input member 'execute' must be a string"]),
    (b'{"execute":"query-status","arguments":[]}', ["QMP input member 'arguments' must be an object"]),
    (b'{"execute":"query-status","arguments":null}', ["QMP input member 'arguments' must be an object"]),
    (b'{"exec-oob":"query-status"}', ["QMP input member 'exec-oob' is unexpected"]),
    (b'{"execute":"query-status","arguments":{"a":1}}', ["Parameter 'a' is unexpected"]),
    (b'{"execute":"Query-Status"}', ["The command Query-Status has not been found"]),
    (b'{"execute":"migrate"}', ["Parameter 'uri' is missing"]),
    (b'{"execute":"migrate","arguments":{"uri":1}}', ["Invalid parameter type for 'uri', expected: string"]),
    (b'{"execute":"migrate","arguments":{"uri":null}}', ["Invalid parameter type for 'uri', expected: string"]),
    (b'{"execute":"migrate","arguments":{"uri":"x","blk":1}}',
     ["Invalid parameter type for 'blk', expected: boolean"]),
    (b'{"execute":"migrate","arguments":{"uri":"tcp:1.2.3.4:1","foo":1}}', ["Parameter 'foo' is unexpected"]),
    (b'{"execute":"migrate","arguments":{"uri":"exec:true","resume":true}}',
     ["Cannot resume if there is no paused migration"]),
    (b'{"execute":"migrate-continue"}', ["Parameter 'state' is missing"]),
    (b'{"execute":"migrate-continue","arguments":{"state":5}}',
     ["Invalid parameter type for 'state', expected: string"]),
    (b'{"execute":"migrate-continue","arguments":{"state":"bogus"}}',
     ["Parameter 'state' does not accept value 'bogus'"]),
    (b'{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}',
     ["Migration not in expected state: none"]),
    (b'{"execute":"migrate-incoming","arguments":{"uri":"tcp:0:0"}}',
     ["'-incoming' was not specified on the command line"]),
    (b'{"execute":"migrate-set-capabilities","arguments":{}}', ["Parameter 'capabilities' is missing"]),
    (b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":{}}}',
     ["Invalid parameter type for 'capabilities', expected: array"]),
    (b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle"}]}}',
     ["Parameter 'capabilities[0].state' is missing"]),
    (b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"foo","state":true}]}}',
     ["Parameter 'capability' does not accept value 'foo'"]),
    (b'{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1.5}}',
     ["Parameter 'downtime-limit' expects uint64"]),
    (b'{"execute":"migrate-set-parameters","arguments":{"compress-level":300}}',
     ["Parameter 'compress-level' expects uint8_t"]),
    (b'{"execute":"qmp_capabilities"}', ["Capabilities negotiation is already complete, command ignored"]),
    (b'{"execute":"migrate_cancel","arguments":{"x":1}}', ["Parameter 'x' is unexpected"]),
]

# (request, the reply's "id" as QEMU 7.2 echoed it)
ID_CASES = [
    (b'{"execute":"query-status", "id": 1.5e3}', "1500"),
    (b'{"execute":"query-status", "id": "\\u00e9"}', '"\\u00E9"'),
    (b'{"execute":"query-status", "id": \'sq\'}', '"sq"'),
    (b'{"execute":"query-status", "id": 18446744073709551616}', "1.8446744073709552e+19"),
    (b'{"execute":"query-status", "id": 9223372036854775808}', "9223372036854775808"),
    (b'{"execute":"query-status", "id": -9223372036854775809}', "-9.2233720368547758e+18"),
    (b'{"execute":"query-status", "id": 0.1}', "0.10000000000000001"),
    (b'{"execute":"query-status", "id": -0}', "0"),
    (b'{"execute":"query-status", "id": null}', "null"),
    (b'{"execute":"query-status","id":{"b":1,"a":2,"status":3,"return":4}}',
     '{"status": 3, "a": 2, "b": 1, "return": 4}'),
    (b'{"execute":"query-status","id":[1, 2.5, true, false, null, "\\u00e9\\/\\u007f"]}',
     '[1, 2.5, true, false, null, "\\u00E9/\\u007F"]'),
    (b'{"execute":"query-status","id":"\\ud83d\\ude00x\\u0000"}', '"\\uD83D\\uDE00x\\u0000"'),
    (b'{"execute":"query-status","id":"\xc0\x80"}', '"\\u0000"'),
]


@pytest.fixture(scope="module")
def machine():
    m = Machine(ram_bytes=1 << 20, paused=True)
    yield m
    m.shutdown()


def _run(machine, raw: bytes, session: Optional[Session] = None) -> list[bytes]:
    """The bytes a monitor answers to ``raw`` (negotiated unless a session is given)."""
    if session is None:
        session = Session()
        session.negotiated = True
    ctx = Context(machine, session)
    out = []
    for value, err in JSONStreamer().feed(raw + b"\n"):
        if err is not None:
            out.append(encode_message({"error": {"class": "GenericError", "desc": err}}))
        else:
            out.append(encode_message(dispatch(value, ctx)))
    return out


@pytest.mark.parametrize("raw,descs", PARSE_CASES, ids=[c[0][:40].decode("latin-1") for c in PARSE_CASES])
def test_errors_match_qemu(machine, raw, descs):
    replies = [json.loads(r) for r in _run(machine, raw)]
    assert [r["error"]["desc"] for r in replies] == descs
    classes = {r["error"]["class"] for r in replies}
    want = "CommandNotFound" if b"Query-Status" in raw or b'"qmp_capabilities"' in raw else "GenericError"
    assert classes == {want}


@pytest.mark.parametrize("raw,id_text", ID_CASES, ids=[c[1][:30] for c in ID_CASES])
def test_id_echo_matches_qemu(machine, raw, id_text):
    (reply,) = _run(machine, raw)
    assert reply == (b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": '
                     + id_text.encode() + b"}\r\n")


def test_errors_before_negotiation(machine):
    s = Session()
    assert _run(machine, b'{"execute":"query-status"}', s) == [
        b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with '
        b"'qmp_capabilities'\"}}\r\n"]
    assert _run(machine, b'{"execute":"query-status","id":5}', s) == [
        b'{"id": 5, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation '
        b"with 'qmp_capabilities'\"}}\r\n"]
    # not a command-lookup failure: told as it is
    assert json.loads(_run(machine, b"[]", s)[0])["error"]["desc"] == "QMP input must be a JSON object"
    assert json.loads(_run(machine, b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}', s)[0])[
        "error"]["desc"] == "Invalid parameter type for 'enable[0]', expected: string"
    assert json.loads(_run(machine, b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}', s)[0])[
        "error"]["desc"] == "Parameter 'null' does not accept value 'foo'"
    assert not s.negotiated
    assert _run(machine, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}', s) == [
        b'{"return": {}}\r\n']
    assert s.negotiated and s.oob
    assert json.loads(_run(machine, b'{"exec-oob":"query-status","id":1}', s)[0]) == {
        "id": 1, "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}}
    assert json.loads(_run(machine, b'{"exec-oob":"migrate-pause","id":1}', s)[0])["error"]["desc"] == (
        "migrate-pause is currently only supported during postcopy-active state")
    assert json.loads(_run(machine, b'{"execute":"query-status","exec-oob":"query-status"}', s)[0])[
        "error"]["desc"] == "QMP input member 'execute' clashes with 'exec-oob'"


def test_streaming_input_is_cut_like_qemu():
    stream = JSONStreamer()
    out = list(stream.feed(b'{"execute":"query-status"'))
    assert out == []  # an open object waits for the rest, newline or not
    out = list(stream.feed(b'}{"execute":"stop","id":2}\r\n\xfe{"execute":"cont"}'))
    assert [v for v, e in out] == [{"execute": "query-status"}, {"execute": "stop", "id": 2}, None,
                                   {"execute": "cont"}]
    assert out[2][1] == "JSON parse error, stray '\ufffd'"
    deep = list(JSONStreamer().feed(b"[" * 1025))
    assert deep == [(None, "JSON nesting depth limit exceeded")]


def test_writer_matches_qemu():
    assert dumps({"a": [1, -2, 2.5, 0.0, True, None, {}], "b": []}) == (
        '{"a": [1, -2, 2.5, 0, true, null, {}], "b": []}')
    assert dumps("\"\\/\b\f\n\r\t\x01\x7f\u00e9\U0001F600") == (
        '"\\"\\\\/\\b\\f\\n\\r\\t\\u0001\\u007F\\u00E9\\uD83D\\uDE00"')
    assert dumps(1e300) == "1.0000000000000001e+300"
    with pytest.raises(QMPError) as err:
        parse_json(b'{"a": 1')
    assert "expected one JSON value" in err.value.desc


_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE)), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_write_then_parse_round_trips(value):
    text = dumps(value)
    assert text.isascii() and "\n" not in text
    assert parse_json(text) == value
    assert parse_json(dumps(parse_json(text))) == value  # key order may change (QDict's), values not


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_any_bytes_give_values_or_parse_errors(data, cuts):
    whole = list(JSONStreamer().feed(data + b"\n"))
    for value, err in whole:
        assert (err is None) or (value is None and err.startswith("JSON "))
    # how the bytes are split into reads does not matter
    stream = JSONStreamer()
    pieces, last = [], 0
    for c in sorted(set(c for c in cuts if c < len(data))):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:] + b"\n")
    chunked = [item for p in pieces for item in stream.feed(p)]
    assert chunked == whole


@pytest.fixture(scope="module")
def fuzz_machine():
    m = Machine(ram_bytes=1 << 20, paused=True)
    yield m
    m.shutdown()


_commands = st.sampled_from(["query-status", "query-migrate", "xyz", "migrate-continue",
                             "migrate-set-parameters", "migrate-set-capabilities",
                             "qmp_capabilities", "query-version"])


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={"execute": _commands | _json, "exec-oob": _json,
                                           "arguments": _json, "id": _json, "x": _json}))
def test_any_request_gets_one_reply(fuzz_machine, req):
    (reply,) = _run(fuzz_machine, dumps(req).encode())
    msg = json.loads(reply)
    assert set(msg) - {"id"} in ({"return"}, {"error"})
    assert ("id" in msg) == ("id" in req)
    if "id" in req:
        assert msg["id"] == req["id"]
    if "error" in msg:
        assert msg["error"]["class"] in ("GenericError", "CommandNotFound")
        assert "internal error" not in msg["error"]["desc"]


# --- served processes ------------------------------------------------------------------------


def test_greeting_negotiation_and_bytes(serve):
    vm = serve("vm", "--ram", "4M", "-S")
    c = Raw(vm.sock)
    try:
        assert c.line() == GREETING
        assert c.ask(b'{"execute":"query-status","id":"a"}') == (
            b'{"id": "a", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities '
            b"negotiation with 'qmp_capabilities'\"}}\r\n")
        assert c.ask(b'{"execute":"qmp_capabilities"}') == b'{"return": {}}\r\n'
        assert c.ask(b'{"execute":"query-status","id":{"k":[1]}}') == (
            b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}, '
            b'"id": {"k": [1]}}\r\n')
        assert c.ask(b'{"execute":"xyz","id":"s"}') == (
            b'{"id": "s", "error": {"class": "CommandNotFound", "desc": "The command xyz has not '
            b'been found"}}\r\n')
        # several requests in one write, the first split over two
        c.s.sendall(b'{"execute":')
        c.s.sendall(b'"query-version"}\n{"execute":"query-name"}')
        assert json.loads(c.line())["return"] == {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                  "package": "qmigx 0.1.0"}
        assert json.loads(c.line())["error"]["class"] == "CommandNotFound"
        names = {e["name"] for e in json.loads(c.ask(b'{"execute":"query-commands"}'))["return"]}
        assert {"qmp_capabilities", "migrate", "migrate-incoming", "query-migrate", "migrate_cancel",
                "migrate-continue", "query-status", "stop", "cont", "quit"} <= names
        # stop in prelaunch changes nothing; cont starts the guest with RESUME, stop pauses with STOP
        assert c.ask(b'{"execute":"stop"}') == b'{"return": {}}\r\n'
        ev = json.loads(c.ask(b'{"execute":"cont"}'))
        assert ev["event"] == "RESUME" and "data" not in ev and set(ev["timestamp"]) == {
            "seconds", "microseconds"}
        assert c.line() == b'{"return": {}}\r\n'
        assert c.ask(b'{"execute":"cont"}') == b'{"return": {}}\r\n'
        assert json.loads(c.ask(b'{"execute":"stop"}'))["event"] == "STOP"
        assert c.line() == b'{"return": {}}\r\n'
        assert json.loads(c.ask(b'{"execute":"query-status"}'))["return"]["status"] == "paused"
        ev = json.loads(c.ask(b'{"execute":"quit"}'))
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert c.line() == b'{"return": {}}\r\n'
        assert c.line() is None  # then the connection closes
        assert vm.wait() == 0
        assert not os.path.exists(vm.sock)
    finally:
        c.close()


def _statuses(events: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def _qemu_qmp():
    """The ``qemu.qmp`` package, for the tests proving compatibility with it (they skip without it)."""
    return pytest.importorskip("qemu.qmp")


async def _until(client, seen: list, status: str, timeout: float = 60) -> None:
    """Collect ``client``'s events into ``seen`` until MIGRATION ``status`` (or failure)."""
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "MIGRATION" and e["data"]["status"] == status for e in seen):
        ev = await asyncio.wait_for(client.events.get(), max(0.1, deadline - time.monotonic()))
        seen.append(dict(ev))
        ended = ev["event"] == "MIGRATION" and ev["data"]["status"] in ("failed", "cancelled")
        if ended and status not in ("failed", "cancelled"):
            raise AssertionError(f"migration {ev['data']['status']}: {seen}")


async def _error(client, cmd: str, args: Optional[dict] = None) -> tuple[str, str]:
    with pytest.raises(_qemu_qmp().ExecuteError) as err:
        await client.execute(cmd, args)
    return err.value.error_class, err.value.error.error.desc


def test_live_migration_between_served_instances(serve, sockdir):
    """A live migration driven by qemu.qmp's QMPClient, asserted as a QEMU user would.

    It proves compatibility with ``qemu.qmp`` (a real orchestrator's client), so it uses that library.
    """
    qmp = _qemu_qmp()
    src = serve("src", "--ram", "64M", "--dirty-rate", "3000")
    dst = serve("dst", "--incoming", "defer")
    uri = f"unix:{os.path.join(sockdir, 'mig.sock')}"

    async def main() -> None:
        s, d, s2 = qmp.QMPClient("src"), qmp.QMPClient("dst"), qmp.QMPClient("src-second")
        await s.connect(src.sock)
        await d.connect(dst.sock)
        await s2.connect(src.sock)  # a second monitor on the same socket
        quiet = Raw(src.sock)  # connected, never negotiated: gets no events
        try:
            assert quiet.line() == GREETING
            assert (await s.execute("query-status")) == {"status": "running", "singlestep": False,
                                                         "running": True}
            assert (await d.execute("query-status"))["status"] == "inmigrate"
            assert (await d.execute("query-migrate")) == {}
            assert await _error(d, "migrate", {"uri": uri}) == (
                "GenericError", "Guest is waiting for an incoming migration")
            caps = [{"capability": "events", "state": True}]
            assert (await s.execute("migrate-set-capabilities", {"capabilities": caps})) == {}
            await d.execute("migrate-set-capabilities", {"capabilities": caps})
            q = await s.execute("query-migrate-capabilities")
            assert {"capability": "events", "state": True} in q and len(q) == 21
            await s.execute("migrate-set-parameters", {"max-bandwidth": 48 << 20})
            assert (await s.execute("query-migrate-parameters"))["max-bandwidth"] == 48 << 20
            # destination: listen; only once
            d_events: list[dict] = []
            assert (await d.execute("migrate-incoming", {"uri": uri})) == {}
            assert await _error(d, "migrate-incoming", {"uri": uri}) == (
                "GenericError", "The incoming migration has already been started")
            assert (await d.execute("query-migrate"))["socket-address"] == [
                {"path": uri[5:], "type": "unix"}]
            # source: go, and check the refusals while it runs
            s_events: list[dict] = []
            assert (await s.execute("migrate", {"uri": uri})) == {}
            await _until(s, s_events, "active")
            info = await s.execute("query-migrate")
            assert info["status"] == "active" and "expected-downtime" in info and "ram" in info
            assert await _error(s, "migrate", {"uri": uri}) == (
                "GenericError", "There's a migration process in progress")
            assert await _error(s, "migrate-continue", {"state": "pre-switchover"}) == (
                "GenericError", "Migration not in expected state: active")
            assert await _error(s, "migrate-set-capabilities", {"capabilities": caps}) == (
                "GenericError", "There's a migration process in progress")
            await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
            await _until(s, s_events, "completed")
            await _until(d, d_events, "completed")
            # the events, exactly
            assert _statuses(s_events) == ["setup", "active", "completed"]
            assert _statuses(d_events) == ["setup", "active", "completed"]
            passes = [e["data"]["pass"] for e in s_events if e["event"] == "MIGRATION_PASS"]
            assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
            names = [e["event"] for e in s_events]
            # QEMU's order: setup, PASS 1, active, ... STOP, final PASS, completed
            assert names[:3] == ["MIGRATION", "MIGRATION_PASS", "MIGRATION"]
            assert names[-3:] == ["STOP", "MIGRATION_PASS", "MIGRATION"]
            assert names.count("STOP") == 1
            d_names = [e["event"] for e in d_events]
            assert d_names == ["MIGRATION", "MIGRATION", "RESUME", "MIGRATION"]
            assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in s_events + d_events)
            # the second negotiated monitor saw the same events; the quiet one none
            seen2: list[dict] = []
            await _until(s2, seen2, "completed", timeout=5)
            assert [e["event"] for e in seen2] == names
            assert quiet.line(timeout=0.2) is None
            # query-migrate at completion
            info = await s.execute("query-migrate")
            assert info["status"] == "completed"
            assert {"total-time", "downtime", "setup-time"} <= set(info)
            assert "expected-downtime" not in info
            ram = info["ram"]
            assert ram["total"] == (64 << 20) + (128 << 10)
            assert ram["remaining"] == 0 and ram["page-size"] == 4096
            assert ram["dirty-sync-count"] == passes[-1]
            assert ram["transferred"] > 0 and ram["normal"] > 0 and ram["duplicate"] > 0
            assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
            assert info["total-time"] >= info["setup-time"]
            assert (await d.execute("query-migrate")) == {"status": "completed"}
            # runstates after
            assert (await s.execute("query-status"))["status"] == "postmigrate"
            assert (await d.execute("query-status"))["status"] == "running"
            assert await _error(s, "migrate", {"uri": uri}) == (
                "GenericError", "Can't migrate the vm that was paused due to previous migration")
            assert await _error(d, "migrate-incoming", {"uri": uri}) == (
                "GenericError", "The incoming migration has already been started")
            # the destination holds the stopped source's memory, byte for byte
            src_ram = await s.execute("x-query-qmigx-ram")
            assert src_ram == await d.execute("x-query-qmigx-ram")
            assert [b["id"] for b in src_ram] == ["pc.ram", "pc.rom"] and src_ram[0]["sha256"]
        finally:
            quiet.close()
            for c in (s, s2, d):
                await c.disconnect()

    asyncio.run(main())


def test_legacy_client_saves_and_restores_a_paused_guest(serve, sockdir):
    """QEMUMonitorProtocol (sync): -S guest to file:, then -incoming from it.

    It proves compatibility with ``qemu.qmp``'s legacy client (as orchestrators still use it), so it
    uses that library.
    """
    QEMUMonitorProtocol = pytest.importorskip("qemu.qmp.legacy").QEMUMonitorProtocol
    from qmigx.tools.streams import load_stream
    from qmigx.synthetic import synthetic_blocks

    path = os.path.join(sockdir, "saved.mig")
    vm = serve("vm", "--ram", "16M", "-S")
    with QEMUMonitorProtocol(vm.sock) as c:
        greeting = c.connect()
        assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
        assert c.cmd("query-status")["status"] == "prelaunch"
        assert c.cmd_raw("migrate", {"uri": "bogus:x"}) == {"error": {
            "class": "GenericError", "desc": "Parameter 'uri' expects a valid migration protocol"}}
        assert c.cmd("query-migrate") == {"status": "failed"}
        assert c.cmd_raw("migrate", {"uri": "file:/x", "inc": True})["error"]["desc"] == (
            BLOCK_INCREMENTAL_REFUSED)
        assert c.cmd("migrate", uri=f"file:{path}") == {}
        deadline = time.monotonic() + 30
        while (info := c.cmd("query-migrate"))["status"] != "completed":
            assert info["status"] in ("setup", "active"), info
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get_events() == []  # capability "events" is off: no MIGRATION events
        assert c.cmd("query-status")["status"] == "postmigrate"
        digests = c.cmd("x-query-qmigx-ram")
        assert c.cmd("quit") == {}
    assert vm.wait() == 0
    # the file is a QEMU stream of the synthetic guest, with the runstate recorded
    loaded = load_stream(path)
    for blk in synthetic_blocks(16 << 20):
        assert np.array_equal(loaded.blocks[blk.idstr].memory, blk.memory), blk.idstr
    assert [hashlib.sha256(memoryview(loaded.blocks[d["id"]].memory)).hexdigest()
            for d in digests] == [d["sha256"] for d in digests]
    # restore: -incoming from the file; a stream of a prelaunch guest arrives in prelaunch
    back = serve("back", "--incoming", f"file:{path}")
    with QEMUMonitorProtocol(back.sock) as c:
        c.connect()
        deadline = time.monotonic() + 30
        while c.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.cmd("query-status") == {"status": "prelaunch", "singlestep": False, "running": False}
        assert c.cmd("x-query-qmigx-ram") == digests
        assert c.cmd_raw("migrate-incoming", {"uri": "defer"})["error"]["desc"] == (
            "The incoming migration has already been started")
        c.cmd("quit")
    assert back.wait() == 0


def _desc(client: QMPClient, cmd: str, args: Optional[dict] = None) -> str:
    """The error text ``cmd`` is refused with."""
    with pytest.raises(QMPCommandError) as err:
        client.execute_raw(cmd, args)
    return err.value.desc


def test_cancel_then_failed_destination_exits(serve, sockdir):
    src = serve("src", "--ram", "32M", "--dirty-rate", "1000")
    dst = serve("dst", "--incoming", f"unix:{os.path.join(sockdir, 'm.sock')}")
    d = QMPClient(dst.sock)
    with QMPClient(src.sock) as s:
        s.connect()
        d.connect()
        for c in (s, d):
            c.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        s.execute_raw("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        s.execute("migrate", uri=f"unix:{os.path.join(sockdir, 'm.sock')}")
        seen = []
        while "active" not in _statuses(seen):
            seen.append(s.pull_event(timeout=10.0))
        assert s.execute("migrate_cancel") == {}
        while "cancelled" not in _statuses(seen):
            seen.append(s.pull_event(timeout=10.0))
        assert _statuses(seen) == ["setup", "active", "cancelling", "cancelled"]
        assert "STOP" not in [e["event"] for e in seen]
        assert s.execute("query-migrate")["status"] == "cancelled"
        assert s.execute("query-status")["status"] == "running"  # never stopped
        # the destination lost its source mid-stream: QEMU's destination fails and exits 1
        d_seen = []
        while "failed" not in _statuses(d_seen):
            d_seen.append(d.pull_event(timeout=10.0))
        assert _statuses(d_seen) == ["active", "failed"]
        d.close()
        assert dst.wait() == 1  # the destination is gone, as a QEMU destination would be
        assert "load of migration failed" in dst.stderr()
        s.execute("quit")
    assert src.wait() == 0


def test_pause_before_switchover_and_continue(serve, sockdir):
    uri = f"unix:{os.path.join(sockdir, 'm.sock')}"
    src = serve("src", "--ram", "16M", "--dirty-rate", "500", "--cap", "events=on")
    dst = serve("dst", "--incoming", uri, "-S")
    with QMPClient(src.sock) as s, QMPClient(dst.sock) as d:
        s.connect()
        d.connect()
        s.execute("migrate-set-capabilities",
                  capabilities=[{"capability": "pause-before-switchover", "state": True}])
        s.execute("migrate", uri=uri)
        seen = []
        while "pre-switchover" not in _statuses(seen):
            seen.append(s.pull_event(timeout=10.0))
        assert [e["event"] for e in seen][-2:] == ["STOP", "MIGRATION"]  # stopped, then paused
        assert s.execute("query-status")["status"] == "finish-migrate"
        assert _desc(s, "cont") == "Migration is not finalized yet"
        assert _desc(s, "migrate-continue", {"state": "active"}) == (
            "Migration not in expected state: pre-switchover")
        assert s.execute("query-migrate")["status"] == "pre-switchover"
        assert s.execute("migrate-continue", state="pre-switchover") == {}
        while "completed" not in _statuses(seen):
            seen.append(s.pull_event(timeout=10.0))
        assert _statuses(seen) == ["setup", "active", "pre-switchover", "device", "completed"]
        deadline = time.monotonic() + 10
        while d.execute("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert d.execute("query-status")["status"] == "paused"  # -S: loaded, not started
        assert d.execute("x-query-qmigx-ram") == s.execute("x-query-qmigx-ram")
        assert d.execute("cont") == {}
        assert d.execute("query-status")["status"] == "running"
        s.execute("quit")
        d.execute("quit")
    assert src.wait() == 0 and dst.wait() == 0


def test_bad_command_lines(sockdir):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qmigx.cli.serve", *args], capture_output=True,
                              text=True, timeout=60)

    r = run("--qmp", f"unix:{sockdir}/x.sock")
    assert r.returncode == 1 and "--ram SIZE" in r.stderr
    r = run("--qmp", "bogus", "--ram", "4M")
    assert r.returncode == 1 and "unix:PATH or tcp:HOST:PORT" in r.stderr
    r = run("--qmp", f"unix:{sockdir}/x.sock", "--load", "/nonexistent", "--incoming", "defer")
    assert r.returncode == 1 and "exclude" in r.stderr


def test_sigterm_announces_shutdown_and_exits(serve):
    vm = serve("vm", "--ram", "4M")
    c = Raw(vm.sock)
    try:
        assert c.line() == GREETING
        assert c.ask(b'{"execute":"qmp_capabilities"}') == b'{"return": {}}\r\n'
        vm.proc.terminate()
        ev = json.loads(c.line())
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-signal"}
        assert c.line() is None
        assert vm.wait() == 0
    finally:
        c.close()
