"""Dirty-log sources: explicit marking and userfaultfd write-protect tracking."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx import dirtylog as D
from qmigx.bitmap import DirtyBitmap, DirtyLogSource
from qmigx.errors import CapabilityError, ChannelError, ParameterError
from qmigx.ram import RAMBlock

PAGE = 4096


def pages_of(log) -> list[int]:
    if log is None:
        return []
    words = np.asarray(log)
    assert words.dtype == np.uint64 and words.ndim == 1
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).tolist()


def in_thread(fn, *args):
    """Run fn in another thread (the writer is never the thread that syncs)."""
    err = []

    def body():
        try:
            fn(*args)
        except BaseException as e:  # pragma: no cover - reported below
            err.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(20)
    assert not t.is_alive(), "writer thread hung"
    if err:
        raise err[0]


# -- explicit marking -----------------------------------------------------------


def test_explicit_is_a_dirty_log_source():
    log = D.ExplicitDirtyLog(RAMBlock("b", bytearray(8 * PAGE)))
    assert isinstance(log, DirtyLogSource)
    assert log.kind == "explicit" and log.reason is None
    assert log.sync() is None


@pytest.mark.parametrize(
    "offset, length, expect",
    [
        (0, 1, [0]),
        (PAGE - 1, 1, [0]),
        (PAGE - 1, 2, [0, 1]),
        (PAGE, PAGE, [1]),
        (PAGE + 1, PAGE, [1, 2]),
        (10, 0, []),
        (3 * PAGE - 5, 70 * PAGE, list(range(2, 73))),
        (63 * PAGE, 2 * PAGE, [63, 64]),
        (0, 130 * PAGE, list(range(130))),
    ],
)
def test_explicit_marks_touched_pages(offset, length, expect):
    log = D.ExplicitDirtyLog(RAMBlock("b", bytearray(130 * PAGE)))
    log.mark_dirty(offset, length)
    assert pages_of(log.sync()) == expect
    assert log.sync() is None  # reset by the sync


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 40 * PAGE)),
                                      max_size=12))
def test_explicit_matches_page_model(npages, ranges):
    log = D.ExplicitDirtyLog(RAMBlock("b", bytearray(npages * PAGE)))
    model = set()
    for off, length in ranges:
        off %= npages * PAGE
        length = min(length, npages * PAGE - off)
        log.mark_dirty(off, length)
        if length:
            model.update(range(off // PAGE, (off + length - 1) // PAGE + 1))
    got = log.sync()
    assert pages_of(got) == sorted(model)
    if got is not None:
        assert len(got) == (npages + 63) // 64  # a DirtyBitmap-sized word array


def test_explicit_rejects_out_of_range_and_clear_is_noop():
    log = D.ExplicitDirtyLog(RAMBlock("b", bytearray(4 * PAGE)))
    for off, length in [(-1, 1), (4 * PAGE, 1), (3 * PAGE, PAGE + 1), (0, -1)]:
        with pytest.raises(ParameterError):
            log.mark_dirty(off, length)
    with pytest.raises(ParameterError):
        log.mark_pages(3, 2)
    log.mark_pages(1, 2)
    log.clear(0, 4)  # no re-protection needed: the marks stay
    with pytest.raises(ParameterError):
        log.clear(2, 3)
    assert pages_of(log.sync()) == [1, 2]


def test_explicit_concurrent_marking_loses_nothing():
    npages = 4096
    log = D.ExplicitDirtyLog(RAMBlock("b", bytearray(npages * PAGE)))
    marked: list[set] = [set() for _ in range(4)]
    seen = set()
    stop = threading.Event()

    def marker(i):
        rng = random.Random(i)
        for _ in range(20000):
            p = rng.randrange(npages)
            n = rng.choice((1, 1, 1, 3, 70))
            n = min(n, npages - p)
            log.mark_pages(p, n)
            marked[i].update(range(p, p + n))

    def syncer():
        while not stop.is_set():
            seen.update(pages_of(log.sync()))

    s = threading.Thread(target=syncer)
    s.start()
    ts = [threading.Thread(target=marker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    s.join()
    seen.update(pages_of(log.sync()))
    assert seen == set().union(*marked)


def test_explicit_feeds_dirty_bitmap():
    block = RAMBlock("b", bytearray(200 * PAGE))
    log = D.ExplicitDirtyLog(block)
    bm = DirtyBitmap(200, 6, source=log)
    log.mark_dirty(5 * PAGE + 100, 2 * PAGE)
    log.mark_dirty(199 * PAGE, 1)
    assert bm.sync_from_source() == 4
    out = np.zeros(200, np.int64)
    n = bm.take_dirty(0, 200, out)
    assert out[:n].tolist() == [5, 6, 7, 199]


# -- userfaultfd write-protect ----------------------------------------------------


def uffd_log(block, mode, **kw):
    """The tracker, or a skip naming the kernel's exact refusal."""
    try:
        return D.UffdWriteProtectLog(block, mode=mode, **kw)
    except CapabilityError as e:
        pytest.skip(e.message)


