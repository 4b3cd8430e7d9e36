"""The compiled multifd send loop against its plain-Python twin and ``pack_packet``.

Whatever rows are picked, both must put on the wire exactly the packets
``pack_packet`` makes for those pages: the headers QEMU reads, each
followed by its pages.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx._core import multifd_send as compiled
from qmigx.multifd.packet import header_size, pack_packet
from qmigx.reference import multifd_send as reference

PAGE = 4096
pytestmark = pytest.mark.kernel("multifd_send")


def expected(name: str, rows: np.ndarray, index, offsets, alloc: int, first: int, flags: int) -> bytes:
    out = bytearray()
    for k, lo in enumerate(range(0, len(index), alloc)):
        sel = index[lo : lo + alloc]
        out += pack_packet(flags=flags, pages_alloc=alloc, packet_num=first + k, ramblock=name,
                           offsets=np.asarray(offsets[lo : lo + alloc], np.uint64),
                           data=rows[sel].tobytes())
    return bytes(out)


def sent(kernel, name: str, rows, index, offsets, alloc: int, first: int = 7, flags: int = 0):
    a, b = socket.socketpair()
    a.setblocking(False)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    got = bytearray()

    def drain() -> None:
        while True:
            chunk = b.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = kernel.send_packets(a.fileno(), wake, np.zeros(header_size(alloc), np.uint8),
                                     name.encode(), rows, np.asarray(index, np.int64),
                                     np.asarray(offsets, np.uint64), PAGE, alloc, first, flags, 5.0)
    finally:
        a.shutdown(socket.SHUT_WR)
        reader.join()
        a.close()
        b.close()
        os.close(wake)
    return result, bytes(got)


def test_packets_are_pack_packet_bytes(kernel):
    rows = np.random.default_rng(1).integers(0, 256, (40, PAGE), dtype=np.uint8)
    index = [0, 1, 2, 5, 6, 39, 3, 3, 10, 11, 12]
    offsets = [PAGE * (100 + i) for i in range(len(index))]
    (status, packets, nbytes, err), wire = sent(kernel, "pc.ram", rows, index, offsets, 4)
    want = expected("pc.ram", rows, index, offsets, 4, 7, 0)
    assert (status, packets, nbytes, err) == (kernel.DONE, 3, len(want), 0)
    assert wire == want


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 63), max_size=300), st.sampled_from([1, 3, 16, 128]),
       st.integers(0, 2**40), st.sampled_from([0, 0x40]))
def test_random_batches_agree(index, alloc, first, flags):
    rows = np.random.default_rng(len(index)).integers(0, 256, (64, PAGE), dtype=np.uint8)
    offsets = [PAGE * (i * 3) for i in range(len(index))]
    want = expected("block", rows, index, offsets, alloc, first, flags)
    for kernel in (compiled, reference):
        (status, packets, nbytes, _), wire = sent(kernel, "block", rows, index, offsets, alloc,
                                                  first, flags)
        assert (status, packets, nbytes) == (kernel.DONE, -(-len(index) // alloc), len(want))
        assert wire == want


def test_a_full_socket_times_out_and_a_stop_request_stops(kernel):
    rows = np.zeros((1024, PAGE), np.uint8)  # 4 MiB: more than the socket holds
    index = np.arange(1024, dtype=np.int64)
    offs = (index * PAGE).astype(np.uint64)
    for timeout, stop, status in ((0.05, False, kernel.TIMEOUT), (None, True, kernel.STOPPED)):
        a, b = socket.socketpair()
        a.setblocking(False)
        wake = os.eventfd(0, os.EFD_NONBLOCK)
        if stop:
            threading.Timer(0.1, os.eventfd_write, (wake, 1)).start()
        try:
            result = kernel.send_packets(a.fileno(), wake, np.zeros(header_size(128), np.uint8),
                                         b"pc.ram", rows, index, offs, PAGE, 128, 1, 0, timeout)
        finally:
            a.close()
            b.close()
            os.close(wake)
        assert result[0] == status
        assert 0 < result[2] < rows.nbytes


def test_a_closed_peer_fails_with_its_errno(kernel):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.close()
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        status, packets, _, err = kernel.send_packets(
            a.fileno(), wake, np.zeros(header_size(4), np.uint8), b"x", np.zeros((1, PAGE), np.uint8),
            np.zeros(1, np.int64), np.zeros(1, np.uint64), PAGE, 4, 1, 0, 1.0)
    finally:
        a.close()
        os.close(wake)
    assert (status, packets, err) == (kernel.FAILED, 0, 32)  # EPIPE


def test_bad_arguments_raise(kernel):
    h = np.zeros(header_size(4), np.uint8)
    rows = np.zeros((2, PAGE), np.uint8)
    one, off = np.zeros(1, np.int64), np.zeros(1, np.uint64)
    with pytest.raises(ValueError):
        kernel.send_packets(0, 0, h, b"x", rows, one, off, 4095, 4, 1, 0, None)
    with pytest.raises(ValueError):
        kernel.send_packets(0, 0, h[:10], b"x", rows, one, off, PAGE, 4, 1, 0, None)
    with pytest.raises(ValueError):
        kernel.send_packets(0, 0, h, b"x\0y", rows, one, off, PAGE, 4, 1, 0, None)
    with pytest.raises(ValueError):
        kernel.send_packets(0, 0, h, b"x", rows, one, np.zeros(2, np.uint64), PAGE, 4, 1, 0, None)
    with pytest.raises(IndexError):
        kernel.send_packets(0, 0, h, b"x", rows, np.array([2], np.int64), off, PAGE, 4, 1, 0, None)
