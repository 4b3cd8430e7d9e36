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
import time
from qmigx.migration.preempt import PreemptWriter
from qmigx.qemufile import QEMUFile
from qmigx.stream import Section, StreamWriter
from qmigx.wire import MAX_DISCARDS_PER_COMMAND, TARGET_PAGE_SIZE, MigCmd, SectionType

__all__ = ["advise_payload", "discard_payload", "switch_over", "stream_rest"]

#: ``max-postcopy-bandwidth`` is spent in windows of this length (QEMU's BUFFER_DELAY)
WINDOW_S = 0.1


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


def switch_over(src, w: StreamWriter, rw, live: list, runstate: str) -> None:
    """Everything between the guest's stop and the destination's RUN (postcopy.md §4)."""
    ram = src.ram
    for lsec, h in live:  # live sections that have no postcopy part end here
        if h is None or not h.is_active():
            continue
        w.section_header(SectionType.SECTION_END, lsec)
        h.save_complete_precopy(w.f)
        w.footer(lsec)
    ram.bitmap_sync()
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
    rw.last_block = None
    w.command(MigCmd.PING, struct.pack(">I", 2))
    blob = bytearray()
    pf = QEMUFile(blob.extend)
    pw = StreamWriter(pf)
    pw.command(MigCmd.POSTCOPY_LISTEN)
    first_id = max(s.section_id for s, _ in live) + 1
    src._write_devices(pw, runstate, first_id=first_id, package=True)
    pw.command(MigCmd.PING, struct.pack(">I", 3))
    pw.command(MigCmd.POSTCOPY_RUN)
    pf.flush()
    w.command(MigCmd.PACKAGED, struct.pack(">I", len(blob)), bytes(blob))
    w.command(MigCmd.PING, struct.pack(">I", 4))
    w.f.flush()
    w.f.check()


def stream_rest(src, w: StreamWriter, rw, sec: Section, preempt_channel=None) -> None:
    """The background stream and the requested pages, until every page went; then END and EOF."""
    ram = src.ram
    f = w.f
    pre = PreemptWriter(preempt_channel.write) if preempt_channel is not None else None
    bw = src.c.params.max_postcopy_bandwidth
    budget = bw * WINDOW_S if bw else 0
    window_start = time.monotonic()
    window_bytes = f.total_transferred
    wake = src._postcopy_request

    def over_budget() -> bool:
        if pre is not None and ram.requests_pending:
            return True  # go and serve them on the preempt channel
        return bool(budget) and f.total_transferred - window_bytes >= budget

    while True:
        src._check_cancel()
        src._rp_check()
        f.check()
        if pre is not None:
            _serve_on_preempt(ram, pre)
        if ram.dirty_pages() == 0:
            break
        if budget and f.total_transferred - window_bytes >= budget:
            delay = window_start + WINDOW_S - time.monotonic()
            if delay > 0:
                wake.wait(delay)
                wake.clear()
                if ram.requests_pending and pre is None:
                    _serve_on_main(ram, w, rw, sec)
                continue
            window_start = time.monotonic()
            window_bytes = f.total_transferred
        w.section_header(SectionType.SECTION_PART, sec)
        ram.iterate(rw, over_budget=over_budget, serve_requests=pre is None)
        rw.eos()
        w.footer(sec)
        f.flush()
        src._account(ram, rw, src.c.stats, f, None)
    if pre is not None:
        _serve_on_preempt(ram, pre)
    w.section_header(SectionType.SECTION_END, sec)
    rw.eos()
    w.footer(sec)
    w.eof()
    f.flush()
    f.check()
    if pre is not None:
        pre.eos()
    src.preempt_pages = pre.pages if pre is not None else 0


def _serve_on_main(ram, w: StreamWriter, rw, sec: Section) -> None:
    w.section_header(SectionType.SECTION_PART, sec)
    ram._serve_requests(rw)
    rw.eos()
    w.footer(sec)
    w.f.flush()


def _serve_on_preempt(ram, pre: PreemptWriter) -> None:
    """Each requested page that has not gone yet, as a bare record on the preempt channel."""
    while ram.requests_pending:
        for block, offset, page in ram.take_requested():
            pre.page(block, offset, page)
