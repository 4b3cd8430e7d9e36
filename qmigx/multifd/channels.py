"""Multifd channels: sender and receiver threads (QEMU 7.2's and 10.0's multifd.c).

The byte formats are in :mod:`qmigx.multifd.packet`; this module moves them. A
:class:`MultifdSender` owns one thread per extra connection: the RAM
engine hands it batches of pages, each becomes packets of at most
``pages_alloc`` pages of one block, dealt round-robin; a channel thread
compresses (zlib and zstd release the GIL, so channels compress in
parallel) and writes them. ``sync()`` puts a SYNC packet on every channel
and waits until each has written it, as QEMU does before every RAM EOS.

A :class:`MultifdReceiver` reads each channel in its own thread, checks
every header, places pages straight into the RAM blocks (and zeroes the
pages a QEMU 10 packet lists as zero pages) and, at a SYNC packet, waits
until the main channel releases all channels together: at each RAM EOS
for a source that syncs per section (QEMU 7.2, multifd.md §5), at each
MULTIFD_FLUSH record for one that syncs per round (QEMU 10, qemu10.md
§4.4). Every packet header is read at the receiver's own size (1344
bytes), whatever its ``pages_alloc`` says: QEMU 10's SYNC packets say 0.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np

from qmigx import _backend
from qmigx.errors import ChannelError, MigrationError, MultifdPacketError, printable_name
from qmigx.multifd.packet import (
    DEFAULT_MAX_PAGES,
    HEADER_FIXED_SIZE,
    INIT_PACKET_SIZE,
    header_size,
    pack_init_packet,
    pack_packet_header,
    place_pages,
    recv_stream,
    send_stream,
    unpack_init_packet,
    unpack_packet_header,
)
from qmigx.wire import MultifdFlag, TARGET_PAGE_SIZE

__all__ = ["MultifdSender", "MultifdReceiver", "COMPRESSION_FLAGS"]

COMPRESSION_FLAGS = {"none": 0, "zlib": MultifdFlag.ZLIB, "zstd": MultifdFlag.ZSTD}

_STOP = object()
_recv = _backend.load("multifd_recv")
_send = _backend.load("multifd_send")
_FAILURES = {_recv.STOPPED: "stopped", _recv.TIMEOUT: "timeout", _recv.TRUNCATED: "truncated",
             _recv.FAILED: "failed"}


def _run_bounds(values: np.ndarray, step: int) -> tuple[list, list]:
    """First and last value of each run of ``values`` that rises by ``step`` at a time."""
    brk = np.flatnonzero(np.diff(values) != step) + 1
    return values[np.r_[0, brk]].tolist(), values[np.r_[brk - 1, len(values) - 1]].tolist()


def _row_runs(rows: np.ndarray, sel: np.ndarray) -> list:
    """The rows ``sel`` (ascending indices) as views of their consecutive runs.

    A channel writes them with one gathering write, straight from guest
    memory: no copy of the pages that are sent, however the zero pages
    between them fall.
    """
    if not len(sel):
        return []
    first, last = _run_bounds(sel, 1)
    return [rows[a : b + 1] for a, b in zip(first, last)]


class _SendChannel:
    def __init__(self, owner: "MultifdSender", idx: int, chan) -> None:
        self.owner = owner
        self.idx = idx
        self.chan = chan
        self.q: "queue.Queue" = queue.Queue(maxsize=4)
        self.stream = send_stream(owner.compression, owner.level)
        self.header = np.zeros(header_size(owner.pages_alloc), np.uint8)
        self.bytes = 0
        self.thread = threading.Thread(target=self._run, name=f"multifd-send-{idx}", daemon=True)

    def _run(self) -> None:
        item = None
        raw = self.owner.compression == "none"
        try:
            if not self.owner.init_sent:
                self.chan.write(pack_init_packet(self.owner.uuid, self.idx))
            while True:
                item = None  # a failing get() must not release the previous item's SYNC again
                item = self.q.get()
                if item is _STOP:
                    return
                name, offsets, pages, flags, done, zeros = item
                if isinstance(pages, _Rows):
                    self._send_rows(name, offsets, pages)
                    continue
                iov = None
                if not len(offsets):
                    data = b""
                elif raw and isinstance(pages, list):  # the pages where they are
                    iov = pages
                    data = b""
                elif raw:  # the pages themselves, as the caller's rows: no copy
                    data = np.ascontiguousarray(pages).reshape(-1)
                else:
                    data = self.stream.compress_pages(pages)
                nbytes = len(offsets) * self.owner.page_size if iov is not None else len(data)
                listed = len(offsets) + (len(zeros) if zeros is not None else 0)
                if listed and self.owner.compression != "none":
                    # QEMU 10: the method's bit on every data packet, zero pages only too
                    flags |= COMPRESSION_FLAGS[self.owner.compression]
                sync10 = flags & MultifdFlag.SYNC and self.owner.sync_format == "10.0"
                if sync10:  # QEMU 10's SYNC: zeroed, pages_alloc 0, still 1344 bytes
                    self.header[:] = 0
                pack_packet_header(
                    self.header, flags=flags, pages_alloc=0 if sync10 else self.owner.pages_alloc,
                    normal_pages=len(offsets),
                    next_packet_size=nbytes if len(offsets) else 0,
                    packet_num=self.owner.take_numbers(1), ramblock=name,
                    offsets=offsets, zero_offsets=zeros)
                n = len(self.header)
                if iov is not None:  # header and pages in one gathering write
                    self.chan.writev([self.header, *iov])
                elif len(data):
                    self.chan.writev([self.header, data])
                else:
                    self.chan.write(self.header)
                self.bytes += n + nbytes
                if done is not None:
                    done.release()
        except BaseException as exc:  # latched; the engine sees it at the next call
            self.owner._fail(exc)
            if item is not None and item is not _STOP and item[4] is not None:
                item[4].release()  # the SYNC being written when it failed: sync() waits on it
            while True:  # keep draining so producers never block forever
                item = self.q.get()
                if item is _STOP:
                    return
                if item[4] is not None:
                    item[4].release()

    def _send_rows(self, name: str, offsets: np.ndarray, rows: "_Rows") -> None:
        """Uncompressed pages as packets: without the GIL on a socket, else packet by packet."""
        o = self.owner
        ps, alloc = o.page_size, o.pages_alloc
        chan = self.chan
        socket_fds = getattr(chan, "socket_fds", None)
        fds = socket_fds() if socket_fds is not None else None
        if fds is not None:
            st, _, nbytes, err = _send.send_packets(
                fds[0], fds[1], self.header, name.encode("utf-8", "surrogateescape"), rows.rows,
                rows.index, offsets, ps, alloc, rows.first_num, 0, chan.timeout)
            chan.bytes_written += nbytes
            self.bytes += nbytes
            if st != _send.DONE:
                raise chan.failure(_FAILURES[st], writing=True, err=err)
            return
        for k, lo in enumerate(range(0, len(offsets), alloc)):
            sel = rows.index[lo : lo + alloc]
            pack_packet_header(self.header, flags=0, pages_alloc=alloc, normal_pages=len(sel),
                               next_packet_size=len(sel) * ps, packet_num=rows.first_num + k,
                               ramblock=name, offsets=offsets[lo : lo + alloc])
            self.bytes += chan.writev([self.header, *_row_runs(rows.rows, sel)])


class _Rows:
    """Pages to send: rows ``index`` of ``rows``, packets numbered from ``first_num``."""

    __slots__ = ("rows", "index", "first_num")

    def __init__(self, rows: np.ndarray, index: np.ndarray, first_num: int) -> None:
        self.rows = rows
        self.index = index
        self.first_num = first_num


class MultifdSender:
    """Sends pages over extra channels (the source side).

    Args:
        channels: connected channels (objects with ``write``), one per
            ``multifd-channels``, already open.
        compression: ``none``, ``zlib`` or ``zstd`` (``multifd-compression``).
        level: the zlib or zstd level.
        uuid: the VM's 16-byte UUID, or None.
        sync_format: ``"7.2"`` (a SYNC packet has the channel's
            ``pages_alloc``) or ``"10.0"`` (QEMU 10's: zeroed, ``pages_alloc``
            0); either is 1344 bytes and both versions read both.
        init_sent: the caller already wrote each channel's init packet (as
            soon as it connected, see :func:`pack_init_packet`).
    """

    def __init__(self, channels: list, *, compression: str = "none", level: Optional[int] = None,
                 uuid: Optional[bytes] = None, pages_alloc: int = DEFAULT_MAX_PAGES,
                 page_size: int = TARGET_PAGE_SIZE, init_sent: bool = False,
                 sync_format: str = "7.2") -> None:
        if compression not in COMPRESSION_FLAGS:
            raise ValueError(f"unknown multifd compression {compression!r}")
        self.compression = compression
        self.level = level
        self.uuid = uuid
        self.init_sent = init_sent
        self.pages_alloc = pages_alloc
        self.page_size = page_size
        self.sync_format = sync_format
        self._num = 1
        self._num_lock = threading.Lock()
        self.error: Optional[BaseException] = None
        self._chans = [_SendChannel(self, i, c) for i, c in enumerate(channels)]
        self._next = 0
        self.bytes_charged = 0
        for c in self._chans:
            c.thread.start()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            if isinstance(self.error, MigrationError):
                raise self.error
            raise ChannelError(f"multifd channel failed: {self.error}") from self.error

    def queue(self, block, offsets: np.ndarray, pages: np.ndarray, *, owned: bool = False,
              zero: Optional[np.ndarray] = None, skip: Optional[np.ndarray] = None) -> int:
        """Send ``pages`` (rows) of ``block`` at ``offsets``; return bytes charged.

        ``owned``: the caller hands ``pages`` over and will not touch them
        again, so they need not be copied before the channel thread sends.
        ``zero`` (QEMU 10's ``zero-page-detection=multifd``): a bool per
        page; those pages are listed as zero pages in the packets, without
        data (qemu10.md §4.3). ``skip``: a bool per page; those pages are
        not sent here at all (QEMU 7.2 sends zero pages on the main channel).
        """
        self._check()
        if skip is not None:
            if self.compression == "none":
                return self._queue_kept(block, offsets, pages, np.flatnonzero(~skip))
            keep = ~skip
            offsets, pages, owned = offsets[keep], pages[keep], True
        charged = 0
        step = self.pages_alloc
        for lo in range(0, len(offsets), step):
            offs = np.ascontiguousarray(offsets[lo : lo + step], dtype=np.uint64)
            rows = pages[lo : lo + step]
            zoffs = None
            if zero is not None:
                z = zero[lo : lo + step]
                if z.any():
                    zoffs = offs[z]
                    offs = offs[~z]
                    # uncompressed: the channel sends each kept run where it is
                    rows = (_row_runs(rows, np.flatnonzero(~z))
                            if self.compression == "none" else rows[~z])
                else:
                    zoffs = offs[:0]
            elif not owned:
                rows = np.array(rows)  # the caller reuses its buffer
            charged += self._put(block, offs, rows, zoffs)
        self.bytes_charged += charged
        return charged

    def _queue_kept(self, block, offsets: np.ndarray, pages: np.ndarray, kept: np.ndarray) -> int:
        """Uncompressed pages ``kept`` (indices), shared out among the idle channels.

        Each channel gets whole packets, which it writes each page from
        where it is.
        """
        step = self.pages_alloc
        npackets = -(-len(kept) // step)
        if not npackets:
            return 0
        per = -(-npackets // len(self._chans)) * step
        pages = np.ascontiguousarray(pages)
        offs = np.ascontiguousarray(offsets[kept], dtype=np.uint64)
        index = kept.astype(np.int64)
        first = self.take_numbers(npackets)
        for lo in range(0, len(kept), per):
            rows = _Rows(pages, index[lo : lo + per], first + lo // step)
            self._idle_channel().q.put((block.idstr, offs[lo : lo + per], rows, 0, None, None))
        charged = npackets * (HEADER_FIXED_SIZE + 8 * step) + len(kept) * self.page_size
        self.bytes_charged += charged
        return charged

    @property
    def batch_hint(self) -> int:
        """Pages worth taking at once: two full packets for every channel."""
        return self.pages_alloc * len(self._chans) * 2

    def take_numbers(self, n: int) -> int:
        """Reserve ``n`` consecutive packet numbers; the first."""
        with self._num_lock:
            first = self._num
            self._num += n
        return first

    def _put(self, block, offs: np.ndarray, rows, zoffs) -> int:
        ch = self._idle_channel()
        ch.q.put((block.idstr, offs, rows, 0, None, zoffs))
        return HEADER_FIXED_SIZE + 8 * self.pages_alloc + len(offs) * self.page_size

    def _idle_channel(self) -> "_SendChannel":
        """The next channel, round-robin, that has room: a slow one must not stall the rest.

        (QEMU hands each packet to the next idle channel.) When every queue
        is full, the next in turn is waited for.
        """
        n = len(self._chans)
        for k in range(n):
            ch = self._chans[(self._next + k) % n]
            if not ch.q.full():
                self._next = (self._next + k + 1) % n
                return ch
        ch = self._chans[self._next]
        self._next = (self._next + 1) % n
        return ch

    def sync(self) -> int:
        """A SYNC packet on every channel, waiting until each is written."""
        self._check()
        done = threading.Semaphore(0)
        empty = np.zeros(0, np.uint64)
        for ch in self._chans:
            ch.q.put(("", empty, None, int(MultifdFlag.SYNC), done, None))
        for _ in self._chans:
            done.acquire()
        self._check()
        charged = len(self._chans) * header_size(self.pages_alloc)
        self.bytes_charged += charged
        return charged

    def close(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop the channel threads once their queues are written (or failed).

        A thread blocked writing to a stalled peer keeps its queue full, so
        shut its channel down first (the migration driver does) or this
        waits up to ``timeout`` for room in the queue.
        """
        for ch in self._chans:
            try:
                ch.q.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
        if wait:
            for ch in self._chans:
                ch.thread.join(timeout=timeout)

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes for c in self._chans)


