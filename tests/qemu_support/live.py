"""Helpers for live-migration interop: qmigx processes, URIs, QEMU live sources.

The live tests pair a real QEMU 7.2 with ``qmigx incoming`` / ``qmigx
send`` (separate processes, as a user runs them) over unix sockets and
loopback TCP. What they need beyond :mod:`.harness`:

* a URI on a fresh unix socket (in a short private dir: socket paths are
  limited to 107 bytes) or a free TCP port;
* knowing when a ``qmigx incoming`` listens **without connecting to it**
  (a probe connection would be accepted as the migration's main channel):
  ``/proc/net/unix`` or ``/proc/net/tcp`` lists the socket as listening;
* a QEMU source migrating a running, dirtying guest, optionally held back
  (as :func:`.harness.save_stream` does) until several dirty syncs happened
  so that XBZRLE pages are really sent;
* a guest for qmigx's Python :class:`~qmigx.migration.MigrationSource`
  whose "vCPU" (a writer thread) really stops when completion stops it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .harness import Qemu, QemuError, _EarlyCompletion, _hold_until

__all__ = [
    "REPO",
    "Uris",
    "free_tcp_port",
    "tcp_listening",
    "unix_listening",
    "qmigx_argv",
    "qmigx_env",
    "cap_args",
    "param_args",
    "QmigxIncoming",
    "qmigx_send",
    "qmigx_send_argv",
    "qemu_live_migrate",
    "sha256_file",
    "first_difference",
    "LockedGuest",
]

REPO = Path(__file__).resolve().parents[2]


# --- URIs ---------------------------------------------------------------------------------------


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uris:
    """Fresh migration URIs; unix sockets live in one short private directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="qx-")
        self._n = 0

    def make(self, transport: str) -> str:
        if transport == "unix":
            self._n += 1
            return f"unix:{self.dir}/m{self._n}.sock"
        if transport == "tcp":
            return f"tcp:127.0.0.1:{free_tcp_port()}"
        raise ValueError(f"unknown transport {transport!r}")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def tcp_listening(port: int) -> bool:
    """True if some socket listens on ``port`` (IPv4 or IPv6), read from /proc/net."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[1].endswith(want) and cols[3] == "0A":  # 0A = TCP_LISTEN
                        return True
        except OSError:
            continue
    return False


def unix_listening(path: str) -> bool:
    """True if a socket listens on ``path`` (its file exists from bind(), before listen())."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                cols = line.split()
                # Flags __SO_ACCEPTCON (0x10000) marks a listening socket
                if len(cols) >= 8 and cols[7] == path and int(cols[3], 16) & 0x10000:
                    return True
    except OSError:
        return os.path.exists(path)
    return False


def _listening(uri: str) -> bool:
    if uri.startswith("unix:"):
        return unix_listening(uri[5:])
    if uri.startswith("tcp:"):
        return tcp_listening(int(uri.rsplit(":", 1)[1]))
    if uri.startswith("file:"):
        return True  # a file is read as soon as the process runs
    raise ValueError(f"cannot tell whether {uri!r} listens")


# --- qmigx processes -----------------------------------------------------------------------------


def qmigx_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def qmigx_argv(*args: str | os.PathLike[str]) -> list[str]:
    # -X faulthandler: a hung child killed with SIGABRT prints every thread's stack
    return [sys.executable, "-X", "faulthandler", "-m", "qmigx", *map(str, args)]


def cap_args(caps: Mapping[str, bool] | None) -> list[str]:
    out: list[str] = []
    for k, v in (caps or {}).items():
        out += ["--cap", f"{k}={'on' if v else 'off'}"]
    return out


