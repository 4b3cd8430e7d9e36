"""Multifd packets of a real QEMU 7.2 migration decode with qmigx's framing and streams.

Two QEMU processes migrate (multifd, 2 channels, compression none/zlib/zstd)
over unix sockets through a recording proxy in this process. Every
recorded channel is then parsed: its init packet must validate, every
packet header must unpack against the source's RAM blocks, and one
persistent receive stream per channel must turn each packet's data into
exactly ``normal_pages * 4096`` bytes. A file loaded into guest RAM with
``-device loader`` gives pages whose content is known, and those must
come out byte for byte.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from qemu_support.qmp import QMPClient
from qmigx import multifd as mf
from qmigx.errors import MultifdPacketError

pytestmark = pytest.mark.qemu

PAGE = 4096
BLOB_ADDR = 0x200000
BLOB_PAGES = 192


class RecordingProxy:
    """Accepts the source's connections, connects each in turn to the destination, keeps the bytes."""

    def __init__(self, listen_path: str, target_path: str) -> None:
        self.target = target_path
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(listen_path)
        self.server.listen(8)
        self.server.settimeout(0.1)
        self.stop = threading.Event()
        self.recorded: list[bytearray] = []
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                src, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            src.settimeout(None)
            # connecting in accept order keeps the main channel first at the destination
            dst = socket.socket(socket.AF_UNIX)
            dst.connect(self.target)
            self.sockets += [src, dst]
            buf = bytearray()
            self.recorded.append(buf)
            for a, b, rec in ((src, dst, buf), (dst, src, None)):
                t = threading.Thread(target=self._pump, args=(a, b, rec), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, rec: bytearray | None) -> None:
        try:
            while True:
                chunk = a.recv(1 << 20)
                if not chunk:
                    break
                if rec is not None:
                    rec += chunk
                b.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.accepter.join(timeout=5)
        self.server.close()
        for t in self.threads:
            t.join(timeout=5)
        for s in self.sockets:
            s.close()


def _ram_blocks(qmp: QMPClient) -> dict[str, int]:
    """RAM block name -> used length, from HMP ``info ramblock``."""
    text = qmp.execute_raw("human-monitor-command", {"command-line": "info ramblock"})
    blocks = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\S+)\s+[\d.]+ \S+\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x[0-9a-f]+", line)
        if m:
            blocks[m.group(1)] = int(m.group(3), 16)
    return blocks


def _blob() -> bytes:
    """Pages with known content: random, text-like and constant ones (no zero pages)."""
    rng = np.random.default_rng(7)
    pages = []
    for i in range(BLOB_PAGES):
        if i % 3 == 0:
            pages.append(rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes())
        elif i % 3 == 1:
            pages.append((f"page {i} of the qmigx multifd test. " * 200).encode()[:PAGE])
        else:
            pages.append(bytes([i % 255 + 1]) * PAGE)
    return b"".join(pages)