MODES = ["async", "fault"]


@pytest.fixture(params=MODES)
def tracked(request):
    block = RAMBlock.anonymous("pc.ram", 2048 * PAGE)  # 8 MiB, THP-sized regions included
    log = uffd_log(block, request.param)
    assert log.mode == request.param
    log.start()
    yield block, log
    log.close()


def test_uffd_reports_exactly_the_pages_another_thread_wrote(tracked):
    block, log = tracked
    mem = block.memory
    chosen = [0, 1, 63, 64, 511, 512, 1000, 2047]

    def writer():
        for p in chosen:
            mem[p * PAGE + (p % PAGE)] = (p % 251) + 1  # a single-byte numpy store

    in_thread(writer)
    assert pages_of(log.sync()) == chosen
    assert log.sync() is None
    for p in chosen:  # the writes went through
        assert mem[p * PAGE + (p % PAGE)] == (p % 251) + 1
    assert int(np.count_nonzero(mem)) == len(chosen)


def test_uffd_range_write_and_vector_ops(tracked):
    block, log = tracked
    mem = block.memory

    def writer():
        mem[10 * PAGE - 3 : 13 * PAGE + 1] = 7  # pages 9..13
        mem.reshape(-1, PAGE)[100:103, 17] += 1  # pages 100..102

    in_thread(writer)
    assert pages_of(log.sync()) == [9, 10, 11, 12, 13, 100, 101, 102]


def test_uffd_no_double_report_until_clear(tracked):
    block, log = tracked
    mem = block.memory
    in_thread(lambda: mem.__setitem__(5 * PAGE, 1))
    assert pages_of(log.sync()) == [5]
    in_thread(lambda: mem.__setitem__(5 * PAGE + 8, 2))  # page 5 is not protected any more
    assert log.sync() is None
    log.clear(0, 64)  # re-protect pages 0..63 (one chunk at shift 6)
    in_thread(lambda: mem.__setitem__(5 * PAGE + 9, 3))
    in_thread(lambda: mem.__setitem__(70 * PAGE, 4))  # never unprotected: reported anyway
    assert pages_of(log.sync()) == [5, 70]
    assert mem[5 * PAGE : 5 * PAGE + 10].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 2, 3]


def test_uffd_write_between_sync_and_clear_is_not_lost(tracked):
    block, log = tracked
    mem = block.memory
    in_thread(lambda: mem.__setitem__(3 * PAGE, 1))
    assert pages_of(log.sync()) == [3]
    in_thread(lambda: mem.__setitem__(4 * PAGE, 1))  # after the sync, before the chunk's clear
    log.clear(0, 64)
    assert pages_of(log.sync()) == [4]


def test_uffd_writes_before_start_are_not_logged():
    block = RAMBlock.anonymous("pc.ram", 64 * PAGE)
    log = uffd_log(block, "auto")
    try:
        block.memory[:] = 9  # before start(): the migration bitmap is all-dirty anyway
        assert log.sync() is None
        log.start()
        assert log.sync() is None
        in_thread(lambda: block.memory.__setitem__(2 * PAGE, 1))
        assert pages_of(log.sync()) == [2]
    finally:
        log.close()


def test_uffd_tracks_kernel_writes_into_the_block(tracked):
    block, log = tracked
    r, w = os.pipe()
    os.write(w, b"k" * 5000)
    os.close(w)
    try:
        n = os.readv(r, [memoryview(block.memory)[8 * PAGE - 100 : 8 * PAGE + 4900]])
    finally:
        os.close(r)
    assert n == 5000
    assert pages_of(log.sync()) == [7, 8, 9]
    assert bytes(block.memory[8 * PAGE - 100 : 8 * PAGE + 4900]) == b"k" * 5000


def test_uffd_mark_dirty_adds_invisible_writes(tracked):
    block, log = tracked
    log.mark_dirty(20 * PAGE + 1, PAGE)
    assert pages_of(log.sync()) == [20, 21]
    with pytest.raises(ParameterError):
        log.mark_dirty(2048 * PAGE, 1)
    with pytest.raises(ParameterError):
        log.clear(2000, 49)


def test_uffd_fault_mode_without_unpopulated_prefaults():
    # The path kernels older than 6.4 take: pages are mapped before protection.
    block = RAMBlock.anonymous("pc.ram", 256 * PAGE)
    log = uffd_log(block, "fault", _unpopulated=False)
    try:
        log.start()
        in_thread(lambda: block.memory.__setitem__(200 * PAGE + 5, 3))
        assert pages_of(log.sync()) == [200]
        assert log.faults >= 1
    finally:
        log.close()


