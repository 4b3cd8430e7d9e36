"""The postcopy source (QEMU's postcopy_start and the postcopy parts of ram.c and savevm.c).

:func:`switch_over` stops the guest and hands the destination what it
needs to run: END sections of the live handlers that cannot continue in
postcopy, the discard ranges of every block (pages still dirty or never
sent), and the device state packaged with LISTEN and RUN
(postcopy.md §2, §4). :func:`stream_rest` then sends the rest of RAM in
the background, at ``max-postcopy-bandwidth``, while the pages the
destination asks for go first: on the preempt channel when there is one,
else on the main channel ahead of the background scan.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Callable

from qmigx.errors import ChannelError, ReturnPathError
from qmigx.migration.preempt import PreemptWriter
from qmigx.migration.preempt_serve import RequestServer
from qmigx.migration.side import S, now_ms
from qmigx.qemufile import QEMUFile
from qmigx.stream import Section, StreamWriter
from qmigx.wire import MAX_DISCARDS_PER_COMMAND, TARGET_PAGE_SIZE, MigCmd, SectionType

__all__ = ["advise_payload", "discard_payload", "connect_preempt", "run_postcopy", "switch_over",
           "stream_rest", "pause_and_resume"]

#: the longest a throttled background stream sleeps before it looks at requests again
WINDOW_S = 0.1
#: pages per background batch after switch-over: a request waits behind one batch at most
POSTCOPY_BATCH_PAGES = 16


def advise_payload(blocks, ignore_shared: bool = False) -> bytes:
    """POSTCOPY_ADVISE: be64 OR of the blocks' host page sizes, be64 target page size."""
    summary = 0
    for b in blocks:
        if ignore_shared and b.shared:
            continue
        summary |= max(int(getattr(b, "page_size", 0) or 0), TARGET_PAGE_SIZE)
    return struct.pack(">QQ", summary or TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)


def discard_payload(block: str, ranges) -> bytes:
    """POSTCOPY_RAM_DISCARD: version 0, the block name (length, bytes, NUL), be64 byte ranges."""
    raw = block.encode()
    out = bytearray((0, len(raw))) + raw + b"\0"
    for start, length in ranges:
        out += struct.pack(">QQ", start, length)
    return bytes(out)


def connect_preempt(src, uri: str):
    """The postcopy preempt channel: one more connection to ``uri`` after the main one."""
    from qmigx import transport

    ch = transport.connect_extra(uri, options=src.connection_options())
    ch.set_timeout(src.io_timeout)
    src._add_channel(ch)
    return ch


def run_postcopy(src, w: StreamWriter, rw, f: QEMUFile, live: list, sec: Section,
                 preempt, ram_end) -> None:
    """Switch over to postcopy, stream the rest, complete (postcopy.md §2, §4).

    Without ``postcopy-ram`` (dirty bitmaps alone) RAM completes at the
    switch-over as in precopy (``ram_end`` writes its END's tail), only
    the bitmaps go on, and a broken connection fails instead of pausing:
    QEMU recovers RAM postcopy only.
    """
    ram_pc = bool(src.c.caps.get("postcopy-ram"))
    if ram_pc and preempt is None and src.c.caps.get("postcopy-preempt"):
        # QEMU 8.0+ machine types: now, once a PONG proved the destination took the
        # main channel (it tells the two apart by their order)
        _wait(src, src._ponged.is_set, "a PONG", field="postcopy-preempt")
        preempt = connect_preempt(src, src._uri)
    st, stats = src.c.state, src.c.stats
    src._check_cancel()
    if not st.try_transition(S.ACTIVE, S.POSTCOPY_ACTIVE):
        src._lost_transition()
    runstate = src.guest.runstate()
    stats.downtime_start = now_ms()
    if src.guest.running:
        src.guest.stop()
        src._pc_stopped = True
    f.rate_limit_max = 0
    precopy_bytes = f.total_transferred
    switch_over(src, w, rw, live, runstate, None if ram_pc else ram_end)
    src._pc_ran = True
    stats.downtime = now_ms() - stats.downtime_start
    while True:
        try:
            stream_rest(src, w, rw, sec, preempt, live, None if ram_pc else ram_end)
            break
        except (ChannelError, OSError) as exc:
            if src._cancel.is_set() or not ram_pc:
                raise
            w, rw, preempt = pause_and_resume(src, sec, exc, rw)
    src._account(src.ram, rw, stats, f, None)
    stats.postcopy_bytes = f.total_transferred - precopy_bytes
    if ram_pc or src.c.caps.get("return-path"):  # bitmaps alone may have no return path
        src._wait_shut()
    stats.remaining = 0
    downtime = stats.downtime
    stats.complete(now_ms(), f.total_transferred)
    stats.downtime = downtime  # postcopy's downtime ends when the package went
    if not st.try_transition(S.POSTCOPY_ACTIVE, S.COMPLETED):
        src._lost_transition()


