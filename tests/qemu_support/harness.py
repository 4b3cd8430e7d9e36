"""Start real QEMU 7.2 processes and make (or load) migration streams with them.

Interop tests compare qmigx against the real peer, so they need streams
that a real QEMU produced from a guest whose RAM we can inspect, and a
real QEMU destination to load what qmigx writes. Guest RAM is always a
``memory-backend-file`` with ``share=on`` (block id ``mem0``), so the
host file *is* the guest's RAM: the harness reads the guest's ready
marker from it and copies it as the reference image of guest RAM.

Everything here has a timeout, and every QEMU process is killed when its
:class:`Qemu` context ends, whatever happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .guest import Marker, build_guest, read_marker
from .qmp import QMPClient, QMPCommandError, QMPError

__all__ = [
    "QemuError",
    "Qemu",
    "StreamInfo",
    "DEVICE_NAMES",
    "qemu_binary",
    "qemu10_binary",
    "qemu_version",
    "parse_size",
    "qemu_args",
    "save_stream",
    "load_stream",
]

QEMU_NAME = "qemu-system-x86_64"
#: Devices ``devices=`` may name, in the order they are put on the command line.
DEVICE_NAMES = ("e1000", "virtio-net-pci", "virtio-blk-pci", "usb-ehci", "usb-tablet", "isa-serial")
DISK_BYTES = 1 << 20


class QemuError(RuntimeError):
    """QEMU failed, exited, or a migration did not complete; includes the log tail."""


#: The node id of the running test while it carries no QEMU marker (set by tests/conftest.py);
#: the harness then refuses to find or start QEMU, so every QEMU test is marked, and gated.
unmarked_test: str | None = None


def _refuse_unmarked() -> None:
    if unmarked_test is not None:
        raise QemuError(f"{unmarked_test} uses QEMU but is not marked @pytest.mark.qemu "
                        "(see tests/conftest.py)")


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` (env ``QMIGX_QEMU`` overrides), or None."""
    _refuse_unmarked()
    env = os.environ.get("QMIGX_QEMU")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which(QEMU_NAME)


_versions: dict[str | None, tuple[int, int]] = {}


def qemu_version(binary: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``binary`` (default: :func:`qemu_binary`), from ``--version``."""
    if binary not in _versions:
        exe = binary or qemu_binary()
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"version (\d+)\.(\d+)", out)
        if m is None:
            raise QemuError(f"{exe} --version says {out!r}")
        _versions[binary] = (int(m.group(1)), int(m.group(2)))
    return _versions[binary]


def qemu10_binary() -> str | None:
    """The QEMU 10 wrapper named by ``$QMIGX_QEMU10`` (see .ci/install-qemu10.sh), or None."""
    env = os.environ.get("QMIGX_QEMU10")
    return env if env and os.access(env, os.X_OK) else None


def parse_size(size: str | int) -> int:
    """``"64M"`` -> 67108864 (suffixes K, M, G; plain numbers are bytes)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if mult != 1 else s) * mult


