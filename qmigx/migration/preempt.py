"""The postcopy-preempt channel (QEMU 7.2's second connection for requested pages).

The channel carries bare RAM page records (ram.md §4: be64 offset|flags,
the block name unless CONTINUE, the page) with no header, sections or
footers, and ends with a RAM EOS record (postcopy.md §7). The source sends
the pages the destination asked for there, so they do not queue behind
the background stream on the main channel.

:class:`PreemptRecords` is the sans-IO decoder; :class:`PreemptReader`
feeds it from the channel on a thread and places each page;
:class:`PreemptWriter` is the source's side.
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Callable, Iterator, Optional

import numpy as np

from qmigx.errors import ChannelError, RamStreamError
from qmigx.wirelock import LockedWriter
from qmigx.wire import TARGET_PAGE_SIZE, RamFlag

__all__ = ["PreemptRecords", "PreemptReader", "PreemptWriter"]

_ALLOWED = RamFlag.ZERO | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE | RamFlag.COMPRESS_PAGE
_MAX_COMPRESSED = TARGET_PAGE_SIZE + TARGET_PAGE_SIZE // 2 + 64


class PreemptRecords:
    """Decode bare RAM records; :meth:`records` yields ``(kind, block, offset, data)``.

    ``kind`` is ``"page"`` (data: the page), ``"zero"`` (data: the fill
    byte) or ``"eos"``. Offsets in errors count bytes from the channel's start.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0  # of self._buf[0]
        self.block: Optional[str] = None
        self.ended = False

    def feed(self, data) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self.offset += self._pos
            self._pos = 0
        self._buf += data

    @property
    def partial(self) -> int:
        """Bytes of a record not yet whole (non-zero at a close: the channel was cut)."""
        return len(self._buf) - self._pos

    @property
    def position(self) -> int:
        """Channel offset of the first byte not decoded yet (where a partial record starts)."""
        return self.offset + self._pos

    def take_rest(self) -> bytes:
        """The bytes not decoded yet (a partial record), removed from the decoder."""
        rest = bytes(self._buf[self._pos :])
        self.offset += self._pos
        self._buf = bytearray()
        self._pos = 0
        return rest

    def _need(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def records(self) -> Iterator[tuple]:
        while not self.ended:
            start = self._pos
            at = self.offset + start
            if not self._need(8):
                return
            addr = struct.unpack_from(">Q", self._buf, start)[0]
            flags = addr & (TARGET_PAGE_SIZE - 1)
            offset = addr - flags
            if flags & ~int(_ALLOWED) or not flags:
                raise RamStreamError(f"Unknown combination of migration flags: 0x{flags:x} "
                                     "(postcopy mode)", offset=at, section="ram", field="flags")
            p = start + 8
            if flags & RamFlag.EOS:
                self._pos = p
                self.ended = True
                yield ("eos", None, 0, None)
                return
            block = self.block
            if not flags & RamFlag.CONTINUE:
                if not self._need(p - start + 1):
                    return
                n = self._buf[p]
                if not self._need(p - start + 1 + n):
                    return
                block = bytes(self._buf[p + 1 : p + 1 + n]).decode("utf-8", "replace")
                p += 1 + n
            elif block is None:
                raise RamStreamError("Ack, bad migration stream! (CONTINUE without a block)",
                                     offset=at, section="ram", field="flags")
            if flags & RamFlag.ZERO:
                if len(self._buf) < p + 1:
                    return
                data = self._buf[p]
                p += 1
                kind = "zero"
            elif flags & RamFlag.PAGE:
                if len(self._buf) < p + TARGET_PAGE_SIZE:
                    return
                data = bytes(self._buf[p : p + TARGET_PAGE_SIZE])
                p += TARGET_PAGE_SIZE
                kind = "page"
            else:  # COMPRESS_PAGE
                if len(self._buf) < p + 4:
                    return
                n = struct.unpack_from(">I", self._buf, p)[0]
                if n > _MAX_COMPRESSED:
                    raise RamStreamError(f"compressed page of {n} bytes", offset=at,
                                         section="ram", field="len")
                if len(self._buf) < p + 4 + n:
                    return
                try:
                    data = zlib.decompress(bytes(self._buf[p + 4 : p + 4 + n]))
                except zlib.error as e:
                    raise RamStreamError(f"compressed page does not inflate: {e}", offset=at,
                                         section="ram", field="data") from None
                if len(data) != TARGET_PAGE_SIZE:
                    raise RamStreamError("compressed page inflates to "
                                         f"{len(data)} bytes", offset=at, section="ram",
                                         field="data")
                p += 4 + n
                kind = "page"
            self.block = block
            self._pos = p
            yield (kind, block, offset, data)


class PreemptReader:
    """The destination's reader of the preempt channel, on its own thread.

    The channel may be attached after :meth:`start`: QEMU 10 connects it
    for machine types newer than 7.2 only when postcopy starts, 7.2 during
    setup. With ``expect_eos`` (7.2's convention) the channel must end with
    a RAM EOS; without, the source never writes one and the channel may
    simply close once the migration is over.
    """

    def __init__(self, channel=None, loader=None, registry=None, *,
                 expect_eos: bool = True) -> None:
        self.channel = channel
        self.loader = loader
        self.expect_eos = expect_eos
        self.pages = 0
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._attached = threading.Event()
        if channel is not None:
            self._attached.set()

    def attach(self, channel) -> None:
        """The preempt connection has been accepted: read it."""
        self.channel = channel
        self._attached.set()
        if self._done.is_set():  # stopped meanwhile
            try:
                channel.shutdown()
            except Exception:
                pass

    def start(self, placement, on_error: Callable[[BaseException], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(placement, on_error),
                                        name="postcopy/preempt", daemon=True)
        self._thread.start()

    def _run(self, placement, on_error) -> None:
        try:
            self._attached.wait()
            fast = None if self._done.is_set() else _fast_table(self.channel, placement)
            if fast is not None:
                self._run_compiled(placement, *fast)
                return
            dec = PreemptRecords()
            buf = bytearray(1 << 16)
            while not dec.ended and not self._done.is_set():
                if not self._read(dec, buf):
                    return
                self._apply(dec, placement)
        except BaseException as exc:  # noqa: BLE001 - handed to the load thread
            if not self._done.is_set():
                self.error = exc
                on_error(exc)
        finally:
            self._done.set()

    def _read(self, dec: PreemptRecords, buf: bytearray) -> bool:
        """Feed ``dec`` what the channel has; False at a clean end (QEMU 10: no EOS)."""
        n = self.channel.readinto_available(buf)
        if n == 0:
            if not self.expect_eos and not dec.partial:
                return False
            if dec.partial:
                raise ChannelError(f"the postcopy preempt channel closed inside a "
                                   f"record ({dec.partial} bytes of it)",
                                   offset=dec.position, field="postcopy-preempt")
            raise ChannelError("the postcopy preempt channel closed before its EOS",
                               field="postcopy-preempt")
        dec.feed(memoryview(buf)[:n])
        return True

    def _apply(self, dec: PreemptRecords, placement) -> int:
        """Place every whole record ``dec`` holds; how many records there were."""
        blocks = self.loader.blocks
        done = 0
        for kind, name, off, data in dec.records():
            done += 1
            if kind == "eos":
                break
            blk = blocks.get(name)
            if blk is None:
                raise RamStreamError(f"Unknown ramblock \"{name}\"",
                                     offset=dec.offset, section="ram", field="idstr")
            if kind == "zero" and data == 0:
                placement.place_zero(blk, off)
            elif kind == "zero":
                placement.place(blk, off, bytes([data]) * TARGET_PAGE_SIZE)
            else:
                placement.place(blk, off, data)
            self.pages += 1
        return done

    def _run_compiled(self, placement, fd: int, wake: int, table: list) -> None:
        """The common records placed by the compiled loop, the rest by :meth:`_apply`.

        The loop hands over at a record it does not place; from there this
        side decodes (reading more itself until at least one record is
        whole, so the two always make progress) and gives the loop back
        whatever follows the last whole record.
        """
        kernel = _preempt_recv()
        names = [e[0].decode() for e in table]
        buf = bytearray(1 << 17)
        scratch = bytearray(1 << 16)  # what this side reads itself after a handover
        have, cur, base = 0, -1, 0  # base: channel offset of buf[0]
        while not self._done.is_set():
            st, pos, end, cur, pages, nread, err = kernel.place_records(
                fd, wake, placement.fd, table, cur, buf, have)
            self.channel.bytes_read += nread
            if pages:
                with placement._lock:
                    placement.placed_host_pages += pages
                self.pages += pages
            if st == kernel.STOPPED:
                if self._done.is_set():
                    return
                raise self.channel.failure("stopped")
            if st == kernel.FAILED:
                raise self.channel.failure("failed", err=err)
            dec = PreemptRecords()
            dec.offset = base + have + nread - end + pos
            dec.block = names[cur] if cur >= 0 else None
            dec.feed(bytes(buf[pos:end]))
            if st == kernel.END:
                self._apply(dec, placement)
                if not dec.ended:
                    self._read(dec, buf)  # 0 again: says how the channel ended
                return
            while not self._apply(dec, placement):
                if not self._read(dec, scratch):
                    return
            if dec.ended:
                return
            rest = dec.take_rest()
            buf[: len(rest)] = rest
            have, base = len(rest), dec.position
            cur = names.index(dec.block) if dec.block in names else -1

    def join(self, timeout: Optional[float]) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise ChannelError("the postcopy preempt channel did not end with its EOS",
                                   field="postcopy-preempt")
        if self.error is not None:
            raise self.error

    @property
    def stopped(self) -> bool:
        """:meth:`stop` was called (the postcopy attempt it served is over)."""
        return self._done.is_set()

    def stop(self) -> None:
        if not self._done.is_set():
            self._done.set()
            if self.channel is not None:
                try:
                    self.channel.shutdown()
                except Exception:
                    pass
        self._attached.set()
        if self._thread is not None:
            self._thread.join(5)


def _preempt_recv():
    from qmigx import _backend

    return _backend.load("preempt_recv")


def _fast_table(channel, placement) -> Optional[tuple]:
    """``(fd, wake, blocks)`` for the compiled loop, or None where it cannot serve.

    It needs a plain socket and a userfaultfd placement; blocks of huge
    pages stay with :meth:`PreemptReader._apply` (their parts are gathered
    before one copy), so do blocks without a ``received`` map.
    """
    get = getattr(channel, "socket_fds", None)
    fds = get() if get is not None else None
    if fds is None or getattr(placement, "fd", -1) < 0 or not hasattr(placement, "placed_at"):
        return None
    table = []
    for b in placement.blocks:
        rb = placement.received.get(b.idstr)
        if placement._host_page(b) != TARGET_PAGE_SIZE or rb is None:
            continue
        pa = placement.placed_at.get(b.idstr)
        if pa is None:
            pa = placement.placed_at[b.idstr] = np.zeros(len(rb), np.float64)
        table.append((b.idstr.encode(), placement._addr[b.idstr], b.used_length, rb, pa))
    return (fds[0], fds[1], table) if table else None


class PreemptWriter(LockedWriter):
    """The source's side: requested pages as bare records, then EOS.

    Each record is written under :attr:`lock`; given the channel's socket
    (:meth:`for_channel`), the compiled return-path server
    (:mod:`qmigx._core.rp_serve`) writes its records between these.
    """

    what = "postcopy-preempt"

    def __init__(self, write: Callable[[bytes], object], fds: Optional[tuple] = None,
                 failure: Optional[Callable[..., Exception]] = None) -> None:
        super().__init__(write, fds, failure)
        self.block: Optional[str] = None
        self.pages = 0

    def page(self, block: str, offset: int, data) -> None:
        with self.lock:
            if block == self.block:
                head = struct.pack(">Q", offset | RamFlag.PAGE | RamFlag.CONTINUE)
            else:
                raw = block.encode()
                head = struct.pack(">QB", offset | RamFlag.PAGE, len(raw)) + raw
            self._write(head + bytes(data))
            self.block = block
            self.pages += 1

    def eos(self) -> None:
        with self.lock:
            self._write(struct.pack(">Q", RamFlag.EOS))