def _migrate(qemu_bin: str, tmp_path, compression: str):
    blob_path = tmp_path / "blob.bin"
    blob_path.write_bytes(_blob())
    common = [
        qemu_bin, "-M", "pc", "-m", "64", "-nographic", "-nodefaults", "-S",
        "-device", f"loader,file={blob_path},addr={BLOB_ADDR:#x},force-raw=on",
    ]
    procs = []
    qmps = []
    proxy = None
    try:
        for role in ("src", "dst"):
            args = common + ["-qmp", f"unix:{tmp_path / role}.qmp,server=on,wait=off"]
            if role == "dst":
                args += ["-incoming", "defer"]
            with open(tmp_path / f"{role}.log", "wb") as log:
                procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT))
        for role, proc in zip(("src", "dst"), procs):
            qmps.append(QMPClient(str(tmp_path / f"{role}.qmp"), timeout=10.0))
            qmps[-1].connect(alive=lambda proc=proc: proc.poll() is None)
        src, dst = qmps
        for q in (src, dst):
            q.execute("migrate-set-capabilities",
                      capabilities=[{"capability": "multifd", "state": True}])
            q.execute_raw("migrate-set-parameters", {
                "multifd-channels": 2, "multifd-compression": compression})
        src.execute_raw("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        blocks = _ram_blocks(src)
        dst.execute("migrate-incoming", uri=f"unix:{tmp_path / 'dst.sock'}")
        proxy = RecordingProxy(str(tmp_path / "proxy.sock"), str(tmp_path / "dst.sock"))
        src.execute("migrate", uri=f"unix:{tmp_path / 'proxy.sock'}")
        deadline = time.monotonic() + 20
        while True:
            status = src.execute("query-migrate").get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, "migration did not finish"
            time.sleep(0.05)
        assert status == "completed", (tmp_path / "src.log").read_text(errors="replace")
        while dst.execute("query-migrate").get("status") not in ("completed", None):
            assert time.monotonic() < deadline, "destination did not finish"
            time.sleep(0.05)
        for q in qmps:
            q.execute("quit")
        for p in procs:
            p.wait(timeout=10)
        proxy.close()
        assert blocks, "no RAM blocks found in 'info ramblock'"
        return blocks, [bytes(b) for b in proxy.recorded]
    finally:
        for q in qmps:
            try:
                q.close()
            except OSError:
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if proxy is not None:
            proxy.close()


def _parse_channel(raw: bytes, blocks, compression: str, stream):
    """Every packet of one channel: (header, pages bytes); checks exact consumption."""
    init = mf.unpack_init_packet(raw, channels=2)
    pos = mf.INIT_PACKET_SIZE
    packets = []
    while pos < len(raw):
        hdr = mf.unpack_packet_header(memoryview(raw)[pos:], blocks=blocks,
                                      compression=compression)
        pos += hdr.header_size
        data = raw[pos:pos + hdr.data_size]
        assert len(data) == hdr.data_size
        pos += hdr.data_size
        pages = bytearray(hdr.normal_pages * PAGE)
        if hdr.normal_pages:
            assert stream.decompress_into(data, pages, hdr.normal_pages, PAGE) == len(pages)
        packets.append((hdr, bytes(pages), data))
    assert pos == len(raw)
    return init, packets


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_qemu_multifd_channels_decode(qemu_bin, tmp_path, compression):
    blocks, recorded = _migrate(qemu_bin, tmp_path, compression)
    assert len(recorded) == 3  # main channel first, then the two multifd channels
    assert recorded[0][:4] == b"QEVM"
    blob = _blob()
    ids = set()
    placed = bytearray(blocks["pc.ram"])
    pages_seen = 0
    syncs = []
    for raw in recorded[1:]:
        init, packets = _parse_channel(raw, blocks, compression, mf.recv_stream(compression))
        ids.add(init.channel_id)
        syncs.append(sum(h.sync for h, _, _ in packets))
        for hdr, pages, data in packets:
            assert hdr.pages_alloc == 128
            if hdr.normal_pages:
                assert hdr.compression_bits == mf.recv_stream(compression).flag
                if compression == "zlib":
                    assert data.endswith(b"\x00\x00\xff\xff")
                if hdr.ramblock == "pc.ram":
                    mf.place_pages(pages, hdr.offsets, placed, PAGE)
                pages_seen += hdr.normal_pages
    assert ids == {0, 1}
    assert syncs[0] == syncs[1] and syncs[0] >= 2
    assert pages_seen >= BLOB_PAGES
    assert bytes(placed[BLOB_ADDR:BLOB_ADDR + len(blob)]) == blob


def test_qemu_zlib_packets_need_the_persistent_stream(qemu_bin, tmp_path):
    blocks, recorded = _migrate(qemu_bin, tmp_path, "zlib")
    identical = []
    for raw in recorded[1:]:
        _, packets = _parse_channel(raw, blocks, "zlib", mf.ZlibRecvStream())
        with_data = [(h, p, d) for h, p, d in packets if h.normal_pages]
        assert with_data and with_data[0][2][:1] == b"\x78"  # zlib header only in the first
        for hdr, _, data in with_data[1:]:
            with pytest.raises(MultifdPacketError):
                mf.ZlibRecvStream().decompress_into(
                    data, bytearray(hdr.normal_pages * PAGE), hdr.normal_pages, PAGE)
        # our sender, fed the same pages, makes the same stream as QEMU's
        tx = mf.ZlibSendStream(1)
        identical += [tx.compress_pages(np.frombuffer(p, np.uint8).reshape(-1, PAGE)) == d
                      for _, p, d in with_data]
    if not identical[0]:
        pytest.skip("QEMU links a different zlib build: byte identity not expected")
    assert all(identical)
