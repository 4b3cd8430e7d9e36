"""Postcopy: page-request latency, switch-over time, total time against precopy, QEMU's blocktime.

* Page-request latency, qmigx -> qmigx in one process, 1 GiB of RAM
  behind a busy background stream and 256 MiB behind a throttled one
  (``qmigx.synthetic``'s fill), 4 KiB pages: the destination's
  ``postcopy_report()["latency_ms"]`` (fault read by the fault thread to
  page placed with ``UFFDIO_COPY``), p50 and p99 over every request of
  ``LAT_ROUNDS`` migrations, over unix and tcp, with and without
  ``postcopy-preempt``, with a busy background stream
  (``max-postcopy-bandwidth`` 0: unlimited) and a throttled one
  (``THROTTLE``). Postcopy starts right after ``migrate`` (nearly all of
  RAM comes after the switch-over) and the destination's vCPU stand-in
  (``touch_rate`` = ``TOUCH_RATE`` random pages a second) makes the faults.
  Baseline, measured in the same run over the same socket type: the round
  trip of a 24-byte request answered by a 4 KiB page between two threads
  of this process (a ``socketpair`` for unix, a loopback connection with
  ``TCP_NODELAY`` for tcp, as the engine's). ``extra_info["p50_in_rtts"]``
  is the latency's p50 divided by the round trip's p50 (how many bare
  socket round trips one page request costs; lower is better).
* Switch-over, 1 GiB (unix): precopy at ``SWITCH_PRECOPY_BW`` until about
  half of RAM went, 4096 already-sent pages rewritten (discard ranges),
  ``start_postcopy()``; the time from the source's ``guest.stop`` to the
  destination's ``on_postcopy_run`` (both ``time.perf_counter`` in this
  process), in ms (the device state here is a few hundred bytes: a memcpy
  of it is no meaningful baseline).
* Total time, 1 GiB over unix, unlimited bandwidth, ``return-path`` on in
  both: precopy, and postcopy started right after ``migrate`` with the
  destination's toucher running; ``ratio_to_memcpy`` as everywhere else,
  and ``extra_info["vs_precopy"]`` = precopy time / postcopy time (> 1:
  postcopy finished sooner).
* QEMU 7.2 -> QEMU 7.2 postcopy (unix) of a 128 MiB dirtying test guest
  with ``postcopy-blocktime`` on the destination (RAM on /dev/shm):
  precopy at 64 MiB/s, ``migrate-start-postcopy`` when its first pass has
  less than 4 MiB left, the rest at ``max-postcopy-bandwidth`` 4 MiB/s; the
  destination's ``postcopy-blocktime`` and ``postcopy-vcpu-blocktime``
  (``query-migrate`` after completion) and the source's
  ``postcopy-requests``, beside qmigx's ``blocktime_ms`` of the latency
  cases (the sum of its fault-to-placed latencies: the toucher's wait).

Nothing here asserts a time: every round checks the destination's memory
equals the source's (QEMU: both ends' status), the figures go to
``extra_info`` and are printed. After each qmigx round the destination's
RAM is dropped untimed (see ``Pair.release``: a finished destination is
freed only by a full GC, which would otherwise land in a later round). Run: ``python -m pytest
benchmarks/test_postcopy.py --benchmark-enable -q -s``.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

from qmigx.control import Capabilities, Parameters
from qmigx.dirtylog import ExplicitDirtyLog
from qmigx.migration import MigrationDestination, MigrationSource, SimpleGuest
from qmigx.ram import RAMBlock, RAMBlockList
from qmigx.synthetic import fill_pages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_support.guest import build_guest  # noqa: E402
from qemu_support.harness import Qemu, qemu_binary  # noqa: E402
from qemu_support.live import Uris  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
BANDWIDTH = 100 << 30  # precopy's max-bandwidth where it must not bind
LAT_RAM = 256 * MIB
LAT_ROUNDS = 2
TOUCH_RATE = 2000
THROTTLE = 64 * MIB  # max-postcopy-bandwidth of the throttled background stream
BIG_RAM = 1 * GIB
SWITCH_PRECOPY_BW = 512 * MIB
SWITCH_DIRTY_PAGES = 4096
ROUNDS = 3
QEMU_RAM = 128 * MIB
QEMU_PRECOPY_BW = 64 * MIB
#: switch when precopy's first pass has this much left (precopy cannot complete before:
#: its threshold is 64 MiB/s x 1 ms downtime)
QEMU_SWITCH_AT = 4 * MIB
#: what is left at the switch-over comes this slowly: the running guest asks for its pages
QEMU_POSTCOPY_BW = 4 * MIB
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
WAIT = 120.0
#: per-test figures kept for the ratios computed in later tests of the same run
FIGURES: dict[str, Any] = {}

needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed")


def _uffd_or_skip() -> None:
    from qmigx import uffd

    try:
        uffd.create_uffd(user_mode_only_first=False)
    except uffd.UffdUnavailable as e:
        pytest.skip(f"userfaultfd unavailable here: {e.message}")


def settings(caps: list[str], params: dict) -> tuple[Capabilities, Parameters]:
    c = Capabilities()
    if caps:
        c.set_many([(k, True) for k in caps])
    p = Parameters(capabilities=c)
    p.set({"max-bandwidth": BANDWIDTH, **params})
    return c, p


def pct(values, q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def with_setup(benchmark, monkeypatch, setup: Callable[[], tuple],
               teardown: Callable[..., None]) -> None:
    """Make ``benchmark.pedantic`` run ``setup``/``teardown`` untimed around each round.

    As in test_live.py: ``setup`` returns the round's ``(args, kwargs)``.
    With benchmarks disabled pedantic runs one round and skips the
    teardown; it runs here then, so every round is checked and cleaned up.
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
            result = pedantic(target, setup=tracked_setup, teardown=tracked_teardown, **kw)
        except BaseException:
            while pending:  # clean up, but let the round's own failure be the one reported
                a, k = pending.pop()
                try:
                    teardown(*a, **k)
                except Exception:
                    pass
            raise
        while pending:
            a, k = pending.pop()
            teardown(*a, **k)
        return result

    monkeypatch.setattr(benchmark, "pedantic", patched)


