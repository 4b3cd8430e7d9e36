"""The QMP server: sockets, greeting, per-client sessions, event delivery.

One listening socket (``unix:PATH`` or ``tcp:HOST:PORT``, QEMU's ``-qmp``
syntax with ``,server=on,wait=off`` accepted and ignored) takes any
number of clients at once; each gets QEMU's greeting, negotiates
capabilities on its own, and has its requests answered in order. Events
go to every client that finished negotiation, as QEMU sends them to
every negotiated monitor.

The server runs on an asyncio loop; the migration engine runs in its own
threads and reports through :meth:`QMPServer.broadcast`, which hands
events to the loop with ``call_soon_threadsafe`` (and writes them at once
when called on the loop, so an event raised by a command precedes the
command's reply, as in QEMU).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import threading
from typing import Optional

from qmigx.control._qdict import qdict
from qmigx.errors import ParameterError
from qmigx.qmp.commands import QMP_CAPABILITIES, Context, Session, dispatch, version_info
from qmigx.qmp.protocol import JSONStreamer, encode_message, error_response

__all__ = ["QMPServer", "parse_address", "greeting"]


def greeting(version: str = "7.2") -> dict:
    """The first message of every connection (QEMU 7.2's and 10.0's shape)."""
    return qdict({"QMP": qdict({"version": version_info(version),
                                "capabilities": list(QMP_CAPABILITIES)})})


def parse_address(text: str) -> tuple[str, str, Optional[int]]:
    """``unix:PATH`` / ``tcp:HOST:PORT`` (QEMU ``-qmp`` options after a comma ignored).

    Returns ``("unix", path, None)`` or ``("tcp", host, port)``.
    """
    spec = text.split(",", 1)[0]
    scheme, sep, rest = spec.partition(":")
    if sep and scheme == "unix" and rest:
        return "unix", rest, None
    if sep and scheme == "tcp":
        host, sep2, port = rest.rpartition(":")
        host = host.strip("[]")
        if sep2 and port.isdigit() and int(port) <= 65535:
            return "tcp", host or "0.0.0.0", int(port)
    raise ParameterError(f"QMP address must be unix:PATH or tcp:HOST:PORT, not {text!r}",
                         field="qmp")


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.session = Session()
        self.closed = False

    def send(self, msg: dict) -> None:
        if not self.closed:
            try:
                self.writer.write(encode_message(msg))
            except (ConnectionError, RuntimeError):
                self.closed = True


class QMPServer:
    """Serves one :class:`~qmigx.qmp.machine.Machine` over QMP.

    Use :meth:`run` (blocking: until ``quit``, a signal or a fatal
    machine error; returns the exit status) or, inside a running loop,
    :meth:`start` then :meth:`wait_closed`.
    """

    #: seconds between the last reply and closing the connections at exit
    QUIT_GRACE = 0.2

    def __init__(self, machine, address: str) -> None:
        self.machine = machine
        self.kind, self.host, self.port = parse_address(address)
        self.address = address
        self._clients: set[_Client] = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._done: Optional[asyncio.Event] = None
        self.exit_code = 0
        self._quitting = False
        self.bound: Optional[str] = None
        machine.set_emitter(self.broadcast)
        machine.set_fatal_handler(self._fatal_from_thread)

    # -- events ----------------------------------------------------------------------
    def broadcast(self, event: dict) -> None:
        """Send ``event`` to every negotiated client; callable from any thread."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._broadcast_now(event)
        else:
            try:
                loop.call_soon_threadsafe(self._broadcast_now, event)
            except RuntimeError:  # loop closed: we are exiting
                pass

    def _broadcast_now(self, event: dict) -> None:
        for client in list(self._clients):
            if client.session.negotiated:
                client.send(event)

    # -- lifetime ----------------------------------------------------------------------
    def request_quit(self, code: int = 0) -> None:
        """End the server after the current reply has been written (loop thread)."""
        self._quitting = True
        self.exit_code = code

    def _fatal_from_thread(self, code: int, message: str) -> None:
        loop = self._loop
        if loop is None:
            return

        def fatal() -> None:
            print(f"qmigx: error: {message}", file=sys.stderr, flush=True)
            self.request_quit(code)
            self._finish()

        if threading.get_ident() == self._loop_thread:
            fatal()
        else:
            try:
                loop.call_soon_threadsafe(fatal)
            except RuntimeError:
                pass

    def _finish(self) -> None:
        if self._done is not None:
            self._done.set()

    def _signal(self, signum: int) -> None:
        self.machine.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        self.request_quit(0)
        self._finish()

    async def start(self) -> None:
        """Bind and listen; the machine starts (``-incoming URI`` listens) here too."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._done = asyncio.Event()
        if self.kind == "unix":
            path = self.host
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)  # a stale socket, as QEMU replaces it
            except FileNotFoundError:
                pass
            self._server = await asyncio.start_unix_server(self._handle, path=path)
            self.bound = f"unix:{path}"
        else:
            self._server = await asyncio.start_server(self._handle, host=self.host,
                                                      port=self.port, reuse_address=True)
            sockname = self._server.sockets[0].getsockname()
            self.bound = f"tcp:{sockname[0]}:{sockname[1]}"
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(signum, self._signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        self.machine.start()

    async def wait_closed(self) -> int:
        """Serve until asked to stop; then close everything. Returns the exit status."""
        assert self._done is not None
        await self._done.wait()
        await self._close()
        return self.exit_code

    async def _close(self) -> None:
        self.machine.shutdown()
        if self._server is not None:
            self._server.close()
        # QEMU's sockets close when its process exits, a moment after the last
        # reply; a client that closes its end right after `quit` sees no EOF
        await asyncio.sleep(self.QUIT_GRACE)
        for client in list(self._clients):
            try:
                await asyncio.wait_for(client.writer.drain(), 2)
            except (Exception, asyncio.TimeoutError):
                pass
            client.closed = True
            client.writer.close()
        self._clients.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except (Exception, asyncio.TimeoutError):
                pass
        if self.kind == "unix":
            try:
                os.unlink(self.host)
            except OSError:
                pass

    async def serve(self) -> int:
        await self.start()
        return await self.wait_closed()

    def run(self, ready=None) -> int:
        """Serve in a new event loop until quit; ``ready(bound_address)`` is called once listening."""

        async def main() -> int:
            await self.start()
            if ready is not None:
                ready(self.bound)
            return await self.wait_closed()

        return asyncio.run(main())

    # -- one client ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._clients.add(client)
        ctx = Context(self.machine, client.session, self)
        streamer = JSONStreamer()
        client.send(greeting(getattr(self.machine, "qemu_version", "7.2")))
        try:
            while not self._quitting:
                data = await reader.read(65536)
                if not data:
                    break
                for value, err in streamer.feed(data):
                    if err is not None:
                        client.send(error_response(err))
                    else:
                        client.send(dispatch(value, ctx))
                    if self._quitting:
                        self._finish()
                        break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not self._quitting:  # else _close() flushes and closes every connection
                self._clients.discard(client)
                if not client.closed:
                    client.closed = True
                    try:
                        writer.close()
                    except Exception:
                        pass