def qemu_args(
    *,
    machine: str = "pc",
    ram: str | int = "64M",
    mem_path: str | os.PathLike[str],
    mem_share: bool = True,
    kernel: str | os.PathLike[str] | None = None,
    devices: Sequence[str] = (),
    disk: str | os.PathLike[str] | None = None,
    paused: bool = False,
    incoming: bool = False,
    qmp_socket: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line (without the binary) for one VM of the harness.

    Source and destination of a migration are built from the same
    arguments (except ``mem_path``, ``paused``, ``incoming`` and the QMP
    socket), so their RAM blocks and device sections match.
    """
    unknown = [d for d in devices if d not in DEVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown devices {unknown}; known: {DEVICE_NAMES}")
    if "usb-tablet" in devices and "usb-ehci" not in devices:
        raise ValueError("usb-tablet needs usb-ehci")
    if "virtio-blk-pci" in devices and disk is None:
        raise ValueError("virtio-blk-pci needs a disk image")
    size = parse_size(ram)
    args = [
        "-machine", machine,
        "-accel", "tcg",
        "-smp", "1",
        "-m", str(size // (1 << 20)) + "M" if size % (1 << 20) == 0 else str(size),
        "-object", f"memory-backend-file,id=mem0,size={size},share={'on' if mem_share else 'off'},mem-path={mem_path}",
        "-numa", "node,memdev=mem0",
        "-nodefaults", "-nographic", "-display", "none", "-serial", "none",
    ]
    if kernel is not None:
        args += ["-kernel", str(kernel)]
    for dev in DEVICE_NAMES:  # fixed order -> fixed PCI slots and section order
        if dev not in devices:
            continue
        if dev == "e1000":
            args += ["-device", "e1000,id=nic0,mac=52:54:00:12:34:56"]
        elif dev == "virtio-net-pci":
            args += ["-device", "virtio-net-pci,id=nic1,mac=52:54:00:12:34:57"]
        elif dev == "virtio-blk-pci":
            args += ["-drive", f"file={disk},format=raw,if=none,id=disk0",
                     "-device", "virtio-blk-pci,drive=disk0,id=blk0"]
        elif dev == "usb-ehci":
            args += ["-device", "usb-ehci,id=ehci"]
        elif dev == "usb-tablet":
            args += ["-device", "usb-tablet,bus=ehci.0,id=tablet0"]
        elif dev == "isa-serial":
            args += ["-chardev", "null,id=ser0", "-device", "isa-serial,chardev=ser0,id=serial0"]
    if paused:
        args.append("-S")
    if incoming:
        args += ["-incoming", "defer"]
    if qmp_socket is not None:
        args += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return args + list(extra)


class Qemu:
    """One QEMU process with QMP, as a context manager.

    Guest RAM is ``<workdir>/<name>.ram`` (or ``mem_path``), a
    memory-backend-file that the host can read while the guest runs.
    Without ``workdir`` a private temp dir is used and removed on close.
    The QMP socket lives in a short private temp dir (unix socket paths
    are limited to 107 bytes). stdout/stderr go to ``<workdir>/<name>.log``;
    errors quote its tail.
    """

    def __init__(
        self,
        *,
        machine: str = "pc",
        ram: str | int = "64M",
        kernel: str | os.PathLike[str] | None = None,
        mem_path: str | os.PathLike[str] | None = None,
        mem_share: bool = True,
        devices: Sequence[str] = (),
        disk: str | os.PathLike[str] | None = None,
        paused: bool = False,
        incoming: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        name: str = "qemu",
        extra: Sequence[str] = (),
        binary: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.binary = binary or qemu_binary()
        if self.binary is None:
            raise QemuError(f"{QEMU_NAME} not found")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qmigx-vm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ram_bytes = parse_size(ram)
        if mem_path is None:
            mem_path = self.workdir / f"{name}.ram"
            mem_path.unlink(missing_ok=True)  # never boot on a stale RAM image (or read its marker)
        self.mem_path = Path(mem_path)
        self.log_path = self.workdir / f"{name}.log"
        self.timeout = timeout
        self._sockdir = tempfile.mkdtemp(prefix="qmigx-qmp-")
        self.qmp_path = os.path.join(self._sockdir, "qmp.sock")
        self.args = qemu_args(
            machine=machine, ram=ram, mem_path=self.mem_path, mem_share=mem_share, kernel=kernel,
            devices=devices, disk=disk, paused=paused, incoming=incoming,
            qmp_socket=self.qmp_path, extra=extra,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(self.qmp_path, timeout=timeout)

    @property
    def argv(self) -> list[str]:
        return [str(self.binary)] + self.args

    # --- lifetime -------------------------------------------------------------
    def start(self) -> "Qemu":
        _refuse_unmarked()
        with open(self.log_path, "ab") as log:
            log.write(("$ " + shlex.join(self.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            self.qmp.connect(timeout=self.timeout, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except QMPError as e:
            self.kill()
            raise self._error(f"QEMU did not come up: {e}") from None
        return self

    def __enter__(self) -> "Qemu":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Quit politely if possible, then make sure the process is gone."""
        try:
            if self.proc is not None and self.proc.poll() is None and self.qmp.connected:
                try:
                    self.qmp.execute("quit", timeout=5)
                except QMPError:
                    pass
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.kill()
            self.qmp.close()
            shutil.rmtree(self._sockdir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def quit(self, timeout: float = 10.0) -> int | None:
        """Send ``quit`` and wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=timeout)
            except QMPError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.qmp.close()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, msg: str) -> QemuError:
        rc = self.proc.poll() if self.proc is not None else None
        state = "running" if rc is None else f"exited with {rc}"
        return QemuError(f"{self.name}: {msg} (QEMU {state}); log {self.log_path} ends with:\n{self.log_tail()}")

    # --- QMP wrappers -------------------------------------------------------------
    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """``execute`` that turns failures into :class:`QemuError` with the log tail."""
        try:
            return self.qmp.execute(command, timeout=timeout, **args)
        except QMPCommandError as e:
            raise self._error(str(e)) from None
        except QMPError as e:
            raise self._error(f"{command}: {e}") from None

    def set_capabilities(self, caps: Mapping[str, bool] | None = None, **kw: bool) -> None:
        """``migrate-set-capabilities``; names as in QAPI (``x-ignore-shared``) or with ``_``."""
        merged = {k.replace("_", "-"): bool(v) for k, v in {**(caps or {}), **kw}.items()}
        if merged:
            self.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": k, "state": v} for k, v in merged.items()])

    def set_parameters(self, params: Mapping[str, Any] | None = None, **kw: Any) -> None:
        merged = {k.replace("_", "-"): v for k, v in {**(params or {}), **kw}.items()}
        if merged:
            try:
                self.qmp.execute_raw("migrate-set-parameters", merged)
            except QMPError as e:
                raise self._error(str(e)) from None

    def query_migrate(self) -> dict[str, Any]:
        return self.cmd("query-migrate")

    def migrate(self, uri: str) -> None:
        self.cmd("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        self.cmd("migrate-incoming", uri=uri)

    def stop(self) -> None:
        self.cmd("stop")

    def cont(self) -> None:
        self.cmd("cont")

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def wait_migration(self, timeout: float = 120.0, *, poll: float = 0.05) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; returns that last answer.

        ``failed``/``cancelled`` raise with QEMU's ``error-desc``; so does a
        QEMU that exits (a destination exits when loading fails).
        """
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            if not self.alive:
                raise self._error(f"QEMU exited during migration (last status {info.get('status')})")
            try:
                info = self.qmp.execute("query-migrate", timeout=max(1.0, deadline - time.monotonic()))
            except QMPError as e:
                time.sleep(0.2)  # let the process finish dying so the log is complete
                raise self._error(f"migration did not complete: {e}") from None
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise self._error(f"migration {status}: {info.get('error-desc', 'no error-desc')}")
            if time.monotonic() > deadline:
                raise self._error(f"migration not completed after {timeout} s (status {status}): {info}")
            time.sleep(poll)

    # --- guest RAM ------------------------------------------------------------------
    def marker(self) -> Marker:
        return read_marker(self.mem_path)

    def wait_guest_ready(self, timeout: float = 60.0, *, min_counter: int = 0) -> Marker:
        """Wait until the guest wrote its marker (and the counter reached ``min_counter``)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise self._error("QEMU exited while waiting for the guest")
            try:
                m = self.marker()
            except (OSError, ValueError):
                m = None
            if m is not None and m.ready and m.counter >= min_counter:
                return m
            if time.monotonic() > deadline:
                raise self._error(f"guest not ready after {timeout} s: {m}")
            time.sleep(0.05)

    def read_ram(self) -> bytes:
        return self.mem_path.read_bytes()


# --- streams ------------------------------------------------------------------------


@dataclasses.dataclass
class StreamInfo:
    """How a stream was made: enough to start an identical destination."""

    name: str
    stream: str  # the migration stream file
    mem: str  # copy of the source's guest RAM (mem0) taken when the migration completed
    machine: str
    ram: str
    seed: int
    caps: dict[str, bool]
    params: dict[str, Any]
    devices: tuple[str, ...]
    live: bool
    kernel: str | None
    disk: str | None
    argv: list[str]
    stats: dict[str, Any]  # source query-migrate at completion
    seconds: float  # wall time to produce the stream (boot included)
    binary: str | None = None  # the QEMU that made it (None: the default QEMU 7.2)

    @property
    def ram_bytes(self) -> int:
        return parse_size(self.ram)

    @property
    def ignore_shared(self) -> bool:
        return bool(self.caps.get("x-ignore-shared"))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["devices"] = list(self.devices)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StreamInfo":
        d = json.loads(text)
        d["devices"] = tuple(d["devices"])
        return cls(**d)


class _SocketSink:
    """Accept one connection on a unix socket and write everything received to a file.

    Used as the outgoing URI instead of ``exec:cat > FILE``: on completion
    QEMU 7.2 closes the exec channel and SIGTERMs a child that has not
    exited yet, so a slow ``cat`` could lose the stream's tail (not seen
    in practice, but possible on a loaded host). Here the file is
    complete exactly when the peer's EOF has been read.
    """

    def __init__(self, path: str | os.PathLike[str], sockdir: str) -> None:
        self.path = Path(path)
        self.sock_path = os.path.join(sockdir, "out.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.sock_path)
        self._listener.listen(1)
        self._listener.settimeout(60)
        self.error: BaseException | None = None
        self.nbytes = 0
        self._thread = threading.Thread(target=self._run, name="qmigx-stream-sink", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"unix:{self.sock_path}"

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn, open(self.path, "wb") as out:
                conn.settimeout(300)
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    self.nbytes += len(chunk)
        except BaseException as e:  # reported by wait()
            self.error = e
        finally:
            self._listener.close()

    def wait(self, timeout: float = 60.0) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise QemuError(f"stream sink for {self.path} still receiving after {timeout} s")
        if self.error is not None:
            raise QemuError(f"stream sink for {self.path} failed: {self.error!r}")
        return self.nbytes

    def close(self) -> None:
        """Stop listening and let the receiver finish (QEMU closes its end when done)."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept(); close() alone does not
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self._thread.join(30)


class _ExecSink:
    """``exec:cat > FILE``, the classic way; the file is complete once the vmdesc trailer is."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)

    @property
    def uri(self) -> str:
        return "exec:cat > " + shlex.quote(str(self.path))

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while not _ends_with_vmdesc(self.path):
            if time.monotonic() > deadline:
                raise QemuError(f"{self.path} does not end with a vmdesc trailer {timeout} s after completion")
            time.sleep(0.05)
        return self.path.stat().st_size

    def close(self) -> None:
        pass


class _FileUri:
    """A URI QEMU writes the stream through itself (``file:PATH``): complete at completion."""

    def __init__(self, path: str | os.PathLike[str], uri: str) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.uri = uri

    def wait(self, timeout: float = 10.0) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        pass


def _ends_with_vmdesc(path: Path) -> bool:
    """True if the file ends with QEMU_VM_VMDESCRIPTION + be32 length + a complete JSON object."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - (4 << 20)))
            tail = f.read()
    except OSError:
        return False
    pos = max(tail.rfind(b'{"page_size"'), tail.rfind(b'{"configuration"'))  # 7.2 / 10.0 vmdesc
    if pos < 5 or tail[pos - 5] != 0x06:
        return False
    if int.from_bytes(tail[pos - 4:pos], "big") != len(tail) - pos:
        return False
    try:
        json.loads(tail[pos:])
    except ValueError:
        return False
    return True


def _make_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
        f.seek(0)
        f.write(b"qmigx test disk\n".ljust(512, b"\0"))
    return path


def save_stream(
    path: str | os.PathLike[str],
    *,
    machine: str = "pc",
    ram: str = "64M",
    seed: int = 0x5EED,
    caps: Mapping[str, bool] | None = None,
    params: Mapping[str, Any] | None = None,
    devices: Iterable[str] = (),
    live: bool = False,
    guest: bool = True,
    dirty: bool | None = None,
    name: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    min_syncs: int = 4,
    hold_bandwidth: int = 32 << 20,
    attempts: int = 4,
    transport: str = "unix",
    timeout: float = 120.0,
    binary: str | None = None,
    uri_of=None,
) -> StreamInfo:
    """Boot the test guest, migrate it into ``path`` and describe what was made.

    Paused (``live=False``): the guest is stopped once ready, then migrated.
    Live: the migration starts while the guest dirties memory; it is held
    back (``max-bandwidth`` = ``hold_bandwidth``, ``downtime-limit`` 0)
    until ``ram.dirty-sync-count`` reaches ``min_syncs`` (and, with xbzrle,
    until ``xbzrle-cache.pages`` > 0), then both limits are raised so it
    converges. ``caps``/``params`` are applied to the source before that.
    The returned :class:`StreamInfo` names a copy of guest RAM (``mem0``)
    taken after completion, when the source is stopped.

    ``transport="unix"`` (default) has the harness receive the stream on
    a unix socket; ``"exec"`` uses ``exec:cat > PATH``. Same bytes either
    way (the format does not depend on the transport), but the socket
    makes "the file is complete" exact: when QEMU 7.2 closes an exec
    channel it sends SIGTERM to a child that has not exited yet.
    A live migration that converges too early despite the holding back
    (ram.md §6) is retried up to ``attempts`` times.

    ``binary`` runs another QEMU (e.g. QEMU 10 through ``$QMIGX_QEMU10``);
    ``uri_of(path)``, if given, names the URI the source migrates to
    instead of the harness's socket (QEMU 10's ``file:`` URI, which
    mapped-ram needs: QEMU then writes the file itself).
    """
    if transport not in ("unix", "exec"):
        raise ValueError(f"transport must be 'unix' or 'exec', not {transport!r}")
    path = Path(path)
    name = name or path.stem
    workdir = Path(workdir) if workdir is not None else path.parent
    workdir.mkdir(parents=True, exist_ok=True)
    caps = {k.replace("_", "-"): bool(v) for k, v in (caps or {}).items()}
    params = {k.replace("_", "-"): v for k, v in (params or {}).items()}
    devices = tuple(d for d in DEVICE_NAMES if d in set(devices))
    ram_bytes = parse_size(ram)
    if dirty is None:
        dirty = live
    t0 = time.monotonic()

    kernel = None
    if guest:
        kernel = workdir / f"{name}.guest"
        kernel.write_bytes(build_guest(seed, ram_bytes, dirty=dirty))
    disk = _make_disk(workdir / f"{name}.disk") if "virtio-blk-pci" in devices else None
    mem_live = workdir / f"{name}.ram"
    mem_copy = workdir / f"{name}.mem"
    for attempt in range(attempts if live else 1):
        try:
            stats, argv = _save_once(
                path, mem_live, mem_copy, machine=machine, ram=ram, kernel=kernel, devices=devices,
                disk=disk, workdir=workdir, name=name, caps=caps, params=params, live=live,
                dirty=dirty and guest, guest=guest, min_syncs=min_syncs, hold_bandwidth=hold_bandwidth,
                transport=transport, timeout=timeout, binary=binary, uri_of=uri_of,
            )
            break
        except _EarlyCompletion as e:
            if attempt == attempts - 1:
                raise QemuError(f"{name}: {e} in each of {attempts} attempts") from None
    return StreamInfo(
        name=name, stream=str(path), mem=str(mem_copy), machine=machine, ram=ram, seed=seed,
        caps=caps, params=params, devices=devices, live=live,
        kernel=str(kernel) if kernel else None, disk=str(disk) if disk else None,
        argv=argv, stats=stats, seconds=round(time.monotonic() - t0, 3), binary=binary,
    )


def _save_once(
    path: Path, mem_live: Path, mem_copy: Path, *, machine: str, ram: str, kernel: Path | None,
    devices: tuple[str, ...], disk: Path | None, workdir: Path, name: str, caps: dict[str, bool],
    params: dict[str, Any], live: bool, dirty: bool, guest: bool, min_syncs: int, hold_bandwidth: int,
    transport: str, timeout: float, binary: str | None = None, uri_of=None,
) -> tuple[dict[str, Any], list[str]]:
    if mem_live.exists():
        mem_live.unlink()
    sockdir = tempfile.mkdtemp(prefix="qmigx-sink-")
    try:
        with Qemu(machine=machine, ram=ram, kernel=kernel, mem_path=mem_live, devices=devices, disk=disk,
                  workdir=workdir, name=f"{name}.src", timeout=30, binary=binary) as vm:
            if guest:
                vm.wait_guest_ready(timeout=60, min_counter=1000 if dirty else 0)
            vm.set_capabilities(caps)
            vm.set_parameters(params)
            sink: _SocketSink | _ExecSink | _FileUri
            if uri_of is not None:
                sink = _FileUri(path, uri_of(path))
            elif transport == "unix":
                sink = _SocketSink(path, sockdir)
            else:
                sink = _ExecSink(path)
            try:
                if not live:
                    vm.stop()
                    vm.migrate(sink.uri)
                    stats = vm.wait_migration(timeout)
                else:
                    final_bw = params.get("max-bandwidth", 1 << 30)
                    final_dt = params.get("downtime-limit", 2000)
                    vm.set_parameters({"max-bandwidth": hold_bandwidth, "downtime-limit": 1})
                    vm.migrate(sink.uri)
                    _hold_until(vm, min_syncs=min_syncs, want_xbzrle=caps.get("xbzrle", False),
                                tail_bandwidth=3_500_000, slow_bandwidth=512 << 10, xbzrle_bandwidth=32 << 10,
                                timeout=timeout)
                    vm.set_parameters({"max-bandwidth": max(final_bw, hold_bandwidth), "downtime-limit": final_dt})
                    stats = vm.wait_migration(timeout)
                sink.wait()
            finally:
                sink.close()
            if vm.status() not in ("postmigrate", "paused"):
                raise vm._error(f"source not stopped after migration: {vm.status()}")
            shutil.copyfile(mem_live, mem_copy)
            argv = vm.argv
            vm.quit()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if mem_live.exists():
            mem_live.unlink()
    return stats, argv


def _hold_until(
    vm: Qemu, *, min_syncs: int, want_xbzrle: bool, tail_bandwidth: int, slow_bandwidth: int,
    xbzrle_bandwidth: int, timeout: float,
) -> dict[str, Any]:
    """Keep a live migration iterating until enough dirty syncs happened.

    QEMU 7.2 syncs the dirty log only when the remaining dirty bytes fall
    below ``threshold = measured bandwidth x downtime-limit`` and completes
    when they are still below it after the sync (ram.md §6). With
    ``downtime-limit`` 1 ms the threshold is below one page once the
    measured bandwidth is under 4 MB/s, so the migration goes on as long
    as the guest dirtied anything since the last sync -- but a round that
    fits in one rate-limit window ends microseconds after it started, and
    on a loaded host the vCPU may not have run in between. So the speeds
    are chosen to make every round outlast a 100 ms window:

    * first pass: the caller's bandwidth (fast), its last few MiB at
      ``tail_bandwidth`` (< 4 MB/s, so the windows measured there give a
      sub-page threshold);
    * after the first pass (dirty-sync-count 2): ``slow_bandwidth``, well
      below the ~260 KB of full pages the guest dirties per window;
    * with XBZRLE, once its cache was filled (sync 3): ``xbzrle_bandwidth``,
      below the ~10 KB of deltas those pages then cost.
    """
    deadline = time.monotonic() + timeout
    speed = 0
    while True:
        info = vm.query_migrate()
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise vm._error(f"migration {status}: {info.get('error-desc')}")
        ram_info = info.get("ram", {})
        syncs = ram_info.get("dirty-sync-count", 0)
        xbz = info.get("xbzrle-cache", {}).get("pages", 0)
        xbz_bytes = info.get("xbzrle-cache", {}).get("bytes", 0)
        if status == "completed":
            raise _EarlyCompletion(f"live migration completed after {syncs} dirty syncs (wanted {min_syncs})")
        if status == "active":
            if speed == 0 and ram_info.get("remaining", 1 << 62) < (6 << 20):
                vm.set_parameters({"max-bandwidth": tail_bandwidth})
                speed = 1
            if speed < 2 and syncs >= 2:
                vm.set_parameters({"max-bandwidth": slow_bandwidth})
                speed = 2
            if speed < 3 and want_xbzrle and syncs >= 3:
                vm.set_parameters({"max-bandwidth": xbzrle_bandwidth})
                speed = 3
        if syncs >= min_syncs and (not want_xbzrle or (xbz > 0 and xbz_bytes > 0)):
            return info
        if time.monotonic() > deadline:
            raise vm._error(f"live migration: still {syncs} dirty syncs / {xbz} xbzrle pages after {timeout} s")
        time.sleep(0.01)


class _EarlyCompletion(Exception):
    pass


def load_stream(
    path: str | os.PathLike[str],
    *,
    like: StreamInfo,
    caps: Mapping[str, bool] | None = None,
    mem_path: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    binary: str | None = None,
    uri: str | None = None,
    resave: str | os.PathLike[str] | None = None,
) -> bytes:
    """Load ``path`` into a fresh QEMU configured like ``like``'s source; return its RAM.

    The QEMU is ``binary``, else the one that made ``like`` (QEMU 7.2 by
    default); ``uri`` replaces ``exec:cat PATH`` (e.g. QEMU 10's ``file:``).
    ``resave`` migrates the loaded (never run) VM into that file before it
    quits, so its device state can be compared with the stream's.

    The destination runs with ``-S -incoming defer`` (so the loaded guest
    never runs and RAM stays exactly as received) and its RAM on a new
    memory-backend-file. Capabilities: ``x-ignore-shared`` and ``compress``
    are enabled when the source used them, plus whatever ``caps`` says
    (e.g. ``{"compress": True}`` for a stream re-encoded with compressed
    pages). With x-ignore-shared the source never sends ``mem0``, so, as
    in ram.md §8, the destination maps a copy of the source's RAM file
    (``share=on``, so it is ignored there too and the GPA check runs).
    Raises :class:`QemuError` (with QEMU's log) if loading fails.
    """
    dest_caps = {k: True for k in ("x-ignore-shared", "compress", "mapped-ram") if like.caps.get(k)}
    dest_caps.update({k.replace("_", "-"): bool(v) for k, v in (caps or {}).items()})
    if qemu_version(binary or like.binary) >= (8, 2):
        dest_caps.pop("compress", None)  # gone from QEMU 10 (qemu10.md §7.1)
    own = workdir is None
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qmigx-dst-"))
    wd.mkdir(parents=True, exist_ok=True)
    try:
        if mem_path is None:
            mem_path = wd / "dst.ram"
            if dest_caps.get("x-ignore-shared"):
                shutil.copyfile(like.mem, mem_path)
        disk = None
        if like.disk:
            disk = wd / "dst.disk"
            shutil.copyfile(like.disk, disk)
        with Qemu(machine=like.machine, ram=like.ram, kernel=like.kernel, mem_path=mem_path,
                  devices=like.devices, disk=disk, paused=True, incoming=True, workdir=wd,
                  name="dst", binary=binary or like.binary) as vm:
            vm.set_capabilities(dest_caps)
            vm.migrate_incoming(uri or "exec:cat " + shlex.quote(str(path)))
            vm.wait_migration(timeout)
            data = Path(mem_path).read_bytes()
            if resave is not None:
                sockdir = tempfile.mkdtemp(prefix="qmigx-resave-")
                try:
                    sink = _SocketSink(resave, sockdir)
                    try:
                        vm.migrate(sink.uri)
                        vm.wait_migration(timeout)
                        sink.wait()
                    finally:
                        sink.close()
                finally:
                    shutil.rmtree(sockdir, ignore_errors=True)
            vm.quit()
        return data
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
