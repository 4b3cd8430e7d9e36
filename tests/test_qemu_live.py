"""Live migration interop with real QEMU 7.2, both directions, over unix and TCP.

* QEMU source -> ``qmigx incoming``: a running test guest keeps dirtying
  its 64 MiB while it migrates; at completion QEMU stops it, so the
  source's memory-backend-file is the final guest RAM, and the
  destination's ``--ram-dir`` ``mem0.bin`` must equal it byte for byte.
  Each capability the destination must decode is covered (XBZRLE held
  back until XBZRLE pages were really sent, multifd 2/4 channels x
  none/zlib/zstd, compress, return-path, x-ignore-shared as VM
  templating), plus the configuration check QEMU makes on x-ignore-shared.
* ``qmigx send`` -> QEMU destination (``-S -incoming defer``): streams
  saved from QEMU (and one received live by ``qmigx incoming --save``),
  sent with the same capabilities; QEMU's RAM file must equal the
  source's. XBZRLE pages need a page sent twice, which a replayed stream
  never has, so a Python-API source with a dirtying writer covers it.
* qmigx -> qmigx: ``send`` into ``incoming --save``, extracted again.
* One unit test at the end shows a throughput bug found by the live
  benchmarks (benchmarks/test_live.py).

Reference data never comes from qmigx: guest RAM is the source QEMU's
memory file (or the writer's own buffer), and success is QEMU's.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qemu_support import streams
from qemu_support.guest import build_guest, read_marker
from qemu_support.harness import Qemu, QemuError, parse_size
from qemu_support.live import (
    LockedGuest,
    QmigxIncoming,
    Uris,
    first_difference,
    qemu_live_migrate,
    qmigx_argv,
    qmigx_env,
    qmigx_send,
    sha256_file,
)

pytestmark = pytest.mark.qemu

RAM = "64M"
RAM_BYTES = parse_size(RAM)
SEED = 0x11FE0001
BIOS_FILES = ("/usr/share/qemu/bios-256k.bin", "/usr/share/seabios/bios-256k.bin")
#: QEMU 7.2's message when only the source enables x-ignore-shared
IGNORE_SHARED_MISMATCH = "Capability x-ignore-shared is off, but received capability is on"


def multifd(n: int, comp: str) -> tuple[dict[str, bool], dict[str, Any]]:
    return {"multifd": True}, {"multifd-channels": n, "multifd-compression": comp}


def case(name: str, transport: str, caps: dict[str, bool] | None = None,
         params: dict[str, Any] | None = None, marks: tuple = ()) -> Any:
    return pytest.param(transport, caps or {}, params or {}, id=f"{name}-{transport}", marks=marks)


MULTIFD = [(n, c) for n in (2, 4) for c in ("none", "zlib", "zstd")]

#: every capability on unix; a representative few on tcp (the format does not depend on the transport)
CASES = [
    case("default", "unix"),
    case("xbzrle", "unix", {"xbzrle": True}, {"xbzrle-cache-size": 1 << 20}),
    case("compress", "unix", {"compress": True}),
    *[case(f"multifd{n}-{c}", "unix", *multifd(n, c)) for n, c in MULTIFD],
    case("return-path", "unix", {"return-path": True}),
    case("default", "tcp"),
    case("compress", "tcp", {"compress": True}),
    case("multifd2-zlib", "tcp", *multifd(2, "zlib")),
    case("multifd4-zstd", "tcp", *multifd(4, "zstd")),
]
#: what the destination must enable too (QEMU decodes XBZRLE without the capability)
DEST_CAPS = ("multifd", "compress", "x-ignore-shared")
DEST_PARAMS = ("multifd-channels", "multifd-compression")


def dest_settings(caps: dict[str, bool], params: dict[str, Any]) -> tuple[dict, dict]:
    return ({k: v for k, v in caps.items() if k in DEST_CAPS},
            {k: v for k, v in params.items() if k in DEST_PARAMS})


@pytest.fixture(scope="session", autouse=True)
def _stream_cache(tmp_path_factory):
    streams.set_default_cache_dir(tmp_path_factory.getbasetemp() / "qemu-streams")


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict[bool, Path]:
    """The test guest, dirtying (True) and idle (False)."""
    d = tmp_path_factory.mktemp("guest")
    out = {}
    for dirty in (True, False):
        out[dirty] = d / f"guest-{int(dirty)}.bin"
        out[dirty].write_bytes(build_guest(SEED, RAM_BYTES, dirty=dirty))
    return out


def assert_same_ram(got: bytes, want: bytes, what: str) -> None:
    diff = first_difference(got, want)
    assert diff is None, f"{what}: {diff}"


def assert_bios(block_dir: Path) -> None:
    """pc.bios is read-only guest RAM: exactly the SeaBIOS image QEMU loaded (when we can find it)."""
    got = block_dir / "pc.bios.bin"
    assert got.exists(), sorted(p.name for p in block_dir.iterdir())
    bios = next((Path(p) for p in BIOS_FILES if Path(p).is_file()), None)
    if bios is not None and bios.stat().st_size == got.stat().st_size:
        assert got.read_bytes() == bios.read_bytes()


def check_source_stats(stats: dict, caps: dict, params: dict) -> None:
    """What QEMU's own counters say was really sent with these capabilities."""
    assert stats["status"] == "completed"
    ram = stats["ram"]
    if caps.get("xbzrle"):
        x = stats["xbzrle-cache"]
        assert x["pages"] > 0 and x["bytes"] > 0, x
    if caps.get("multifd"):
        assert ram["multifd-bytes"] > 0, ram
    if caps.get("compress"):
        assert stats["compression"]["pages"] > 0, stats.get("compression")


