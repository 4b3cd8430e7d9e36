"""``qmigx demo``: the main job on built-in defaults — a live migration.

Two processes: this one is the source, with a synthetic guest (RAM with
zero, run and random pages, plus a few VMState devices) that a thread
keeps dirtying; a ``qmigx incoming`` child is the destination. The guest
migrates live over a unix socket with the ``xbzrle`` and ``multifd``
capabilities on (as in QEMU 7.2, pages that go to multifd channels are
never XBZRLE-encoded), with a progress bar and a final summary laid out
like ``info migrate``. Then the destination's memory is compared with the
stopped source's, byte for byte, and the received device state with the
source's.

``--offline`` runs the earlier file round trip instead: save the guest as
a stream, verify and analyze it, load it back and check every byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from qmigx.errors import MigrationError, ParameterError
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["run_demo", "parse_size"]


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096`` -> bytes (QEMU's size suffixes, powers of 2)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise ParameterError(f"not a size: {text!r}", field="ram") from None
    if value <= 0 or value % TARGET_PAGE_SIZE:
        raise ParameterError(f"size must be a positive multiple of 4 KiB: {text!r}",
                             field="ram")
    return value


def run_demo(args) -> int:
    ram_bytes = parse_size(args.ram)
    if getattr(args, "offline", False):
        from qmigx.cli.demo_offline import run_offline

        return run_offline(ram_bytes, args.workdir)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="qmigx-demo-") as tmp:
            return _run_live(ram_bytes, tmp)
    os.makedirs(args.workdir, exist_ok=True)
    return _run_live(ram_bytes, args.workdir)


def _run_live(ram_bytes: int, workdir: str) -> int:
    from qmigx._child import qmigx_command
    from qmigx.cli.live import info_migrate
    from qmigx.cli.progress import Progress
    from qmigx.control import Capabilities, MigrationStatus, Parameters
    from qmigx.dirtylog import best_dirty_log
    from qmigx.guest import DirtyingGuest
    from qmigx.migration import MigrationSource
    from qmigx.synthetic import synthetic_blocks, synthetic_devices
    from qmigx.tools.analyze import block_filename
    from qmigx.tools.streams import load_stream, vmstate_device

    sock = os.path.join(workdir, "migrate.sock")
    ram_dir = os.path.join(workdir, "received")
    saved = os.path.join(workdir, "received.mig")
    caps = ["xbzrle", "multifd"]

    t = time.perf_counter()
    blocks = synthetic_blocks(ram_bytes)
    devices = synthetic_devices()
    ram = blocks["pc.ram"]
    log = best_dirty_log(ram)
    guest = DirtyingGuest(ram.memory, log)
    print(f"source:      guest of {ram_bytes >> 20} MiB ({len(blocks)} RAM blocks, "
          f"{len(devices)} devices), dirtied by a vCPU thread; dirty log: {log.kind}"
          + (f" ({log.reason})" if getattr(log, "reason", None) else "")
          + f" [{time.perf_counter() - t:.2f}s]")

    # the qmigx this process runs, not a source tree in the working directory
    cmd = qmigx_command() + ["incoming", f"unix:{sock}", "--ram-dir", ram_dir, "--save", saved]
    for c in caps:
        cmd += ["--cap", f"{c}=on"]
    dest = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if dest.poll() is not None or time.monotonic() > deadline:
            raise MigrationError(f"destination did not start: {dest.stderr.read().strip()}")
        time.sleep(0.02)
    print(f"destination: pid {dest.pid}, qmigx incoming unix:{sock} "
          f"--cap xbzrle=on --cap multifd=on")

    c = Capabilities()
    c.set_many([(name, True) for name in caps])
    p = Parameters(capabilities=c)
    p.set({"xbzrle-cache-size": 16 << 20})
    src = MigrationSource(blocks, devices=[vmstate_device(*d) for d in devices], guest=guest,
                          dirty_logs={"pc.ram": log}, capabilities=c, parameters=p)
    log.start()
    guest.start()
    time.sleep(0.2)  # let the vCPU run a little before migrating
    src.migrate(f"unix:{sock}")
    bar = Progress("migrating", ram_bytes, force=sys.stderr.isatty())
    while src.wait(0.1) not in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                                MigrationStatus.CANCELLED):
        q = src.query()
        done = q.get("ram", {}).get("transferred", 0)
        bar.update(done, f"{q['status']} pass {q.get('ram', {}).get('dirty-sync-count', 0)}")
    bar.close()
    guest.stop()
    log.close()
    rc = dest.wait(60)
    q = src.query()
    print()
    print(info_migrate(q))
    print(f"vCPU writes during the migration: {guest.writes} pages "
          f"(multifd pages are never XBZRLE-encoded, as in QEMU 7.2)")
    if src.state.state != MigrationStatus.COMPLETED:
        raise MigrationError(f"migration {src.state.state.value}: {src.error}")
    if rc != 0:
        raise MigrationError(f"destination failed: {dest.stderr.read().strip()}")

    bad = []
    for blk in blocks:
        got = np.fromfile(os.path.join(ram_dir, block_filename(blk.idstr)), np.uint8)
        if not np.array_equal(got, blk.memory):
            bad.append(blk.idstr)
    received = load_stream(saved)
    sent = {(d[0], d[1]): vmstate_device(*d).payload for d in devices}
    got = {(s.section.idstr, s.section.instance_id): s.payload for s in received.sections}
    bad += [f"{k[0]}/{k[1]}" for k, v in sent.items() if got.get(k) != v]
    if bad:
        raise MigrationError(f"destination differs from the stopped source in: {', '.join(bad)}")
    print(f"check:       the destination's {ram_bytes >> 20} MiB of RAM and {len(sent)} device "
          f"sections equal the stopped source's, byte for byte")
    return 0