def test_uffd_shmem_block():
    path = f"/dev/shm/qmigx-test-dirtylog-{os.getpid()}"
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with open(path, "wb") as f:
        f.truncate(64 * PAGE)
    block = RAMBlock.from_file("shm", path, 64 * PAGE, shared=True)
    try:
        with pytest.raises(CapabilityError, match="shared memory"):
            D.UffdWriteProtectLog(block, mode="async")
        log = uffd_log(block, "auto")
        try:
            assert log.mode == "fault"  # shared memory: the kernel may drop written PTEs
            log.start()
            in_thread(lambda: block.memory.__setitem__(33 * PAGE, 1))
            assert pages_of(log.sync()) == [33]
        finally:
            log.close()
    finally:
        os.unlink(path)


def test_uffd_refusals_and_fallback(tmp_path):
    # malloc'ed numpy memory is not page aligned (or may not be): refused with the reason
    arr = np.zeros(16 * PAGE + 64, np.uint8)[64:]
    block = RAMBlock("heap", arr)
    with pytest.raises(CapabilityError) as ei:
        D.UffdWriteProtectLog(block)
    assert ei.value.field == "dirty-log"
    assert ei.value.message.startswith("userfaultfd write-protect is not available: ")
    assert "not aligned" in ei.value.message
    assert ei.value.message.endswith("use explicit dirty marking (ExplicitDirtyLog)")
    best = D.best_dirty_log(block)
    assert best.kind == "explicit" and "not aligned" in best.reason
    # a regular-file mapping on a disk filesystem cannot be write-protected
    (tmp_path / "ram").write_bytes(bytes(16 * PAGE))
    fblock = RAMBlock.from_file("file", str(tmp_path / "ram"), 16 * PAGE, shared=True)
    best = D.best_dirty_log(fblock)
    if best.kind == "explicit":
        assert "UFFDIO_REGISTER failed" in best.reason
    else:  # a kernel that can write-protect this file: fault mode, still tracking
        assert best.mode == "fault"
        best.close()
    with pytest.raises(ParameterError):
        D.UffdWriteProtectLog(block, mode="bogus")


def test_best_dirty_log_prefers_uffd():
    block = RAMBlock.anonymous("pc.ram", 16 * PAGE)
    log = D.best_dirty_log(block)
    try:
        if log.kind == "explicit":
            pytest.skip(log.reason)
        assert log.kind == "uffd-wp" and log.mode in ("async", "fault")
        assert isinstance(log, DirtyLogSource)
    finally:
        log.close()


def test_uffd_close_releases_and_is_idempotent():
    block = RAMBlock.anonymous("pc.ram", 32 * PAGE)
    log = uffd_log(block, "fault")
    log.start()
    log.close()
    log.close()
    block.memory[:] = 5  # would hang forever if anything stayed protected
    assert log.sync() is None
    log.clear(0, 32)  # no-op when closed


@pytest.mark.parametrize("mode", MODES)
def test_uffd_stress_migration_converges_with_concurrent_writer(mode):
    """A writer dirties random pages for at least 0.5 s while a model migration runs.

    The model is QEMU's loop: sync into a DirtyBitmap (clear_bitmap_shift
    6), take dirty pages (the bitmap clears each armed chunk of the
    tracker first), copy them. After the writer stops, one final round.
    The copy must equal the memory (no write lost) and every page the
    writer touched must have been reported by some sync.
    """
    npages = 1024
    block = RAMBlock.anonymous("pc.ram", npages * PAGE)
    log = uffd_log(block, mode)
    reported = set()

    class Recorder:
        def sync(self):
            w = log.sync()
            reported.update(pages_of(w))
            return w

        def clear(self, start, n):
            log.clear(start, n)

    bm = DirtyBitmap(npages, 6, source=Recorder())
    bm.set_all()
    log.start()
    mem = block.memory
    shadow = np.zeros_like(mem)
    out = np.zeros(npages, np.int64)
    written = set()
    stop = threading.Event()

    def writer():
        rng = random.Random(1)
        k = 0
        while not stop.is_set():
            p = rng.randrange(npages)
            k += 1
            mem[p * PAGE + rng.randrange(PAGE)] = k & 0xFF or 1
            written.add(p)

    def send_round():
        bm.sync_from_source()
        n = bm.take_dirty(0, npages, out)
        for p in out[:n].tolist():
            shadow[p * PAGE : (p + 1) * PAGE] = mem[p * PAGE : (p + 1) * PAGE]
        return n

    t = threading.Thread(target=writer)
    try:
        send_round()  # the first, all-dirty pass
        t.start()
        rounds = 0
        t0 = time.monotonic()
        # At least 0.5 s, three rounds and 50 written pages, however slow
        # the machine; the cap only keeps a broken writer from hanging us.
        while time.monotonic() - t0 < 30 and (
            time.monotonic() - t0 < 0.5 or rounds < 3 or len(written) <= 50
        ):
            send_round()
            rounds += 1
        stop.set()
        t.join(10)
        assert not t.is_alive()
        send_round()
        assert send_round() == 0  # nothing left once the writer stopped
    finally:
        stop.set()
        log.close()
    assert rounds > 1 and len(written) > 50
    assert written <= reported
    assert np.array_equal(shadow, mem)


