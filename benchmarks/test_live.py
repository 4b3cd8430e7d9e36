"""Live migration throughput, as a ratio to memcpy of the guest RAM's bytes.

* qmigx -> qmigx, 1 GiB of mostly non-zero RAM (``qmigx.synthetic``'s
  fill: 1 page in 7 zero, 1 in 11 a byte run, the rest random): source
  and destination threads in one process (the Python API) over unix, TCP
  and 4-channel multifd over TCP; and a ``qmigx incoming`` process as the
  destination over TCP (its peak memory recorded). ``max-bandwidth`` is
  100 GiB/s so the rate limit never binds. Targets, not asserted: 0.3x over
  unix, 0.25x over TCP. ``test_loopback_limit`` measures, in the same run,
  what one socket alone allows (unix 0.49x, TCP 0.31x on an idle machine;
  much less when other work shares the two cores).
* The same 512 MiB paused QEMU 7.2 test guest migrated QEMU -> QEMU,
  QEMU -> ``qmigx incoming`` and qmigx -> QEMU over unix, in the same
  run; ``extra_info["vs_qemu_to_qemu"]`` is each ratio divided by QEMU ->
  QEMU's (target: >= 1, a qmigx peer at least as fast as a QEMU one).
  ``qmigx incoming``'s peak RSS is recorded against guest RAM + 64 MiB.
* Saved states in and out, a 1 GiB paused QEMU 7.2 guest over unix, whole
  processes, in the same run: QEMU -> QEMU, QEMU -> ``qmigx incoming``
  without and with ``--save OUT``, and ``qmigx send FILE`` -> ``qmigx
  incoming --save`` (``test_saved_state_streams_1gib``; quotients against
  QEMU -> QEMU and each qmigx side's peak RSS printed and recorded).

A round is timed from the migrate command to the end of the migration;
the ``return-path`` capability is on, so a source completes only after
its destination loaded everything and answered SHUT. Starting a
destination (a QEMU process or ``qmigx incoming``, which take longer than
the migration itself) happens in each round's untimed setup.

Run: ``python -m pytest benchmarks/test_live.py --benchmark-enable -q -s``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pytest

from qmigx.control import Capabilities, Parameters
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.synthetic import fill_pages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_support.guest import build_guest  # noqa: E402
from qemu_support.harness import Qemu, qemu_binary  # noqa: E402
from qemu_support.live import QmigxIncoming, Uris, first_difference  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
QEMU_RAM = 512 * MIB
BANDWIDTH = 100 << 30
ROUNDS = 3
#: guest RAM files and received blocks live in memory, as a destination's RAM does
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: ratio of each QEMU-peer case, by test name, for the quotients
RATIOS: dict[str, float] = {}

needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed")


def settings(caps: dict[str, bool], params: dict[str, Any]) -> tuple[Capabilities, Parameters]:
    c = Capabilities()
    if caps:
        c.set_many(list(caps.items()))
    p = Parameters(capabilities=c)
    p.set({"max-bandwidth": BANDWIDTH, **params})
    return c, p


def with_setup(benchmark, monkeypatch, setup: Callable[[], Any], teardown: Callable[..., None]) -> None:
    """Make ``vs_memcpy``'s ``benchmark.pedantic`` run ``setup``/``teardown`` untimed around each round.

    The shared fixture has no setup hook (see the report); pytest-benchmark's
    pedantic has, and ``setup`` may return the round's ``(args, kwargs)``.
    With benchmarks disabled pedantic runs one round and skips ``teardown``;
    it is run here then, so no destination is left behind.
    """
    pedantic = benchmark.pedantic
    pending: list = []

    def tracked_setup():
        args = setup()
        pending.append(args)
        return args

    def tracked_teardown(*args, **kwargs):
        pending.pop()
        teardown(*args, **kwargs)

    def patched(target, **kw):
        try:
            return pedantic(target, setup=tracked_setup, teardown=tracked_teardown, **kw)
        finally:
            while pending:
                a, k = pending.pop()
                teardown(*a, **k)

    monkeypatch.setattr(benchmark, "pedantic", patched)


def record_ratio(benchmark, name: str) -> float:
    ratio = benchmark.extra_info.get("ratio_to_memcpy")
    if ratio is not None:
        RATIOS[name] = ratio
        base = RATIOS.get("qemu_to_qemu")
        if base and name != "qemu_to_qemu":
            benchmark.extra_info["vs_qemu_to_qemu"] = round(ratio / base, 3)
            print(f"{name}: {ratio / base:.2f}x QEMU -> QEMU ({ratio:.3f} vs {base:.3f})")
    return ratio


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


# --- qmigx -> qmigx, 1 GiB ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest() -> RAMBlockList:
    mem = np.empty(GIB, np.uint8)
    fill_pages(mem, seed=11)
    return RAMBlockList([RAMBlock("pc.ram", mem)])


@pytest.fixture(scope="module")
def target() -> RAMBlockList:
    mem = np.zeros(GIB, np.uint8)
    mem[:] = 0xA5  # touch every page now, not during the first round
    return RAMBlockList([RAMBlock("pc.ram", mem)])


def qmigx_pair(vs_memcpy, benchmark, monkeypatch, guest, target, make_uri: Callable[[], str], caps: dict,
               params: dict) -> None:
    def setup():
        target["pc.ram"].memory[::4096] = 0xA5  # a stale round cannot pass for a good one
        c, p = settings(caps, params)
        dst = MigrationDestination(target, capabilities=c, parameters=p)
        dst.incoming(make_uri())
        c, p = settings(caps, params)
        src = MigrationSource(guest, capabilities=c, parameters=p, guest=SimpleGuest(running=True))
        return (src, dst), {}

    def migrate(src: MigrationSource, dst: MigrationDestination) -> None:
        src.migrate(dst.connect_uri)
        assert src.wait(120).value == "completed", src.error
        assert dst.wait(120).value == "completed", dst.error

    def teardown(src: MigrationSource, dst: MigrationDestination) -> None:
        assert dst.state.state.value == "completed", dst.error

    with_setup(benchmark, monkeypatch, setup, teardown)
    vs_memcpy(migrate, GIB, cold=True, rounds=ROUNDS)
    assert np.array_equal(target["pc.ram"].memory, guest["pc.ram"].memory)


def test_qmigx_to_qmigx_unix(vs_memcpy, benchmark, monkeypatch, guest, target, uris):
    qmigx_pair(vs_memcpy, benchmark, monkeypatch, guest, target, lambda: uris.make("unix"), {}, {})


def test_qmigx_to_qmigx_tcp(vs_memcpy, benchmark, monkeypatch, guest, target):
    qmigx_pair(vs_memcpy, benchmark, monkeypatch, guest, target, lambda: "tcp:127.0.0.1:0", {}, {})


def test_qmigx_to_qmigx_tcp_multifd4(vs_memcpy, benchmark, monkeypatch, guest, target):
    qmigx_pair(vs_memcpy, benchmark, monkeypatch, guest, target, lambda: "tcp:127.0.0.1:0",
               {"multifd": True}, {"multifd-channels": 4})


def qmigx_to_incoming(vs_memcpy, benchmark, monkeypatch, guest, tmp_path, make_uri: Callable[[], str],
                      caps: dict, params: dict, *, src_params: Optional[dict] = None,
                      objects=None, extra=(), peak_file: Optional[Path] = None) -> list[int]:
    """Time an API source sending ``guest`` to a ``qmigx incoming`` process (fresh memory each round).

    ``src_params``: the source's parameters besides ``params``; ``extra``:
    more ``incoming`` arguments. Returns the destination's peak RSS per
    round when ``peak_file`` is given.
    """
    peaks: list[int] = []
    rd = Path(tempfile.mkdtemp(prefix="qmigx-bench-rd-", dir=SHM))

    def setup():
        shutil.rmtree(rd, ignore_errors=True)
        inc = QmigxIncoming(make_uri(), tmp_path, caps=caps, params=params, peak_file=peak_file,
                            ram_dir=rd, extra=extra).start()
        c, p = settings(caps, {**params, **(src_params or {})})
        return (MigrationSource(guest, capabilities=c, parameters=p, objects=objects), inc), {}

    def migrate(src: MigrationSource, inc: QmigxIncoming) -> None:
        src.migrate(inc.uri)
        assert src.wait(120).value == "completed", src.error

    def teardown(src: MigrationSource, inc: QmigxIncoming) -> None:
        rc, err = inc.wait(120)
        assert rc == 0, err
        if peak_file is not None:
            peaks.append(inc.peak_bytes())

    try:
        with_setup(benchmark, monkeypatch, setup, teardown)
        vs_memcpy(migrate, GIB, cold=True, rounds=ROUNDS)
        got = np.fromfile(rd / "pc.ram.bin", np.uint8)
        assert np.array_equal(got, guest["pc.ram"].memory)
        del got
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    return peaks


def test_qmigx_to_qmigx_incoming_process_tcp(vs_memcpy, benchmark, monkeypatch, guest, uris, tmp_path):
    """Two processes: the API source here, ``qmigx incoming`` (fresh memory each round) there."""
    peaks = qmigx_to_incoming(vs_memcpy, benchmark, monkeypatch, guest, tmp_path,
                              lambda: uris.make("tcp"), {"return-path": True}, {},
                              peak_file=tmp_path / "peak")
    peak = max(peaks)
    benchmark.extra_info.update(dest_peak_rss_mib=round(peak / MIB, 1),
                                dest_peak_vs_ram_plus_64mib=round(peak / (GIB + 64 * MIB), 3))
    print(f"qmigx incoming peak RSS {peak / MIB:.0f} MiB for {GIB // MIB} MiB of guest RAM")


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_loopback_limit(vs_memcpy, family, guest, target, uris):
    """The transport alone: 1 GiB through one socket (sendall / recv_into, 1 MiB at a time).

    Measured in the same run as the migrations, so their ratios can be read
    against what the loopback allows on this machine at this moment.
    """
    import socket
    import threading

    src = memoryview(guest["pc.ram"].memory)
    dst = memoryview(target["pc.ram"].memory)
    chunk = 1 << 20

    def once() -> None:
        if family == "unix":
            ls = socket.socket(socket.AF_UNIX)
            ls.bind(uris.make("unix")[5:])
        else:
            ls = socket.socket(socket.AF_INET)
            ls.bind(("127.0.0.1", 0))
        ls.listen(1)

        def receive() -> None:
            conn, _ = ls.accept()
            got = 0
            with conn:
                while got < GIB:
                    n = conn.recv_into(dst[got:got + chunk])
                    assert n, "sender closed early"
                    got += n

        rx = threading.Thread(target=receive)
        rx.start()
        with socket.socket(ls.family) as s:
            s.connect(ls.getsockname())
            for lo in range(0, GIB, chunk):
                s.sendall(src[lo:lo + chunk])
        rx.join()
        ls.close()

    vs_memcpy(once, GIB, cold=True, rounds=ROUNDS)
    assert dst[:4096] == src[:4096] and dst[-4096:] == src[-4096:]


# --- with a QEMU 7.2 peer, 512 MiB ----------------------------------------------------------------


def paused_qemu(tmp_path_factory, ram: int, name: str):
    """A paused test guest of ``ram`` bytes (RAM in /dev/shm, as the destinations'), return-path on."""
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 not installed")
    d = tmp_path_factory.mktemp(name)
    shm = Path(SHM) if SHM else d
    mem = shm / f"qmigx-bench-{os.getpid()}-{name}.ram"
    mem.unlink(missing_ok=True)
    kernel = d / "guest.bin"
    kernel.write_bytes(build_guest(0xBE4C, ram, dirty=False))
    try:
        with Qemu(ram=ram, kernel=kernel, mem_path=mem, workdir=d, name="src", timeout=60) as vm:
            vm.wait_guest_ready(120)
            vm.stop()
            vm.set_capabilities({"return-path": True})
            vm.set_parameters({"max-bandwidth": BANDWIDTH})
            yield SimpleNamespace(vm=vm, image=mem.read_bytes(), shm=shm, ram=ram)
    finally:
        mem.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def qemu_source(tmp_path_factory):
    """A paused 512 MiB test guest."""
    yield from paused_qemu(tmp_path_factory, QEMU_RAM, "qemu-src")


def wait_completed(vm: Qemu, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.qmp.execute("query-migrate")
        if q.get("status") == "completed":
            return q
        assert q.get("status") not in ("failed", "cancelled"), q
        assert time.monotonic() < deadline, q
        time.sleep(0.002)


def rearm(vm: Qemu) -> None:
    """QEMU 7.2 refuses to migrate a VM paused by a finished migration; a halted guest may run a moment."""
    vm.cont()
    vm.stop()


def qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, src, make_uri: Callable[[], str],
                 start_destination: Callable[[Path, str], Qemu]) -> None:
    """Time ``src``'s VM migrating to a QEMU destination that ``start_destination(mem, uri)`` starts.

    Each round listens on a fresh URI from ``make_uri``.
    """
    vm = src.vm
    dst_mem = src.shm / f"qmigx-bench-{os.getpid()}-dst.ram"

    def setup():
        dst_mem.unlink(missing_ok=True)
        uri = make_uri()
        return (start_destination(dst_mem, uri), uri), {}

    def migrate(dst: Qemu, uri: str) -> None:
        vm.migrate(uri)
        wait_completed(vm)

    def teardown(dst: Qemu, uri: str) -> None:
        try:
            assert dst.wait_migration(60)["status"] == "completed"
            diff = first_difference(dst_mem.read_bytes(), src.image)
            assert diff is None, diff
        finally:
            dst.close()
            dst_mem.unlink(missing_ok=True)
            rearm(vm)

    with_setup(benchmark, monkeypatch, setup, teardown)
    vs_memcpy(migrate, QEMU_RAM, cold=True, rounds=ROUNDS)


@needs_qemu
def test_qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, qemu_source, uris, tmp_path):
    qemu_to_qemu(vs_memcpy, benchmark, monkeypatch, qemu_source, lambda: uris.make("unix"),
                 qemu_destination(tmp_path, {"return-path": True}))
    record_ratio(benchmark, "qemu_to_qemu")


def qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, src, tmp_path, make_uri: Callable[[], str],
                  extra=(), peak_file: Optional[Path] = None) -> list[int]:
    """Time ``src``'s VM migrating to ``qmigx incoming`` (``extra`` arguments); its peak RSS per round."""
    vm = src.vm
    peaks: list[int] = []
    rd = Path(tempfile.mkdtemp(prefix="qmigx-bench-rd-", dir=src.shm))

    def setup():
        inc = QmigxIncoming(make_uri(), tmp_path, caps={"return-path": True}, ram_dir=rd,
                            peak_file=peak_file, extra=extra).start()
        return (inc,), {}

    def migrate(inc: QmigxIncoming) -> None:
        vm.migrate(inc.uri)
        wait_completed(vm)

    def teardown(inc: QmigxIncoming) -> None:
        try:
            rc, err = inc.wait(120)
            assert rc == 0, err
            if peak_file is not None:
                peaks.append(inc.peak_bytes())
            diff = first_difference((rd / "mem0.bin").read_bytes(), src.image)
            assert diff is None, diff
        finally:
            shutil.rmtree(rd, ignore_errors=True)
            rearm(vm)

    try:
        with_setup(benchmark, monkeypatch, setup, teardown)
        vs_memcpy(migrate, QEMU_RAM, cold=True, rounds=ROUNDS)
    finally:
        shutil.rmtree(rd, ignore_errors=True)
    return peaks