class _RecvChannel:
    def __init__(self, owner: "MultifdReceiver", idx: int, chan) -> None:
        self.owner = owner
        self.idx = idx
        self.chan = chan
        self.stream = recv_stream(owner.compression)
        self.synced = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.ended = False  # the source closed the channel
        self.packets = 0
        self.pages = 0
        self.zero_pages = 0
        self.syncs = 0
        self.thread = threading.Thread(target=self._run, name=f"multifd-recv-{idx}", daemon=True)

    def _run(self) -> None:
        o = self.owner
        ps = o.page_size
        # every header is read at the wire's size, the receiver's own (QEMU 10's
        # SYNC packets say pages_alloc 0 but are 1344 bytes like the others)
        head = np.empty(header_size(o.max_pages), np.uint8)
        hview = memoryview(head)
        scratch = np.empty((o.max_pages, ps), np.uint8)
        # any object with readinto/readinto_exact serves; a Channel that is a
        # socket is read by the compiled loop
        socket_fds = getattr(self.chan, "socket_fds", None)
        fds = socket_fds() if socket_fds is not None and o.compression == "none" else None
        try:
            while not o.stopping:
                table = o.fast_blocks() if fds is not None else None
                if table is not None:  # plain packets without the GIL, until one needs Python
                    if not self._receive_fast(fds, head, table):
                        self.ended = True
                        self.synced.release()
                        return
                else:
                    got = self.chan.readinto(hview)
                    if got == 0:  # the source closed the channel between packets
                        # fine after the last sync; wait_sync fails if one is still due
                        self.ended = True
                        self.synced.release()
                        return
                    if got < len(head):
                        self.chan.readinto_exact(hview[got:])
                hdr = unpack_packet_header(head, blocks=o.block_lengths(), page_size=ps,
                                           max_pages=o.max_pages, compression=o.compression,
                                           version="10.0")
                n = hdr.normal_pages
                if hdr.zero_pages:
                    o.place_zero(o.block(hdr.ramblock), hdr.zero_offsets)
                    self.zero_pages += hdr.zero_pages
                if n:
                    blk = o.block(hdr.ramblock)
                    offs = hdr.offsets
                    direct = o.direct_views(blk, offs) if o.compression == "none" else None
                    if direct is not None:  # straight into RAM
                        if len(direct) == 1 or not hasattr(self.chan, "readv_exact"):
                            for view in direct:
                                self.chan.readinto_exact(view)
                        else:
                            self.chan.readv_exact(direct)
                    elif o.compression == "none":  # into a reused buffer, then placed
                        self.chan.readinto_exact(scratch.reshape(-1)[: n * ps])
                        o.place(blk, scratch[:n], offs)
                    else:
                        raw = self.chan.read_exact(hdr.next_packet_size)
                        self.stream.decompress_into(raw, scratch, n, ps)
                        o.place(blk, scratch[:n], offs)
                    self.pages += n
                self.packets += 1
                if hdr.sync:
                    self.syncs += 1
                    self.synced.release()
                    self.release.acquire()
        except BaseException as exc:
            o._fail(exc)
            self.synced.release()

    def _receive_fast(self, fds: tuple, head: np.ndarray, table: list) -> bool:
        """Place plain packets in the compiled loop; False at the end of the stream.

        Returns True with a header in ``head`` that the Python path handles
        (a SYNC, or one to reject with its typed error).
        """
        chan = self.chan
        st, packets, pages, zeros, nbytes, got, want, err = _recv.receive_packets(
            fds[0], fds[1], head, table, self.owner.page_size, self.owner.max_pages,
            chan.timeout)
        chan.bytes_read += nbytes
        self.packets += packets
        self.pages += pages
        self.zero_pages += zeros
        if st == _recv.HEADER:
            return True
        if st == _recv.END:
            return False
        raise chan.failure(_FAILURES[st], got=got, want=want, err=err)


