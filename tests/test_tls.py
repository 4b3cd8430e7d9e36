"""Migration over TLS between qmigx peers: every channel, refusals, and bad input.

Accepted migrations must deliver RAM byte for byte. Refused ones must end
the source ``failed`` with its memory and guest intact, while the
destination refuses the peer, says why, and keeps listening for the right
one. Bad input (no TLS, garbage, a truncated record, a stalled handshake,
expired or foreign certificates) must end in a typed error within the
timeout, leaving no thread or fd behind. Interop with QEMU 7.2 is in
tests/test_tls_qemu.py.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qmigx
from qmigx import transport
from qmigx.crypto import ObjectRoot, TLSSettings
from qmigx.errors import (ChannelTimeout, MigrationError, ObjectError, StreamError, TLSError,
                          TLSPeerRejected)
from qmigx.migration import MigrationDestination, MigrationSource
from qmigx.control import MigrationStatus
from tls_support import CLIENT_DN, HOSTILE_DN, make_psk_dir, make_x509_dir, self_signed

S = MigrationStatus
RAM = 8 << 20
KEY = bytes(range(32))


def _gnutls_ok() -> bool:
    from qmigx._core import gnutls

    return gnutls.available()


needs_gnutls = pytest.mark.skipif(not _gnutls_ok(), reason="libgnutls.so.30 not available")


@pytest.fixture
def sockdir():
    import tempfile
    import shutil

    d = tempfile.mkdtemp(prefix="qxtls-")  # short: unix socket paths are limited
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def guest_blocks(seed: int = 1) -> qmigx.RAMBlockList:
    blk = qmigx.RAMBlock.anonymous("pc.ram", RAM)
    mem = np.frombuffer(blk.memory, np.uint8)
    rng = np.random.default_rng(seed)
    pages = rng.choice(RAM // 4096, RAM // 4096 // 2, replace=False)
    for p in pages:  # half the pages random, the rest zero
        mem[p * 4096:(p + 1) * 4096] = rng.integers(0, 256, 4096, dtype=np.uint8)
    return qmigx.RAMBlockList([blk])


def x509_objects(d, endpoint: str, **props) -> ObjectRoot:
    root = ObjectRoot()
    root.add({"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(d), "endpoint": endpoint,
              **props})
    return root


def psk_objects(d, endpoint: str, **props) -> ObjectRoot:
    root = ObjectRoot()
    root.add({"qom-type": "tls-creds-psk", "id": "tls0", "dir": str(d), "endpoint": endpoint,
              **props})
    return root


def destination(uri: str, objects: ObjectRoot, *, params=None, caps=(), accept_timeout=30.0,
                io_timeout=20.0) -> MigrationDestination:
    dst = MigrationDestination(objects=objects, accept_timeout=accept_timeout, io_timeout=io_timeout)
    if caps:
        dst.capabilities.set_many([(c, True) for c in caps], incoming=True)
    dst.parameters.set({"tls-creds": "tls0", **(params or {})})
    dst.incoming(uri)
    return dst


def source(objects: ObjectRoot, *, params=None, caps=(), seed=1, plain=False) -> MigrationSource:
    src = MigrationSource(guest_blocks(seed), objects=objects, connect_timeout=10.0, io_timeout=20.0)
    if caps:
        src.capabilities.set_many([(c, True) for c in caps])
    if not plain:
        src.parameters.set({"tls-creds": "tls0", **(params or {})})
    return src


def ram(side) -> bytes:
    return bytes(side.blocks["pc.ram"].memory)


def assert_delivered(src: MigrationSource, dst: MigrationDestination) -> None:
    assert src.wait(60) == S.COMPLETED, src.error
    assert dst.wait(60) == S.COMPLETED, dst.error
    assert ram(dst) == ram(src)


def assert_refused_source(src: MigrationSource, before: bytes) -> None:
    """The source failed, its guest runs again and its memory is what it was."""
    assert src.wait(60) == S.FAILED, src.query()
    assert src.query()["status"] == "failed" and src.query().get("error-desc")
    assert src.guest.running
    assert ram(src) == before


# --- accepted migrations ------------------------------------------------------------------


@pytest.mark.parametrize("transport_name", ["tcp", "unix"])
@pytest.mark.parametrize("caps", [(), ("return-path",), ("multifd",)], ids=["plain", "rp", "multifd"])
def test_x509_every_channel(tmp_path, sockdir, transport_name, caps):
    d = make_x509_dir(tmp_path / "x509")
    uri = "tcp:127.0.0.1:0" if transport_name == "tcp" else f"unix:{sockdir}/m.sock"
    params = {"multifd-channels": 4} if "multifd" in caps else {}
    dst = destination(uri, x509_objects(d, "server"), params=params, caps=caps)
    sparams = dict(params, **({"tls-hostname": "127.0.0.1"} if transport_name == "unix" else {}))
    src = source(x509_objects(d, "client"), params=sparams, caps=caps)
    src.migrate(dst.connect_uri)
    assert_delivered(src, dst)
    assert not dst.refused
    if "multifd" in caps:
        assert src.query()["ram"]["multifd-bytes"] > 0


@needs_gnutls
@pytest.mark.parametrize("transport_name", ["tcp", "unix"])
@pytest.mark.parametrize("caps", [(), ("return-path",), ("multifd",)], ids=["plain", "rp", "multifd"])
def test_psk_every_channel(tmp_path, sockdir, transport_name, caps):
    d = make_psk_dir(tmp_path / "psk", {"qemu": KEY})
    uri = "tcp:127.0.0.1:0" if transport_name == "tcp" else f"unix:{sockdir}/m.sock"
    params = {"multifd-channels": 3} if "multifd" in caps else {}
    dst = destination(uri, psk_objects(d, "server"), params=params, caps=caps)
    src = source(psk_objects(d, "client"), params=params, caps=caps)  # no hostname needed
    src.migrate(dst.connect_uri)
    assert_delivered(src, dst)


def test_x509_authz_friendly_client_and_the_dn_it_sees(tmp_path):
    d = make_x509_dir(tmp_path / "x509")
    objs = x509_objects(d, "server")
    objs.add({"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    dst = destination("tcp:127.0.0.1:0", objs, params={"tls-authz": "auth0"},
                      caps=("return-path",))
    src = source(x509_objects(d, "client"), caps=("return-path",))
    src.migrate(dst.connect_uri)
    assert_delivered(src, dst)


def test_x509_override_host(tmp_path):
    d = make_x509_dir(tmp_path / "x509", hosts=("qemu.org",))
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"))
    src = source(x509_objects(d, "client"), params={"tls-hostname": "qemu.org"})
    src.migrate(dst.connect_uri)
    assert_delivered(src, dst)


def test_x509_allow_anon_client(tmp_path):
    d = make_x509_dir(tmp_path / "x509", client_dn=None)
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server", **{"verify-peer": False}))
    src = source(x509_objects(d, "client"))
    src.migrate(dst.connect_uri)
    assert_delivered(src, dst)


def test_exec_channels_are_wrapped_too(tmp_path, sockdir):
    """``exec:`` carries TLS as sockets do (QEMU wraps it too): here through a relay command."""
    d = make_x509_dir(tmp_path / "x509")
    dst = destination(f"unix:{sockdir}/m.sock", x509_objects(d, "server"), caps=("return-path",))
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    src = source(x509_objects(d, "client"), params={"tls-hostname": "127.0.0.1"},
                 caps=("return-path",))
    src.migrate(f"exec:{sys.executable} {relay} {sockdir}/m.sock")
    assert_delivered(src, dst)


#: stdin/stdout <-> a unix socket, both ways
RELAY = """
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def up():
    while (b := os.read(0, 1 << 16)):
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while (b := s.recv(1 << 16)):
    os.write(1, b)
