"""Postcopy with real QEMU 7.2, both directions (QEMU's /postcopy/plain and /postcopy/preempt/plain).

* QEMU source (running, dirtying guest, bandwidth so low that precopy
  cannot converge) -> ``qmigx incoming --cap postcopy-ram=on --touch``:
  ``migrate-start-postcopy``; the background stream is throttled with
  ``max-postcopy-bandwidth`` so that the pages the toucher reads are
  requested: QEMU's own ``postcopy-requests`` counter must be non-zero.
  At the end QEMU's memory-backend-file (the source stops the guest at
  switch-over) must equal what qmigx holds, byte for byte.
* ``qmigx send --start-postcopy`` -> QEMU 7.2 destination whose RAM is a
  memory-backend-file on tmpfs (userfaultfd missing mode needs shmem):
  QEMU must reach ``running`` (it runs the guest while pages arrive) and
  its RAM must equal the stream's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qemu_support.guest import build_guest, read_marker
from qemu_support.harness import Qemu, parse_size
from qemu_support.live import QmigxIncoming, Uris, first_difference, qmigx_argv, qmigx_env

pytestmark = pytest.mark.qemu

RAM = "64M"
RAM_BYTES = parse_size(RAM)
SEED = 0x11FE0009


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("guest") / "guest.bin"
    p.write_bytes(build_guest(SEED, RAM_BYTES, dirty=True))
    return p


def _wait_status(vm: Qemu, want: set, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.query_migrate()
        if q.get("status") in want:
            return q
        if q.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"QEMU migration {q.get('status')}: {q.get('error-desc')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU migration still {q.get('status')} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_postcopy_to_qmigx(transport, preempt, tmp_path, uris, guest):
    uri = uris.make(transport)
    caps = {"postcopy-ram": True, "postcopy-blocktime": True}
    if preempt:
        caps["postcopy-preempt"] = True
    rd = tmp_path / "rd"
    report = tmp_path / "report.json"
    inc = QmigxIncoming(uri, tmp_path, caps=caps, ram_dir=rd, save=tmp_path / "state.mig",
                        report=report, extra=["--touch", "2000"])
    with Qemu(ram=RAM, kernel=guest, workdir=tmp_path, name="src") as vm:
        before = vm.wait_guest_ready(60, min_counter=1000)
        with inc:
            vm.set_capabilities({"postcopy-ram": True, "postcopy-preempt": preempt})
            # precopy cannot converge at 8 MiB/s with a guest dirtying its RAM; the
            # background stream after switch-over is slow enough that the toucher's
            # reads hit missing pages, which QEMU must serve on request
            vm.set_parameters({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 4 << 20,
                               "downtime-limit": 1})
            vm.migrate(uri)
            _wait_status(vm, {"active"})
            time.sleep(0.5)
            vm.cmd("migrate-start-postcopy")
            _wait_status(vm, {"postcopy-active", "completed"})
            stats = _wait_status(vm, {"completed"}, timeout=120)
            rc, err = inc.wait(120)
        assert rc == 0, f"qmigx incoming exited {rc}:\n{err[-3000:]}"
        assert vm.status() == "postmigrate"
        src = vm.read_ram()
    assert read_marker(src).counter > before.counter, "the guest did not run"
    assert stats["ram"]["postcopy-requests"] > 0, stats["ram"]
    pc = json.loads(report.read_text())["postcopy"]
    assert pc["requests"] > 0 and pc["served"] > 0 and pc["touched"] > 0, pc
    # requested pages come on the preempt channel when it is on, never otherwise
    assert (pc["preempt_pages"] > 0) == preempt, pc
    got = (rd / "mem0.bin").read_bytes()
    diff = first_difference(got, src)
    assert diff is None, f"mem0 after postcopy: {diff}"