def param_args(params: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    for k, v in (params or {}).items():
        out += ["--param", f"{k}={v}"]
    return out


#: ``python -c`` body: run the qmigx CLI, then write this process's peak RSS (KiB) to argv[1].
#: VmHWM belongs to the process's own address space, which exec() makes new; ru_maxrss
#: would not do: Linux carries the parent's RSS at fork/exec into it, so a child of a
#: big test process would report the parent's size.
_PEAK_WRAPPER = """
import sys
from qmigx.cli.main import main
out = sys.argv.pop(1)
try:
    rc = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(out, "w") as f:
        f.write(hwm)
sys.exit(rc)
"""


class QmigxIncoming:
    """``qmigx incoming URI ...`` as a child process; :meth:`start` returns once it listens.

    stderr goes to a file in ``workdir`` (never a pipe nobody reads, which
    could fill and stall the child); :meth:`wait` returns the exit code
    and that text. With ``peak_file`` the same CLI runs through a wrapper
    that records the process's peak RSS there (see :meth:`peak_bytes`).
    """

    def __init__(self, uri: str, workdir: str | os.PathLike[str], *, caps: Mapping[str, bool] | None = None,
                 params: Mapping[str, Any] | None = None, save: str | os.PathLike[str] | None = None,
                 ram_dir: str | os.PathLike[str] | None = None,
                 shared_ram: Sequence[tuple[str, str | os.PathLike[str]]] = (),
                 report: str | os.PathLike[str] | None = None, name: str = "incoming",
                 peak_file: str | os.PathLike[str] | None = None,
                 drives: Sequence[tuple[str, str | os.PathLike[str]]] = (),
                 extra: Sequence[str] = ()) -> None:
        self.uri = uri
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        args: list[str | os.PathLike[str]] = ["incoming", uri]
        if save is not None:
            args += ["--save", save]
        if ram_dir is not None:
            args += ["--ram-dir", ram_dir]
        for idstr, path in shared_ram:
            args += ["--shared-ram", f"{idstr}={path}"]
        if report is not None:
            args += ["--report", report]
        for drive, path in drives:
            args += ["--drive", f"{drive}={path}"]
        self.argv = qmigx_argv(*args) + cap_args(caps) + param_args(params) + list(extra)
        self.peak_file = Path(peak_file) if peak_file is not None else None
        if self.peak_file is not None:
            self.peak_file.unlink(missing_ok=True)
            self.argv[1:5] = ["-X", "faulthandler", "-c", _PEAK_WRAPPER, str(self.peak_file)]
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "QmigxIncoming":
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, env=qmigx_env(), cwd=REPO)
        deadline = time.monotonic() + timeout
        while not _listening(self.uri):
            if self.proc.poll() is not None:
                raise QemuError(f"qmigx incoming exited with {self.proc.returncode} before listening:\n"
                                f"{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError(f"qmigx incoming not listening on {self.uri} after {timeout} s:\n{self.stderr()}")
            time.sleep(0.02)
        return self

    def __enter__(self) -> "QmigxIncoming":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = 120.0) -> tuple[int, str]:
        assert self.proc is not None
        # polled every 2 ms, as the benchmarks poll QEMU's query-migrate: Popen.wait's
        # own back-off sleeps up to 50 ms, which timed cases would count
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if rc is None:
            self.dump_and_kill()
            raise QemuError(f"qmigx incoming still running after {timeout} s; its threads:\n"
                            f"{self.stderr()[-6000:]}") from None
        return rc, self.stderr()

    def peak_bytes(self) -> int:
        """Peak resident memory of the finished process (needs ``peak_file``)."""
        assert self.peak_file is not None
        return int(self.peak_file.read_text()) << 10

    def dump_and_kill(self) -> None:
        """SIGABRT first (faulthandler writes all thread stacks to stderr), then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def qmigx_send(stream: str | os.PathLike[str], uri: str, *, caps: Mapping[str, bool] | None = None,
               params: Mapping[str, Any] | None = None,
               shared_ram: Sequence[tuple[str, str | os.PathLike[str]]] = (),
               report: str | os.PathLike[str] | None = None,
               drives: Sequence[tuple[str, str | os.PathLike[str]]] = (),
               timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``qmigx send STREAM URI -v ...`` to its end."""
    return subprocess.run(qmigx_send_argv(stream, uri, caps=caps, params=params, shared_ram=shared_ram,
                                          report=report, drives=drives),
                          capture_output=True, text=True, timeout=timeout, env=qmigx_env(), cwd=REPO)