"""


def test_file_uri_refuses_tls(tmp_path):
    with pytest.raises(MigrationError) as ei:
        transport.connect(f"file:{tmp_path}/f", options=transport.ConnectionOptions(
            tls=TLSSettings(ObjectRoot(), "tls0")))
    assert "tls-creds" in str(ei.value)


# --- refusals --------------------------------------------------------------------------------


def refused_then_right_peer(dst, bad_src, good_src):
    """``bad_src`` fails, the destination keeps listening, ``good_src`` then gets through."""
    before = ram(bad_src)
    bad_src.migrate(dst.connect_uri)
    assert_refused_source(bad_src, before)
    deadline = time.monotonic() + 10
    while not dst.refused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dst.refused, "the destination did not report the refused peer"
    # still waiting, as QEMU: no status yet, only the address it listens on
    assert dst.state.state == S.NONE and "status" not in dst.query()
    assert dst.query()["socket-address"]
    good_src.migrate(dst.connect_uri)
    assert_delivered(good_src, dst)
    return dst.refused[0][1]


def test_x509_hostile_client_is_refused_by_authz(tmp_path):
    hostile = tmp_path / "hostile"  # a certificate from the same CA, another name
    d = make_x509_dir(tmp_path / "x509", other_clients={hostile: HOSTILE_DN})
    objs = x509_objects(d, "server")
    objs.add({"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    dst = destination("tcp:127.0.0.1:0", objs, params={"tls-authz": "auth0"})
    err = refused_then_right_peer(dst, source(x509_objects(hostile, "client"), seed=2),
                                  source(x509_objects(d, "client")))
    assert isinstance(err, TLSPeerRejected)
    assert f"TLS x509 authz check for {HOSTILE_DN} is denied" in err.message
    assert err.peer == HOSTILE_DN


def test_x509_reject_anon_client(tmp_path):
    anon = tmp_path / "anon"
    d = make_x509_dir(tmp_path / "x509", other_clients={anon: None})
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"))
    err = refused_then_right_peer(dst, source(x509_objects(anon, "client"), seed=2),
                                  source(x509_objects(d, "client")))
    assert isinstance(err, TLSPeerRejected) and "No certificate peers" in err.message


def test_x509_mismatch_host_is_refused_by_the_client(tmp_path):
    d = make_x509_dir(tmp_path / "x509", hosts=("10.0.0.1",))
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"))
    src = source(x509_objects(d, "client"))
    before = ram(src)
    src.migrate(dst.connect_uri)
    assert_refused_source(src, before)
    assert src.error.message.endswith("Certificate does not match the hostname 127.0.0.1")
    assert isinstance(src.error, TLSPeerRejected)
    # as with QEMU, the server finished its handshake: the stream then just ends
    assert dst.wait(30) == S.FAILED
    assert isinstance(dst.error, (StreamError, MigrationError))


def test_x509_unix_needs_a_hostname(tmp_path, sockdir):
    d = make_x509_dir(tmp_path / "x509")
    dst = destination(f"unix:{sockdir}/m.sock", x509_objects(d, "server"))
    src = source(x509_objects(d, "client"))
    before = ram(src)
    src.migrate(dst.connect_uri)
    assert_refused_source(src, before)
    assert src.error.message.endswith("No hostname for certificate validation")
    dst.cancel()
    dst.wait(10)


@needs_gnutls
def test_psk_mismatch_is_refused(tmp_path):
    d = make_psk_dir(tmp_path / "psk", {"qemu": KEY})
    wrong = make_psk_dir(tmp_path / "wrong", {"qemu": bytes(32)})
    dst = destination("tcp:127.0.0.1:0", psk_objects(d, "server"))
    err = refused_then_right_peer(dst, source(psk_objects(wrong, "client"), seed=2),
                                  source(psk_objects(d, "client")))
    assert isinstance(err, TLSError)


@pytest.mark.parametrize("case", ["missing", "not-creds", "wrong-endpoint"])
def test_source_credentials_are_checked_with_qemus_texts(tmp_path, case):
    d = make_x509_dir(tmp_path / "x509")
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"), accept_timeout=5)
    objs = ObjectRoot()
    if case == "not-creds":
        objs.add({"qom-type": "authz-simple", "id": "tls0", "identity": "x"})
    elif case == "wrong-endpoint":
        objs = x509_objects(d, "server")
    src = source(objs)
    before = ram(src)
    src.migrate(dst.connect_uri)
    assert_refused_source(src, before)
    want = {"missing": "No TLS credentials with id 'tls0'",
            "not-creds": "Object with id 'tls0' is not TLS credentials",
            "wrong-endpoint": "Expected TLS credentials for a client endpoint"}[case]
    assert src.error.message == want and isinstance(src.error, ObjectError)
    dst.cancel()
    dst.wait(10)


def test_destination_without_its_credentials_refuses_and_keeps_listening(tmp_path):
    d = make_x509_dir(tmp_path / "x509")
    objs = ObjectRoot()
    dst = destination("tcp:127.0.0.1:0", objs)  # tls0 does not exist yet
    src = source(x509_objects(d, "client"), seed=3)
    before = ram(src)
    src.migrate(dst.connect_uri)
    assert_refused_source(src, before)
    assert dst.refused and dst.refused[0][1].message == "No TLS credentials with id 'tls0'"
    objs.add({"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(d), "endpoint": "server"})
    good = source(x509_objects(d, "client"))  # resolved at use: the new object serves now
    good.migrate(dst.connect_uri)
    assert_delivered(good, dst)


# --- bad input ---------------------------------------------------------------------------------


def _resources() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks():
    """Threads and fds after the test (and its objects) are gone: as many as before."""
    import gc

    before = _resources()
    yield
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        now = _resources()
        if now[0] <= before[0] and now[1] <= before[1] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert now[0] <= before[0], f"threads: {before[0]} before, {now[0]} after"
    assert now[1] <= before[1], f"fds: {before[1]} before, {now[1]} after"


def tls_listener(d, *, handshake_timeout=2.0, **props):
    objs = x509_objects(d, "server", **props)
    opts = transport.ConnectionOptions(tls=TLSSettings(objs, "tls0"), handshake_timeout=handshake_timeout)
    refused = []
    lst = transport.listen("tcp:127.0.0.1:0", options=opts, on_refused=lambda p, e: refused.append(e))
    return lst, refused


def _accept_in_thread(lst, timeout):
    box = {}

    def run():
        try:
            box["ch"] = lst.accept(timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["err"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


def _raw(lst) -> socket.socket:
    return socket.create_connection(("127.0.0.1", lst.port), timeout=5)


@pytest.mark.parametrize("what", ["plain", "garbage", "stall", "stall-mid", "close-mid"])
def test_bad_peers_on_a_tls_listener_are_refused_and_it_keeps_listening(tmp_path, no_leaks, what):
    d = make_x509_dir(tmp_path / "x509")
    lst, refused = tls_listener(d, handshake_timeout=1.0)
    t, box = _accept_in_thread(lst, 20)
    bad = _raw(lst)
    t0 = time.monotonic()
    if what == "plain":
        bad.sendall(b"QEVM\x00\x00\x00\x03" + bytes(64))  # a plain migration stream
    elif what == "garbage":
        bad.sendall(os.urandom(4096))
    elif what == "stall-mid":
        bad.sendall(_client_hello()[:40])  # a record header and a bit of a ClientHello
    elif what == "close-mid":
        bad.sendall(_client_hello()[:40])
        bad.close()
    while not refused and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert refused, "the bad peer was not refused"
    assert time.monotonic() - t0 < 5
    err = refused[0]
    if what.startswith("stall"):
        assert isinstance(err, ChannelTimeout) and "TLS handshake not complete" in err.message
    else:
        assert isinstance(err, TLSError), repr(err)
    # the right peer still gets through
    cli = transport.connect(f"tcp:127.0.0.1:{lst.port}", options=transport.ConnectionOptions(
        tls=TLSSettings(x509_objects(d, "client"), "tls0")))
    t.join(10)
    assert "ch" in box, box
    cli.write(b"hello")
    assert box["ch"].read_exact(5) == b"hello"
    for ch in (cli, box["ch"]):
        ch.close()
    bad.close()
    lst.close()


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_a_tls_peer_on_a_plain_listener_fails_the_stream(tmp_path, no_leaks):
    d = make_x509_dir(tmp_path / "x509")
    dst = MigrationDestination(accept_timeout=10, io_timeout=5)
    dst.incoming("tcp:127.0.0.1:0")  # no tls-creds
    src = source(x509_objects(d, "client"))
    before = ram(src)
    t0 = time.monotonic()
    src.migrate(dst.connect_uri)
    assert dst.wait(15) == S.FAILED
    assert isinstance(dst.error, StreamError), repr(dst.error)  # a ClientHello is no stream header
    assert src.wait(15) == S.FAILED
    assert time.monotonic() - t0 < 12
    assert ram(src) == before


def test_a_stalled_server_fails_the_source_within_its_timeout(no_leaks, tmp_path):
    d = make_x509_dir(tmp_path / "x509")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts (the kernel does) and never answers
    src = MigrationSource(guest_blocks(), objects=x509_objects(d, "client"), connect_timeout=1.0)
    src.parameters.set({"tls-creds": "tls0"})
    before = ram(src)
    t0 = time.monotonic()
    src.migrate(f"tcp:127.0.0.1:{srv.getsockname()[1]}")
    assert_refused_source(src, before)
    assert time.monotonic() - t0 < 5
    assert isinstance(src.error, ChannelTimeout) and "TLS handshake" in src.error.message
    srv.close()


def test_a_truncated_record_is_a_typed_error(tmp_path, no_leaks):
    d = make_x509_dir(tmp_path / "x509")
    lst, _ = tls_listener(d)
    t, box = _accept_in_thread(lst, 10)
    cli = transport.connect(f"tcp:127.0.0.1:{lst.port}", options=transport.ConnectionOptions(
        tls=TLSSettings(x509_objects(d, "client"), "tls0")))
    t.join(10)
    srv = box["ch"]
    # one whole record, then half of the next, then the connection ends
    with cli._slock:
        cli.session.send(b"A" * 1000)
        whole = cli.session.take_output()
        cli.session.send(b"B" * 1000)
        part = cli.session.take_output()[:300]
    cli.inner.write(whole + part)
    cli.inner.shutdown()
    assert srv.read_exact(1000) == b"A" * 1000
    with pytest.raises(TLSError) as ei:
        srv.read(1000)
    assert "inside a TLS record" in ei.value.message
    for ch in (cli, srv):
        ch.close()
    lst.close()


def test_a_clean_end_between_records_is_the_end_of_stream(tmp_path, no_leaks):
    """QEMU closes without close_notify: that is a plain end of stream, not an error."""
    d = make_x509_dir(tmp_path / "x509")
    lst, _ = tls_listener(d)
    t, box = _accept_in_thread(lst, 10)
    cli = transport.connect(f"tcp:127.0.0.1:{lst.port}", options=transport.ConnectionOptions(
        tls=TLSSettings(x509_objects(d, "client"), "tls0")))
    t.join(10)
    cli.write(b"last words")
    cli.close()
    assert box["ch"].read_exact(10) == b"last words"
    assert box["ch"].read(100) == b""
    box["ch"].close()
    lst.close()


@pytest.mark.parametrize("problem", ["expired", "self-signed"])
def test_a_bad_server_certificate_is_refused_by_the_client(tmp_path, no_leaks, problem):
    d = make_x509_dir(tmp_path / "x509", server_expired=problem == "expired")
    if problem == "self-signed":
        self_signed(d)
    lst, _ = tls_listener(d, **{"sanity-check": False})
    t, box = _accept_in_thread(lst, 5)
    with pytest.raises(TLSPeerRejected) as ei:
        transport.connect(f"tcp:127.0.0.1:{lst.port}", options=transport.ConnectionOptions(
            tls=TLSSettings(x509_objects(d, "client"), "tls0")))
    want = {"expired": "The certificate has expired",
            "self-signed": "The certificate hasn't got a known issuer"}[problem]
    assert want in ei.value.message
    lst.shutdown()
    t.join(10)
    assert "err" in box
    lst.close()


def test_cancel_during_a_stalled_handshake(tmp_path, no_leaks):
    d = make_x509_dir(tmp_path / "x509")
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"))
    bad = socket.create_connection(("127.0.0.1", int(dst.connect_uri.rsplit(":", 1)[1])))
    time.sleep(0.2)  # the destination is now inside the handshake, waiting
    t0 = time.monotonic()
    dst.cancel()
    assert dst.wait(5) == S.FAILED
    assert time.monotonic() - t0 < 3
    bad.close()


# --- command line ----------------------------------------------------------------------------


def test_cli_incoming_and_send_with_object(tmp_path, sockdir):
    """``qmigx incoming``/``send`` with ``--object`` as QEMU's ``-object``: a TLS migration."""
    d = make_x509_dir(tmp_path / "x509")
    stream = tmp_path / "guest.mig"
    blocks = guest_blocks(5)
    with open(stream, "wb") as f:
        qmigx.save_stream(f.write, blocks)
    uri = f"unix:{sockdir}/cli.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    inc = subprocess.Popen([sys.executable, "-m", "qmigx", "incoming", uri, "--ram-dir", str(tmp_path / "rd"),
                            "--object", f"tls-creds-x509,id=tls0,dir={d},endpoint=server",
                            "--object", f"authz-simple,id=auth0,identity={CLIENT_DN.replace(',', ',,')}",
                            "--param", "tls-creds=tls0", "--param", "tls-authz=auth0"],
                           stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(f"{sockdir}/cli.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = subprocess.run([sys.executable, "-m", "qmigx", "send", str(stream), uri,
                        "--object", f"tls-creds-x509,id=tls0,dir={d}",
                        "--param", "tls-creds=tls0", "--param", "tls-hostname=127.0.0.1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert inc.wait(60) == 0, inc.stderr.read()
    inc.stderr.close()
    assert (tmp_path / "rd" / "pc.ram.bin").read_bytes() == ram_bytes(blocks)


def ram_bytes(blocks) -> bytes:
    return bytes(blocks["pc.ram"].memory)


def test_cli_object_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qmigx", "incoming", "tcp:127.0.0.1:0",
                        "--object", "tls-creds-x509,id=t,dir=/nonexist"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 1
    assert r.stderr.strip() == ("qmigx: error: Unable to access credentials /nonexist/ca-cert.pem: "
                                "No such file or directory (at field dir)")


@pytest.mark.parametrize("argv", [["incoming", "rdma:127.0.0.1:4444"],
                                  ["send", "STREAM", "rdma:127.0.0.1:4444"]])
def test_cli_refuses_rdma_at_once(tmp_path, argv):
    stream = tmp_path / "s.mig"
    with open(stream, "wb") as f:
        qmigx.save_stream(f.write, guest_blocks())
    argv = [str(stream) if a == "STREAM" else a for a in argv]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "qmigx", *argv], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "RDMA transport is not supported" in lines[0]
    qemu = ("unknown migration protocol: rdma:127.0.0.1:4444" if argv[0] == "incoming"
            else "Parameter 'uri' expects a valid migration protocol")
    assert qemu in lines[0]
    assert time.monotonic() - t0 < 30