class MultifdReceiver:
    """Receives pages from extra channels (the destination side).

    Args:
        channels: accepted channels, each positioned after its init packet,
            in channel-id order (see :meth:`order_channels`).
        blocks: the destination's :class:`~qmigx.ram.RAMBlockList`, filled by
            the time pages arrive (the setup record precedes them).
        placement: where pages go (:mod:`qmigx.placement`), the same one the
            main channel's loader uses; default: copied into the blocks.
    """

    def __init__(self, channels: list, blocks, *, compression: str = "none",
                 max_pages: int = DEFAULT_MAX_PAGES, page_size: int = TARGET_PAGE_SIZE,
                 placement=None) -> None:
        self.blocks = blocks
        self.placement = placement
        self.compression = compression
        self.max_pages = max_pages
        self.page_size = page_size
        self.error: Optional[BaseException] = None
        self.stopping = False
        self._lengths: dict = {}
        self._chans = [_RecvChannel(self, i, c) for i, c in enumerate(channels)]
        for c in self._chans:
            c.thread.start()

    @staticmethod
    def order_channels(channels: list, *, uuid: Optional[bytes] = None) -> list:
        """Read each channel's init packet and return them in id order."""
        slots: list = [None] * len(channels)
        for ch in channels:
            pkt = unpack_init_packet(ch.read_exact(INIT_PACKET_SIZE), channels=len(channels),
                                     uuid=uuid)
            if slots[pkt.channel_id] is not None:
                raise MultifdPacketError(f"multifd channel {pkt.channel_id} connected twice",
                                         field="id")
            slots[pkt.channel_id] = ch
        return slots

    def block(self, name: str):
        blk = self.blocks.get(name)
        if blk is None:
            raise MultifdPacketError(f"unknown ram block {printable_name(name)}", field="ramblock")
        return blk

    def place(self, blk, data: np.ndarray, offsets) -> None:
        """Put one packet's pages where the placement says (straight into RAM by default)."""
        pl = self.placement
        buf = blk.buffer if pl is None else pl.buffer(blk)
        if buf is not None:
            place_pages(data, offsets, buf[: blk.used_length], self.page_size)
            if pl is not None and pl.tracks_batches:
                pl.mark_received(blk, offsets)
            return
        for page, off in zip(data, offsets):
            pl.place(blk, int(off), page)

    def fast_blocks(self) -> Optional[list]:
        """``(name, buffer, used_length)`` per block for the compiled loop, or None.

        Only where pages are plain copies into a buffer (no postcopy or COLO
        bookkeeping per page) does the compiled loop place them itself.
        """
        pl = self.placement
        if pl is not None and pl.tracks_batches:
            return None
        table = []
        for b in self.blocks:
            buf = b.buffer if pl is None else pl.buffer(b)
            if buf is None:
                return None
            table.append((b.idstr.encode("utf-8", "surrogateescape"), buf, b.used_length))
        return table

    def direct_views(self, blk, offsets) -> Optional[list]:
        """Where a packet's pages go in a plain copy placement, as views of their runs; else None.

        The pages are read from the socket straight into guest RAM with one
        scattering read, sparing a copy of every page: a bulk pass sends
        consecutive pages, so most packets are one run or a few (QEMU 7.2
        sends zero pages on the main channel, which splits the runs).
        """
        pl = self.placement
        if pl is not None and (pl.tracks_batches or pl.buffer(blk) is None):
            return None
        buf = blk.buffer if pl is None else pl.buffer(blk)
        ps = self.page_size
        starts, lasts = _run_bounds(np.asarray(offsets, np.uint64), np.uint64(ps))
        if max(lasts) + ps > blk.used_length:
            return None  # checked against the block already; never past it
        return [buf[a : b + ps] for a, b in zip(starts, lasts)]

    def place_zero(self, blk, offsets) -> None:
        """Zero the pages a packet lists as zero pages (QEMU 10)."""
        pl = self.placement
        ps = self.page_size
        buf = blk.buffer if pl is None else pl.buffer(blk)
        if buf is None:
            for off in offsets:
                pl.place_zero(blk, int(off))
            return
        idx = (np.asarray(offsets, np.uint64) // np.uint64(ps)).astype(np.intp)
        pages = buf[: blk.used_length].reshape(-1, ps)
        if len(idx) and int(idx.max()) >= len(pages):
            raise MultifdPacketError(f"zero page beyond the {blk.used_length}-byte block "
                                     f"{blk.idstr}", field="zero_offsets")
        pages[idx] = 0
        if pl is not None and pl.tracks_batches:
            pl.mark_received(blk, offsets)

    def block_lengths(self) -> dict:
        """Block name -> used length (asked once per packet: remade only when blocks appear).

        The setup record, which creates and sizes the blocks, comes before
        any page; afterwards the table does not change.
        """
        if len(self._lengths) != len(self.blocks):
            self._lengths = {b.idstr: b.used_length for b in self.blocks}
        return self._lengths

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def wait_sync(self, timeout: Optional[float] = None) -> None:
        """Wait for every channel's next SYNC packet, then release them all."""
        for ch in self._chans:
            if not ch.synced.acquire(timeout=timeout):
                raise ChannelError(f"multifd channel {ch.idx} did not reach its sync point",
                                   field="multifd")
            self._check()
            if ch.ended:
                raise ChannelError(f"multifd channel {ch.idx} closed before its sync point",
                                   field="multifd")
        for ch in self._chans:
            ch.release.release()

    def _check(self) -> None:
        if self.error is not None:
            if isinstance(self.error, MigrationError):
                raise self.error
            raise ChannelError(f"multifd channel failed: {self.error}") from self.error

    def close(self, timeout: float = 10.0) -> None:
        """Stop the channel threads and wait for them (the channels stay open: shut down only)."""
        self.stopping = True
        for ch in self._chans:
            ch.release.release()
            try:
                ch.chan.shutdown()
            except Exception:
                pass
        for ch in self._chans:
            ch.thread.join(timeout=timeout)

    @property
    def pages(self) -> int:
        return sum(c.pages for c in self._chans)

    @property
    def zero_pages(self) -> int:
        return sum(c.zero_pages for c in self._chans)

    @property
    def syncs(self) -> list[int]:
        """SYNC packets received, per channel."""
        return [c.syncs for c in self._chans]