@needs_qemu
def test_qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, qemu_source, uris, tmp_path):
    peaks = qemu_to_qmigx(vs_memcpy, benchmark, monkeypatch, qemu_source, tmp_path,
                          lambda: uris.make("unix"), peak_file=tmp_path / "peak")
    peak = max(peaks)
    benchmark.extra_info.update(dest_peak_rss_mib=round(peak / MIB, 1),
                                dest_peak_vs_ram_plus_64mib=round(peak / (QEMU_RAM + 64 * MIB), 3))
    print(f"qmigx incoming peak RSS {peak / MIB:.0f} MiB for {QEMU_RAM // MIB} MiB of guest RAM")
    record_ratio(benchmark, "qemu_to_qmigx")


@pytest.fixture(scope="module")
def qemu_state(qemu_source, uris, tmp_path_factory):
    """The QEMU source's state (RAM and devices) as received by ``qmigx incoming --save``, loaded."""
    from qmigx.tools.streams import load_stream

    vm = qemu_source.vm
    d = tmp_path_factory.mktemp("qemu-state")
    uri = uris.make("unix")
    with QmigxIncoming(uri, d, caps={"return-path": True}, save=d / "state.mig") as inc:
        vm.migrate(uri)
        wait_completed(vm)
        rc, err = inc.wait(120)
    rearm(vm)
    assert rc == 0, err
    return load_stream(str(d / "state.mig"))


