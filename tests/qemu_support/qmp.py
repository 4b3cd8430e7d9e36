"""A minimal synchronous QMP client: the one the tests use to drive QMP.

It drives real QEMU (the harness, the interop tests) and ``qmigx serve``
alike. It must never hang a test run: every read has a deadline, and a
peer that dies mid-command shows up as :class:`QMPError` instead of a
blocked socket. (The ``qemu.qmp`` package is asyncio-based and an
optional dependency; this module has no dependencies. Only tests that
prove compatibility with ``qemu.qmp`` itself use that package.)
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

__all__ = ["QMPError", "QMPCommandError", "QMPTimeout", "QMPClient"]


class QMPError(Exception):
    """The connection failed, closed, or carried something that is not QMP."""


class QMPTimeout(QMPError):
    """No answer (or no matching event) before the deadline."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an ``error`` object."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command}: {error_class}: {desc}")


class QMPClient:
    """One QMP session over a unix socket.

    ``connect`` retries until the socket exists and the greeting arrives
    (QEMU creates the socket shortly after start), then negotiates
    capabilities. Events that arrive while waiting for a command's answer
    are kept in :attr:`events` in arrival order.
    """

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    # --- connection -----------------------------------------------------
    def connect(self, timeout: float | None = None, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Connect, read the greeting and leave negotiation mode.

        ``alive`` (optional) is polled between retries so a QEMU that
        exited during start-up fails fast instead of waiting out the timeout.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last_err: Exception | None = None
        while True:
            if alive is not None and not alive():
                raise QMPError(f"QEMU exited before its QMP socket {self.path} accepted a connection")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                s.connect(self.path)
                break
            except OSError as e:
                s.close()
                last_err = e
                if time.monotonic() >= deadline:
                    raise QMPTimeout(f"cannot connect to QMP socket {self.path}: {last_err}") from None
                time.sleep(0.05)
        self._sock = s
        msg = self._read_message(deadline)
        while "event" in msg:  # QEMU 10 can emit one (RESUME) before it greets a client that came early
            self.events.append(msg)
            msg = self._read_message(deadline)
        if "QMP" not in msg:
            self.close()
            raise QMPError(f"expected a QMP greeting, got {msg!r}")
        self.greeting = msg
        self.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))
        return msg

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # --- framing ----------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        """One JSON object; QEMU ends each with CRLF and never breaks lines inside."""
        if self._sock is None:
            raise QMPError("not connected")
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout(f"no QMP message within the deadline on {self.path}")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout(f"no QMP message within the deadline on {self.path}") from None
            except OSError as e:
                self.close()
                raise QMPError(f"QMP connection lost: {e}") from None
            if not chunk:
                self.close()
                raise QMPError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"not JSON on the QMP socket: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QMPError(f"not a QMP object: {msg!r}")
        return msg

    def _send(self, obj: dict[str, Any]) -> None:
        if self._sock is None:
            raise QMPError("not connected")
        try:
            self._sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            self.close()
            raise QMPError(f"QMP connection lost while sending: {e}") from None

    # --- commands and events ------------------------------------------------
    def execute(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """Run ``cmd`` with ``args`` (``_`` in keyword names becomes ``-``).

        Returns the ``return`` value; raises :class:`QMPCommandError`
        with QEMU's error class and description.
        """
        return self.execute_raw(cmd, {k.replace("_", "-"): v for k, v in args.items()}, timeout)

    def execute_raw(self, cmd: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Like :meth:`execute` but with argument names passed verbatim."""
        self._next_id += 1
        req_id = f"q{self._next_id}"
        req: dict[str, Any] = {"execute": cmd, "id": req_id}
        if arguments:
            req["arguments"] = arguments
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(req)
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != req_id:
                continue  # an answer to an earlier, abandoned request
            if "error" in msg:
                err = msg["error"]
                raise QMPCommandError(cmd, err.get("class", "?"), err.get("desc", "?"))
            return msg.get("return")

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Collect the events that arrive within ``timeout`` s; return all collected so far."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._read_message(max(deadline, time.monotonic() + 0.001))
            except QMPTimeout:
                return self.events
            if "event" in msg:
                self.events.append(msg)

    def pull_event(self, timeout: float = 30.0) -> dict[str, Any]:
        """Consume the next event in arrival order (already-collected ones first).

        Raises :class:`QMPTimeout` when none arrives within ``timeout`` s.
        """
        if self.events:
            return self.events.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                return msg

    def wait_event(
        self,
        name: str,
        pred: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Wait for (and consume) the first event ``name`` whose data satisfies ``pred``.

        Already-collected events are searched first.
        """
        def match(ev: dict[str, Any]) -> bool:
            return ev.get("event") == name and (pred is None or pred(ev.get("data", {})))

        for k, ev in enumerate(self.events):
            if match(ev):
                return self.events.pop(k)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if "event" not in msg:
                continue
            if match(msg):
                return msg
            self.events.append(msg)