def rounds(benchmark, monkeypatch, setup, run, teardown, n: int) -> None:
    with_setup(benchmark, monkeypatch, setup, teardown)
    benchmark.pedantic(run, rounds=n, iterations=1, warmup_rounds=0)


def median_seconds(benchmark) -> Optional[float]:
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return None
    return stats.stats.median


class TimedGuest(SimpleGuest):
    """A running guest that notes when the migration stopped it."""

    def __init__(self) -> None:
        super().__init__(running=True)
        self.t_stop: Optional[float] = None

    def stop(self) -> None:
        self.t_stop = time.perf_counter()
        super().stop()


@pytest.fixture(scope="module")
def uris():
    u = Uris()
    yield u
    u.close()


def _make_uri(uris: Uris, transport: str) -> str:
    return uris.make("unix") if transport == "unix" else "tcp:127.0.0.1:0"


def _filled(size: int, seed: int) -> RAMBlockList:
    b = RAMBlock.anonymous("pc.ram", size)
    fill_pages(b.memory, seed=seed)
    return RAMBlockList([b])


class Pair:
    """One qmigx -> qmigx migration: a fresh destination, a source over ``blocks``."""

    def __init__(self, blocks: RAMBlockList, uri: str, caps: list[str], params: dict, *,
                 touch_rate: float = 0, dirty_logs: Optional[dict] = None,
                 src_params: Optional[dict] = None) -> None:
        dc, dp = settings(caps, {})
        self.dst = MigrationDestination(None, capabilities=dc, parameters=dp, io_timeout=WAIT)
        self.dst.touch_rate = touch_rate
        self.t_run: Optional[float] = None
        self.dst.on_postcopy_run = self._ran
        self.dst.incoming(uri)
        sc, sp = settings(caps, {**params, **(src_params or {})})
        self.guest = TimedGuest()
        self.src = MigrationSource(blocks, capabilities=sc, parameters=sp, guest=self.guest,
                                   dirty_logs=dirty_logs, io_timeout=WAIT)
        self.blocks = blocks

    def _ran(self, dst) -> None:
        self.t_run = time.perf_counter()

    def wait(self) -> None:
        assert self.src.wait(WAIT).value == "completed", self.src.error
        assert self.dst.wait(WAIT).value == "completed", self.dst.error

    def check_and_close(self) -> None:
        try:
            assert self.src.state.state.value == "completed", self.src.error
            assert self.dst.state.state.value == "completed", self.dst.error
            for b in self.blocks:
                assert np.array_equal(self.dst.blocks[b.idstr].memory, b.memory), b.idstr
        finally:
            self.src.cancel()
            self.dst.cancel()
            self.dst.on_postcopy_run = None

    def release(self) -> None:
        """Give the destination's RAM back now, untimed.

        A finished ``MigrationDestination`` sits in reference cycles (bound
        methods: ``listener.on_refused``, ``postcopy.on_error``), so its RAM
        goes only at a full GC; left to chance, that collection (freeing the
        whole guest RAM under the GIL) lands in a later round, e.g. inside
        its switch-over (seen: +226 ms). The pages are dropped here
        (``MADV_DONTNEED``), and earlier rounds' cycles collected.
        """
        from qmigx import uffd

        for b in self.dst.blocks:
            uffd.madvise(uffd.buffer_address(b), b.used_length, 4)  # MADV_DONTNEED
        gc.collect()

    @property
    def switchover_ms(self) -> Optional[float]:
        if self.t_run is None or self.guest.t_stop is None:
            return None
        return (self.t_run - self.guest.t_stop) * 1000


