"""Transports: URI parsing, every scheme both ways, cancel, timeouts, listeners."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import transport as C
from qmigx.errors import CapabilityError, ChannelError, ParameterError, TransportNotSupported

MIB = 1 << 20
PAYLOAD = np.random.default_rng(7).integers(0, 256, 3 * MIB + 123, dtype=np.uint8).tobytes()
REPLY = bytes(range(256)) * (MIB // 256) + b"end"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- parse_uri -------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, fields",
    [
        ("tcp:127.0.0.1:4444", dict(scheme="tcp", host="127.0.0.1", port=4444)),
        ("tcp:0:0", dict(scheme="tcp", host="0", port=0)),
        ("tcp::4444", dict(scheme="tcp", host="", port=4444)),
        ("tcp:[::]:4444", dict(scheme="tcp", host="::", port=4444)),
        ("tcp:[fe80::1%eth0]:1", dict(scheme="tcp", host="fe80::1%eth0", port=1)),
        ("tcp:localhost:65535", dict(scheme="tcp", host="localhost", port=65535)),
        ("unix:/tmp/x.sock", dict(scheme="unix", path="/tmp/x.sock")),
        ("vsock:3:1234", dict(scheme="vsock", cid=3, port=1234)),
        ("exec:cat > /tmp/f", dict(scheme="exec", command="cat > /tmp/f")),
        ("fd:7", dict(scheme="fd", fd_name="7", fd_number=7)),
        ("fd:mig", dict(scheme="fd", fd_name="mig", fd_number=None)),
        ("file:/tmp/img", dict(scheme="file", path="/tmp/img")),
    ],
)
def test_parse_uri_valid(uri, fields):
    u = C.parse_uri(uri)
    assert u.uri == uri
    for k, v in fields.items():
        assert getattr(u, k) == v, k
    assert u.multi_channel == (fields["scheme"] in ("tcp", "unix", "vsock"))


UNKNOWN = ["", "bogus:1", "defer", "tcp", "TCP:1.2.3.4:5", "x-file:/tmp/f"]
MALFORMED = ["tcp:host", "tcp:1.2.3.4:", "tcp:h:65536", "tcp:h:http", "tcp:::1:4444", "tcp:[::1",
             "unix:", "exec:", "exec:   ", "fd:", "file:", "vsock:x:1", "vsock:1:"]


@pytest.mark.parametrize("uri", UNKNOWN)
def test_parse_uri_unknown_scheme_outgoing(uri):
    with pytest.raises(ParameterError) as ei:
        C.parse_uri(uri)
    assert ei.value.message == "Parameter 'uri' expects a valid migration protocol"
    assert ei.value.field == "uri"


@pytest.mark.parametrize("uri", UNKNOWN)
def test_parse_uri_unknown_scheme_incoming(uri):
    with pytest.raises(ParameterError) as ei:
        C.parse_uri(uri, incoming=True)
    assert ei.value.message == f"unknown migration protocol: {uri}"


@pytest.mark.parametrize("incoming", [False, True])
def test_rdma_is_refused_with_qemus_text_and_the_reason_in_words(incoming):
    uri = "rdma:192.168.0.1:4444"
    with pytest.raises(TransportNotSupported) as ei:
        C.parse_uri(uri, incoming=incoming)
    qemu = f"unknown migration protocol: {uri}" if incoming else \
        "Parameter 'uri' expects a valid migration protocol"
    assert ei.value.message.startswith(qemu)
    assert "RDMA transport is not supported" in ei.value.message
    assert "\n" not in ei.value.message and ei.value.field == "uri"
    assert isinstance(ei.value, ParameterError)


@pytest.mark.parametrize("uri", MALFORMED)
@pytest.mark.parametrize("incoming", [False, True])
def test_parse_uri_malformed_address(uri, incoming):
    with pytest.raises(ParameterError) as ei:
        C.parse_uri(uri, incoming=incoming)
    assert ei.value.message.endswith(f" in migration URI '{uri}'")
    assert ei.value.field == "uri"


def test_listen_and_connect_use_qemu_texts():
    with pytest.raises(ParameterError, match=r"^unknown migration protocol: nope:x"):
        C.listen("nope:x")
    with pytest.raises(ParameterError, match=r"^Parameter 'uri' expects a valid migration protocol"):
        C.connect("nope:x")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_uri_random_text_raises_parameter_error_or_parses(text):
    try:
        u = C.parse_uri(text)
    except ParameterError:
        return
    assert u.scheme in ("tcp", "unix", "vsock", "exec", "fd", "file")
    assert text.startswith(u.scheme + ":")


# -- helpers -----------------------------------------------------------------------


def _read_all(ch: C.Channel, n: int) -> bytes:
    buf = np.zeros(n, np.uint8)  # readinto a numpy array
    ch.readinto_exact(buf)
    return buf.tobytes()


def _roundtrip(src: C.Channel, dst: C.Channel) -> None:
    """PAYLOAD source -> destination while REPLY goes back on the return path, concurrently."""
    got = {}

    def dest():
        got["stream"] = _read_all(dst, len(PAYLOAD))
        dst.write(np.frombuffer(REPLY, np.uint8))

    def source_rp():
        got["rp"] = src.read_exact(len(REPLY))

    threads = [threading.Thread(target=dest), threading.Thread(target=source_rp)]
    for t in threads:
        t.start()
    src.write(memoryview(PAYLOAD))
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert got["stream"] == PAYLOAD
    assert got["rp"] == REPLY
    assert src.bytes_written == len(PAYLOAD) and dst.bytes_read == len(PAYLOAD)
    assert dst.bytes_written == len(REPLY) and src.bytes_read == len(REPLY)


# -- sockets -----------------------------------------------------------------------------


def test_tcp_port_zero_roundtrip_and_socket_address():
    with C.listen("tcp:127.0.0.1:0", channels=3) as lst:
        addr = lst.socket_address
        assert len(addr) == 1 and addr[0]["type"] == "inet" and addr[0]["host"] == "127.0.0.1"
        port = int(addr[0]["port"])
        assert port > 0 and lst.port == port
        assert lst.connect_uri == f"tcp:127.0.0.1:{port}"
        with C.connect(lst.connect_uri, timeout=2) as src, lst.accept(timeout=2) as dst:
            assert src.has_return_path
            _roundtrip(src, dst)


def test_tcp_wildcard_listen_reports_real_port():
    with C.listen("tcp:0:0") as lst:
        assert lst.socket_address[0]["host"] == "0.0.0.0"
        assert lst.socket_address[0]["port"] == str(lst.port) != "0"
        with C.connect(f"tcp:localhost:{lst.port}", timeout=2) as src, lst.accept(2) as dst:
            src.write(b"hello")
            assert dst.read_exact(5) == b"hello"


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_tcp_ipv6_brackets():
    with C.listen("tcp:[::1]:0") as lst:
        assert lst.socket_address[0]["host"] == "::1"
        assert lst.connect_uri == f"tcp:[::1]:{lst.port}"
        with C.connect(lst.connect_uri, timeout=2) as src, lst.accept(2) as dst:
            dst.write(b"v6")
            assert src.read_exact(2) == b"v6"


def test_tcp_extra_channels_for_multifd():
    with C.listen("tcp:127.0.0.1:0", channels=3) as lst:
        chans = [C.connect(lst.connect_uri, timeout=2)]
        chans += [C.connect_extra(lst.connect_uri, timeout=2) for _ in range(2)]
        accepted = [lst.accept(2) for _ in range(3)]
        try:
            for i, c in enumerate(chans):
                c.write(bytes([i]) * 10)
            assert sorted(a.read_exact(10)[0] for a in accepted) == [0, 1, 2]
            assert lst.accepted == 3
        finally:
            for c in chans + accepted:
                c.close()


def test_unix_roundtrip_and_cleanup(tmp_path):
    path = str(tmp_path / "mig.sock")
    lst = C.listen(f"unix:{path}", channels=2)
    try:
        assert lst.socket_address == [{"type": "unix", "path": path}]
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with C.connect(f"unix:{path}") as src, lst.accept(2) as dst:
            _roundtrip(src, dst)
        with C.connect_extra(f"unix:{path}") as extra, lst.accept(2) as dst2:
            extra.write(b"x")
            assert dst2.read_exact(1) == b"x"
    finally:
        lst.close()
    assert not os.path.exists(path)


def test_unix_replaces_stale_socket_but_not_a_file(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # leaves the socket file behind
    with C.listen(f"unix:{path}") as lst:
        with C.connect(f"unix:{path}") as c, lst.accept(2) as d:
            c.write(b"ok")
            assert d.read_exact(2) == b"ok"
    regular = tmp_path / "plain"
    regular.write_bytes(b"keep me")
    with pytest.raises(ChannelError, match="not a socket"):
        C.listen(f"unix:{regular}")
    assert regular.read_bytes() == b"keep me"


def test_unix_close_leaves_foreign_file_alone(tmp_path):
    path = str(tmp_path / "m.sock")
    lst = C.listen(f"unix:{path}")
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)  # someone else's socket now lives there
    try:
        lst.close()
        assert os.path.exists(path)
    finally:
        other.close()


def test_connect_refused_is_channel_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ChannelError, match=f"Failed to connect to '127.0.0.1:{port}'"):
        C.connect(f"tcp:127.0.0.1:{port}", timeout=1)
    with pytest.raises(ChannelError, match="Failed to connect"):
        C.connect("unix:/nonexistent/dir/x.sock")


# -- exec ----------------------------------------------------------------------------------


def test_exec_outgoing_writes_file(tmp_path):
    out = tmp_path / "stream.bin"
    ch = C.connect(f"exec:cat > {out}")
    ch.write(PAYLOAD)
    ch.close()
    assert ch.exit_status == 0
    assert out.read_bytes() == PAYLOAD


def test_exec_outgoing_return_path_is_stdout():
    # `cat` echoes the stream back on its stdout, the source's return path.
    with C.connect("exec:cat") as ch:
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("rp", ch.read_exact(len(PAYLOAD))))
        t.start()
        ch.write(PAYLOAD)
        t.join(10)
        assert got["rp"] == PAYLOAD
        assert ch.bytes_read == ch.bytes_written == len(PAYLOAD)


def test_exec_incoming_reads_command_stdout_and_rp_goes_to_stdin(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(PAYLOAD)
    rp = tmp_path / "rp.bin"
    # stream from stdout; then stdout is closed (EOF) and the return path is saved
    lst = C.listen(f"exec:cat {src}; exec 1>&-; cat > {rp}")
    ch = lst.accept()
    with pytest.raises(ChannelError, match="only one channel"):
        lst.accept()
    lst.close()
    assert _read_all(ch, len(PAYLOAD)) == PAYLOAD
    assert ch.read(10) == b""  # end of stream
    ch.write(REPLY)
    ch.close()
    assert ch.exit_status == 0
    assert rp.read_bytes() == REPLY


def test_exec_incoming_unaccepted_is_reaped_on_listener_close(tmp_path):
    lst = C.listen("exec:sleep 30")
    ch = lst._channel
    t0 = time.monotonic()
    lst.close()
    assert time.monotonic() - t0 < 3
    assert ch.closed and ch.exit_status is not None


def test_exec_is_single_channel():
    with pytest.raises(CapabilityError) as ei:
        C.connect_extra("exec:cat")
    assert ei.value.message == "multifd is not supported by current protocol"
    for uri in ("fd:3", "file:/tmp/x"):
        with pytest.raises(CapabilityError, match="multifd is not supported by current protocol"):
            C.connect_extra(uri)


# -- fd and file ----------------------------------------------------------------------------


def test_fd_by_name_and_number_socketpair():
    a, b = socket.socketpair()
    C.register_fd("migfd", a.detach())
    out = C.connect("fd:migfd")
    with pytest.raises(ChannelError, match="File descriptor named 'migfd' has not been found"):
        C.connect("fd:migfd")  # taken by the first connect, as QEMU's getfd
    lst = C.listen(f"fd:{b.detach()}")
    inc = lst.accept()
    lst.close()
    try:
        _roundtrip(out, inc)
        out.shutdown()  # a socket fd: the peer sees the end of the stream
        assert inc.read(1) == b""
    finally:
        out.close()
        inc.close()


def test_fd_pipe_and_bad_numbers():
    r, w = os.pipe()
    src = C.connect(f"fd:{w}")
    lst = C.listen(f"fd:{r}")
    dst = lst.accept()
    lst.close()
    try:
        t = threading.Thread(target=src.write, args=(PAYLOAD,))
        t.start()
        assert _read_all(dst, len(PAYLOAD)) == PAYLOAD
        t.join(5)
        with pytest.raises(ChannelError):
            dst.write(b"x")  # a pipe's read end cannot carry a return path
    finally:
        src.close()
        dst.close()
    with pytest.raises(ChannelError, match="Invalid file descriptor number"):
        C.connect(f"fd:{w}")  # closed with its channel
    with pytest.raises(ParameterError, match="not starting with a digit"):
        C.register_fd("1x", 0)


def test_register_fd_replaces_and_unregisters():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    C.register_fd("rp", r1)
    C.register_fd("rp", r2)  # closes r1
    with pytest.raises(OSError):
        os.fstat(r1)
    assert C.unregister_fd("rp") == r2
    with pytest.raises(ChannelError):
        C.unregister_fd("rp")
    for fd in (w1, r2, w2):
        os.close(fd)


def test_file_roundtrip(tmp_path):
    path = tmp_path / "mig.img"
    with C.connect(f"file:{path}") as out:
        assert not out.has_return_path
        out.write(PAYLOAD)
        with pytest.raises(ChannelError, match="no return path"):
            out.read(1)
    with C.listen(f"file:{path}") as lst:
        with lst.accept() as inc:
            assert _read_all(inc, len(PAYLOAD)) == PAYLOAD
            assert inc.read(1) == b""
            with pytest.raises(ChannelError):
                inc.write(b"x")
    with pytest.raises(ChannelError, match="cannot open"):
        C.listen(f"file:{tmp_path / 'missing'}")


def test_read_exact_short_stream_raises(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    with C.listen(f"file:{path}") as lst, lst.accept() as ch:
        with pytest.raises(ChannelError, match="end of stream after 3 of 10 bytes"):
            ch.read_exact(10)


# -- cancel and timeouts ----------------------------------------------------------------------


def _pair(kind, tmp_path):
    if kind == "tcp":
        lst = C.listen("tcp:127.0.0.1:0")
        src = C.connect(lst.connect_uri, timeout=2)
    elif kind == "unix":
        lst = C.listen(f"unix:{tmp_path / 's.sock'}")
        src = C.connect(lst.uri.uri)
    else:
        lst = C.listen("exec:cat")  # the destination's "peer" never sends: blocks
        src = None
    dst = lst.accept(2)
    lst.close()
    return src, dst


@pytest.mark.parametrize("kind", ["tcp", "unix", "exec"])
def test_shutdown_unblocks_reader_in_other_thread(kind, tmp_path):
    src, dst = _pair(kind, tmp_path)
    result = {}

    def reader():
        t0 = time.monotonic()
        try:
            dst.read_exact(10)
        except ChannelError as e:
            result["err"] = e
        result["t"] = time.monotonic() - t0

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # really blocked
    dst.shutdown()
    t.join(2)
    assert not t.is_alive()
    assert "shut down" in str(result["err"]) and result["t"] < 1.5
    with pytest.raises(ChannelError, match="shut down"):
        dst.write(b"x")
    if src is not None:
        assert src.read(1) == b""  # socket peer sees the end of the stream
        src.close()
    dst.close()


def test_shutdown_unblocks_writer_in_other_thread():
    with C.listen("tcp:127.0.0.1:0") as lst:
        src = C.connect(lst.connect_uri, timeout=2)
        dst = lst.accept(2)  # never reads
        err = {}

        def writer():
            try:
                src.write(bytes(64 * MIB))
            except ChannelError as e:
                err["e"] = e

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.2)
        assert t.is_alive() and 0 < src.bytes_written < 64 * MIB
        src.shutdown()
        t.join(2)
        assert not t.is_alive() and "shut down" in str(err["e"])
        src.close()
        dst.close()


@pytest.mark.parametrize("kind", ["tcp", "exec"])
def test_timeout_on_stalled_peer_read(kind, tmp_path):
    src, dst = _pair(kind, tmp_path)
    dst.set_timeout(0.2)
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match=r"timed out after 0.2 s waiting to read"):
        dst.read_exact(1)
    assert time.monotonic() - t0 < 1.5
    dst.close()
    if src is not None:
        src.close()


def test_timeout_on_stalled_peer_write():
    with C.listen("tcp:127.0.0.1:0") as lst:
        src = C.connect(lst.connect_uri, timeout=2)
        dst = lst.accept(2)
        src.set_timeout(0.3)
        with pytest.raises(ChannelError, match="waiting to write"):
            src.write(bytes(64 * MIB))  # the peer never reads: buffers fill up
        assert 0 < src.bytes_written < 64 * MIB
        src.close()
        dst.close()


def test_accept_timeout_and_shutdown():
    with C.listen("tcp:127.0.0.1:0") as lst:
        t0 = time.monotonic()
        with pytest.raises(ChannelError, match="timed out"):
            lst.accept(timeout=0.2)
        assert time.monotonic() - t0 < 1.5
        err = {}

        def acceptor():
            try:
                lst.accept()
            except ChannelError as e:
                err["e"] = e

        t = threading.Thread(target=acceptor)
        t.start()
        time.sleep(0.1)
        lst.shutdown()
        t.join(2)
        assert not t.is_alive() and "shut down" in str(err["e"])


def test_set_timeout_rejects_negative():
    with C.listen("tcp:127.0.0.1:0") as lst:
        with C.connect(lst.connect_uri) as c, lst.accept(2) as d:
            with pytest.raises(ParameterError):
                c.set_timeout(-1)
            c.set_timeout(None)
            assert c.timeout is None
            d.write(b"z")
            assert c.read_exact(1) == b"z"
