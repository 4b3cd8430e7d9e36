"""The compiled page sender against its plain-Python twin and ``encode_pages``.

Whatever the pages (zero or not, in runs or scattered, more than one
gathering write's worth), the bytes a kernel writes must be exactly the
records ``ramparse.encode_pages`` encodes for them, with the same counts.
"""

from __future__ import annotations

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


def send(kernel, mem, pages, *, stop: bool = False, sndbuf: int = 0):
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
        out = kernel.send_pages(a.fileno(), wake, mem, pages, PAGE, timeout=5.0)
    finally:
        a.close()
        if reader is not None:
            reader.join()
        b.close()
        os.close(wake)
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
