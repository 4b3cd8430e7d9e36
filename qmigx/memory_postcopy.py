"""Postcopy into a program's own memory: arrays usable at once while their pages fault in.

A Python thread that touches a missing page blocks in the kernel holding
the GIL, so the engine that fetches the page cannot run in the same
process. :func:`receive_postcopy` therefore splits the work as CRIU's
lazy-pages daemon does:

* the program's process makes each block (a memfd mapped shared, as the
  setup record announces it), registers it with its own userfaultfd in
  missing mode and hands the memfd and the userfaultfd to a child;
* the child runs the destination: precopy pages go into the memfd through
  its own mapping, discarded pages are punched out of it, and after
  LISTEN each missing page is placed with ``UFFDIO_COPY`` into the
  program's mapping, which wakes whichever of the program's threads
  waits on it; faults come to the child through the same userfaultfd.

The program gets its arrays when the destination runs (POSTCOPY_RUN), or
at completion if the source never switched to postcopy, and waits for
the end with :meth:`PostcopyMemory.wait`.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import subprocess
import sys
from typing import Mapping, Optional

import numpy as np

from qmigx import uffd
from qmigx._child import python_command
from qmigx.errors import MigrationError

__all__ = ["PostcopyMemory", "receive_postcopy"]

_CHILD = "from qmigx.memory_postcopy import _child_main; _child_main()"


def _send(sock: socket.socket, msg: dict, fds=()) -> None:
    data = json.dumps(msg).encode()
    head = struct.pack(">I", len(data))
    if fds:
        socket.send_fds(sock, [head + data], list(fds))
    else:
        sock.sendall(head + data)


def _recv(sock: socket.socket, want_fds: int = 0):
    fds: list = []
    buf = b""
    while len(buf) < 4:
        if want_fds and not fds:
            chunk, fds, _, _ = socket.recv_fds(sock, 65536, want_fds)
        else:
            chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the postcopy receiver closed its control socket")
        buf += chunk
    n = struct.unpack(">I", buf[:4])[0]
    while len(buf) < 4 + n:
        chunk = sock.recv(4 + n - len(buf))
        if not chunk:
            raise EOFError("the postcopy receiver closed its control socket")
        buf += chunk
    return json.loads(buf[4 : 4 + n]), fds


class PostcopyMemory(dict):
    """The received arrays by block name, usable at once; :meth:`wait` for the end.

    ``status`` is ``"postcopy-active"`` while pages still arrive, then
    ``"completed"``; ``report`` holds the receiver's postcopy figures
    (faults, requests, latency percentiles) once completed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.status = "active"
        self.report: Optional[dict] = None
        self._sock: Optional[socket.socket] = None
        self._proc: Optional[subprocess.Popen] = None
        self._uffd = -1
        self._maps: list = []

    def wait(self, timeout: Optional[float] = None) -> str:
        """Until every page arrived (or the migration failed: raises); returns the status."""
        if self.status == "completed":
            return self.status
        self._sock.settimeout(timeout)
        try:
            while self.status != "completed":
                self._handle(_recv(self._sock)[0])
        except socket.timeout:
            raise MigrationError(f"postcopy did not complete within {timeout} s") from None
        except EOFError:
            raise MigrationError("the postcopy receiver ended before the migration "
                                 "completed") from None
        finally:
            if self.status == "completed":
                self._close()
        return self.status

    def _handle(self, msg: dict) -> None:
        event = msg.get("event")
        if event == "error":
            self._close()
            raise MigrationError(msg.get("message", "incoming migration failed"))
        if event == "run":
            self.status = "postcopy-active"
        elif event == "completed":
            self.status = "completed"
            self.report = msg.get("report")

    def _close(self) -> None:
        if self._uffd >= 0:
            os.close(self._uffd)  # the memory stays mapped; faults are plain from now on
            self._uffd = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


def receive_postcopy(uri: str, capabilities, parameters: Optional[Mapping],
                     timeout: Optional[float]) -> PostcopyMemory:
    """Start the receiving child for ``uri``; return the arrays once the program may use them."""
    fd, _ = uffd.create_uffd(user_mode_only_first=False)
    uffd.api(fd, 0)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = PostcopyMemory()
    out._uffd = fd
    out._sock = mine
    config = json.dumps({"uri": uri, "capabilities": list(capabilities),
                         "parameters": dict(parameters or {})})
    try:
        out._proc = subprocess.Popen(python_command(_CHILD) + [str(theirs.fileno()), config],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        _send(mine, {"uffd": True}, [fd])
        mine.settimeout(timeout)
        while True:
            msg, _ = _recv(mine)
            if msg.get("event") == "block":
                _make_block(out, msg)
            elif msg.get("event") in ("run", "completed", "error"):
                out._handle(msg)
                if out.status == "completed":
                    out._close()
                return out
    except socket.timeout:
        out._close()
        raise MigrationError(f"no postcopy migration arrived within {timeout} s") from None
    except EOFError:
        out._close()
        raise MigrationError("the postcopy receiver ended before the migration ran") from None


def _make_block(out: PostcopyMemory, msg: dict) -> None:
    """A block the setup record announced: memfd, shared mapping, registered; sent over."""
    name, size = msg["idstr"], int(msg["size"])
    mfd = os.memfd_create(name.replace("/", "_")[:200], os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, size)
        m = mmap.mmap(mfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        arr = np.frombuffer(m, np.uint8)
        addr = int(arr.ctypes.data)
        uffd.register(out._uffd, addr, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE,
                      uffd.UFFDIO_REGISTER_MODE_MISSING)
        out._maps.append(m)
        out[name] = arr
        _send(out._sock, {"address": addr}, [mfd])
    finally:
        os.close(mfd)


# -- the child ---------------------------------------------------------------------------------


def _child_main() -> None:
    """The receiving child: a destination whose blocks and userfaultfd are the parent's."""
    from qmigx.control import Capabilities, Parameters
    from qmigx.migration import MigrationDestination
    from qmigx.migration.side import S
    from qmigx.ram import RAMBlock

    sock = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    _, fds = _recv(sock, 1)
    caps = Capabilities()
    caps.set_many([(n, True) for n in config["capabilities"]], incoming=True)
    params = Parameters(capabilities=caps)
    params.set(config["parameters"])
    dst = MigrationDestination(None, capabilities=caps, parameters=params)
    dst.uffd_fd = fds[0]

    def factory(info):
        _send(sock, {"event": "block", "idstr": info.idstr, "size": info.used_length})
        msg, got = _recv(sock, 1)
        m = mmap.mmap(got[0], info.used_length, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        blk = RAMBlock(info.idstr, m, info.used_length, shared=True)
        blk.fd = got[0]
        blk.uffd_address = int(msg["address"])
        return blk

    dst.block_factory = factory
    dst.on_postcopy_run = lambda d: _send(sock, {"event": "run"})
    try:
        dst.incoming(config["uri"])
        state = dst.wait()
        if state is not S.COMPLETED:
            raise dst.error or MigrationError(f"incoming migration {state.value}")
        _send(sock, {"event": "completed", "report": dst.postcopy_report()})
    except BaseException as exc:  # noqa: BLE001 - reported to the program, one line
        try:
            _send(sock, {"event": "error", "message": str(exc)})
        except OSError:
            pass
        raise SystemExit(1) from None