# --- QEMU source -> qmigx incoming ----------------------------------------------------------------


@pytest.mark.parametrize(("transport", "caps", "params"), CASES)
def test_qemu_to_qmigx(transport, caps, params, tmp_path, uris, kernels):
    xbzrle = bool(caps.get("xbzrle"))
    dcaps, dparams = dest_settings(caps, params)
    for attempt in range(3):  # a held-back migration may still converge early on a loaded host
        uri = uris.make(transport)
        rd = tmp_path / f"rd{attempt}"
        inc = QmigxIncoming(uri, tmp_path, caps=dcaps, params=dparams, ram_dir=rd, name=f"inc{attempt}")
        with Qemu(ram=RAM, kernel=kernels[True], workdir=tmp_path, name=f"src{attempt}") as vm:
            before = vm.wait_guest_ready(60, min_counter=1000)
            with inc:
                try:
                    stats = qemu_live_migrate(vm, uri, caps=caps, params=params,
                                              hold_syncs=4 if xbzrle else 0, want_xbzrle=xbzrle)
                except QemuError as e:
                    if attempt < 2 and "converged too early" in str(e):
                        continue
                    raise
                rc, err = inc.wait(120)
            assert rc == 0, f"qmigx incoming exited {rc}:\n{err[-3000:]}"
            assert vm.status() == "postmigrate"
            src = vm.read_ram()
        break
    after = read_marker(src)
    assert after.counter > before.counter, "the guest did not run during the migration"
    assert stats["ram"]["dirty-sync-count"] >= (4 if xbzrle else 2)
    check_source_stats(stats, caps, params)
    assert_same_ram((rd / "mem0.bin").read_bytes(), src, "mem0 received by qmigx")
    assert_bios(rd)


def test_qemu_to_qmigx_ignore_shared_template(tmp_path, uris, kernels):
    """VM templating: mem0 is never sent; qmigx maps a copy of the template privately."""
    uri = uris.make("unix")
    template = tmp_path / "template.ram"
    rd = tmp_path / "rd"
    caps = {"x-ignore-shared": True}
    with Qemu(ram=RAM, kernel=kernels[False], workdir=tmp_path, name="src") as vm:
        vm.wait_guest_ready(60)
        vm.stop()
        shutil.copyfile(vm.mem_path, template)
        digest = sha256_file(template)
        with QmigxIncoming(uri, tmp_path, caps=caps, ram_dir=rd, save=tmp_path / "state.mig",
                           shared_ram=[("mem0", template)]) as inc:
            stats = qemu_live_migrate(vm, uri, caps=caps)
            rc, err = inc.wait(120)
        assert rc == 0, f"qmigx incoming exited {rc}:\n{err[-3000:]}"
        src = vm.read_ram()
    assert sha256_file(template) == digest, "the template file was modified"
    tmpl = template.read_bytes()
    assert_same_ram(src, tmpl, "paused source changed its RAM")
    assert_same_ram((rd / "mem0.bin").read_bytes(), tmpl, "mem0 mapped from the template")
    assert_bios(rd)
    # QEMU did not count (or send) the shared block: only the small ROM/BIOS blocks went
    assert stats["ram"]["total"] < RAM_BYTES // 8, stats["ram"]
    assert stats["ram"]["normal"] * 4096 < RAM_BYTES // 8, stats["ram"]