def state_source(loaded, caps: dict, params: dict, **kw) -> MigrationSource:
    """A qmigx source sending ``loaded`` (a stream QEMU's source produced: ``qemu_state``)."""
    blocks = RAMBlockList()
    for info in loaded.ram_setup.blocks:
        blocks.add(loaded.blocks[info.idstr])
    c, p = settings(caps, params)
    return MigrationSource(blocks, devices=loaded.sections, vmdesc=loaded.vmdesc,
                           machine_type=loaded.configuration.machine_type, capabilities=c,
                           parameters=p, globalstate=False, guest=SimpleGuest(running=False),
                           ram_section_id=loaded.ram_setup.section.section_id, **kw)


def qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, qsrc, make_uri: Callable[[], str],
                  start_destination: Callable[[Path, str], Qemu],
                  make_source: Callable[[], MigrationSource]) -> None:
    """Time a qmigx source (``make_source``) migrating ``qsrc``'s state to a QEMU destination."""
    dst_mem = qsrc.shm / f"qmigx-bench-{os.getpid()}-dst.ram"

    def setup():
        dst_mem.unlink(missing_ok=True)
        uri = make_uri()
        dst = start_destination(dst_mem, uri)
        return (make_source(), dst, uri), {}

    def migrate(src: MigrationSource, dst: Qemu, uri: str) -> None:
        src.migrate(uri)
        assert src.wait(120).value == "completed", src.error

    def teardown(src: MigrationSource, dst: Qemu, uri: str) -> None:
        try:
            assert dst.wait_migration(60)["status"] == "completed"
            diff = first_difference(dst_mem.read_bytes(), qsrc.image)
            assert diff is None, diff
        finally:
            dst.close()
            dst_mem.unlink(missing_ok=True)

    with_setup(benchmark, monkeypatch, setup, teardown)
    vs_memcpy(migrate, QEMU_RAM, cold=True, rounds=ROUNDS)


