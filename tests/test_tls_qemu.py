"""TLS interop with real QEMU 7.2, both directions: QEMU's migration-test TLS matrix.

Each case of QEMU's tests/qtest/migration-test.c (x509 default-host,
override-host, mismatch-host, friendly-client, hostile-client,
allow-anon-client, reject-anon-client over tcp, the unix variants; PSK
match and mismatch; multifd with x509 and PSK) runs twice:

* QEMU source (a running 64 MiB guest that keeps writing) -> qmigx
  destination: RAM received must equal the source's memory-backend-file
  at completion, byte for byte;
* qmigx source (a stream QEMU saved) -> QEMU destination (``-S
  -incoming defer``): QEMU's RAM file must equal the stream's RAM.

Credentials are created with QMP ``object-add`` on QEMU and on qmigx's
object root, as libvirt creates them. A refused migration must leave the
source ``failed`` with its guest running and memory intact; the refusing
destination stays ``inmigrate`` and listening, and the right peer then
gets through to the same destination. Where QEMU's own destination gives
up (mismatch-host: the client refuses after the server's handshake
completed) qmigx's fails too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qemu_support import streams
from qemu_support.guest import build_guest, read_marker
from qemu_support.harness import Qemu, QemuError, parse_size, qemu_binary
from qemu_support.live import first_difference, free_tcp_port, qmigx_argv, qmigx_env, tcp_listening
from qmigx.control import MigrationStatus
from qmigx.crypto import ObjectRoot
from qmigx.errors import TLSPeerRejected
from qmigx.migration import MigrationDestination, MigrationSource
from qmigx.ram import RAMBlockList
from qmigx.tools.streams import load_stream
from tls_support import CLIENT_DN, HOSTILE_DN, make_psk_dir, make_x509_dir

pytestmark = [
    pytest.mark.qemu,
]

S = MigrationStatus
RAM = "64M"
SEED = 0x7150_0001
KEY = bytes(range(32))


def _gnutls_ok() -> bool:
    from qmigx._core import gnutls

    return gnutls.available()


needs_gnutls = pytest.mark.skipif(not _gnutls_ok(), reason="libgnutls.so.30 not available")


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


@pytest.fixture(scope="module")
def guest_kernel(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("guest") / "guest.bin"
    p.write_bytes(build_guest(SEED, parse_size(RAM), dirty=True))
    return p


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qxq-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Creds:
    """One test's credential directories (fresh keys every test)."""

    def __init__(self, root: Path, *, hosts=("127.0.0.1",)) -> None:
        self.hostile = root / "hostile"
        self.anon = root / "anon"
        self.x509 = make_x509_dir(root / "x509", hosts=hosts,
                                  other_clients={self.hostile: HOSTILE_DN, self.anon: None}).path
        self.psk = make_psk_dir(root / "psk", {"qemu": KEY})
        self.psk_wrong = make_psk_dir(root / "psk-wrong", {"qemu": bytes(32)})


#: the matrix: name -> (server side, client side, outcome)
#:   server/client: kind (x509|psk), directory attribute, extra properties, params
#:   outcome: "ok", "refused" (the server refuses the client: the destination listens on),
#:            "client-refuses" (the client refuses the server, the destination then fails)
X509 = {
    "default-host": dict(hosts=("127.0.0.1",)),
    "override-host": dict(hosts=("qemu.org",), client_params={"tls-hostname": "qemu.org"}),
    "mismatch-host": dict(hosts=("10.0.0.1",), outcome="client-refuses",
                          error="Certificate does not match the hostname 127.0.0.1"),
    "friendly-client": dict(authz=CLIENT_DN),
    "hostile-client": dict(authz=CLIENT_DN, client_dir="hostile", outcome="refused",
                           error=f"TLS x509 authz check for {HOSTILE_DN} is denied"),
    "allow-anon-client": dict(client_dir="anon", server_props={"verify-peer": False}),
    "reject-anon-client": dict(client_dir="anon", outcome="refused"),
}


def creds_args(kind: str, d: Path, endpoint: str, props=None) -> dict:
    return {"qom-type": f"tls-creds-{kind}", "id": "tls0", "dir": str(d), "endpoint": endpoint,
            **(props or {})}


def server_objects(kind: str, d: Path, *, authz=None, props=None) -> list[dict]:
    out = [creds_args(kind, d, "server", props)]
    if authz is not None:
        out.append({"qom-type": "authz-simple", "id": "auth0", "identity": authz})
    return out


