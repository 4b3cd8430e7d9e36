"""The QEMU 7.2 test harness itself: guest, QMP client, stream making and loading.

The interop tests (test_qemu_streams.py) are only as good as the streams
and the reference RAM images this harness produces, so these tests check
that the guest really writes what ``expected_page`` says, that each named
stream is a real QEMU stream of the intended kind, and that a QEMU
destination loads a stream back into exactly the source's RAM.
"""

from __future__ import annotations

import struct
from pathlib import Path
import time

import numpy as np
import pytest

from qemu_support import guest, streams
from qemu_support.harness import Qemu, QemuError, load_stream, parse_size, qemu_args
from qemu_support.qmp import QMPCommandError

RAM = 64 << 20


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


def _ram_pages(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, guest.PAGE_SIZE)


def _mismatched_pages(ram: np.ndarray, seed: int, first: int, last: int) -> list[int]:
    exp = guest.expected_pages(seed, first, last - first)
    bad = np.nonzero((ram[first:last] != exp).any(axis=1))[0]
    return [first + int(i) for i in bad]


# --- the guest image, without QEMU -------------------------------------------------


def test_multiboot_header():
    img = guest.build_guest(0x1234, RAM, dirty=True)
    magic, flags, checksum, header_addr, load, load_end, bss_end, entry = struct.unpack_from("<8I", img)
    assert magic == 0x1BADB002 and flags & 0x10000
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert header_addr == load == guest.LOAD_ADDR
    assert load_end - load == len(img) == guest.PAGE_SIZE
    assert load_end <= guest.MARKER_ADDR < bss_end <= guest.FILL_START
    assert load < entry < load_end
    # the seed and the fill end are immediates in the code: images differ
    assert img != guest.build_guest(0x1235, RAM, dirty=True)
    assert img != guest.build_guest(0x1234, RAM - guest.PAGE_SIZE, dirty=True)
    assert img != guest.build_guest(0x1234, RAM, dirty=False)


def test_listing_covers_the_code():
    text = guest.listing(0x1234, RAM, dirty=True)
    assert "invlpg [edi]" in text and "stosd" in text
    img = guest.build_guest(0x1234, RAM, dirty=True)
    code = bytes.fromhex("".join(line[10:46].replace(" ", "") for line in text.splitlines()))
    assert img[32:32 + len(code)] == code


@pytest.mark.parametrize("bad", [(1, RAM + 1), (1, guest.FILL_START), (-1, RAM), (1 << 32, RAM)])
def test_build_guest_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        guest.build_guest(*bad)


def test_expected_page_pattern():
    seed = 77
    zeros = [i for i in range(0x200, 0x240) if i % 7 == 3]
    assert len(zeros) >= 9
    for i in zeros:
        assert guest.page_kind(i) == "zero" and guest.expected_page(seed, i) == bytes(4096)
    i = 0x200 + next(k for k in range(100) if (0x200 + k) % 11 == 5 and (0x200 + k) % 7 != 3)
    assert guest.page_kind(i) == "run" and guest.expected_page(seed, i) == bytes([i & 0xFF]) * 4096
    # random pages: xorshift32 from ((i * GOLDEN) ^ seed) | 1, words little-endian
    i = 0x200
    assert guest.page_kind(i) == "random"
    x = (((i * guest.GOLDEN) & 0xFFFFFFFF) ^ seed) | 1
    words = []
    for _ in range(1024):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        words.append(x)
    assert guest.expected_page(seed, i) == struct.pack("<1024I", *words)
    assert guest.expected_page(seed, i) != guest.expected_page(seed + 1, i)
    block = guest.expected_pages(seed, 0x200, 40)
    assert all(block[k].tobytes() == guest.expected_page(seed, 0x200 + k) for k in range(40))


def test_qemu_args_rejects_unknown_devices(tmp_path):
    with pytest.raises(ValueError):
        qemu_args(mem_path=tmp_path / "m", devices=("floppy",))
    with pytest.raises(ValueError):
        qemu_args(mem_path=tmp_path / "m", devices=("usb-tablet",))
    assert parse_size("64M") == RAM and parse_size("1G") == 1 << 30 and parse_size(4096) == 4096


# --- the guest under QEMU ----------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_guest_writes_expected_pages(tmp_path, machine):
    seed = 0xC0FFEE
    kernel = tmp_path / "guest.bin"
    kernel.write_bytes(guest.build_guest(seed, RAM, dirty=False))
    with Qemu(machine=machine, ram="64M", kernel=kernel, workdir=tmp_path, name="vm") as vm:
        m = vm.wait_guest_ready(timeout=60)
        assert (m.ready, m.seed, m.ram_bytes, m.dirty, m.counter) == (True, seed, RAM, False, 0)
        ram = _ram_pages(vm.mem_path)
        assert ram.shape[0] == RAM // guest.PAGE_SIZE
        first = guest.FILL_START // guest.PAGE_SIZE
        assert _mismatched_pages(ram, seed, first, ram.shape[0]) == []
        assert vm.marker().counter == 0  # a non-dirtying guest halts


