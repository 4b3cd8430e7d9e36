"""Fault-tolerant memory (``ColoPrimaryMemory`` / ``ColoSecondaryMemory``) and ``incoming --save``.

* Arrays (numpy and mmap) written step by step: after each checkpoint the
  standby's copy equals the primary's; after failover it stays so.
* A standby with a heartbeat timeout fails over by itself when no
  checkpoint comes, holding the initial copy.
* A primary process killed with SIGKILL in the middle of a checkpoint: the
  standby holds the previous complete one (every page of checkpoint k
  holds the byte k, so the copy shows which checkpoint it is).
* ``qmigx incoming --cap x-colo=on --save FILE`` fails over when the
  primary's connection ends and writes the last complete checkpoint as a
  plain stream, which qmigx loads back byte for byte (a QEMU 7.2 loading
  it is in test_colo_qemu.py).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qmigx
from qmigx.errors import ColoError
from qmigx.ram import aligned_array

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096


def _wait(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.0005)


def test_arrays_and_mmap_follow_each_checkpoint_and_survive_failover(tmp_path):
    uri = f"unix:{tmp_path / 'ft.sock'}"
    weights = aligned_array(2 << 20)
    weights[:] = np.arange(weights.size, dtype=np.uint64).astype(np.uint8)
    region = mmap.mmap(-1, 256 * PAGE)
    view = np.frombuffer(region, np.uint8)
    standby = qmigx.ColoSecondaryMemory(uri)
    standby.start()
    primary = qmigx.ColoPrimaryMemory({"weights": weights, "region": region}, uri)
    primary.start()
    rng = np.random.default_rng(1)
    try:
        for step in range(20):
            with primary.writing():
                for p in rng.integers(0, weights.size // PAGE, 16):
                    weights[p * PAGE : p * PAGE + 64] = step
                    primary.mark_dirty("weights", int(p) * PAGE, 64)
                view[step * PAGE : (step + 1) * PAGE] = step + 1
                primary.mark_dirty("region", step * PAGE, PAGE)
            row = primary.checkpoint()
            assert row["dirty_pages"] >= 2
            copy = standby.arrays
            assert np.array_equal(copy["weights"], weights), step
            assert np.array_equal(copy["region"], view), step
        assert primary.checkpoints == standby.checkpoints == 20
        assert primary.status == {"mode": "primary", "last-mode": "none", "reason": "none"}
        standby.failover()
        arrays = standby.wait(30)
        assert np.array_equal(arrays["weights"], weights)
        assert np.array_equal(arrays["region"], view)
        assert standby.status == {"mode": "none", "last-mode": "secondary", "reason": "request"}
    finally:
        primary.close()
    assert primary.status["last-mode"] == "primary"


def test_a_standby_without_a_guest_applies_the_cache_after_acknowledging(tmp_path, monkeypatch):
    """The primary resumes before the standby's cache→RAM copy ends; readers and failover wait.

    The copy is held until the test releases it: the primary's checkpoint
    returns while it is held (so it did not wait for it), ``arrays`` then
    waits for it, and a failover asked for while it is held still ends
    with the checkpoint's content.
    """
    from qmigx.placement import ColoCachePlacement

    real_flush = ColoCachePlacement.flush
    release, done = threading.Event(), threading.Event()

    def held_flush(self, blocks):
        release.wait(30)
        n = real_flush(self, blocks)
        done.set()
        return n

    uri = f"unix:{tmp_path / 'ft.sock'}"
    data = aligned_array(64 * PAGE)
    standby = qmigx.ColoSecondaryMemory(uri)
    standby.start()
    primary = qmigx.ColoPrimaryMemory({"data": data}, uri)
    primary.start()
    try:
        monkeypatch.setattr(ColoCachePlacement, "flush", held_flush)
        for step in (1, 2):
            release.clear()
            done.clear()
            with primary.writing():
                data[:] = step
                primary.mark_dirty("data", 0, data.size)
            row = primary.checkpoint()
            assert row["dirty_pages"] == 64
            assert not done.is_set()  # acknowledged before RAM was written
            threading.Timer(0.2, release.set).start()
            if step == 1:
                assert np.all(standby.arrays["data"] == 1)  # waited for the copy
                assert done.is_set()
            else:
                standby.failover()
                arrays = standby.wait(30)
                assert np.all(arrays["data"] == 2)
        assert standby.checkpoints == 2
    finally:
        release.set()
        primary.close()


def test_a_standby_fails_over_when_no_checkpoint_comes_in_time(tmp_path):
    uri = f"unix:{tmp_path / 'ft.sock'}"
    data = aligned_array(64 * PAGE)
    data[:] = 7
    standby = qmigx.ColoSecondaryMemory(uri, heartbeat_timeout=0.5)
    standby.start()
    primary = qmigx.ColoPrimaryMemory({"data": data}, uri)  # checkpoints on demand only
    primary.start()
    try:
        with primary.writing():
            data[:PAGE] = 9  # never checkpointed
            primary.mark_dirty("data", 0, PAGE)
        arrays = standby.wait(30)
        assert isinstance(standby.error, ColoError)
        assert standby.error.field == "heartbeat"
        assert standby.status["reason"] == "error"
        assert np.all(arrays["data"] == 7)
    finally:
        primary.close()


_CHILD = r"""
import sys, numpy as np, qmigx
from qmigx.ram import aligned_array
arr = aligned_array(int(sys.argv[2]))
p = qmigx.ColoPrimaryMemory({"arr": arr}, sys.argv[1])
p.start()
print("colo", flush=True)
k = 0
while True:
    k += 1
    with p.writing():
        arr[:] = k & 0xFF
        p.mark_dirty("arr", 0, arr.size)
    p.checkpoint()
