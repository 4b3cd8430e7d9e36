"""Whole-stream throughput: load, write, extract and analyze 1 GiB of RAM.

Each case reports its ratio to a memcpy of the guest's RAM bytes measured
in the same run. ``extract`` and ``analyze`` are timed as whole processes
(interpreter start-up included), as a user runs them; peak memory of the
loading process is recorded in ``extra_info`` (``peak_rss_mib``).

QEMU 7.2 on this class of machine, for comparison: loading 0.086x,
writing 0.10x, its analyze-migration.py ``-d state`` 0.088x and ``-x``
0.037x.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.tools.streams import load_stream, save_stream

GIB = 1 << 30


@pytest.fixture(scope="module")
def guest():
    """1 GiB of mostly non-zero RAM (one page in 64 is zero)."""
    mem = np.empty(GIB, np.uint8)
    rng = np.random.default_rng(7)
    chunk = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
    for lo in range(0, GIB, len(chunk)):
        mem[lo : lo + len(chunk)] = chunk
        mem[lo : lo + 8] = (lo >> 20) & 0xFF  # make the chunks differ
    mem.reshape(-1, 4096)[::64] = 0
    return RAMBlockList([RAMBlock("pc.ram", mem)])


@pytest.fixture(scope="module")
def stream_file(guest, tmp_path_factory):
    """The stream on tmpfs when there is one, so reads measure qmigx, not a disk."""
    base = _scratch_dir(tmp_path_factory.mktemp("bench"))
    path = os.path.join(base, f"qmigx-bench-{os.getpid()}-guest.mig")
    with open(path, "wb") as f:
        save_stream(f.write, guest)
    yield path
    os.unlink(path)


def test_load_1gib_from_file(vs_memcpy, guest, stream_file):
    target = RAMBlockList([RAMBlock("pc.ram", np.zeros(GIB, np.uint8))])

    def load():
        return load_stream(stream_file, target)

    vs_memcpy(load, GIB, cold=True, rounds=3)
    assert np.array_equal(target["pc.ram"].memory, guest["pc.ram"].memory)


def _scratch_dir(tmp_path):
    """tmpfs when there is one: a disk file system measures the disk, not us."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else str(tmp_path)


def test_write_1gib_to_file(vs_memcpy, guest, tmp_path, benchmark):
    path = os.path.join(_scratch_dir(tmp_path), f"qmigx-bench-{os.getpid()}.mig")
    try:
        def write():
            with open(path, "wb") as f:
                save_stream(f.write, guest)

        vs_memcpy(write, GIB, cold=True, rounds=3)
        assert os.path.getsize(path) > GIB * 63 // 64  # one page in 64 is a ZERO record
        # the floor any writer has: writing the same bytes raw to that file system
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(guest["pc.ram"].memory)
        raw = time.perf_counter() - t0
        benchmark.extra_info["raw_write_seconds"] = raw
        print(f"raw write of the RAM bytes to {os.path.dirname(path)}: {raw:.3f} s")
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_encode_1gib_stream(vs_memcpy, guest):
    """Making the stream alone, written to /dev/null."""
    def encode():
        with open(os.devnull, "wb") as f:
            return save_stream(f.write, guest)

    ram = vs_memcpy(encode, GIB, cold=True, rounds=3)
    assert ram.stats.normal + ram.stats.duplicate == GIB // 4096


def _run(args, cwd=None):
    subprocess.run([sys.executable, "-m", "qmigx", *args], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL)


def test_extract_1gib_process(vs_memcpy, stream_file, tmp_path, benchmark):
    out = Path(_scratch_dir(tmp_path)) / f"qmigx-bench-x-{os.getpid()}"
    vs_memcpy(lambda: _run(["extract", stream_file, str(out)]), GIB, cold=True, rounds=3)
    assert os.path.getsize(out / "pc.ram.bin") == GIB
    shutil.rmtree(out)


#: QEMU's scripts/analyze-migration.py, when there is a copy (QEMU's packages do not ship it)
QEMU_ANALYZE = os.environ.get("QMIGX_ANALYZE_MIGRATION",
                              "/tmp/qsrc/qemu-7.2.0/scripts/analyze-migration.py")


def test_analyze_state_1gib_process(vs_memcpy, stream_file, benchmark, tmp_path):
    """``qmigx analyze -f`` as a whole process; beside it QEMU's script on the same file.

    The script, when found, runs three times in the same run and its best
    time is divided by qmigx's median (``ratio_to_qemu_script``); both
    print the same JSON, which is compared.
    """
    vs_memcpy(lambda: _run(["analyze", "-f", stream_file]), GIB, cold=True, rounds=3)
    if not os.path.exists(QEMU_ANALYZE):
        return
    ours = subprocess.run([sys.executable, "-m", "qmigx", "analyze", "-f", stream_file],
                          check=True, capture_output=True).stdout
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        theirs = subprocess.run([sys.executable, QEMU_ANALYZE, "-f", stream_file],
                                check=True, capture_output=True).stdout
        best = min(best, time.perf_counter() - t0)
    assert theirs == ours
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        ratio = best / stats.stats.median
        benchmark.extra_info.update(qemu_script_seconds=best,
                                    ratio_to_qemu_script=round(ratio, 3))
        print(f"QEMU's analyze-migration.py: {best:.3f} s, qmigx {ratio:.2f}x as fast")


def test_peak_memory_while_loading(stream_file, benchmark):
    """Peak RSS of a process loading the stream, against guest RAM + 64 MiB."""
    # VmHWM, not ru_maxrss: a child forked from this big process would
    # inherit the parent's high-water mark in ru_maxrss
    code = ("import sys; from qmigx.tools.streams import load_stream; "
            "load_stream(sys.argv[1]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    rss_kib = benchmark.pedantic(
        lambda: int(subprocess.run([sys.executable, "-c", code, stream_file], check=True,
                                   capture_output=True, text=True).stdout),
        rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = rss_kib / 1024
    benchmark.extra_info["limit_mib"] = GIB / (1 << 20) + 64
    print(f"\npeak RSS while loading 1 GiB: {rss_kib / 1024:.0f} MiB")
    assert rss_kib > 0