def qmigx_objects(args: list[dict]) -> ObjectRoot:
    root = ObjectRoot()
    for a in args:
        root.add(a)
    return root


# --- QEMU source -> qmigx destination ---------------------------------------------------------


@contextlib.contextmanager
def qemu_source(tmp_path: Path, guest_kernel: Path, name: str = "src"):
    """A QEMU whose guest runs and keeps writing its RAM."""
    with Qemu(ram=RAM, kernel=guest_kernel, workdir=tmp_path, name=name) as vm:
        vm.wait_guest_ready(60, min_counter=100)
        yield vm


def qemu_client_creds(vm: Qemu, kind: str, d: Path, params=None) -> None:
    try:
        vm.cmd("object-del", id="tls0")
    except QemuError:
        pass
    vm.cmd("object-add", **creds_args(kind, d, "client"))
    vm.set_parameters({"tls-creds": "tls0", "tls-hostname": "", **(params or {})})


def qemu_migrate_expect_failure(vm: Qemu, uri: str, timeout: float = 60) -> dict:
    """QEMU fails the migration; its guest keeps running (memory intact: it keeps counting)."""
    before = read_marker(vm.read_ram()).counter
    vm.migrate(uri)
    with pytest.raises(QemuError) as ei:
        vm.wait_migration(timeout)
    assert "migration failed" in str(ei.value), ei.value
    info = vm.query_migrate()
    assert info["status"] == "failed"
    deadline = time.monotonic() + 20
    while read_marker(vm.read_ram()).counter <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.status() == "running"
    assert read_marker(vm.read_ram()).counter > before, "the source's guest stopped"
    return info


def qemu_migrate_into(vm: Qemu, dst: MigrationDestination, uri: str) -> None:
    vm.migrate(uri)
    st = vm.wait_migration(120)
    assert st["status"] == "completed"
    assert dst.wait(60) == S.COMPLETED, dst.error
    assert vm.status() == "postmigrate"
    diff = first_difference(bytes(dst.blocks["mem0"].memory), vm.read_ram())
    assert diff is None, f"mem0 received by qmigx: {diff}"


def _dest(objects: ObjectRoot, uri: str, caps=(), params=None) -> MigrationDestination:
    dst = MigrationDestination(objects=objects, accept_timeout=120, io_timeout=60)
    if caps:
        dst.capabilities.set_many([(c, True) for c in caps], incoming=True)
    dst.parameters.set({"tls-creds": "tls0", **(params or {})})
    dst.incoming(uri)
    return dst


@pytest.mark.parametrize("case", list(X509))
def test_x509_qemu_to_qmigx(tmp_path, guest_kernel, case):
    spec = X509[case]
    c = Creds(tmp_path / "creds", hosts=spec["hosts"] if "hosts" in spec else ("127.0.0.1",))
    objs = qmigx_objects(server_objects("x509", c.x509, authz=spec.get("authz"),
                                        props=spec.get("server_props")))
    dst = _dest(objs, "tcp:127.0.0.1:0", params={"tls-authz": "auth0"} if spec.get("authz") else {})
    client_dir = getattr(c, spec.get("client_dir", "x509"))
    outcome = spec.get("outcome", "ok")
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, "x509", client_dir, spec.get("client_params"))
        if outcome == "ok":
            qemu_migrate_into(vm, dst, dst.connect_uri)
            assert not dst.refused
            return
        info = qemu_migrate_expect_failure(vm, dst.connect_uri)
        if outcome == "client-refuses":
            assert spec["error"] in info["error-desc"]
            assert dst.wait(30) == S.FAILED  # QEMU's destination gives up here too
            return
        # refused by the destination, which keeps listening for the right client
        deadline = time.monotonic() + 10
        while not dst.refused and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dst.refused and isinstance(dst.refused[0][1], TLSPeerRejected)
        if "error" in spec:
            assert spec["error"] in dst.refused[0][1].message
        assert dst.state.state == S.NONE
        qemu_client_creds(vm, "x509", c.x509)
        qemu_migrate_into(vm, dst, dst.connect_uri)


