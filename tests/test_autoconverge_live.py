"""Auto-converge throttles a guest that dirties memory faster than it migrates."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from qmigx.control import Capabilities, MigrationStatus, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.migration import MigrationDestination, MigrationSource
from qmigx.ram import RAMBlock, RAMBlockList


class BusyGuest:
    """Dirties pages as fast as its throttle lets it."""

    def __init__(self, block: RAMBlock, log: ExplicitDirtyLog) -> None:
        self.mem = block.memory.reshape(-1, 4096)
        self.log = log
        self.running = False
        self.throttles: list[int] = []
        self._pct = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.running = True
        if not self._t.is_alive():
            self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.running = False

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        self._pct = percent
        self.throttles.append(percent)

    def _run(self) -> None:
        rng = np.random.default_rng(5)
        while not self._stop.is_set():
            for p in rng.integers(0, len(self.mem), 64):
                self.mem[p, 0] ^= 1
                self.log.mark_dirty(int(p) * 4096, 1)
            # a vCPU throttled to p % runs (100 - p) % of the time
            time.sleep(0.002 / max(1 - self._pct / 100, 0.01))


def test_throttle_rises_until_the_migration_converges(tmp_path):
    blk = RAMBlock.anonymous("pc.ram", 16 << 20)
    blk.memory[:] = np.random.default_rng(1).integers(0, 256, blk.used_length, dtype=np.uint8)
    log = ExplicitDirtyLog(blk)
    guest = BusyGuest(blk, log)
    caps = Capabilities()
    caps.set("auto-converge")
    params = Parameters(capabilities=caps)
    params.set({"max-bandwidth": 8 << 20, "downtime-limit": 20, "cpu-throttle-initial": 50,
                "cpu-throttle-increment": 49})
    uri = f"unix:{tmp_path}/m.sock"
    dst = MigrationDestination()
    dst.incoming(uri)
    src = MigrationSource(RAMBlockList([blk]), guest=guest, dirty_logs={"pc.ram": log},
                          capabilities=caps, parameters=params, globalstate=False)
    guest.start()
    src.migrate(uri)
    assert src.wait(120) == MigrationStatus.COMPLETED, src.error
    assert dst.wait(30) == MigrationStatus.COMPLETED
    raised = [p for p in guest.throttles if p]  # migrate() first resets it to 0
    assert raised and raised[0] == 50 and raised[-1] <= 99
    assert all(b > a for a, b in zip(raised, raised[1:]))
    assert np.array_equal(dst.blocks["pc.ram"].memory, blk.memory)
    report = src.report(str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["iterations"]
    assert rows == report["iterations"] and len(rows) >= 2
    assert max(r["throttle"] for r in rows) == raised[-1]
    assert sum(r["pages"]["normal"] for r in rows) > 0