def test_api_refuses_rdma_before_any_state_change():
    src = MigrationSource(guest_blocks())
    with pytest.raises(MigrationError) as ei:
        src.migrate("rdma:127.0.0.1:4444")
    assert "RDMA transport is not supported" in ei.value.message
    assert src.query() == {} or src.query().get("status") in (None, "none")
    dst = MigrationDestination()
    with pytest.raises(MigrationError) as ei:
        dst.incoming("rdma:127.0.0.1:4444")
    assert ei.value.message.startswith("unknown migration protocol: rdma:127.0.0.1:4444")


def test_serve_object_option_and_tls_incoming(tmp_path, sockdir):
    """``qmigx serve --incoming URI --object ...``: a TLS destination an orchestrator can query."""
    import hashlib
    import json

    from test_qmp import Raw, Served

    d = make_x509_dir(tmp_path / "x509")
    uri = f"unix:{sockdir}/in.sock"
    served = Served("dst", "--incoming", uri,
                    "--object", f"tls-creds-x509,id=tls0,dir={d},endpoint=server",
                    "--param", "tls-creds=tls0", sockdir=str(sockdir))
    c = Raw(served.sock)

    def ask(raw: bytes):
        """The reply to ``raw`` (events in between are skipped)."""
        reply = json.loads(c.ask(raw))
        while "event" in reply:
            reply = json.loads(c.line())
        return reply["return"]

    try:
        c.line()
        ask(b'{"execute":"qmp_capabilities"}')
        types = ask(b'{"execute":"qom-list-types","arguments":{"implements":"authz"}}')
        assert {t["name"] for t in types} == {"authz-simple", "authz-list", "authz-listfile"}
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{sockdir}/in.sock"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        src = source(x509_objects(d, "client"), params={"tls-hostname": "127.0.0.1"})
        src.migrate(uri)
        assert src.wait(60) == S.COMPLETED, src.error
        while True:
            q = ask(b'{"execute":"query-migrate"}')
            if q.get("status") == "completed":
                break
            assert q.get("status") != "failed" and time.monotonic() < deadline + 30, q
            time.sleep(0.05)
        got = {b["id"]: b["sha256"] for b in ask(b'{"execute":"x-query-qmigx-ram"}')}
        assert got["pc.ram"] == hashlib.sha256(ram_bytes(src.blocks)).hexdigest()
    finally:
        c.close()
        served.close()


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_postcopy_over_tls(tmp_path, preempt):
    """Postcopy with x509 on every connection: the main one, its return path carrying the page
    requests, and the preempt channel."""
    from qmigx import uffd

    try:
        os.close(uffd.create_uffd(user_mode_only_first=False)[0])
    except uffd.UffdUnavailable as e:
        pytest.skip(f"userfaultfd unavailable here: {e.message}")
    caps = ("postcopy-ram", "postcopy-preempt") if preempt else ("postcopy-ram",)
    d = make_x509_dir(tmp_path / "x509")
    dst = destination("tcp:127.0.0.1:0", x509_objects(d, "server"), caps=caps)
    dst.touch_rate = 2000
    src = source(x509_objects(d, "client"), caps=caps,
                 params={"max-postcopy-bandwidth": 1 << 20})
    src.migrate(dst.connect_uri)
    src.start_postcopy()
    assert_delivered(src, dst)
    assert not dst.refused
    pc = dst.postcopy_report()
    assert pc is not None and pc["requests"] > 0, pc
    assert (pc["preempt_pages"] > 0) == preempt, pc