def switch_over(src, w: StreamWriter, rw, live: list, runstate: str, ram_end=None) -> None:
    """Everything between the guest's stop and the destination's RUN (postcopy.md §4).

    ``ram_end`` given: postcopy of dirty bitmaps alone. RAM completes here
    in its END section (``ram_end`` writes its tail), and what only RAM
    postcopy needs (discards, PINGs 2-4) is left out, as QEMU leaves it out.
    """
    ram = src.ram
    ram_pc = ram_end is None
    for lsec, h in live:  # live sections that have no postcopy part end here
        if h is None:
            if not ram_pc:
                w.section_header(SectionType.SECTION_END, lsec)
                ram.complete(rw)
                ram_end()
            continue
        if not h.is_active():
            continue
        if h.has_postcopy():
            h.in_postcopy = True
            continue
        w.section_header(SectionType.SECTION_END, lsec)
        h.save_complete_precopy(w.f)
        w.footer(lsec)
    if ram_pc:
        _discard_stale(ram, w, rw)
        w.command(MigCmd.PING, struct.pack(">I", 2))
    blob = bytearray()
    pf = QEMUFile(blob.extend)
    pw = StreamWriter(pf)
    pw.command(MigCmd.POSTCOPY_LISTEN)
    first_id = max(s.section_id for s, _ in live) + 1
    src._write_devices(pw, runstate, first_id=first_id, package=True)
    if ram_pc:
        pw.command(MigCmd.PING, struct.pack(">I", 3))
    pw.command(MigCmd.POSTCOPY_RUN)
    pf.flush()
    w.command(MigCmd.PACKAGED, struct.pack(">I", len(blob)), bytes(blob))
    if ram_pc:
        w.command(MigCmd.PING, struct.pack(">I", 4))
    w.f.flush()
    w.f.check()


def _discard_stale(ram, w: StreamWriter, rw) -> None:
    """A last sync, then POSTCOPY_RAM_DISCARD of every page dirty or never sent."""
    ram.bitmap_sync()
    ram.canonicalize_host_pages()
    for name, runs in ram.discard_ranges():
        ranges = [(first * TARGET_PAGE_SIZE, n * TARGET_PAGE_SIZE) for first, n in runs]
        for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
            w.command(MigCmd.POSTCOPY_RAM_DISCARD,
                      discard_payload(name, ranges[i : i + MAX_DISCARDS_PER_COMMAND]))
    # postcopy places whole pages: no XBZRLE from here on; the first record names its block
    ram.xbzrle_enabled = False
    ram.cache = None
    ram.last_stage = True
    ram._cursor_block = ram._cursor_page = 0
    ram.batch_pages = POSTCOPY_BATCH_PAGES
    rw.last_block = None