# -- the compiled fault-handler helper ----------------------------------------------


def test_helper_take_log_and_atomic_or_range():
    from qmigx._backend import load_compiled

    H = load_compiled("uffd")
    log = np.zeros(5, np.uint64)
    model = np.zeros(320, bool)
    for first, n in [(0, 1), (3, 70), (63, 2), (128, 64), (300, 20), (319, 1)]:
        H.atomic_or_range(log, first, n)
        model[first : first + n] = True
    out = np.full(5, 7, np.uint64)
    assert H.take_log(log, out) == int(model.sum())
    assert pages_of(out) == np.flatnonzero(model).tolist()
    assert not log.any()
    with pytest.raises(ValueError):
        H.atomic_or_range(log, 300, 21)
    with pytest.raises(ValueError):
        H.take_log(log, np.zeros(4, np.uint64))
    H.atomic_or_range(log, 5, 0)  # empty: nothing
    assert H.take_log(log, out) == 0 and not out.any()


def test_helper_concurrent_or_and_take_lose_nothing():
    from qmigx._backend import load_compiled

    H = load_compiled("uffd")
    log = np.zeros(64, np.uint64)
    seen = np.zeros(64 * 64, bool)
    marked = np.zeros(64 * 64, bool)
    stop = threading.Event()

    def marker(seed):
        rng = random.Random(seed)
        for _ in range(20000):
            p = rng.randrange(4096)
            H.atomic_or_range(log, p, 1)
            marked[p] = True

    def taker():
        out = np.zeros(64, np.uint64)
        while not stop.is_set():
            H.take_log(log, out)
            seen[np.unpackbits(out.view(np.uint8), bitorder="little").astype(bool)] = True

    tt = threading.Thread(target=taker)
    tt.start()
    ms = [threading.Thread(target=marker, args=(i,)) for i in range(3)]
    for m in ms:
        m.start()
    for m in ms:
        m.join()
    stop.set()
    tt.join()
    out = np.zeros(64, np.uint64)
    H.take_log(log, out)
    seen[np.unpackbits(out.view(np.uint8), bitorder="little").astype(bool)] = True
    assert np.array_equal(seen, marked)


def test_helper_failure_marks_everything_dirty_and_raises():
    from qmigx._backend import load_compiled

    H = load_compiled("uffd")
    log = np.zeros(2, np.uint64)
    stats = np.zeros(2, np.uint64)
    fd = os.open("/dev/null", os.O_RDONLY)  # readable at once, reads EOF: not a userfaultfd
    stop = os.eventfd(0)
    try:
        with pytest.raises(OSError, match="userfaultfd read failed"):
            H.serve_faults(fd, stop, 0x10000, 100 * PAGE, PAGE, log, stats)
    finally:
        os.close(fd)
        os.close(stop)
    assert pages_of(log) == list(range(100))  # conservative: everything must be resent
    assert int(stats[1]) % 2 == 0  # no batch left "in progress": clear() cannot wait forever
    H.wait_batch(stats)
    with pytest.raises(ValueError):
        H.serve_faults(0, 0, 0x10001, PAGE, PAGE, log, stats)
    with pytest.raises(ValueError):
        H.serve_faults(0, 0, 0, 200 * PAGE, PAGE, log, stats)


def test_dead_handler_fails_the_next_sync():
    block = RAMBlock.anonymous("pc.ram", 16 * PAGE)
    log = uffd_log(block, "fault")
    try:
        log.start()
        log._handler_error = OSError(5, "simulated")
        with pytest.raises(ChannelError, match="handler for pc.ram failed"):
            log.sync()
        with pytest.raises(ChannelError):
            log.clear(0, 16)
    finally:
        log.close()


def test_ioctl_numbers_match_kernel_encoding():
    from qmigx import uffd

    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert uffd.UFFDIO_COPY == 0xC028AA03
    assert uffd.UFFDIO_ZEROPAGE == 0xC020AA04
    assert uffd.PAGEMAP_SCAN == 0xC0606610