@pytest.mark.qemu
def test_dirty_guest_counter_advances(tmp_path):
    seed = 0xD1D1
    kernel = tmp_path / "guest.bin"
    kernel.write_bytes(guest.build_guest(seed, RAM, dirty=True))
    with Qemu(kernel=kernel, workdir=tmp_path, name="vm") as vm:
        m1 = vm.wait_guest_ready(timeout=60, min_counter=1)
        assert m1.dirty
        deadline = time.monotonic() + 20
        while vm.marker().counter < m1.counter + 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.marker().counter >= m1.counter + 1000
        vm.stop()
        ram = _ram_pages(vm.mem_path)
        first = guest.FILL_START // guest.PAGE_SIZE
        region_end = guest.DIRTY_FIRST_PAGE + guest.DIRTY_REGION
        # only the dirty region changes, and some of it did
        assert _mismatched_pages(ram, seed, region_end, ram.shape[0]) == []
        assert len(_mismatched_pages(ram, seed, first, region_end)) >= guest.DIRTY_WINDOW


@pytest.mark.qemu
def test_qmp_errors_and_events(tmp_path):
    with Qemu(paused=True, workdir=tmp_path, name="vm") as vm:
        with pytest.raises(QMPCommandError) as ei:
            vm.qmp.execute("no-such-command")
        assert ei.value.error_class == "CommandNotFound"
        with pytest.raises(QemuError, match="GenericError|Invalid|expects"):
            vm.cmd("migrate-set-parameters", xbzrle_cache_size=1000)  # not a power of two
        assert vm.status() == "prelaunch"
        vm.cont()
        ev = vm.qmp.wait_event("RESUME", timeout=10)
        assert ev["event"] == "RESUME"
        assert vm.status() == "running"


# --- the named streams --------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("name", streams.STREAM_NAMES)
def test_named_stream(name):
    info = streams.get_stream(name)
    data = Path(info.stream).read_bytes()
    magic, version, machine = streams.read_header(data)
    assert (magic, version) == (0x5145564D, 3) and data[:4] == b"QEVM"
    assert machine.startswith("pc-q35-" if info.machine == "q35" else "pc-i440fx-")
    desc = streams.vmdesc(data)
    assert desc["page_size"] == 4096 and desc["devices"]
    _, blocks, _ = streams.ram_setup(data, ignore_shared=info.ignore_shared)
    assert blocks[0].name == "mem0" and blocks[0].length == RAM
    assert info.stats["status"] == "completed"

    # the RAM image: filled by the guest, only the dirty region may differ
    ram = _ram_pages(info.mem)
    m = guest.read_marker(info.mem)
    assert m.ready and m.seed == info.seed and m.ram_bytes == RAM and m.dirty == info.live
    region_end = guest.DIRTY_FIRST_PAGE + guest.DIRTY_REGION
    first = guest.FILL_START // guest.PAGE_SIZE if not info.live else region_end
    assert _mismatched_pages(ram, info.seed, first, ram.shape[0]) == []

    stats = info.stats
    if info.live:
        assert stats["ram"]["dirty-sync-count"] >= 4
        assert m.counter > 0
    if name == "pc-xbzrle":
        assert stats["xbzrle-cache"]["pages"] > 0 and stats["xbzrle-cache"]["bytes"] > 0
    if name == "pc-compress":
        assert stats["compression"]["pages"] > 0
        assert stats["compression"]["compressed-size"] > 0
    if name == "pc-ignore-shared":
        assert b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared" in data[:200]
        assert blocks[0].gpa == 0
        assert stats["ram"]["total"] == sum(b.length for b in blocks) - RAM  # mem0 not counted
        assert len(data) < 4 << 20  # no guest RAM pages in the stream
    else:
        assert len(data) > 40 << 20  # ~14,000 random pages
    if name == "pc-devices":
        vmsd_names = {d.get("vmsd_name") for d in desc["devices"]}
        assert {"e1000", "virtio-net", "virtio-blk", "ehci", "usb-ptr", "serial"} <= vmsd_names


@pytest.mark.qemu
def test_paused_stream_loads_back():
    info = streams.get_stream("pc-paused")
    assert load_stream(info.stream, like=info) == Path(info.mem).read_bytes()


@pytest.mark.qemu
def test_load_failure_reports_qemu_error(tmp_path):
    info = streams.get_stream("pc-ignore-shared")  # small: quick to copy
    data = bytearray(Path(info.stream).read_bytes())
    pos, _ = streams.first_page_record(bytes(data), ignore_shared=True)
    data[pos + 7] ^= 0xFF  # flags byte: an impossible flag combination
    bad = tmp_path / "bad.stream"
    bad.write_bytes(data)
    with pytest.raises(QemuError, match="(?i)migration|flags|exited"):
        load_stream(bad, like=info)