def test_x509_unix_qemu_to_qmigx(tmp_path, guest_kernel, sockdir):
    """Over unix QEMU needs tls-hostname; with it the migration goes through."""
    c = Creds(tmp_path / "creds")
    uri = f"unix:{sockdir}/m.sock"
    dst = _dest(qmigx_objects(server_objects("x509", c.x509)), uri)
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, "x509", c.x509)
        info = qemu_migrate_expect_failure(vm, uri)
        assert info["error-desc"] == "No hostname for certificate validation"
        assert dst.wait(30) == S.FAILED  # the stream ended at once (QEMU's destination quits too)
        dst2 = _dest(qmigx_objects(server_objects("x509", c.x509)), uri)
        qemu_client_creds(vm, "x509", c.x509, {"tls-hostname": "127.0.0.1"})
        qemu_migrate_into(vm, dst2, uri)


@needs_gnutls
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_psk_qemu_to_qmigx(tmp_path, guest_kernel, sockdir, transport):
    c = Creds(tmp_path / "creds")
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{sockdir}/m.sock"
    dst = _dest(qmigx_objects(server_objects("psk", c.psk)), uri)
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, "psk", c.psk)
        qemu_migrate_into(vm, dst, dst.connect_uri)


@needs_gnutls
def test_psk_mismatch_qemu_to_qmigx(tmp_path, guest_kernel):
    c = Creds(tmp_path / "creds")
    dst = _dest(qmigx_objects(server_objects("psk", c.psk)), "tcp:127.0.0.1:0")
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, "psk", c.psk_wrong)
        qemu_migrate_expect_failure(vm, dst.connect_uri)
        deadline = time.monotonic() + 10
        while not dst.refused and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dst.refused and dst.state.state == S.NONE
        qemu_client_creds(vm, "psk", c.psk)
        qemu_migrate_into(vm, dst, dst.connect_uri)


@pytest.mark.parametrize("kind", ["x509", pytest.param("psk", marks=needs_gnutls)])
def test_multifd_qemu_to_qmigx(tmp_path, guest_kernel, kind):
    c = Creds(tmp_path / "creds")
    d = c.x509 if kind == "x509" else c.psk
    dst = _dest(qmigx_objects(server_objects(kind, d)), "tcp:127.0.0.1:0", caps=("multifd",),
                params={"multifd-channels": 4})
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, kind, d)
        vm.set_capabilities({"multifd": True})
        vm.set_parameters({"multifd-channels": 4})
        qemu_migrate_into(vm, dst, dst.connect_uri)
        assert vm.query_migrate()["ram"]["multifd-bytes"] > 0


def test_exec_qemu_to_qmigx(tmp_path, guest_kernel, sockdir):
    """QEMU wraps ``exec:`` in TLS too: its command relays to qmigx's unix listener."""
    from test_tls import RELAY

    c = Creds(tmp_path / "creds")
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    dst = _dest(qmigx_objects(server_objects("x509", c.x509)), f"unix:{sockdir}/m.sock")
    with qemu_source(tmp_path, guest_kernel) as vm:
        qemu_client_creds(vm, "x509", c.x509, {"tls-hostname": "127.0.0.1"})
        qemu_migrate_into(vm, dst, f"exec:{sys.executable} {relay} {sockdir}/m.sock")


def test_cli_incoming_from_qemu(tmp_path, guest_kernel):
    """``qmigx incoming --object ...``: refuses a hostile QEMU, says so, takes the friendly one."""
    c = Creds(tmp_path / "creds")
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    rd = tmp_path / "rd"
    err_path = tmp_path / "incoming.stderr"
    argv = qmigx_argv("incoming", uri, "--ram-dir", rd,
                      "--object", f"tls-creds-x509,id=tls0,dir={c.x509},endpoint=server",
                      "--object", f"authz-simple,id=auth0,identity={CLIENT_DN.replace(',', ',,')}",
                      "--param", "tls-creds=tls0", "--param", "tls-authz=auth0")
    with open(err_path, "wb") as err:
        inc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                               env=qmigx_env())
    try:
        deadline = time.monotonic() + 30
        while not tcp_listening(port):
            assert inc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.02)
        with qemu_source(tmp_path, guest_kernel) as vm:
            qemu_client_creds(vm, "x509", c.hostile)
            qemu_migrate_expect_failure(vm, uri)
            assert inc.poll() is None  # still listening
            qemu_client_creds(vm, "x509", c.x509)
            vm.migrate(uri)
            assert vm.wait_migration(120)["status"] == "completed"
            assert inc.wait(60) == 0, err_path.read_text()
            assert first_difference((rd / "mem0.bin").read_bytes(), vm.read_ram()) is None
        text = err_path.read_text()
        assert f"TLS x509 authz check for {HOSTILE_DN} is denied" in text
    finally:
        if inc.poll() is None:
            inc.kill()
            inc.wait(10)