def test_qemu_ignore_shared_needs_the_capability(tmp_path, uris, kernels):
    """QEMU source with x-ignore-shared, qmigx without: QEMU's configuration check, one line, exit 1."""
    uri = uris.make("unix")
    with Qemu(ram=RAM, kernel=kernels[False], workdir=tmp_path, name="src") as vm:
        vm.wait_guest_ready(60)
        vm.stop()
        with QmigxIncoming(uri, tmp_path, ram_dir=tmp_path / "rd") as inc:
            vm.set_capabilities({"x-ignore-shared": True})
            vm.migrate(uri)
            rc, err = inc.wait(60)
            deadline = time.monotonic() + 30
            while vm.query_migrate()["status"] not in ("completed", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmigx: error: "), lines[0]
    assert IGNORE_SHARED_MISMATCH in lines[0]
    assert not (tmp_path / "rd").exists()


# --- qmigx send -> QEMU destination ---------------------------------------------------------------


def qemu_destination_load(tmp_path: Path, uri: str, stream: str | Path, *, kernel: str | None,
                          caps: dict, params: dict, mem_path: Path | None = None, mem_share: bool = True,
                          shared_ram: list = ()) -> tuple[bytes, dict]:
    """Start a paused QEMU with ``-incoming defer``, ``qmigx send`` into it; its RAM and send's report."""
    dcaps, dparams = dest_settings(caps, params)
    mem_path = mem_path or tmp_path / "dst.ram"
    report = tmp_path / "send.json"
    with Qemu(ram=RAM, kernel=kernel, mem_path=mem_path, mem_share=mem_share, paused=True, incoming=True,
              workdir=tmp_path, name="dst") as dst:
        dst.set_capabilities(dcaps)
        dst.set_parameters(dparams)
        dst.migrate_incoming(uri)
        r = qmigx_send(stream, uri, caps=caps, params=params, shared_ram=shared_ram, report=report)
        assert r.returncode == 0, f"qmigx send exited {r.returncode}:\n{r.stderr[-3000:]}\n{dst.log_tail()}"
        st = dst.wait_migration(60)
        assert st["status"] == "completed"
        assert dst.status() in ("paused", "inmigrate", "prelaunch"), dst.status()
        ram = Path(mem_path).read_bytes()
    return ram, json.loads(report.read_text())


#: capabilities with which ``send`` loads FILE's pages into RAM instead of relaying them
LOADS_RAM = ("xbzrle", "compress", "multifd", "mapped-ram", "postcopy-ram", "x-colo",
             "dirty-bitmaps", "x-ignore-shared")


def check_send_report(report: dict, caps: dict) -> None:
    q = report["query-migrate"]
    assert q["status"] == "completed"
    relayed = report["file"]["pages_relayed"]  # plain records go from FILE itself
    if any(caps.get(c) for c in LOADS_RAM):
        assert relayed is None, report["file"]
    else:
        assert relayed > 0, report["file"]
    if caps.get("multifd"):
        assert q["ram"]["multifd-bytes"] > 0, q["ram"]
    if caps.get("compress"):
        assert q["compression"]["pages"] > 0, q.get("compression")


@pytest.fixture(scope="module")
def live_saved(tmp_path_factory, uris, kernels) -> dict[str, Any]:
    """A stream ``qmigx incoming --save`` received from a live QEMU, and that source's final RAM."""
    d = tmp_path_factory.mktemp("live-saved")
    uri = uris.make("unix")
    with Qemu(ram=RAM, kernel=kernels[True], workdir=d, name="src") as vm:
        vm.wait_guest_ready(60, min_counter=1000)
        with QmigxIncoming(uri, d, save=d / "recv.mig") as inc:
            qemu_live_migrate(vm, uri)
            rc, err = inc.wait(120)
        assert rc == 0, err
        shutil.copyfile(vm.mem_path, d / "src.mem")
    return {"stream": d / "recv.mig", "mem": d / "src.mem", "kernel": str(kernels[True])}


SEND_CASES = [
    case("default", "unix"),
    case("xbzrle", "unix", {"xbzrle": True}, {"xbzrle-cache-size": 1 << 20}),
    case("compress", "unix", {"compress": True}),
    *[case(f"multifd{n}-{c}", "unix", *multifd(n, c)) for n, c in MULTIFD],
    case("return-path", "unix", {"return-path": True}),
    case("default", "tcp"),
    case("compress", "tcp", {"compress": True}),
    case("multifd4-zlib", "tcp", *multifd(4, "zlib")),
]


@pytest.mark.parametrize(("transport", "caps", "params"), SEND_CASES)
def test_qmigx_send_to_qemu(transport, caps, params, tmp_path, uris):
    info = streams.get_stream("pc-paused")
    ram, report = qemu_destination_load(tmp_path, uris.make(transport), info.stream, kernel=info.kernel,
                                        caps=caps, params=params)
    assert_same_ram(ram, Path(info.mem).read_bytes(), "QEMU destination's mem0")
    check_send_report(report, caps)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qmigx_send_live_received_stream_to_qemu(transport, tmp_path, uris, live_saved):
    """A stream qmigx received live from QEMU goes on to another QEMU unchanged in content."""
    ram, _ = qemu_destination_load(tmp_path, uris.make(transport), live_saved["stream"],
                                   kernel=live_saved["kernel"], caps={}, params={})
    assert_same_ram(ram, Path(live_saved["mem"]).read_bytes(), "QEMU destination's mem0")


@pytest.mark.parametrize("dest_share", [True, False], ids=["dest-share-on", "dest-share-off"])
def test_qmigx_send_ignore_shared_to_qemu(dest_share, tmp_path, uris):
    """x-ignore-shared: qmigx maps mem0 shared and skips it.

    QEMU maps the same file with ``share=on`` (its block is ignored too, and
    QEMU refuses pages of an ignored block and checks the GPA), or, as a
    VM-template clone, a copy with ``share=off`` (ram.md §8).
    """
    info = streams.get_stream("pc-ignore-shared")
    shared = tmp_path / "shared.ram"
    shutil.copyfile(info.mem, shared)
    digest = sha256_file(shared)
    dest_mem = shared
    if not dest_share:
        dest_mem = tmp_path / "clone.ram"
        shutil.copyfile(info.mem, dest_mem)
    caps = {"x-ignore-shared": True}
    ram, report = qemu_destination_load(tmp_path, uris.make("unix"), info.stream, kernel=info.kernel,
                                        caps=caps, params={}, mem_path=dest_mem, mem_share=dest_share,
                                        shared_ram=[("mem0", shared)])
    assert sha256_file(shared) == digest
    assert_same_ram(ram, Path(info.mem).read_bytes(), "QEMU destination's mem0")
    q = report["query-migrate"]["ram"]
    assert q["total"] < RAM_BYTES // 8, q  # the shared block is neither counted nor sent
    assert q["normal"] * 4096 < RAM_BYTES // 8, q


def test_qmigx_api_xbzrle_to_qemu(tmp_path, uris):
    """XBZRLE pages from qmigx into QEMU: a writer dirties pages while the source iterates."""
    from qmigx.control import Capabilities, Parameters
    from qmigx.dirtylog import ExplicitDirtyLog
    from qmigx.migration import MigrationSource
    from qmigx.ram import RAMBlockList
    from qmigx.tools.streams import load_stream

    info = streams.get_stream("pc-paused")
    loaded = load_stream(info.stream)
    blocks = RAMBlockList()
    for b in loaded.ram_setup.blocks:
        blocks.add(loaded.blocks[b.idstr])
    mem0 = blocks["mem0"]
    log = ExplicitDirtyLog(mem0)
    guest = LockedGuest()
    caps = Capabilities()
    caps.set_many([("xbzrle", True)])
    params = Parameters(capabilities=caps)
    # 1 ms downtime: a few dirty pages per iteration keep it iterating
    params.set({"xbzrle-cache-size": 1 << 20, "downtime-limit": 1, "max-bandwidth": 64 << 20})
    src = MigrationSource(blocks, devices=loaded.sections, vmdesc=loaded.vmdesc,
                          machine_type=loaded.configuration.machine_type, capabilities=caps,
                          parameters=params, globalstate=False, guest=guest,
                          dirty_logs={"mem0": log},
                          ram_section_id=loaded.ram_setup.section.section_id)
    mem = mem0.memory
    first_page, npages = 1024, 64  # 4..4.25 MiB: inside the guest's filled range
    passes = [0]
    release = threading.Event()

    def touch() -> None:
        n = passes[0] = passes[0] + 1
        for k in range(npages):
            off = (first_page + k) * 4096 + ((n * 52 + k * 132) & 0xFFC)
            mem[off:off + 4] = np.frombuffer(np.uint32(n + k).tobytes(), np.uint8)
            log.mark_dirty(off, 4)

    def writer() -> None:  # the "vCPU": writes at any time, until completion stops it
        while not release.is_set() and guest.write(touch):
            time.sleep(0.002)

    def on_iteration(row: dict) -> None:
        # the writer may not get the GIL between two syncs, which would let the
        # migration converge: also dirty once per iteration until XBZRLE was used
        if src.ram is not None and src.ram.xbzrle_pages > 0 and row["dirty_sync_count"] >= 4:
            release.set()
        if not release.is_set():
            guest.write(touch)

    src.on_iteration = on_iteration
    uri = uris.make("unix")
    with Qemu(ram=RAM, kernel=info.kernel, mem_path=tmp_path / "dst.ram", paused=True, incoming=True,
              workdir=tmp_path, name="dst") as dst:
        dst.migrate_incoming(uri)
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            src.migrate(uri)
            assert src.wait(120).value == "completed", src.error
        finally:
            release.set()
            t.join(10)
        q = src.query()
        st = dst.wait_migration(60)
        assert st["status"] == "completed"
        ram = (tmp_path / "dst.ram").read_bytes()
    assert guest.stops == 1 and not guest.running
    x = q["xbzrle-cache"]
    assert x["pages"] > 0 and x["bytes"] > 0, x
    assert q["ram"]["dirty-sync-count"] >= 4, q["ram"]
    want = bytes(mem0.memory)
    assert want != Path(info.mem).read_bytes(), "the writer changed nothing"
    assert_same_ram(ram, want, "QEMU destination's mem0 after XBZRLE")


# --- qmigx -> qmigx -------------------------------------------------------------------------------


X2X_CASES = [
    case("default", "unix"),
    case("compress", "unix", {"compress": True}),
    case("default", "tcp"),
    case("return-path", "tcp", {"return-path": True}),
    case("multifd4-zstd", "tcp", *multifd(4, "zstd")),
]


@pytest.mark.parametrize(("transport", "caps", "params"), X2X_CASES)
def test_qmigx_to_qmigx(transport, caps, params, tmp_path, uris):
    import subprocess

    info = streams.get_stream("pc-paused")
    uri = uris.make(transport)
    dcaps, dparams = dest_settings(caps, params)
    with QmigxIncoming(uri, tmp_path, caps=dcaps, params=dparams, save=tmp_path / "recv.mig") as inc:
        r = qmigx_send(info.stream, uri, caps=caps, params=params, report=tmp_path / "send.json")
        assert r.returncode == 0, r.stderr[-3000:]
        rc, err = inc.wait(120)
    assert rc == 0, err[-3000:]
    check_send_report(json.loads((tmp_path / "send.json").read_text()), caps)
    outs = {}
    for name, stream in (("orig", info.stream), ("recv", tmp_path / "recv.mig")):
        outs[name] = tmp_path / name
        e = subprocess.run(qmigx_argv("extract", stream, outs[name]), capture_output=True, text=True,
                           env=qmigx_env(), timeout=120)
        assert e.returncode == 0, e.stderr[-3000:]
    assert_same_ram((outs["recv"] / "mem0.bin").read_bytes(), Path(info.mem).read_bytes(), "mem0")
    orig_blocks = sorted(p.name for p in outs["orig"].glob("*.bin"))
    assert sorted(p.name for p in outs["recv"].glob("*.bin")) == orig_blocks
    for name in orig_blocks:
        assert (outs["recv"] / name).read_bytes() == (outs["orig"] / name).read_bytes(), name
    assert json.loads((outs["recv"] / "state.json").read_text()) == \
        json.loads((outs["orig"] / "state.json").read_text())


# --- found while benchmarking ---------------------------------------------------------------------


def test_source_hands_page_batches_to_the_channel_uncopied():
    """A batch of PAGE records (~0.8 MiB: 256 pages minus the zero ones) must reach the channel as is.

    ``QEMUFile.write`` (qmigx/qemufile.py) copies every write shorter than
    its 1 MiB buffer into a bytearray that each flush replaces with a new
    one, so nearly every page batch of a migration is copied once more,
    into freshly faulted memory: the qmigx source alone spends ~1.9 s per
    GiB (most of it system time in page faults), ~0.45 s without the copy.
    """
    from qmigx.qemufile import QEMUFile

    got: list = []
    f = QEMUFile(got.append)
    batch = np.arange(200 * 4104, dtype=np.uint32).astype(np.uint8).reshape(200, 4104)
    f.write(b"\x02\x00\x00\x00\x02")  # a section header before the batch
    f.write(batch.reshape(-1))
    f.flush()
    assert b"".join(bytes(x) for x in got) == b"\x02\x00\x00\x00\x02" + batch.tobytes()
    assert any(np.shares_memory(np.frombuffer(x, np.uint8), batch) for x in got), \
        "the page batch was copied before reaching the channel"