def stream_rest(src, w: StreamWriter, rw, sec: Section, preempt_channel=None,
                live: tuple = (), ram_end=None) -> None:
    """The background stream and the requested pages, until every page went; then END and EOF.

    ``live`` (QEMU's order, RAM's slot None) holds the other sections that
    go on in postcopy (dirty bitmaps): their chunks come in PART sections
    within the same bandwidth, and their ENDs with RAM's. ``ram_end``
    given (bitmaps alone, RAM complete already): only the bitmaps stream,
    and RAM's END that QEMU still sends carries just its tail.
    """
    ram = src.ram
    f = w.f
    pre = PreemptWriter.for_channel(preempt_channel) if preempt_channel is not None else None
    bw = src.c.params.max_postcopy_bandwidth
    t_base, b_base = time.monotonic(), f.total_transferred
    wake = src._postcopy_request

    def ahead() -> float:
        """Seconds the background stream is ahead of ``max-postcopy-bandwidth`` (<= 0: may send)."""
        if not bw:
            return 0.0
        return t_base + (f.total_transferred - b_base) / bw - time.monotonic()

    def over_budget() -> bool:
        if pre is not None and ram.requests_pending:
            return True  # go and serve them on the preempt channel
        return ahead() > 0

    if pre is not None:  # the return-path thread sends requested pages as they come
        lock = threading.Lock()

        def serve() -> None:
            with lock:
                _serve_on_preempt(ram, pre)

        src._serve_requested = serve
        if RequestServer.possible(pre):
            src._rp_server = RequestServer(ram, pre, _count_requests(src))
    others = [(lsec, h) for lsec, h in live if h is not None and h.is_active() and h.has_postcopy()]
    for _, h in others:
        h.limit = over_budget
    while True:
        src._check_cancel()
        src._rp_check()
        f.check()
        if pre is not None:
            src._serve_requested()
        for lsec, h in others:
            if not h.bulk_completed and ahead() <= 0:
                w.section_header(SectionType.SECTION_PART, lsec)
                h.save_live_iterate(f)
                w.footer(lsec)
        ram_done = ram.dirty_pages() == 0
        if ram_done and (ram_end is None or all(h.bulk_completed for _, h in others)):
            break
        delay = ahead()
        if delay > 0:  # requests are served however far ahead the stream is
            wake.wait(min(delay, WINDOW_S))
            wake.clear()
            if ram.requests_pending and pre is None:
                _serve_on_main(ram, w, rw, sec)
            continue
        if ram_done:
            continue  # bitmaps alone: their next chunks
        w.section_header(SectionType.SECTION_PART, sec)
        ram.iterate(rw, over_budget=over_budget, serve_requests=pre is None)
        rw.eos()
        w.footer(sec)
        f.flush()
        src._account(ram, rw, src.c.stats, f, None)
    if pre is not None:
        src._serve_requested()
        src._serve_requested = None
        _stop_server(src)
    for lsec, h in live or ((sec, None),):  # QEMU's order
        if h is None:
            w.section_header(SectionType.SECTION_END, sec)
            if ram_end is not None:
                ram_end()
            else:
                rw.eos()
                w.footer(sec)
        elif (lsec, h) in others:
            w.section_header(SectionType.SECTION_END, lsec)
            h.save_complete_postcopy(f)
            w.footer(lsec)
    w.eof()
    f.flush()
    f.check()
    if pre is not None and src.compat.preempt_pre_7_2:
        # 7.1/7.2 destinations wait for it; QEMU 8.0+ sends none for newer machine
        # types, whose destination may have closed the channel at EOF already
        pre.eos()
    src.preempt_pages = pre.pages if pre is not None else 0


def _serve_on_main(ram, w: StreamWriter, rw, sec: Section) -> None:
    w.section_header(SectionType.SECTION_PART, sec)
    ram._serve_requests(rw)
    rw.eos()
    w.footer(sec)
    w.f.flush()


def _count_requests(src) -> Callable[[int], None]:
    def counted(n: int) -> None:
        src.c.stats.postcopy_requests += n
        src._postcopy_request.set()
    return counted


def _stop_server(src) -> None:
    server, src._rp_server = src._rp_server, None
    if server is not None:
        server.active = False  # the return-path thread reads on by itself within TURN_MS


def _serve_on_preempt(ram, pre: PreemptWriter) -> None:
    """Each requested page that has not gone yet, as a bare record on the preempt channel."""
    while ram.requests_pending:
        for block, offset, page in ram.take_requested():
            pre.page(block, offset, page)