def qemu_destination(tmp_path: Path, caps: dict) -> Callable[[Path, str], Qemu]:
    """Starts a paused QEMU 7.2 destination with ``caps`` on a given RAM file and URI."""
    def start(mem: Path, uri: str) -> Qemu:
        dst = Qemu(ram=QEMU_RAM, mem_path=mem, paused=True, incoming=True, workdir=tmp_path,
                   name="dst", timeout=60).start()
        dst.set_capabilities(caps)
        dst.migrate_incoming(uri)
        return dst
    return start


@needs_qemu
def test_qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, qemu_source, qemu_state, uris, tmp_path):
    caps = {"return-path": True}
    qmigx_to_qemu(vs_memcpy, benchmark, monkeypatch, qemu_source, lambda: uris.make("unix"),
                  qemu_destination(tmp_path, caps), lambda: state_source(qemu_state, caps, {}))
    record_ratio(benchmark, "qmigx_to_qemu")


# --- saved states in and out, 1 GiB paused QEMU 7.2 guest, whole processes -----------------------


@pytest.fixture(scope="module")
def qemu_source_1g(tmp_path_factory):
    """A paused 1 GiB test guest."""
    yield from paused_qemu(tmp_path_factory, GIB, "qemu-src-1g")


@needs_qemu
def test_saved_state_streams_1gib(benchmark, qemu_source_1g, uris, tmp_path):
    """QEMU -> QEMU, QEMU -> ``incoming --save OUT`` and ``send FILE`` -> ``incoming --save``.

    Each round runs the three in turn (so contention hits them alike); the
    best time of each counts. A qmigx case is timed from the migrate
    command (QEMU) or the start of the ``send`` process to the exit of
    every qmigx process, OUT written; destinations listen before the
    clock starts, as the QEMU destination does. FILE is the OUT of the
    QEMU -> qmigx case (tmpfs, page cache warm). Targets: send -> incoming
    >= 2x QEMU -> QEMU, QEMU -> incoming --save >= 1.2x, each qmigx
    side's peak RSS <= guest RAM + 64 MiB.
    """
    from qemu_support.live import _PEAK_WRAPPER, qmigx_env, qmigx_send_argv

    src, vm = qemu_source_1g, qemu_source_1g.vm
    dst_mem = src.shm / f"qmigx-bench-{os.getpid()}-dst1g.ram"
    saved, resent = src.shm / f"qmigx-bench-{os.getpid()}-in.mig", src.shm / f"qmigx-bench-{os.getpid()}-out.mig"
    caps = {"return-path": True}
    best = dict.fromkeys(("qemu_to_qemu", "qemu_to_incoming", "qemu_to_save", "send_to_save"),
                         float("inf"))
    peaks = dict.fromkeys(("qemu_to_incoming", "qemu_to_save", "send_to_save:send",
                           "send_to_save:incoming"), 0)

    def incoming(out: Optional[Path], name: str) -> QmigxIncoming:
        return QmigxIncoming(uris.make("unix"), tmp_path, caps=caps, save=out, name=name,
                             peak_file=tmp_path / f"{name}.peak").start()

    def finished(inc: QmigxIncoming, peak: str) -> None:
        rc, err = inc.wait(120)
        assert rc == 0, err
        peaks[peak] = max(peaks[peak], inc.peak_bytes())

    def qemu_into(out: Optional[Path], case: str) -> None:
        inc = incoming(out, case)
        t0 = time.perf_counter()
        vm.migrate(inc.uri)
        wait_completed(vm)
        finished(inc, case)
        best[case] = min(best[case], time.perf_counter() - t0)
        rearm(vm)

    try:
        for _ in range(ROUNDS):
            dst_mem.unlink(missing_ok=True)
            uri = uris.make("unix")
            with Qemu(ram=src.ram, mem_path=dst_mem, paused=True, incoming=True, workdir=tmp_path,
                      name="dst", timeout=60) as dst:
                dst.set_capabilities(caps)
                dst.migrate_incoming(uri)
                t0 = time.perf_counter()
                vm.migrate(uri)
                wait_completed(vm)
                best["qemu_to_qemu"] = min(best["qemu_to_qemu"], time.perf_counter() - t0)
                assert dst.wait_migration(60)["status"] == "completed"
            rearm(vm)
            dst_mem.unlink(missing_ok=True)

            qemu_into(None, "qemu_to_incoming")  # what receiving alone takes, for comparison
            qemu_into(saved, "qemu_to_save")

            inc = incoming(resent, "resave")
            argv = qmigx_send_argv(saved, inc.uri, caps=caps, params={"max-bandwidth": BANDWIDTH})
            argv[1:5] = ["-X", "faulthandler", "-c", _PEAK_WRAPPER, str(tmp_path / "send.peak")]
            t0 = time.perf_counter()
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=qmigx_env(),
                               cwd=Path(__file__).resolve().parent.parent)
            finished(inc, "send_to_save:incoming")
            best["send_to_save"] = min(best["send_to_save"], time.perf_counter() - t0)
            assert r.returncode == 0, r.stderr
            peaks["send_to_save:send"] = max(peaks["send_to_save:send"], int((tmp_path / "send.peak").read_text()) << 10)
        from qmigx.tools.streams import load_stream

        got = load_stream(str(resent)).blocks["mem0"]
        diff = first_difference(bytes(got.memory), src.image)
        assert diff is None, diff
        size = saved.stat().st_size
    finally:
        for p in (dst_mem, saved, resent):
            p.unlink(missing_ok=True)
    base = best["qemu_to_qemu"]
    limit = src.ram + 64 * MIB
    info = {f"{k}_s": round(v, 3) for k, v in best.items()}
    info.update({f"{k}_vs_qemu_to_qemu": round(base / v, 3) for k, v in best.items() if k != "qemu_to_qemu"})
    info.update({f"{k.replace(':', '_')}_peak_rss_mib": round(v / MIB, 1) for k, v in peaks.items()},
                stream_mib=round(size / MIB, 1))
    benchmark.extra_info.update(info)
    print(f"\n1 GiB paused guest, {size / MIB:.0f} MiB stream: QEMU -> QEMU {base:.3f} s; "
          f"QEMU -> incoming (no --save) {best['qemu_to_incoming']:.3f} s "
          f"({base / best['qemu_to_incoming']:.2f}x); "
          f"QEMU -> incoming --save {best['qemu_to_save']:.3f} s ({base / best['qemu_to_save']:.2f}x); "
          f"send FILE -> incoming --save {best['send_to_save']:.3f} s "
          f"({base / best['send_to_save']:.2f}x); peak RSS (limit {limit / MIB:.0f} MiB): "
          + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in peaks.items()))