# --- baseline: a 4 KiB round trip over the same socket type ---------------------------------------

_rtt_cache: dict[str, dict] = {}
REQ = 24  # a REQ_PAGES_ID message for "pc.ram": 3 + 8 + 4 + 1 + 6 bytes, rounded up
REPLY = 8 + PAGE  # a page record: be64 offset|flags, the page


def _recv_exact(s: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = s.recv_into(buf[got:])
        if not n:
            raise ConnectionError("peer closed")
        got += n


def rtt_baseline(transport: str, n: int = 3000, warmup: int = 200) -> dict:
    """p50/p99 (ms) of a 24-byte request answered by 4 KiB, between two threads of this process."""
    if transport in _rtt_cache:
        return _rtt_cache[transport]
    if transport == "unix":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        ls = socket.socket(socket.AF_INET)
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
        ls.close()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    page = os.urandom(REPLY)
    total = n + warmup

    def server() -> None:
        req = memoryview(bytearray(REQ))
        for _ in range(total):
            _recv_exact(b, req)
            b.sendall(page)

    t = threading.Thread(target=server, daemon=True)
    t.start()
    req = os.urandom(REQ)
    reply = memoryview(bytearray(REPLY))
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        a.sendall(req)
        _recv_exact(a, reply)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t.join(10)
    a.close()
    b.close()
    assert bytes(reply) == page
    ms = np.asarray(times) * 1000
    _rtt_cache[transport] = {"p50": pct(ms, 50), "p99": pct(ms, 99)}
    return _rtt_cache[transport]


# --- 1. page-request latency, 1 GiB (busy) and 256 MiB (throttled) --------------------------------------------------------------


@pytest.fixture(scope="module")
def lat_guest() -> RAMBlockList:
    return _filled(LAT_RAM, seed=21)


@pytest.mark.parametrize("stream", ["busy", "throttled"])
@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_request_latency(benchmark, monkeypatch, transport, preempt, stream, lat_guest, big_guest,
                         uris):
    _uffd_or_skip()
    base = rtt_baseline(transport)
    caps = ["postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    params = {"max-postcopy-bandwidth": 0 if stream == "busy" else THROTTLE}
    lat: list[float] = []
    reports: list[dict] = []
    # the busy stream lasts about a second for 1 GiB; throttled, 256 MiB take 4 s
    guest = big_guest if stream == "busy" else lat_guest

    def setup():
        return (Pair(guest, _make_uri(uris, transport), caps, params,
                     touch_rate=TOUCH_RATE),), {}

    def run(pair: Pair) -> None:
        pair.src.migrate(pair.dst.connect_uri)
        pair.src.start_postcopy()  # all but the setup goes after the switch-over
        pair.wait()

    def teardown(pair: Pair) -> None:
        try:
            pair.check_and_close()
        finally:
            pc = pair.dst.postcopy_report()
            if pc is not None:
                reports.append(pc)
                lat.extend(pair.dst.postcopy.latencies)
            pair.release()

    rounds(benchmark, monkeypatch, setup, run, teardown, LAT_ROUNDS)
    assert reports and all(r["served"] == r["requests"] for r in reports), reports
    assert sum(r["requests"] for r in reports) > 0, reports
    assert all((r["preempt_pages"] > 0) == preempt for r in reports), reports
    ms = np.asarray(lat) * 1000
    p50, p99 = pct(ms, 50), pct(ms, 99)
    info = {
        "ram_mib": sum(b.used_length for b in guest) // MIB,
        "max_postcopy_bandwidth": params["max-postcopy-bandwidth"],
        "touch_rate": TOUCH_RATE,
        "requests": int(len(ms)),
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "latency_max_ms": round(float(ms.max()), 3) if len(ms) else None,
        "rtt_p50_ms": base["p50"],
        "rtt_p99_ms": base["p99"],
        "p50_in_rtts": round(p50 / base["p50"], 2) if p50 and base["p50"] else None,
        "p99_in_rtts": round(p99 / base["p99"], 2) if p99 and base["p99"] else None,
        "blocktime_ms": [r["blocktime_ms"] for r in reports],
        "preempt_pages": [r["preempt_pages"] for r in reports],
        "touched": [r["touched"] for r in reports],
    }
    benchmark.extra_info.update(info)
    FIGURES[f"latency-{transport}-{'preempt' if preempt else 'plain'}-{stream}"] = info
    print(f"\n{benchmark.name}: {len(ms)} requests, p50 {p50} ms ({info['p50_in_rtts']} RTT), "
          f"p99 {p99} ms ({info['p99_in_rtts']} RTT), max {info['latency_max_ms']} ms; "
          f"{transport} 4 KiB RTT p50 {base['p50']} ms p99 {base['p99']} ms; "
          f"blocktime {info['blocktime_ms']} ms")


# --- 2. switch-over time, 1 GiB ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_guest() -> RAMBlockList:
    return _filled(BIG_RAM, seed=11)


def test_switchover_1gib(benchmark, monkeypatch, big_guest, uris):
    _uffd_or_skip()
    caps = ["postcopy-ram"]
    switch: list[float] = []
    downtime: list[int] = []
    sent_before: list[float] = []
    rng = np.random.default_rng(7)
    mem = big_guest["pc.ram"].memory

    def setup():
        logs = {b.idstr: ExplicitDirtyLog(b) for b in big_guest}
        pair = Pair(big_guest, uris.make("unix"), caps,
                    {"max-bandwidth": SWITCH_PRECOPY_BW, "max-postcopy-bandwidth": 0},
                    touch_rate=1000, dirty_logs=logs)
        return (pair, logs), {}

    def run(pair: Pair, logs: dict) -> None:
        src = pair.src
        src.migrate(pair.dst.connect_uri)
        deadline = time.monotonic() + WAIT
        while src.query().get("ram", {}).get("transferred", 0) < BIG_RAM // 2:
            assert src.state.state.value in ("setup", "active"), (src.state.state, src.error)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sent_before.append(src.query()["ram"]["transferred"] / MIB)
        # rewrite pages the precopy sent already: they go again, after discards
        for p in rng.choice(BIG_RAM // PAGE // 4, SWITCH_DIRTY_PAGES, replace=False):
            off = int(p) * PAGE
            mem[off : off + 8] = rng.integers(1, 256, 8, dtype=np.uint8)
            logs["pc.ram"].mark_dirty(off, 8)
        src.start_postcopy()
        pair.wait()

    def teardown(pair: Pair, logs: dict) -> None:
        try:
            pair.check_and_close()
        finally:
            if pair.switchover_ms is not None:
                switch.append(pair.switchover_ms)
                downtime.append(pair.src.query().get("downtime"))
            pair.release()

    rounds(benchmark, monkeypatch, setup, run, teardown, ROUNDS)
    assert switch, "postcopy never ran on the destination"
    info = {
        "ram_mib": BIG_RAM // MIB,
        "precopy_mib_before_switch": [round(x) for x in sent_before],
        "rewritten_pages": SWITCH_DIRTY_PAGES,
        "switchover_ms": [round(x, 3) for x in switch],
        "switchover_ms_median": round(float(np.median(switch)), 3),
        "switchover_ms_min": round(min(switch), 3),
        "source_downtime_ms": downtime,
    }
    benchmark.extra_info.update(info)
    FIGURES["switchover"] = info
    print(f"\n{benchmark.name}: source stop -> destination RUN {info['switchover_ms']} ms "
          f"(median {info['switchover_ms_median']}), source downtime {downtime} ms")


# --- 3. total time, postcopy against precopy, 1 GiB -------------------------------------------------


def _total(vs_memcpy, benchmark, monkeypatch, big_guest, uris, postcopy: bool) -> dict:
    caps = ["return-path"] + (["postcopy-ram"] if postcopy else [])
    out: dict[str, list] = {"switchover_ms": [], "requests": [], "p50": [], "p99": []}

    def setup():
        return (Pair(big_guest, uris.make("unix"), caps, {"max-postcopy-bandwidth": 0},
                     touch_rate=1000 if postcopy else 0),), {}

    def run(pair: Pair) -> None:
        pair.src.migrate(pair.dst.connect_uri)
        if postcopy:
            pair.src.start_postcopy()
        pair.wait()

    def teardown(pair: Pair) -> None:
        try:
            pair.check_and_close()
        finally:
            pair.release()
        if postcopy:
            pc = pair.dst.postcopy_report()
            assert pc is not None, "the migration did not switch to postcopy"
            out["switchover_ms"].append(round(pair.switchover_ms, 3))
            out["requests"].append(pc["requests"])
            out["p50"].append(pc["latency_ms"]["p50"])
            out["p99"].append(pc["latency_ms"]["p99"])

    with_setup(benchmark, monkeypatch, setup, teardown)
    vs_memcpy(run, BIG_RAM, cold=True, rounds=ROUNDS)
    return out


def test_total_precopy_1gib(vs_memcpy, benchmark, monkeypatch, big_guest, uris):
    _total(vs_memcpy, benchmark, monkeypatch, big_guest, uris, postcopy=False)
    t = median_seconds(benchmark)
    if t is not None:
        FIGURES["precopy_s"] = t
        benchmark.extra_info["total_s"] = round(t, 3)
        print(f"precopy of 1 GiB: {t:.3f} s")


def test_total_postcopy_1gib(vs_memcpy, benchmark, monkeypatch, big_guest, uris):
    _uffd_or_skip()
    out = _total(vs_memcpy, benchmark, monkeypatch, big_guest, uris, postcopy=True)
    benchmark.extra_info.update({f"postcopy_{k}": v for k, v in out.items()})
    t = median_seconds(benchmark)
    if t is not None:
        benchmark.extra_info["total_s"] = round(t, 3)
        pre = FIGURES.get("precopy_s")
        if pre:
            benchmark.extra_info["vs_precopy"] = round(pre / t, 3)
            print(f"postcopy of 1 GiB: {t:.3f} s, precopy {pre:.3f} s: "
                  f"{pre / t:.2f}x precopy's speed; switch-over {out['switchover_ms']} ms, "
                  f"requests {out['requests']}, p50 {out['p50']} ms, p99 {out['p99']} ms")


# --- 4. QEMU 7.2 -> QEMU 7.2, postcopy-blocktime -----------------------------------------------------


def _wait_status(vm: Qemu, want: set, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = vm.query_migrate()
        if q.get("status") in want:
            return q
        assert q.get("status") not in ("failed", "cancelled"), q
        assert time.monotonic() < deadline, f"QEMU migration still {q.get('status')} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.qemu
@needs_qemu
def test_qemu_to_qemu_blocktime(benchmark, monkeypatch, uris, tmp_path):
    """A running guest that dirties its RAM; postcopy near the end of precopy's first pass.

    The test guest writes a 1 MiB region near the start of RAM (and its
    marker page): sent in the first pass and dirtied since, those pages are
    discarded at the switch-over; the background stream (``QEMU_POSTCOPY_BW``)
    starts again from the start of RAM, but the guest, running at once on
    the destination, blocks on them first and asks for them.
    """
    kernel = tmp_path / "guest.bin"
    kernel.write_bytes(build_guest(0xB10C, QEMU_RAM, dirty=True))
    shm = Path(tempfile.mkdtemp(prefix="qmigx-pcbench-", dir=SHM))
    results: list[dict] = []

    def setup():
        src = Qemu(ram=QEMU_RAM, kernel=kernel, mem_path=shm / "src.ram", workdir=tmp_path,
                   name="src", timeout=60).start()
        dst = None
        try:
            src.wait_guest_ready(60, min_counter=1000)
            dst = Qemu(ram=QEMU_RAM, kernel=kernel, mem_path=shm / "dst.ram", incoming=True,
                       workdir=tmp_path, name="dst", timeout=60).start()
            dst.set_capabilities({"postcopy-ram": True, "postcopy-blocktime": True})
            uri = uris.make("unix")
            dst.migrate_incoming(uri)
            src.set_capabilities({"postcopy-ram": True})
            src.set_parameters({"max-bandwidth": QEMU_PRECOPY_BW, "downtime-limit": 1,
                                "max-postcopy-bandwidth": QEMU_POSTCOPY_BW})
        except BaseException:
            src.close()
            if dst is not None:
                dst.close()
            raise
        return (src, dst, uri), {}

    def run(src: Qemu, dst: Qemu, uri: str) -> None:
        src.migrate(uri)
        deadline = time.monotonic() + WAIT
        while True:  # the first pass over RAM is nearly done; what the guest dirtied is left too
            q = src.query_migrate()
            assert q.get("status") in ("setup", "active"), q
            if q.get("status") == "active" and 0 < q.get("ram", {}).get("remaining", 0) < QEMU_SWITCH_AT:
                break
            assert time.monotonic() < deadline, q
            time.sleep(0.005)
        src.cmd("migrate-start-postcopy")
        _wait_status(src, {"completed"}, timeout=WAIT)
        _wait_status(dst, {"completed"}, timeout=WAIT)

    def teardown(src: Qemu, dst: Qemu, uri: str) -> None:
        try:
            sq = src.query_migrate()
            dq = dst.query_migrate()
            assert sq.get("status") == "completed", sq
            assert dq.get("status") == "completed", dq
            assert src.status() == "postmigrate", src.status()
            assert dst.status() == "running", dst.status()
            results.append({"src": sq, "dst": dq})
        finally:
            src.close()
            dst.close()
            for f in ("src.ram", "dst.ram"):
                (shm / f).unlink(missing_ok=True)

    try:
        rounds(benchmark, monkeypatch, setup, run, teardown, ROUNDS)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert results
    bt = [r["dst"].get("postcopy-blocktime") for r in results]
    vbt = [r["dst"].get("postcopy-vcpu-blocktime") for r in results]
    reqs = [r["src"].get("ram", {}).get("postcopy-requests") for r in results]
    per_req = [round(b / n, 1) if b is not None and n else None for b, n in zip(bt, reqs)]
    info = {
        "ram_mib": QEMU_RAM // MIB,
        "qemu_postcopy_blocktime_ms": bt,
        "qemu_postcopy_vcpu_blocktime_ms": vbt,
        "qemu_postcopy_requests": reqs,
        "qemu_blocktime_per_request_ms": per_req,
        "qemu_downtime_ms": [r["src"].get("downtime") for r in results],
        "qemu_total_time_ms": [r["src"].get("total-time") for r in results],
        "qmigx_blocktime_ms": {k: v["blocktime_ms"] for k, v in FIGURES.items()
                               if k.startswith("latency-")},
    }
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.name}: QEMU postcopy-blocktime {bt} ms, vcpu {vbt}, requests {reqs}; "
          f"qmigx (toucher) blocktime {info['qmigx_blocktime_ms']}")
