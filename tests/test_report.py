"""Migration reports from the CLI, and their plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from streams import small_stream


def test_send_and_incoming_write_reports_and_plot_draws_them(tmp_path):
    stream = tmp_path / "s.mig"
    stream.write_bytes(small_stream())
    sock = tmp_path / "m.sock"
    inc = subprocess.Popen([sys.executable, "-m", "qmigx", "incoming", f"unix:{sock}",
                            "--save", str(tmp_path / "out.mig"), "--report",
                            str(tmp_path / "dst.json")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert inc.poll() is None, inc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = subprocess.run([sys.executable, "-m", "qmigx", "send", str(stream), f"unix:{sock}",
                        "--report", str(tmp_path / "src.json")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    _, err = inc.communicate(timeout=30)
    assert inc.returncode == 0, err
    src = json.loads((tmp_path / "src.json").read_text())
    dst = json.loads((tmp_path / "dst.json").read_text())
    assert src["side"] == "source" and src["status"] == "completed"
    assert src["iterations"] and {"pages", "bytes", "throughput_mbps", "dirty_rate_mbps",
                                  "throttle", "xbzrle_hits"} <= set(src["iterations"][0])
    assert sum(r["pages"]["normal"] + r["pages"]["zero"] for r in src["iterations"]) > 0
    assert dst["side"] == "destination" and dst["status"] == "completed"
    assert dst["timings"]["migration_s"] >= 0
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    p = subprocess.run([sys.executable, "-m", "qmigx", "plot", str(tmp_path / "src.json"),
                        "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000


def test_plot_rejects_a_non_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    p = subprocess.run([sys.executable, "-m", "qmigx", "plot", str(bad), "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("qmigx: error:")
