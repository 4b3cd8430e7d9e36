"""QMP commands of a served VM: QEMU 7.2's or 10.0's names, arguments, checks and texts.

Requests are checked in QEMU's order, so the first problem reported is
the one QEMU reports: the request object itself (``QMP input ...``), the
command name (``CommandNotFound``), out-of-band use, then the arguments
the way QEMU's input visitor walks them (each member in schema order:
missing, wrong type, bad enum value; then members that should not be
there), and only then the command's own checks. Before capabilities
negotiation only ``qmp_capabilities`` exists, and a ``CommandNotFound``
then says so.

:func:`dispatch` turns one parsed request into one reply dict; the
server writes it. Command implementations live on
:class:`~qmigx.qmp.machine.Machine`.

A machine speaks one QEMU version (``Machine.qemu_version``), and so do
its commands (:func:`commands_for`): QEMU 10.0's ``migrate`` takes a
``uri`` **or** ``channels`` and has no ``blk``/``inc``, its
``migrate-incoming`` takes ``channels`` and ``exit-on-error``, and
``query-migrationthreads`` exists (qemu10.md §7.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from qmigx.control._qdict import qdict
from qmigx.control.capabilities import _parse_changes
from qmigx.control.states import MigrationStatus
from qmigx.errors import MigrationError
from qmigx.qmp.protocol import (
    COMMAND_NOT_FOUND,
    QMPError,
    error_response,
    return_response,
)

__all__ = ["Arg", "Command", "Session", "COMMANDS", "QMP_CAPABILITIES", "dispatch",
           "version_info", "QEMU_VERSION", "QEMU_VERSIONS", "PACKAGE", "commands_for",
           "channel_uri"]

#: The QEMU version a served VM claims by default (the QMP dialect it speaks).
QEMU_VERSION = (7, 2, 0)
#: Every version a served VM can claim (``qmigx serve --qemu-version``).
QEMU_VERSIONS = {"7.2": (7, 2, 0), "10.0": (10, 0, 0)}


def _package() -> str:
    from qmigx._version import __version__

    return f"qmigx {__version__}"


PACKAGE = _package()

#: QMP protocol capabilities offered in the greeting (QAPI ``QMPCapability``).
QMP_CAPABILITIES = ("oob",)

_NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


class Session:
    """One client connection's protocol state."""

    def __init__(self) -> None:
        self.negotiated = False
        self.oob = False


