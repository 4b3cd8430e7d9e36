"""The README's main job, ``qmigx demo``, on small RAM sizes."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmigx", "demo", *args], capture_output=True,
                          text=True, timeout=300)


def test_live_demo_migrates_and_checks_every_byte():
    r = run("--ram", "32M")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Migration status: completed" in out
    assert "equal the stopped source's, byte for byte" in out
    assert "multifd bytes:" in out and "cache size: 16777216 bytes" in out


def test_offline_demo_round_trips_a_stream(tmp_path):
    r = run("--ram", "16M", "--offline", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "every byte of RAM and every device field matches" in r.stdout
    assert (tmp_path / "guest.mig").stat().st_size > 8 << 20


def test_demo_rejects_a_bad_size():
    r = run("--ram", "12345")
    assert r.returncode == 1
    assert r.stderr.startswith("qmigx: error: size must be a positive multiple of 4 KiB")
    assert len(r.stderr.strip().splitlines()) == 1
