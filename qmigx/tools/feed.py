"""Loading a saved stream while ``qmigx send FILE`` sends it.

Loading FILE whole before the first byte leaves costs as long as the
sending itself. Instead a thread loads FILE into RAM (read in chunks, so
memory stays guest RAM plus a buffer) and the RAM engine sends it as it
would a running guest's: the loader is the "guest", and its writes are a
dirty log (:class:`~qmigx.tools.pagelog.LoggingPlacement`).

* The engine's first pass takes pages in block order, ascending; before
  it takes a chunk it re-arms the chunk's log (``clear``), and there the
  feed waits until the loader has gone past the chunk, so the first pass
  sends loaded pages, not zeros to be sent again.
* A page FILE carries again later (a live save's later passes, XBZRLE
  deltas, compressed pages: all decoded by the loader) is marked once
  more and goes again, as a re-dirtied page does.
* Before completion the engine waits for the loader to finish
  (:meth:`StreamFeed.wait`), so the final sync collects every page
  written since; last record wins on both sides.

With ``relay`` the loader writes no RAM for PAGE and ZERO records: it
notes where they lie in FILE and the engine relays them from there
(:mod:`qmigx.tools.pagerelay`); only pages rebuilt from other records
land in RAM.
"""

from __future__ import annotations

import threading
from typing import Optional

from qmigx.ram import RAMBlockList, RamLoader
from qmigx.stream import RamMappedPages, RamPages
from qmigx.stream.reader import Source, StreamReader
from qmigx.tools.loaded import LoadedStream, apply_event
from qmigx.tools.pagelog import LoggingPlacement
from qmigx.tools.pagerelay import RelayPlacement

__all__ = ["StreamFeed", "FEED_CLEAR_SHIFT"]

#: Log chunk of the engine's bitmaps while feeding (QEMU's x-clear-bitmap-shift):
#: 256 pages, one engine batch, so the first pass waits for 1 MiB at a time.
FEED_CLEAR_SHIFT = 8

#: FILE is read 2 MiB at a time: the loader's progress shows at that grain
#: and its buffer stays small beside guest RAM
_READ_CHUNK = 2 << 20

_SHIFT = 40  # progress key: setup index << _SHIFT | page


class _FeedLog:
    """The dirty-log source of one block (:class:`~qmigx.bitmap.DirtyLogSource`)."""

    def __init__(self, feed: "StreamFeed", idstr: str) -> None:
        self.feed = feed
        self.idstr = idstr
        self.index = feed.placement.order[idstr]

    def sync(self):
        return self.feed.placement.take_bitmap(self.idstr)

    def clear(self, start_page: int, npages: int) -> None:
        self.feed.wait_loaded(self.index, start_page + npages - 1)
        self.feed.placement.forget(self.idstr, start_page, npages)


class StreamFeed:
    """FILE loaded by a thread into RAM blocks, with a dirty log per block.

    ``relay`` (``source`` a regular file's path): see the module docstring;
    the sender then sets ``MigrationSource.page_relay`` to :attr:`placement`.

    :meth:`begin` reads, in the caller's thread, what comes before the
    first page (configuration, RAM setup: what the sender needs to
    start), then the thread loads the rest. ``loaded`` fills as
    :func:`~qmigx.tools.streams.load_stream`'s result would; it is whole
    once :meth:`wait` returned.
    """

    def __init__(self, source: Source, blocks: Optional[RAMBlockList] = None, *,
                 create_missing: bool = False, relay: bool = False) -> None:
        self.placement = (RelayPlacement(source, on_mark=self._advance) if relay
                          else LoggingPlacement(on_mark=self._advance))
        # relayed, FILE's bytes are not copied out: read through mmap windows
        self.reader = StreamReader(source, chunk=_READ_CHUNK, use_mmap=relay)
        self.loader = RamLoader(blocks, create_missing=create_missing, placement=self.placement)
        self.loaded = LoadedStream(blocks=self.loader.blocks, vmdesc=self.reader.vmdesc_text)
        self.error: Optional[BaseException] = None
        #: bytes of FILE parsed when the engine first took pages to send
        self.parsed_at_first_send: Optional[int] = None
        self._cond = threading.Condition()
        self._progress = -1
        self._done = False
        self._thread: Optional[threading.Thread] = None

    def begin(self) -> LoadedStream:
        """Read up to the first page, start the loading thread; returns ``loaded``."""
        events = self.reader.events()
        first = None
        for ev in events:
            # a mapped-ram file lists its blocks only after their pages: it is
            # read up to that list (its RAM, whole) before anything is sent
            if type(ev) is RamPages or (type(ev) is RamMappedPages
                                        and self.loaded.ram_setup is not None):
                first = ev
                break
            apply_event(self.loader, self.loaded, ev)
        self.loaded.multifd_sync = self.reader.parser.ctx.multifd_sync
        self._thread = threading.Thread(target=self._run, args=(first, events),
                                        name="stream-feed", daemon=True)
        self._thread.start()
        return self.loaded

    def dirty_logs(self) -> dict:
        """A dirty-log source per block of the setup record (MigrationSource's ``dirty_logs``)."""
        return {idstr: _FeedLog(self, idstr) for idstr in self.placement.order}

    def _run(self, first, events) -> None:
        try:
            if first is not None:
                apply_event(self.loader, self.loaded, first)
                for ev in events:
                    apply_event(self.loader, self.loaded, ev)
            self.loaded.multifd_sync = self.reader.parser.ctx.multifd_sync
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _advance(self, index: int, page: int) -> None:
        key = index << _SHIFT | page
        if key > self._progress:
            with self._cond:
                self._progress = max(self._progress, key)
                self._cond.notify_all()

    def wait_loaded(self, index: int, page: int) -> None:
        """Wait until the loader went past ``page`` of block ``index`` (or finished)."""
        if self.parsed_at_first_send is None:
            self.parsed_at_first_send = self.reader.parser.offset
        key = index << _SHIFT | page
        if self._progress >= key or self._done:
            self._raise()
            return
        with self._cond:
            while self._progress < key and not self._done:
                self._cond.wait()
        self._raise()

    def wait(self) -> LoadedStream:
        """Wait until FILE is loaded whole; raises what loading it raised."""
        with self._cond:
            while not self._done:
                self._cond.wait()
        self._raise()
        return self.loaded

    @property
    def done(self) -> bool:
        return self._done

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
