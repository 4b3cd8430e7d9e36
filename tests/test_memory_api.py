"""Live migration of plain numpy memory between two processes (qmigx.memory)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import qmigx
from qmigx.errors import CapabilityError

RECEIVER = textwrap.dedent("""
    import hashlib, sys, qmigx
    arrays = qmigx.receive_memory(sys.argv[1], capabilities=sys.argv[2:], timeout=60)
    for name, mem in sorted(arrays.items()):
        print(name, len(mem), hashlib.sha256(mem).hexdigest())
""")


def _receiver(uri: str, *caps: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RECEIVER, uri, *caps],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _sha(mem) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(mem)).hexdigest()


@pytest.mark.parametrize("caps", [(), ("xbzrle",), ("multifd",)], ids=["plain", "xbzrle",
                                                                        "multifd"])
def test_memory_written_by_another_thread_arrives_intact(tmp_path, caps):
    sock = str(tmp_path / "m.sock")
    rx = _receiver(f"unix:{sock}", *caps)
    _wait_for(sock, rx)
    weights = qmigx.aligned_array(8 << 20)
    weights[:] = np.random.default_rng(1).integers(0, 256, len(weights), dtype=np.uint8)
    stop = threading.Event()

    def writer():  # no mark_dirty: the kernel tracker must see these writes
        rng = np.random.default_rng(2)
        while not stop.is_set():
            weights[rng.integers(0, len(weights), 512)] += 1

    t = threading.Thread(target=writer)

    def pause():
        stop.set()
        t.join()

    q = qmigx.migrate_memory({"weights": weights}, f"unix:{sock}", capabilities=caps,
                             pause=pause, on_start=lambda logs: t.start(), timeout=60)
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    assert q["status"] == "completed"
    assert out.split() == ["weights", str(len(weights)), _sha(weights)]


def test_unaligned_memory_is_refused_clearly_in_auto_mode():
    with pytest.raises(CapabilityError) as ei:
        qmigx.migrate_memory({"buf": np.zeros(1 << 20, np.uint8)[16:16 + (512 << 10)]},
                             "unix:/nonexistent/x.sock")
    assert "not aligned" in str(ei.value) and "track='explicit'" in str(ei.value)


def test_explicit_tracking_with_marks(tmp_path):
    sock = str(tmp_path / "m.sock")
    rx = _receiver(f"unix:{sock}")
    _wait_for(sock, rx)
    buf = np.zeros(4 << 20, np.uint8)  # malloc'ed: explicit marking works for any memory
    stop = threading.Event()
    logs = {}

    def writer():
        rng = np.random.default_rng(3)
        while not stop.wait(0.001):  # a writer that leaves the migration some time
            for i in rng.integers(0, len(buf), 64):
                buf[i] += 1
                logs["buf"].mark_dirty(int(i), 1)

    t = threading.Thread(target=writer)

    def on_start(l):
        logs.update(l)
        t.start()

    def pause():
        stop.set()
        t.join()

    qmigx.migrate_memory({"buf": buf}, f"unix:{sock}", track="explicit", pause=pause,
                         on_start=on_start, timeout=60)
    out, err = rx.communicate(timeout=60)
    assert out.split() == ["buf", str(len(buf)), _sha(buf)], err