def pause_and_resume(src, sec: Section, exc: BaseException, rw_before=None):
    """A broken postcopy: pause, wait for ``migrate(uri, resume=True)``, recover (postcopy.md §6).

    The guest stays stopped and its memory untouched throughout. Returns
    the new ``(writer, ram writer, preempt channel)`` once the destination
    acknowledged RESUME; a failed attempt pauses again and waits for the next.
    """
    src._serve_requested = None  # the old preempt channel is gone
    _stop_server(src)
    st = src.c.state
    before, src.pause_reason = src.pause_reason, exc  # set first: postcopy-paused comes with why
    if not (st.try_transition(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED)
            or st.try_transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)):
        src.pause_reason = before
        raise exc
    while True:
        _drop_channels(src)
        deadline = None if src.recover_timeout is None else time.monotonic() + src.recover_timeout
        while not src._resume.wait(0.1):
            if src._cancel.is_set():
                raise exc
            if deadline is not None and time.monotonic() > deadline:
                raise ChannelError(f"postcopy stayed paused for {src.recover_timeout} s: "
                                   f"nobody resumed it ({exc})", field="resume")
        src._resume.clear()
        try:
            return _reconnect(src, sec, rw_before)
        except (ChannelError, ReturnPathError, OSError) as again:
            exc = again
            src.pause_reason = again
            st.try_transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)


def _drop_channels(src) -> None:
    chans, src._chans = list(src._chans), []
    for ch in chans:
        try:
            ch.shutdown()
        except Exception:
            pass
    rp = src._rp_thread
    if rp is not None and rp is not threading.current_thread():
        rp.join(5)
    for ch in chans:
        try:
            ch.close(timeout=1)
        except Exception:
            pass


def _reconnect(src, sec: Section, rw_before):
    from qmigx import transport
    from qmigx.ram import RamWriter

    uri = src._resume_uri
    options = src.connection_options()
    main = transport.connect(uri, options=options)
    main.set_timeout(src.io_timeout)
    src._add_channel(main)
    pre = None
    want_preempt = bool(src.c.caps.get("postcopy-preempt"))
    if want_preempt and src.compat.preempt_pre_7_2:  # as at the start: right after main
        pre = connect_preempt(src, uri)
    src.c.state.transition(S.POSTCOPY_RECOVER)
    src._rp_error = None
    src._shut.clear()
    src._shut_status = None
    src._resume_acked.clear()
    src._recv_bitmaps.clear()
    src._rp_thread = threading.Thread(target=src._rp_reader, args=(main,), name="return-path",
                                      daemon=True)
    src._rp_thread.start()
    f = QEMUFile(main.write, sink_v=main.writev)  # no header: the stream goes on
    w = StreamWriter(f)
    rw = RamWriter(f)
    if rw_before is not None:
        rw.stats = rw_before.stats
    ram = src.ram
    names = [s.block.idstr for s in ram._states if not s.ignored]
    for name in names:
        raw = name.encode()
        w.command(MigCmd.RECV_BITMAP, bytes((len(raw),)) + raw)
    f.flush()
    _wait(src, lambda: all(n in src._recv_bitmaps for n in names), "the received bitmaps")
    for name in names:
        ram.load_received_bitmap(name, src._recv_bitmaps[name])
    if want_preempt and pre is None:  # QEMU 8.0+ machine types: once the bitmaps are in
        pre = connect_preempt(src, uri)
    w.command(MigCmd.POSTCOPY_RESUME)
    f.flush()
    _wait(src, src._resume_acked.is_set, "RESUME_ACK")
    src.c.state.transition(S.POSTCOPY_ACTIVE)
    ram._cursor_block = ram._cursor_page = 0
    rw.last_block = None
    return w, rw, pre


def _wait(src, done, what: str, field: str = "resume") -> None:
    deadline = time.monotonic() + (src.io_timeout or 3600)
    while not done():
        src._rp_event.wait(0.05)
        src._rp_event.clear()
        if src._rp_error is not None:
            raise src._rp_error
        if src._cancel.is_set():
            raise ChannelError(f"cancelled while waiting for {what}", field=field)
        if time.monotonic() > deadline:
            raise ChannelError(f"timed out waiting for {what} from the destination",
                               field=field)