@dataclass(frozen=True)
class Arg:
    """One member of a command's arguments.

    ``kind``: ``str``, ``bool``, ``enum`` (string from ``values``),
    ``enum-list`` (array of those), ``capabilities`` (QEMU's
    ``MigrationCapabilityStatus`` array), ``channels`` (QEMU 10's
    ``MigrationChannel`` array).
    """

    name: str
    kind: str
    required: bool = True
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A command: its handler ``fn(ctx, args) -> result`` and argument schema.

    ``args`` None passes the arguments through unvisited (the handler
    checks them, e.g. ``migrate-set-parameters`` via
    :class:`~qmigx.control.Parameters`).
    """

    name: str
    fn: Callable[[Any, dict], Any]
    args: Optional[tuple[Arg, ...]] = ()
    allow_oob: bool = False


def _type_error(path: str, what: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{path}', expected: {what}", field=path)


def _visit_enum(value: Any, path: str, name_in_error: str, values: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _type_error(path, "string")
    if value not in values:
        raise QMPError(f"Parameter '{name_in_error}' does not accept value '{value}'", field=path)
    return value


def visit_args(args: dict, schema: tuple[Arg, ...], *,
               capabilities: frozenset = frozenset()) -> dict:
    """QEMU's input visitor on a command's arguments: checked values by name.

    ``capabilities``: the capability names the machine's QEMU version has.
    """
    out: dict[str, Any] = {}
    for arg in schema:
        if arg.name not in args:
            if arg.required:
                raise QMPError(f"Parameter '{arg.name}' is missing", field=arg.name)
            continue
        value = args[arg.name]
        if arg.kind == "str":
            if not isinstance(value, str):
                raise _type_error(arg.name, "string")
        elif arg.kind == "bool":
            if not isinstance(value, bool):
                raise _type_error(arg.name, "boolean")
        elif arg.kind == "enum":
            _visit_enum(value, arg.name, arg.name, arg.values)
        elif arg.kind == "enum-list":
            if not isinstance(value, list):
                raise _type_error(arg.name, "array")
            # QEMU names list elements 'null' in enum value errors (sic)
            value = [_visit_enum(v, f"{arg.name}[{i}]", "null", arg.values)
                     for i, v in enumerate(value)]
        elif arg.kind == "capabilities":
            if not isinstance(value, list):
                raise _type_error(arg.name, "array")
            try:
                _parse_changes(value, capabilities) if capabilities else _parse_changes(value)
            except MigrationError as exc:
                raise QMPError(exc.message, field=arg.name) from None
        elif arg.kind == "channels":
            value = _visit_channels(value)
        else:  # pragma: no cover - schema bug
            raise AssertionError(arg.kind)
        out[arg.name] = value
    known = {a.name for a in schema}
    for key in args:
        if key not in known:
            raise QMPError(f"Parameter '{key}' is unexpected", field=key)
    return out


def check_request(req: Any, allow_oob: bool) -> tuple[str, dict, bool]:
    """QEMU's checks of the request object: (command name, arguments, out-of-band)."""
    if not isinstance(req, dict):
        raise QMPError("QMP input must be a JSON object")
    exec_key = None
    for key, value in req.items():
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise QMPError("QMP input member 'execute' clashes with 'exec-oob'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise QMPError("QMP input lacks member 'execute'")
    return req[exec_key], req.get("arguments", {}), exec_key == "exec-oob"


# --- QEMU 10's MigrationChannel ----------------------------------------------------

#: MigrationAddress members by transport: (name, kind, required) in schema order
_ADDRESS = {
    "socket": None,  # a SocketAddress: its own union, by "type"
    "exec": (("args", "str-list", True),),
    "rdma": (("host", "str", True), ("port", "str", True)),
    "file": (("filename", "str", True), ("offset", "size", True)),
}
_SOCKET = {
    "inet": (("host", "str", True), ("port", "str", True)),
    "unix": (("path", "str", True),),
    "vsock": (("cid", "str", True), ("port", "str", True)),
    "fd": (("str", "str", True),),
}


def _visit_members(obj: dict, path: str, members: tuple, skip: tuple[str, ...]) -> dict:
    out = {}
    for name, kind, required in members:
        sub = f"{path}.{name}"
        if name not in obj:
            if required:
                raise QMPError(f"Parameter '{sub}' is missing", field=sub)
            continue
        v = obj[name]
        if kind == "str" and not isinstance(v, str):
            raise _type_error(sub, "string")
        if kind == "size" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _type_error(sub, "size")
        if kind == "str-list":
            if not isinstance(v, list):
                raise _type_error(sub, "array")
            for i, x in enumerate(v):
                if not isinstance(x, str):
                    raise _type_error(f"{sub}[{i}]", "string")
        out[name] = v
    known = {m[0] for m in members} | set(skip)
    for key in obj:
        if key not in known:
            raise QMPError(f"Parameter '{path}.{key}' is unexpected", field=f"{path}.{key}")
    return out


def _visit_channels(value: Any) -> list:
    """QEMU 10's ``channels`` argument: a list of ``{"channel-type", "addr"}``."""
    if not isinstance(value, list):
        raise _type_error("channels", "array")
    out = []
    for i, ch in enumerate(value):
        path = f"channels[{i}]"
        if not isinstance(ch, dict):
            raise _type_error(path, "object")
        if "channel-type" not in ch:
            raise QMPError(f"Parameter '{path}.channel-type' is missing", field=path)
        ctype = _visit_enum(ch["channel-type"], f"{path}.channel-type", "channel-type",
                            ("main", "cpr"))
        if "addr" not in ch:
            raise QMPError(f"Parameter '{path}.addr' is missing", field=f"{path}.addr")
        addr = ch["addr"]
        apath = f"{path}.addr"
        if not isinstance(addr, dict):
            raise _type_error(apath, "object")
        if "transport" not in addr:
            raise QMPError(f"Parameter '{apath}.transport' is missing", field=apath)
        transport = _visit_enum(addr["transport"], f"{apath}.transport", "transport",
                                tuple(_ADDRESS))
        if transport == "socket":
            if "type" not in addr:
                raise QMPError(f"Parameter '{apath}.type' is missing", field=apath)
            stype = _visit_enum(addr["type"], f"{apath}.type", "type", tuple(_SOCKET))
            fields = _visit_members(addr, apath, _SOCKET[stype], ("transport", "type"))
            fields["type"] = stype
        else:
            fields = _visit_members(addr, apath, _ADDRESS[transport], ("transport",))
        for key in ch:
            if key not in ("channel-type", "addr"):
                raise QMPError(f"Parameter '{path}.{key}' is unexpected", field=f"{path}.{key}")
        out.append({"channel-type": ctype, "addr": {"transport": transport, **fields}})
    return out


def channel_uri(args: dict) -> str:
    """The migration URI of a command's ``uri`` or ``channels`` (QEMU 10's rules and texts).

    ``exec``'s argument list becomes a shell command line (qmigx runs
    ``exec:`` through ``/bin/sh -c``; QEMU 10 runs the list without a
    shell and without searching ``PATH``).
    """
    import shlex

    uri = args.get("uri")
    channels = args.get("channels") or []
    if (uri is None) == (not channels):
        raise QMPError("need either 'uri' or 'channels' argument")
    if uri is not None:
        return uri
    mains = [c for c in channels if c["channel-type"] == "main"]
    if len(mains) > 1:
        raise QMPError("Channel list has more than one main entry")
    if not mains:
        # QEMU 10.0.2 crashes here (a cpr channel alone); refuse instead
        raise QMPError("Channel list has no main entry")
    a = mains[0]["addr"]
    t = a["transport"]
    if t == "file":
        return f"file:{a['filename']}" + (f",offset={a['offset']}" if a["offset"] else "")
    if t == "exec":
        return "exec:" + shlex.join(a["args"])
    if t == "rdma":
        return f"rdma:{a['host']}:{a['port']}"
    st = a["type"]
    if st == "inet":
        host = a["host"]
        return f"tcp:[{host}]:{a['port']}" if ":" in host else f"tcp:{host}:{a['port']}"
    if st == "unix":
        return f"unix:{a['path']}"
    if st == "vsock":
        return f"vsock:{a['cid']}:{a['port']}"
    return f"fd:{a['str']}"


# --- the commands ----------------------------------------------------------------


class Context:
    """What a handler may touch: the machine, the client's session, the server."""

    def __init__(self, machine, session: Session, server=None) -> None:
        self.machine = machine
        self.session = session
        self.server = server


def version_info(version: str = "7.2") -> dict:
    major, minor, micro = QEMU_VERSIONS[version]
    return qdict({"qemu": qdict({"major": major, "minor": minor, "micro": micro}),
                  "package": PACKAGE})


def _version(ctx: "Context") -> str:
    return getattr(ctx.machine, "qemu_version", "7.2")


def _qmp_capabilities(ctx: Context, args: dict) -> None:
    if ctx.session.negotiated:
        raise QMPError("Capabilities negotiation is already complete, command ignored",
                       COMMAND_NOT_FOUND)
    ctx.session.oob = "oob" in args.get("enable", ())
    ctx.session.negotiated = True


def _query_commands(ctx: Context, args: dict) -> list:
    return [{"name": name} for name in commands_for(_version(ctx))]


def _quit(ctx: Context, args: dict) -> None:
    ctx.machine.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    if ctx.server is not None:
        ctx.server.request_quit(0)


def _migrate(ctx: Context, args: dict) -> None:
    ctx.machine.migrate(args["uri"], blk=args.get("blk", False), inc=args.get("inc", False),
                        resume=args.get("resume", False))


def _migrate10(ctx: Context, args: dict) -> None:
    ctx.machine.migrate(channel_uri(args), resume=args.get("resume", False))


def _migrate_incoming10(ctx: Context, args: dict) -> None:
    ctx.machine.migrate_incoming(channel_uri(args),
                                 exit_on_error=args.get("exit-on-error", True))


def _object_add(ctx: Context, args: dict) -> None:
    ctx.machine.objects.add(args)


def _qom_list_types(ctx: Context, args: dict) -> list:
    return [qdict(t) for t in ctx.machine.objects.list_types(args.get("implements"),
                                                            bool(args.get("abstract", False)))]


def _migrate_pause(ctx: Context, args: dict) -> None:
    if ctx.machine.migrate_pause():
        return
    if _version(ctx) == "10.0":
        raise QMPError("migrate-pause is currently only supported during postcopy-active or "
                       "postcopy-recover state")
    raise QMPError("migrate-pause is currently only supported during postcopy-active state")


def _migrate_recover(ctx: Context, args: dict) -> None:
    ctx.machine.migrate_recover(args["uri"])


_STATES = tuple(s.value for s in MigrationStatus)

_TABLE = (
    Command("qmp_capabilities", _qmp_capabilities,
            (Arg("enable", "enum-list", False, QMP_CAPABILITIES),), allow_oob=False),
    Command("query-commands", _query_commands),
    Command("query-version", lambda ctx, a: version_info(_version(ctx))),
    Command("query-status", lambda ctx, a: ctx.machine.query_status()),
    Command("stop", lambda ctx, a: ctx.machine.stop()),
    Command("cont", lambda ctx, a: ctx.machine.cont()),
    Command("quit", _quit),
    Command("migrate", _migrate, (Arg("uri", "str"), Arg("blk", "bool", False),
                                  Arg("inc", "bool", False), Arg("detach", "bool", False),
                                  Arg("resume", "bool", False))),
    Command("migrate-incoming", lambda ctx, a: ctx.machine.migrate_incoming(a["uri"]),
            (Arg("uri", "str"),)),
    Command("migrate_cancel", lambda ctx, a: ctx.machine.migrate_cancel()),
    Command("migrate-continue", lambda ctx, a: ctx.machine.migrate_continue(a["state"]),
            (Arg("state", "enum", True, _STATES),)),
    Command("migrate-start-postcopy", lambda ctx, a: ctx.machine.start_postcopy()),
    Command("migrate-pause", _migrate_pause, allow_oob=True),
    Command("migrate-recover", _migrate_recover, (Arg("uri", "str"),), allow_oob=True),
    Command("migrate-set-capabilities",
            lambda ctx, a: ctx.machine.set_capabilities(a["capabilities"]),
            (Arg("capabilities", "capabilities"),)),
    Command("query-migrate-capabilities", lambda ctx, a: ctx.machine.caps.as_qmp()),
    Command("migrate-set-parameters", lambda ctx, a: ctx.machine.set_parameters(a), None),
    Command("query-migrate-parameters", lambda ctx, a: ctx.machine.params.as_qmp()),
    Command("query-migrate", lambda ctx, a: ctx.machine.query_migrate()),
    # COLO (block replication and network comparison are not emulated: their
    # commands and object types are not found, as in a QEMU built without them)
    Command("x-colo-lost-heartbeat", lambda ctx, a: ctx.machine.colo_lost_heartbeat()),
    Command("query-colo-status", lambda ctx, a: ctx.machine.query_colo_status()),
    # qmigx extension: COLO's checkpoints so far (count, dirty pages, pause)
    Command("x-query-qmigx-colo", lambda ctx, a: ctx.machine.colo_checkpoints()),
    # objects (the arguments of object-add depend on qom-type: the object root checks them)
    Command("object-add", _object_add, None),
    Command("object-del", lambda ctx, a: ctx.machine.objects.delete(a["id"]), (Arg("id", "str"),)),
    Command("qom-list-types", _qom_list_types, (Arg("implements", "str", False),
                                                Arg("abstract", "bool", False))),
    # qmigx extension (QEMU's x- prefix): digests of guest RAM, to compare two machines
    Command("x-query-qmigx-ram", lambda ctx, a: ctx.machine.ram_digest()),
)

#: Every command by name (QEMU 7.2's).
COMMANDS: dict[str, Command] = {c.name: c for c in _TABLE}

_COMMANDS_10 = dict(COMMANDS)
_COMMANDS_10["migrate"] = Command("migrate", _migrate10, (
    Arg("uri", "str", False), Arg("channels", "channels", False), Arg("detach", "bool", False),
    Arg("resume", "bool", False)))
_COMMANDS_10["migrate-incoming"] = Command("migrate-incoming", _migrate_incoming10, (
    Arg("uri", "str", False), Arg("channels", "channels", False),
    Arg("exit-on-error", "bool", False)))
_COMMANDS_10["query-migrationthreads"] = Command("query-migrationthreads", lambda ctx, a: [])


def commands_for(version: str) -> dict[str, Command]:
    """The commands of a QEMU version, by name."""
    return _COMMANDS_10 if version == "10.0" else COMMANDS

_MISSING = object()


def dispatch(req: Any, ctx: Context) -> dict:
    """The reply to one parsed request (``id`` echoed when the request had one)."""
    rid = req.get("id", _MISSING) if isinstance(req, dict) else _MISSING
    idkw = {} if rid is _MISSING else {"id": rid}
    negotiated = ctx.session.negotiated
    try:
        name, args, oob = check_request(req, ctx.session.oob)
        cmd = commands_for(_version(ctx)).get(name)
        if cmd is None or (not negotiated and name != "qmp_capabilities"):
            raise QMPError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        if oob and not cmd.allow_oob:
            raise QMPError(f"The command {name} does not support OOB")
        caps = getattr(getattr(ctx.machine, "caps", None), "_names", frozenset())
        checked = args if cmd.args is None else visit_args(args, cmd.args, capabilities=caps)
        result = cmd.fn(ctx, checked)
        rsp = return_response({} if result is None else result, **idkw)
    except QMPError as exc:
        desc, cls = exc.desc, exc.error_class
        if not negotiated and cls == COMMAND_NOT_FOUND:
            desc = _NEGOTIATION_DESC
        rsp = error_response(desc, cls, **idkw)
    except MigrationError as exc:  # the engine's refusals carry QEMU's texts
        rsp = error_response(exc.message, **idkw)
    except Exception as exc:  # noqa: BLE001 - a bug must not take the monitor down
        rsp = error_response(f"internal error: {type(exc).__name__}: {exc}", **idkw)
    return rsp
