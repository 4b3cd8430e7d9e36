"""The compiled page sender against its plain-Python twin and ``encode_pages``.

Whatever the pages (zero or not, in runs or scattered, more than one
gathering write's worth), the bytes a kernel writes must be exactly the
records ``ramparse.encode_pages`` encodes for them, with the same counts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx._core import pagesend as compiled
from qmigx._core import ramparse
from qmigx.errors import RamStreamError

PAGE = 64
NPAGES = 1200  # more than two chunks


def memory(seed: int, zero_share: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mem = rng.integers(0, 256, NPAGES * PAGE, dtype=np.uint8).reshape(NPAGES, PAGE)
    mem[rng.random(NPAGES) < zero_share] = 0
    mem[rng.random(NPAGES) < 0.05, -1] = 0  # non-zero pages with zero ends
    return mem.reshape(-1)


@contextlib.contextmanager
def socket_pair(*, stop: bool = False, sndbuf: int = 0):
    """``(writer fd, wake fd, bytes read)``: a reader drains the other end, or with
    ``stop`` nobody reads and the wake descriptor fires after 50 ms."""
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    got = bytearray()

    def read() -> None:
        while chunk := b.recv(1 << 16):
            got.extend(chunk)

    reader = None
    if stop:
        threading.Timer(0.05, os.eventfd_write, (wake, 1)).start()
    else:
        reader = threading.Thread(target=read)
        reader.start()
    try:
        yield a.fileno(), wake, got
    finally:
        a.close()
        if reader is not None:
            reader.join()
        b.close()
        os.close(wake)


def send(kernel, mem, pages, *, stop: bool = False, sndbuf: int = 0):
    with socket_pair(stop=stop, sndbuf=sndbuf) as (fd, wake, got):
        out = kernel.send_pages(fd, wake, mem, pages, PAGE, timeout=5.0)
    return out, bytes(got)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 999), zero_share=st.sampled_from([0.0, 0.3, 1.0]),
       picks=st.lists(st.integers(0, NPAGES - 1), max_size=1100), run=st.booleans())
@pytest.mark.kernel("pagesend")
def test_same_bytes_as_encode_pages(kernel, seed, zero_share, picks, run):
    mem = memory(seed, zero_share)
    pages = np.arange(len(picks), dtype=np.int64) if run else np.array(picks, np.int64)
    out = np.empty(len(pages) * (8 + PAGE), np.uint8)
    nbytes, zeros, normal = ramparse.encode_pages(mem, pages, out, PAGE)
    (sent, z, n, status, err), wire = send(kernel, mem, pages)
    assert (status, err) == (compiled.DONE, 0)
    assert (sent, z, n) == (nbytes, zeros, normal)
    assert wire == out[:nbytes].tobytes()


@pytest.mark.kernel("pagesend")
def test_stop_while_the_socket_is_full(kernel):
    mem = memory(1, 0.0)
    pages = np.arange(NPAGES, dtype=np.int64)
    (sent, _, _, status, _), _ = send(kernel, mem, np.tile(pages, 40), stop=True, sndbuf=4096)
    assert status == compiled.STOPPED
    assert 0 < sent < 40 * NPAGES * (8 + PAGE)


@pytest.mark.kernel("pagesend")
@pytest.mark.parametrize("pages, page_size", [([NPAGES], PAGE), ([-1], PAGE), ([0], 12), ([0], 0)])
def test_bad_arguments_are_refused_before_writing(kernel, pages, page_size):
    with pytest.raises(RamStreamError):
        kernel.send_pages(-1, -1, memory(0, 0.0), np.array(pages, np.int64), page_size)


def relay(kernel, path, head, offset, count, *, stop: bool = False, sndbuf: int = 0):
    """``send_file`` of ``path``'s bytes over a socket pair; its result and what arrived."""
    src = os.open(path, os.O_RDONLY)
    try:
        with socket_pair(stop=stop, sndbuf=sndbuf) as (fd, wake, got):
            out = kernel.send_file(fd, wake, head, src, offset, count, timeout=5.0)
        assert os.lseek(src, 0, os.SEEK_CUR) == 0  # the file's own offset is left alone
    finally:
        os.close(src)
    return out, bytes(got)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(head=st.binary(max_size=300), offset=st.integers(0, 3 << 20),
       count=st.integers(0, 3 << 20))
@pytest.mark.kernel("pagesend")
def test_send_file_writes_the_head_then_the_range(kernel, tmp_path_factory, head, offset, count):
    path = tmp_path_factory.getbasetemp() / "relay-source.bin"
    if not path.exists():
        path.write_bytes(np.random.default_rng(3).integers(0, 256, 4 << 20, np.uint8).tobytes())
    data = path.read_bytes()
    (sent, status, err), wire = relay(kernel, path, head, offset, count)
    want = head + data[offset : offset + count]
    short = offset + count > len(data)  # the file ends first
    assert (sent, status, err) == (len(want), compiled.SHORT if short else compiled.DONE, 0)
    assert wire == want


@pytest.mark.kernel("pagesend")
def test_send_file_says_when_the_file_ends_first(kernel, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(256)) * 16)
    (sent, status, _), wire = relay(kernel, path, b"H", 4000, 200)
    assert status == compiled.SHORT
    assert (sent, wire) == (97, b"H" + (bytes(range(256)) * 16)[4000:])


@pytest.mark.kernel("pagesend")
def test_send_file_stops_while_the_socket_is_full(kernel, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(8 << 20))
    (sent, status, _), _ = relay(kernel, path, b"", 0, 8 << 20, stop=True, sndbuf=4096)
    assert status == compiled.STOPPED
    assert 0 < sent < 8 << 20


@pytest.mark.kernel("pagesend")
@pytest.mark.parametrize("offset, count", [(-1, 10), (0, -1)])
def test_send_file_refuses_a_negative_range(kernel, tmp_path, offset, count):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(RamStreamError):
        relay(kernel, path, b"", offset, count)