# --- qmigx source -> QEMU destination ---------------------------------------------------------


def stream_source(objects: ObjectRoot, *, caps=(), params=None) -> tuple[MigrationSource, bytes]:
    """A qmigx source replaying a stream QEMU saved; and the RAM it must deliver."""
    info = streams.get_stream("pc-paused")
    loaded = load_stream(info.stream)
    blocks = RAMBlockList()
    for b in loaded.ram_setup.blocks:
        blocks.add(loaded.blocks[b.idstr])
    src = MigrationSource(blocks, devices=loaded.sections, vmdesc=loaded.vmdesc,
                          machine_type=loaded.configuration.machine_type, globalstate=False,
                          ram_section_id=loaded.ram_setup.section.section_id, objects=objects,
                          connect_timeout=20, io_timeout=60)
    if caps:
        src.capabilities.set_many([(c, True) for c in caps])
    src.parameters.set({"tls-creds": "tls0", **(params or {})})
    return src, Path(info.mem).read_bytes()


@contextlib.contextmanager
def qemu_destination(tmp_path: Path, objects: list[dict], *, uri: str, params=None, caps=(),
                     name="dst"):
    """A paused QEMU listening on ``uri`` with TLS (``-S -incoming defer``, then QMP)."""
    info = streams.get_stream("pc-paused")
    with Qemu(ram=RAM, kernel=info.kernel, mem_path=tmp_path / f"{name}.ram", paused=True,
              incoming=True, workdir=tmp_path, name=name) as vm:
        for a in objects:
            vm.cmd("object-add", **a)
        if caps:
            vm.set_capabilities({c: True for c in caps})
        vm.set_parameters({"tls-creds": "tls0", **(params or {})})
        vm.migrate_incoming(uri)
        yield vm


def send_into(src: MigrationSource, want: bytes, vm: Qemu, uri: str) -> None:
    src.migrate(uri)
    assert src.wait(120) == S.COMPLETED, src.error
    assert vm.wait_migration(60)["status"] == "completed"
    diff = first_difference(vm.mem_path.read_bytes(), want)
    assert diff is None, f"QEMU destination's mem0: {diff}"


def qemu_still_listening(vm: Qemu) -> None:
    time.sleep(0.3)
    assert vm.alive and vm.status() == "inmigrate"
    assert "status" not in vm.query_migrate()


@pytest.mark.parametrize("case", list(X509))
def test_x509_qmigx_to_qemu(tmp_path, case):
    spec = X509[case]
    c = Creds(tmp_path / "creds", hosts=spec["hosts"] if "hosts" in spec else ("127.0.0.1",))
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    params = {"tls-authz": "auth0"} if spec.get("authz") else {}
    with qemu_destination(tmp_path, server_objects("x509", c.x509, authz=spec.get("authz"),
                                                   props=spec.get("server_props")),
                          uri=uri, params=params) as vm:
        client_dir = getattr(c, spec.get("client_dir", "x509"))
        src, want = stream_source(qmigx_objects([creds_args("x509", client_dir, "client")]),
                                  params=spec.get("client_params"))
        outcome = spec.get("outcome", "ok")
        if outcome == "ok":
            send_into(src, want, vm, uri)
            return
        before = {b.idstr: bytes(b.memory) for b in src.blocks}
        src.migrate(uri)
        assert src.wait(120) == S.FAILED
        assert src.guest.running and src.query()["status"] == "failed"
        assert {b.idstr: bytes(b.memory) for b in src.blocks} == before
        if outcome == "client-refuses":
            assert isinstance(src.error, TLSPeerRejected)
            assert spec["error"] in src.error.message
            return  # QEMU's destination read an empty stream and gives up, as with a QEMU source
        qemu_still_listening(vm)
        good, want = stream_source(qmigx_objects([creds_args("x509", c.x509, "client")]))
        send_into(good, want, vm, uri)
    if "error" in spec and outcome == "refused":
        assert spec["error"] in vm.log_path.read_text()


def test_x509_unix_qmigx_to_qemu(tmp_path, sockdir):
    c = Creds(tmp_path / "creds")
    uri = f"unix:{sockdir}/m.sock"
    with qemu_destination(tmp_path, server_objects("x509", c.x509), uri=uri) as vm:
        src, _ = stream_source(qmigx_objects([creds_args("x509", c.x509, "client")]))
        src.migrate(uri)
        assert src.wait(60) == S.FAILED
        assert src.error.message.endswith("No hostname for certificate validation")
    with qemu_destination(tmp_path, server_objects("x509", c.x509), uri=uri, name="dst2") as vm:
        src, want = stream_source(qmigx_objects([creds_args("x509", c.x509, "client")]),
                                  params={"tls-hostname": "127.0.0.1"})
        send_into(src, want, vm, uri)


