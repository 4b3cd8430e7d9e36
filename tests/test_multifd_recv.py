"""The compiled multifd receive loop against its plain-Python twin.

Both read the same bytes from a socket: every packet they place must land
exactly where ``unpack_packet_header`` + ``place_pages`` would put it, and
every header they leave for the Python path (SYNC, compressed data,
anything to reject) must stop them with nothing of that packet written.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmigx._core import multifd_recv as compiled
from qmigx.multifd.packet import header_size, pack_packet
from qmigx.reference import multifd_recv as reference

PAGE = 4096
ALLOC = 16
HSIZE = header_size(ALLOC)
KERNELS = [compiled, reference]
IDS = ["compiled", "reference"]


def packet(block: str, offsets, data: bytes = b"", *, flags: int = 0, zeros=None, alloc: int = ALLOC,
           num: int = 1) -> bytes:
    pkt = pack_packet(flags=flags, pages_alloc=alloc, packet_num=num, ramblock=block,
                      offsets=np.asarray(offsets, np.uint64), data=data,
                      zero_offsets=None if zeros is None else np.asarray(zeros, np.uint64))
    assert len(pkt) == header_size(alloc) + len(data)
    return pkt


def pages(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n * PAGE, dtype=np.uint8).tobytes()


class Run:
    """One kernel reading ``wire`` from a socket into fresh blocks."""

    def __init__(self, kernel, wire: bytes, *, close: bool = True, timeout=5.0, stop=False) -> None:
        self.blocks = {"pc.ram": np.full(64 * PAGE, 0xEE, np.uint8),
                       "rom": np.full(4 * PAGE, 0xDD, np.uint8)}
        a, b = socket.socketpair()
        b.setblocking(False)
        wake = os.eventfd(0, os.EFD_NONBLOCK)
        writer = threading.Thread(target=self._write, args=(a, wire, close))
        writer.start()
        if stop:
            threading.Timer(0.1, os.eventfd_write, (wake, 1)).start()
        self.head = np.zeros(HSIZE, np.uint8)
        table = [(k.encode(), v, len(v)) for k, v in self.blocks.items()]
        try:
            self.result = kernel.receive_packets(b.fileno(), wake, self.head, table, PAGE, ALLOC,
                                                 timeout)
            self.lowat = b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        finally:
            b.close()  # a writer still blocked on what the kernel left unread fails now
            writer.join()
            a.close()
            os.close(wake)

    @staticmethod
    def _write(sock, wire: bytes, close: bool) -> None:
        try:
            sock.sendall(wire)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the reader stopped early and closed its end
            pass

    @property
    def status(self) -> int:
        return self.result[0]


def both(wire: bytes, **kw) -> list:
    runs = [Run(k, wire, **kw) for k in KERNELS]
    a, b = runs
    assert a.result == b.result
    for name in a.blocks:
        assert np.array_equal(a.blocks[name], b.blocks[name])
    assert np.array_equal(a.head, b.head)
    assert a.lowat == b.lowat == 1  # the Python path's reads see the default mark again
    return runs


def test_plain_packets_land_in_place_then_end():
    data = pages(5, 1)
    wire = (packet("pc.ram", [0, 4096, 8192], data[: 3 * PAGE], num=1)
            + packet("pc.ram", [40 * PAGE, 3 * PAGE], data[3 * PAGE :], num=2)
            + packet("rom", [], num=3))
    run = both(wire)[0]
    status, packets, npages, zeros, nbytes, *_ = run.result
    assert (status, packets, npages, zeros, nbytes) == (compiled.END, 3, 5, 0, len(wire))
    ram = run.blocks["pc.ram"].reshape(-1, PAGE)
    assert ram[0:3].tobytes() == data[: 3 * PAGE]
    assert ram[40].tobytes() == data[3 * PAGE : 4 * PAGE]
    assert ram[3].tobytes() == data[4 * PAGE :]
    assert (ram[4:40] == 0xEE).all() and (ram[41:] == 0xEE).all()


def test_zero_pages_of_a_qemu10_packet_are_zeroed():
    data = pages(1, 2)
    run = both(packet("rom", [PAGE], data, zeros=[0, 3 * PAGE]))[0]
    assert run.result[:4] == (compiled.END, 1, 1, 2)
    rom = run.blocks["rom"].reshape(-1, PAGE)
    assert (rom[0] == 0).all() and (rom[3] == 0).all()
    assert rom[1].tobytes() == data and (rom[2] == 0xDD).all()


@pytest.mark.parametrize("bad", [
    pytest.param(dict(flags=1), id="sync"),
    pytest.param(dict(flags=2), id="zlib"),
    pytest.param(dict(block="nope"), id="unknown-block"),
    pytest.param(dict(offsets=[PAGE + 8]), id="misaligned"),
    pytest.param(dict(offsets=[64 * PAGE]), id="beyond-block"),
    pytest.param(dict(block="rom", offsets=[4 * PAGE]), id="beyond-small-block"),
])
def test_headers_for_python_stop_the_loop_before_any_page(bad):
    kw = {"block": "pc.ram", "offsets": [0], "flags": 0, **bad}
    first = packet("pc.ram", [5 * PAGE], pages(1, 3))
    second = packet(kw["block"], kw["offsets"], pages(1, 4), flags=kw["flags"], num=2)
    run = both(first + second)[0]
    status, packets, npages, _, nbytes, *_ = run.result
    assert (status, packets, npages) == (compiled.HEADER, 1, 1)
    assert nbytes == len(first) + HSIZE  # the header read, its data left on the socket
    assert run.head.tobytes() == second[:HSIZE]
    ram = run.blocks["pc.ram"].reshape(-1, PAGE)
    assert (np.delete(ram, 5, axis=0) == 0xEE).all()


@pytest.mark.parametrize("field,offset,value", [
    ("magic", 0, b"\0\0\0\0"), ("version", 4, b"\0\0\0\2"), ("pages_alloc", 12, b"\0\0\4\1"),
    ("normal_pages", 16, b"\0\0\0\x11"), ("zero_pages", 32, b"\0\0\0\x10"),
])
def test_corrupt_fields_are_left_for_python(field, offset, value):
    pkt = bytearray(packet("pc.ram", [0], pages(1, 5)))
    pkt[offset : offset + len(value)] = value
    run = both(bytes(pkt))[0]
    assert run.result[:3] == (compiled.HEADER, 0, 0)
    assert (run.blocks["pc.ram"] == 0xEE).all()


def test_name_without_nul_is_left_for_python():
    pkt = bytearray(packet("pc.ram", [0], pages(1, 6)))
    pkt[64 : 64 + 256] = b"x" * 256
    assert both(bytes(pkt))[0].status == compiled.HEADER


@pytest.mark.parametrize("cut", [1, 100, HSIZE - 1, HSIZE + 1, HSIZE + PAGE + 7])
def test_a_cut_inside_a_packet_is_truncated(cut):
    pkt = packet("pc.ram", [0, PAGE * 9], pages(2, 7))
    run = both(pkt[:cut])[0]
    status, packets, _, _, nbytes, got, want, _ = run.result
    assert (status, packets, nbytes) == (compiled.TRUNCATED, 0, cut)
    if cut < HSIZE:
        assert (got, want) == (cut, HSIZE)
    else:
        assert (got, want) == (cut - HSIZE, 2 * PAGE)


def test_silence_times_out_and_a_stop_request_stops():
    assert both(b"", close=False, timeout=0.05)[0].status == compiled.TIMEOUT
    assert both(b"", close=False, timeout=None, stop=True)[0].status == compiled.STOPPED


def test_bad_arguments_raise():
    for k in KERNELS:
        with pytest.raises(ValueError):
            k.receive_packets(0, 0, bytearray(HSIZE), [], 4095, ALLOC, None)
        with pytest.raises(ValueError):
            k.receive_packets(0, 0, bytearray(10), [], PAGE, ALLOC, None)
        with pytest.raises(ValueError):
            k.receive_packets(0, 0, bytearray(HSIZE), [(b"x", bytearray(PAGE), PAGE + 1)], PAGE,
                              ALLOC, None)


_packet = st.tuples(
    st.sampled_from(["pc.ram", "rom", "other"]),
    st.lists(st.integers(0, 70), max_size=ALLOC),
    st.sampled_from([0, 0, 0, 1, 2, 0x40]),
    st.integers(0, 2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_packet, min_size=1, max_size=6), st.integers(0, 2**32 - 1), st.data())
def test_random_streams_agree(packets, seed, data):
    """Random packets, some invalid, then a random byte flip or cut: the twins agree."""
    wire = bytearray()
    for i, (block, idx, flags, nzero) in enumerate(packets):
        idx = idx[: ALLOC - nzero]
        zeros = [PAGE * (60 + j) for j in range(nzero)] if nzero else None
        wire += packet(block, [PAGE * j for j in idx], pages(len(idx), seed + i), flags=flags,
                       zeros=zeros, num=i)
    mutate = data.draw(st.sampled_from(["none", "flip", "cut"]))
    if mutate == "flip":
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif mutate == "cut":
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    both(bytes(wire))