def qmigx_send_argv(stream: str | os.PathLike[str], uri: str, *, caps: Mapping[str, bool] | None = None,
                    params: Mapping[str, Any] | None = None,
                    shared_ram: Sequence[tuple[str, str | os.PathLike[str]]] = (),
                    report: str | os.PathLike[str] | None = None,
                    drives: Sequence[tuple[str, str | os.PathLike[str]]] = ()) -> list[str]:
    """The command line of ``qmigx send STREAM URI -v ...`` (for running it in the background)."""
    args: list[str | os.PathLike[str]] = ["send", stream, uri, "-v"]
    if report is not None:
        args += ["--report", report]
    for idstr, path in shared_ram:
        args += ["--shared-ram", f"{idstr}={path}"]
    for drive, path in drives:
        args += ["--drive", f"{drive}={path}"]
    return qmigx_argv(*args) + cap_args(caps) + param_args(params)


# --- QEMU as a live source -----------------------------------------------------------------------


def qemu_live_migrate(vm: Qemu, uri: str, *, caps: Mapping[str, bool] | None = None,
                      params: Mapping[str, Any] | None = None, hold_syncs: int = 0,
                      want_xbzrle: bool = False, hold_bandwidth: int = 32 << 20,
                      timeout: float = 120.0) -> dict[str, Any]:
    """Migrate ``vm`` (guest running) to ``uri``; return ``query-migrate`` at completion.

    With ``hold_syncs`` the migration is held back as in
    :func:`.harness.save_stream` (``downtime-limit`` 1 ms, decreasing
    bandwidth) until ``dirty-sync-count`` reaches it (and, with
    ``want_xbzrle``, XBZRLE pages were sent), then released to converge.
    Raises :class:`QemuError` if it completed before that (the caller may
    retry with a fresh destination).
    """
    caps = dict(caps or {})
    params = dict(params or {})
    vm.set_capabilities(caps)
    vm.set_parameters(params)
    if not hold_syncs:
        vm.migrate(uri)
        return vm.wait_migration(timeout)
    final_bw = params.get("max-bandwidth", 1 << 30)
    final_dt = params.get("downtime-limit", 2000)
    vm.set_parameters({"max-bandwidth": hold_bandwidth, "downtime-limit": 1})
    vm.migrate(uri)
    try:
        _hold_until(vm, min_syncs=hold_syncs, want_xbzrle=want_xbzrle, tail_bandwidth=3_500_000,
                    slow_bandwidth=512 << 10, xbzrle_bandwidth=32 << 10, timeout=timeout)
    except _EarlyCompletion as e:
        raise QemuError(f"held-back migration converged too early: {e}") from None
    vm.set_parameters({"max-bandwidth": max(final_bw, hold_bandwidth), "downtime-limit": final_dt})
    return vm.wait_migration(timeout)


# --- comparisons ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def first_difference(a: bytes, b: bytes) -> str | None:
    """None if equal, else where they first differ (for assertion messages, not a diff dump)."""
    if a == b:
        return None
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    import numpy as np

    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    idx = np.flatnonzero(x != y)
    pages = np.unique(idx >> 12)
    return (f"{idx.size} bytes differ in {pages.size} pages; first at {int(idx[0]):#x} "
            f"(pages {', '.join(hex(int(p)) for p in pages[:8])}{'...' if pages.size > 8 else ''})")


# --- a guest for qmigx's Python source -----------------------------------------------------------


class LockedGuest:
    """A :class:`qmigx.migration.Guest` whose vCPU is a writer thread under a lock.

    ``write(fn)`` runs one guest "instruction" (``fn()``, which writes RAM
    and marks it dirty) only while the guest runs; :meth:`stop` takes the
    same lock, so once the source stopped the guest for completion no
    write can slip in after its final dirty sync.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = True
        self.stops = 0

    def stop(self) -> None:
        with self._lock:
            self.running = False
            self.stops += 1

    def start(self) -> None:
        with self._lock:
            self.running = True

    def runstate(self) -> str:
        return "running" if self.running else "paused"

    def throttle(self, percent: int) -> None:
        pass

    def write(self, fn: Callable[[], None]) -> bool:
        with self._lock:
            if not self.running:
                return False
            fn()
            return True