@needs_gnutls
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_psk_qmigx_to_qemu(tmp_path, sockdir, transport):
    c = Creds(tmp_path / "creds")
    uri = f"tcp:127.0.0.1:{free_tcp_port()}" if transport == "tcp" else f"unix:{sockdir}/m.sock"
    with qemu_destination(tmp_path, server_objects("psk", c.psk), uri=uri,
                          caps=("return-path",)) as vm:
        src, want = stream_source(qmigx_objects([creds_args("psk", c.psk, "client")]),
                                  caps=("return-path",))
        send_into(src, want, vm, uri)


@needs_gnutls
def test_psk_mismatch_qmigx_to_qemu(tmp_path):
    c = Creds(tmp_path / "creds")
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    with qemu_destination(tmp_path, server_objects("psk", c.psk), uri=uri) as vm:
        src, _ = stream_source(qmigx_objects([creds_args("psk", c.psk_wrong, "client")]))
        before = {b.idstr: bytes(b.memory) for b in src.blocks}
        src.migrate(uri)
        assert src.wait(60) == S.FAILED
        assert {b.idstr: bytes(b.memory) for b in src.blocks} == before
        qemu_still_listening(vm)
        good, want = stream_source(qmigx_objects([creds_args("psk", c.psk, "client")]))
        send_into(good, want, vm, uri)


@pytest.mark.parametrize("kind", ["x509", pytest.param("psk", marks=needs_gnutls)])
def test_multifd_qmigx_to_qemu(tmp_path, kind):
    c = Creds(tmp_path / "creds")
    d = c.x509 if kind == "x509" else c.psk
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    with qemu_destination(tmp_path, server_objects(kind, d), uri=uri, caps=("multifd",),
                          params={"multifd-channels": 4}) as vm:
        src, want = stream_source(qmigx_objects([creds_args(kind, d, "client")]), caps=("multifd",),
                                  params={"multifd-channels": 4})
        send_into(src, want, vm, uri)
        assert src.query()["ram"]["multifd-bytes"] > 0


def test_exec_qmigx_to_qemu(tmp_path, sockdir):
    from test_tls import RELAY

    c = Creds(tmp_path / "creds")
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    uri = f"unix:{sockdir}/m.sock"
    with qemu_destination(tmp_path, server_objects("x509", c.x509), uri=uri) as vm:
        src, want = stream_source(qmigx_objects([creds_args("x509", c.x509, "client")]),
                                  params={"tls-hostname": "127.0.0.1"})
        send_into(src, want, vm, f"exec:{sys.executable} {relay} {sockdir}/m.sock")


def test_cli_send_to_qemu(tmp_path):
    """``qmigx send --object ...`` into a QEMU destination with authz."""
    c = Creds(tmp_path / "creds")
    info = streams.get_stream("pc-paused")
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    with qemu_destination(tmp_path, server_objects("x509", c.x509, authz=CLIENT_DN), uri=uri,
                          params={"tls-authz": "auth0"}) as vm:
        r = subprocess.run(qmigx_argv("send", info.stream, uri,
                                      "--object", f"tls-creds-x509,id=tls0,dir={c.x509}",
                                      "--param", "tls-creds=tls0"),
                           capture_output=True, text=True, timeout=120, env=qmigx_env())
        assert r.returncode == 0, r.stderr[-3000:]
        assert vm.wait_migration(60)["status"] == "completed"
        assert first_difference(vm.mem_path.read_bytes(), Path(info.mem).read_bytes()) is None


# --- QMP: object-add through qmigx serve, as an orchestrator would -----------------------------