"""


def test_a_primary_killed_mid_checkpoint_leaves_the_previous_one(tmp_path):
    uri = f"unix:{tmp_path / 'ft.sock'}"
    standby = qmigx.ColoSecondaryMemory(uri)
    standby.start()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, uri, str(48 << 20)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"colo\n", child.stderr.read()
        colo = lambda: standby.destination.colo
        _wait(lambda: colo() is not None and colo().checkpoints >= 2, "two checkpoints")
        # every checkpoint carries 48 MiB: catch one on the wire and kill the primary
        _wait(lambda: colo().phase == "receiving" and colo().rx.offset > 0, "a checkpoint")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        arrays = standby.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
    held = standby.checkpoints
    assert held >= 2
    assert standby.destination.colo.discarded == 1  # the one cut by the kill
    assert standby.status["reason"] == "error"
    assert np.all(arrays["arr"] == held & 0xFF)


def test_incoming_with_x_colo_saves_the_last_checkpoint_as_a_plain_stream(tmp_path):
    from qmigx.tools.streams import load_stream

    uri = f"unix:{tmp_path / 'ft.sock'}"
    save, report = tmp_path / "svm.qmigx", tmp_path / "report.json"
    argv = [sys.executable, "-X", "faulthandler", "-m", "qmigx", "incoming", uri, "--cap", "x-colo=on",
            "--save", str(save), "--report", str(report)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: os.path.exists(tmp_path / "ft.sock") or proc.poll() is not None,
              "the secondary listening")
        mem = aligned_array(1 << 20)
        primary = qmigx.ColoPrimaryMemory({"pc.ram": mem}, uri)
        try:
            primary.start(timeout=20)
        except Exception:
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            raise AssertionError(proc.stderr.read().decode())
        for step in range(5):
            with primary.writing():
                mem[step * PAGE : (step + 1) * PAGE] = step + 1
                primary.mark_dirty("pc.ram", step * PAGE, PAGE)
            primary.checkpoint()
        with primary.writing():  # after the last checkpoint: must not be in the file
            mem[-PAGE:] = 0xEE
            primary.mark_dirty("pc.ram", mem.size - PAGE, PAGE)
        want = np.array(mem, copy=True)
        want[-PAGE:] = 0
        primary.failover()  # the primary goes on alone: the connection ends
        assert proc.wait(30) == 0, proc.stderr.read()
        assert b"took over after 5 checkpoint(s)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    loaded = load_stream(str(save))
    assert np.array_equal(loaded.blocks["pc.ram"].memory, want)
    rep = json.loads(report.read_text())
    assert rep["colo"]["checkpoints"] == 5
    assert rep["colo"]["status"] == {"mode": "none", "last-mode": "secondary", "reason": "error"}
    assert [r["checkpoint"] for r in rep["colo"]["rows"]] == [1, 2, 3, 4, 5]
    assert all(r["dirty-pages"] >= 1 and r["pause-ms"] > 0 for r in rep["colo"]["rows"])
    pytest.importorskip("matplotlib")
    png = tmp_path / "colo.png"
    r = subprocess.run([sys.executable, "-m", "qmigx", "plot", str(report), "--out", str(png)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
