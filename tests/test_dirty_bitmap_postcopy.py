"""Dirty bitmaps that go on migrating after the postcopy switch-over, with QEMU 7.2.

With ``dirty-bitmaps`` and ``postcopy-ram`` both on, QEMU 7.2 keeps the
``dirty-bitmap`` section out of the switch-over: its bitmap chunks follow
in PART sections after POSTCOPY_RUN, interleaved with the background RAM
stream, and its END (COMPLETE records) comes with RAM's at the very end
(postcopy.md §8). A destination must take bitmap records while the guest
already runs, and must not count a bitmap as complete before its END.

* QEMU 7.2 source (bitmaps made and dirtied with ``qemu-io``, precopy
  throttled so that it cannot finish first) -> ``qmigx incoming
  --bitmaps --cap postcopy-ram=on``: every bitmap arrives exactly as the
  steps left it, and QEMU's own SHA-256 of each agrees.
* ``qmigx send --bitmaps --start-postcopy`` -> QEMU 7.2 (RAM on tmpfs):
  QEMU ends with the bitmaps a QEMU that made them itself reports.
* qmigx -> qmigx, read back: the bitmap chunks are in PART sections after
  POSTCOPY_RUN and the bitmaps' END comes after it too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from dirty_bitmap_helpers import (DISK_SIZE, STEPS, incoming_cli, qemu_vm, save_base_stream,
                                  send_cli, want_bitmaps)
from qemu_support.bitmaps import Disk, query_bitmaps, run_steps
from qemu_support.guest import build_guest
from qemu_support.harness import Qemu
from qemu_support.live import Uris
from qmigx.block_bitmaps import DirtyBitmapSet
from qmigx.wire import MigCmd

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


def _wait_status(vm, want: set, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.query_migrate()
        if q.get("status") in want:
            return q
        assert q.get("status") not in ("failed", "cancelled"), q.get("error-desc")
        assert time.monotonic() < deadline, f"QEMU migration still {q.get('status')}"
        time.sleep(0.05)


@pytest.mark.parametrize("ram_postcopy", [True, False], ids=["with-ram", "bitmaps-only"])
def test_qemu_bitmaps_in_postcopy_to_qmigx(tmp_path, uris, ram_postcopy):
    """Bitmaps alone: QEMU switches once RAM is below its threshold, since it counts the
    bitmaps' unsent granules as postcopy-pending; a 1 ms downtime limit keeps that
    threshold below them, and an idle guest lets RAM get there."""
    uri = uris.make("unix")
    out = tmp_path / "bitmaps.json"
    kernel = tmp_path / "guest.bin"  # a guest dirtying its RAM: precopy cannot converge first
    kernel.write_bytes(build_guest(0x0B17C0DE, 64 << 20, dirty=ram_postcopy))
    disk = Disk(tmp_path / "src.raw", DISK_SIZE).create()
    with Qemu(ram="64M", kernel=kernel, workdir=tmp_path, name="src", extra=disk.args()) as vm:
        vm.wait_guest_ready(60, min_counter=1000 if ram_postcopy else 0)
        run_steps(vm, STEPS)
        before = query_bitmaps(vm)
        pc = ["--cap", "postcopy-ram=on"] if ram_postcopy else []
        inc = incoming_cli(uri, tmp_path, out, extra=pc)
        with inc:
            vm.set_capabilities({"dirty-bitmaps": True, "postcopy-ram": ram_postcopy})
            vm.set_parameters({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 8 << 20,
                               "downtime-limit": 300 if ram_postcopy else 1})
            vm.migrate(uri)
            _wait_status(vm, {"active"})
            vm.cmd("migrate-start-postcopy")
            _wait_status(vm, {"postcopy-active", "completed"})
            stats = _wait_status(vm, {"completed"}, timeout=120)
            rc, err = inc.wait(120)
        assert rc == 0, err
    got = json.loads(out.read_text())
    assert got == want_bitmaps()
    for name, bm in DirtyBitmapSet.from_json(got).nodes["disk0"].items():
        q = before["disk0"][name]
        assert (bm.sha256(), bm.dirty_granules() * bm.granularity) == (q["sha256"], q["count"]), name
    report = json.loads((tmp_path / "inc.json").read_text())
    assert report["postcopy"] is not None, report.keys()  # LISTEN came: it did switch over
    if ram_postcopy:
        assert stats["ram"]["postcopy-bytes"] > 0, stats["ram"]
    else:
        assert report["postcopy"]["faults"] == 0, report["postcopy"]


@pytest.fixture(scope="module")
def base_stream(tmp_path_factory) -> Path:
    return save_base_stream(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("ram_postcopy", [True, False], ids=["with-ram", "bitmaps-only"])
def test_qmigx_bitmaps_in_postcopy_to_qemu(tmp_path, uris, base_stream, ram_postcopy):
    bitmaps = tmp_path / "in.json"
    bitmaps.write_text(json.dumps(want_bitmaps()))
    with qemu_vm(tmp_path, "ref") as ref:  # the same bitmaps, made by QEMU itself
        run_steps(ref, STEPS)
        reference = query_bitmaps(ref)
    uri = uris.make("unix")
    shm = Path(tempfile.mkdtemp(prefix="qmigx-bm-", dir="/dev/shm"))
    disk = Disk(tmp_path / "dst.raw", DISK_SIZE).create()
    try:
        with Qemu(ram="64M", paused=True, incoming=True, mem_path=shm / "dst.ram",
                  workdir=tmp_path, name="dst", extra=disk.args()) as dst:
            caps = {"dirty-bitmaps": True, "postcopy-ram": ram_postcopy}
            dst.set_capabilities({**caps, "events": True})
            dst.migrate_incoming(uri)
            r = send_cli(base_stream, uri, caps=caps,
                         bitmaps=bitmaps, params={"max-postcopy-bandwidth": str(4 << 20)},
                         extra=["--start-postcopy"])
            assert r.returncode == 0, f"{r.stderr[-3000:]}\n{dst.log_tail()}"
            assert dst.wait_migration(60)["status"] == "completed"
            got = query_bitmaps(dst)
            statuses = [e["data"]["status"] for e in dst.qmp.poll_events(0.2)
                        if e["event"] == "MIGRATION"]
            assert "postcopy-active" in statuses, statuses  # QEMU ran it as postcopy
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert got == reference


@pytest.mark.parametrize("ram_postcopy", [True, False], ids=["with-ram", "bitmaps-only"])
def test_bitmap_chunks_follow_the_switch_over_qmigx_to_qmigx(ram_postcopy):
    """Read back from a qmigx destination: START in setup, every chunk and COMPLETE after RUN.

    Bitmaps alone (``dirty-bitmaps`` without ``postcopy-ram``, which QEMU
    accepts for ``migrate-start-postcopy``): RAM completes before LISTEN,
    so the destination registers nothing with userfaultfd and its RAM is
    whole when the guest runs.
    """
    from qmigx.block_dirty_bitmap import DirtyBitmapDestination, DirtyBitmapSource
    from qmigx.migration import MigrationDestination, MigrationSource
    from qmigx.migration.postcopy_incoming import PostcopyIncoming
    from test_postcopy import WAIT, S, _blocks, _uffd_or_skip, controls

    caps = ("postcopy-ram", "dirty-bitmaps") if ram_postcopy else ("dirty-bitmaps",)
    if ram_postcopy:
        _uffd_or_skip()
    blocks = _blocks(2)
    c, p = controls(*caps, max_bandwidth=1 << 20)
    dc, dp = controls(*caps)
    ram_at_run: list = []
    seen: list = []
    bitmaps_in = DirtyBitmapDestination()
    load_record = bitmaps_in.load_record

    def note(record, section):
        pc = dst.postcopy
        seen.append((record.kind, pc is not None and pc.state >= PostcopyIncoming.RUNNING))
        load_record(record, section)

    bitmaps_in.load_record = note
    dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT,
                               handlers=[bitmaps_in])
    if not ram_postcopy:  # RAM must be whole when the guest would start
        dst.on_postcopy_run = lambda d: ram_at_run.extend(
            bytes(d.blocks[b.idstr].memory) for b in blocks)
    dst.incoming("tcp:127.0.0.1:0")
    spec = want_bitmaps()
    src = MigrationSource(blocks, capabilities=c, parameters=p, io_timeout=WAIT,
                          handlers=[DirtyBitmapSource(DirtyBitmapSet.from_json(spec),
                                                      capabilities=c)])
    src.migrate(dst.connect_uri)
    src.start_postcopy()
    assert src.wait(WAIT) is S.COMPLETED, src.error
    assert dst.wait(WAIT) is S.COMPLETED, dst.error
    assert bitmaps_in.result.to_json() == spec
    kinds = {k for k, _ in seen}
    assert kinds == {"start", "bits", "complete", "eos"}, seen
    assert all(not late for k, late in seen if k == "start"), seen
    assert all(late for k, late in seen if k in ("bits", "complete")), seen
    got = {b.idstr: bytes(dst.blocks[b.idstr].memory) for b in blocks}
    assert got == {b.idstr: bytes(b.buffer) for b in blocks}
    if not ram_postcopy:
        assert dst.postcopy.placement is None  # nothing registered with userfaultfd
        assert ram_at_run == [got[b.idstr] for b in blocks]
        assert src.c.stats.postcopy_bytes > 0  # the bitmaps' bytes, after the switch
        cmds = [cmd.cmd for cmd in dst.result.commands]
        assert MigCmd.POSTCOPY_RAM_DISCARD not in cmds
        assert MigCmd.PING not in cmds  # no return path, and PINGs 2-4 are RAM postcopy's
        assert cmds[0] == MigCmd.POSTCOPY_ADVISE and MigCmd.POSTCOPY_LISTEN in cmds