def test_serve_object_add_and_tls_migration_to_qemu(tmp_path):
    """``qmigx serve`` driven over QMP: object-add, tls parameters, migrate into QEMU."""
    from qemu_support.qmp import QMPClient

    c = Creds(tmp_path / "creds")
    info = streams.get_stream("pc-paused")
    sock = tmp_path / "src.qmp"
    proc = subprocess.Popen(qmigx_argv("serve", "--qmp", f"unix:{sock}", "--load", info.stream, "-S"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=qmigx_env())
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    q = QMPClient(str(sock), timeout=30)
    try:
        q.connect(timeout=30, alive=lambda: proc.poll() is None)
        types = q.execute("qom-list-types", implements="tls-creds")
        assert {t["name"] for t in types} >= {"tls-creds-x509", "tls-creds-psk"}
        with pytest.raises(Exception) as ei:
            q.execute("migrate", uri="rdma:127.0.0.1:4444")
        assert "Parameter 'uri' expects a valid migration protocol" in str(ei.value)
        assert "RDMA transport is not supported" in str(ei.value)
        q.execute("object-add", **creds_args("x509", c.x509, "client"))
        q.execute_raw("migrate-set-parameters", {"tls-creds": "tls0"})
        assert q.execute("query-migrate-parameters")["tls-creds"] == "tls0"
        with qemu_destination(tmp_path, server_objects("x509", c.x509), uri=uri) as vm:
            q.execute("migrate", uri=uri)
            assert vm.wait_migration(60)["status"] == "completed"
            deadline = time.monotonic() + 30
            while q.execute("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert first_difference(vm.mem_path.read_bytes(), Path(info.mem).read_bytes()) is None
        q.execute("object-del", id="tls0")
        with pytest.raises(Exception) as ei:
            q.execute("object-del", id="tls0")
        assert "object 'tls0' not found" in str(ei.value)
        q.execute("quit")
        proc.wait(30)
    finally:
        q.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


# --- object-add / object-del replies, byte for byte against QEMU --------------------------------


def test_object_replies_match_qemu(tmp_path, sockdir):
    """The same object-add / object-del requests get the same replies from QEMU and qmigx serve."""
    from test_qmp import Served
    from test_qmp_qemu import _masked, _replies
    from test_tls_objects import QMP_ERRORS, _fill

    from tls_support import self_signed

    good = make_x509_dir(tmp_path / "good")
    expired = make_x509_dir(tmp_path / "expired", server_expired=True)
    foreign = make_x509_dir(tmp_path / "foreign")
    self_signed(foreign)
    swapped = make_x509_dir(tmp_path / "swapped")
    for part in ("cert", "key"):
        os.replace(swapped.path / f"client-{part}.pem", swapped.path / f"server-{part}.pem")
    psk = make_psk_dir(tmp_path / "psk", {"qemu": KEY})
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "ca-cert.pem").write_text("junk\n")
    dirs = {"empty": str(empty), "junk": str(junk)}
    requests = [_fill(args, dirs) for args, _ in QMP_ERRORS] + [
        creds_args("x509", good.path, "server"),
        creds_args("x509", good.path, "client") | {"id": "tls1"},
        creds_args("x509", expired.path, "server") | {"id": "e"},
        creds_args("x509", foreign.path, "server") | {"id": "f"},
        creds_args("x509", swapped.path, "server") | {"id": "s"},
        creds_args("psk", psk, "client") | {"id": "p", "username": "bob"},
        creds_args("psk", psk, "server") | {"id": "p"},
        {"qom-type": "authz-simple", "id": "a1", "identity": CLIENT_DN},
        {"qom-type": "authz-simple", "id": "a1", "identity": "CN=y"},
        {"qom-type": "authz-list", "id": "l1", "policy": "allow",
         "rules": [{"match": "CN=*", "format": "glob", "policy": "deny"}]},
    ]
    raw = [json.dumps({"execute": "object-add", "arguments": a}).encode() for a in requests]
    raw += [json.dumps({"execute": "object-del", "arguments": {"id": i}}).encode()
            for i in ("a1", "a1", "nonexist", "tls0", "l1")]
    qsock = os.path.join(sockdir, "qemu.sock")
    proc = subprocess.Popen(
        [qemu_binary(), "-qmp", f"unix:{qsock},server=on,wait=off", "-S", "-nodefaults", "-nographic",
         "-display", "none", "-M", "pc", "-m", "32"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(qsock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ours = Served("vm", "--ram", "32M", "-S", sockdir=str(sockdir))
        theirs = _masked(_replies(qsock, raw))
        mine = _masked(_replies(ours.sock, raw))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if ours is not None:
            ours.close()
    n = len(theirs) - len(raw) - 1  # the greeting and negotiation replies come first
    diffs = [(r, q, o) for r, q, o in zip(raw, theirs[n:], mine[n:]) if q != o]
    assert not diffs, "\n".join(f"{r.decode()}\n  qemu:  {q}\n  qmigx: {o}" for r, q, o in diffs)
    assert sum(b'"return": {}' in line for lines in mine for line in lines) >= 8
