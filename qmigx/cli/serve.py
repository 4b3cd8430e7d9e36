"""``qmigx serve``: a VM that speaks QMP, for orchestrators written for QEMU.

Starts a :class:`~qmigx.qmp.Machine` (a synthetic guest with ``--ram``,
a saved state with ``--load``, or an empty destination with
``--incoming``) behind a :class:`~qmigx.qmp.QMPServer` and serves until
``quit`` (exit 0), SIGINT/SIGTERM (exit 0) or a failed incoming load
(exit 1, as QEMU exits). Options follow QEMU's where QEMU has one:
``--qmp`` takes ``-qmp``'s ``unix:PATH`` / ``tcp:HOST:PORT`` (with
``,server=on,wait=off`` accepted), ``-S`` leaves the guest paused,
``--incoming defer`` waits for ``migrate-incoming``.

Once listening it prints one line, ``qmigx: QMP listening on ADDRESS``, to
stderr (the bound port for ``tcp:...:0``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["add_serve_parser", "build_parser", "cmd_serve", "main"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                   help="where to listen for QMP clients (several may connect at once)")
    p.add_argument("--ram", metavar="SIZE",
                   help="a synthetic guest with SIZE of RAM (e.g. 64M); with --incoming, "
                        "the destination's RAM layout")
    p.add_argument("--dirty-rate", type=int, default=0, metavar="PAGES_PER_S",
                   help="pages per second a vCPU thread dirties while the guest runs")
    p.add_argument("--load", metavar="FILE", help="the guest is this saved migration stream")
    p.add_argument("--incoming", metavar="defer|URI",
                   help="wait for an incoming migration (defer: until migrate-incoming)")
    p.add_argument("-S", "--paused", action="store_true",
                   help="do not start the guest (QEMU's -S)")
    p.add_argument("--drive", metavar="NAME=PATH", action="append", default=[],
                   help="a raw disk image of the VM (QEMU's -drive id=NAME,file=PATH): sent by "
                        "block migration (migrate with blk, or capability block), or written "
                        "by an incoming one; repeatable")
    p.add_argument("--cap", metavar="NAME=on|off", action="append", default=[],
                   help="set a migration capability at start, repeatable")
    p.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                   help="set a migration parameter at start, repeatable")
    p.add_argument("--qemu-version", choices=["7.2", "10.0"], default="7.2",
                   help="answer as this QEMU: its greeting, commands, capabilities, "
                        "parameters, errors and replies (default 7.2)")
    p.add_argument("--machine", metavar="TYPE",
                   help="the machine type of a synthetic guest (default pc-i440fx-<version>); "
                        "an outgoing migration follows its conventions (a --load file "
                        "keeps its own)")
    p.add_argument("--object", metavar="TYPE,id=ID,...", action="append", default=[],
                   help="create an object as QEMU's -object does (TLS credentials, authz), "
                        "repeatable")
    p.set_defaults(func=cmd_serve)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on ``qmigx``'s subcommand parsers."""
    p = subparsers.add_parser("serve", help="serve a VM over QMP, drivable as QEMU 7.2 "
                              "(or 10.0) is")
    _arguments(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmigx serve", description=(
        "Serve a VM over QMP, migratable with QEMU 7.2's commands."))
    _arguments(p)
    return p


def _machine(args):
    from qmigx.cli.demo import parse_size
    from qmigx.errors import ParameterError
    from qmigx.cli.live import settings_from_args
    from qmigx.qmp import Machine

    if args.load and args.incoming:
        raise ParameterError("--load and --incoming exclude each other", field="load")
    if not (args.ram or args.load or args.incoming):
        raise ParameterError("give the VM a guest: --ram SIZE, --load FILE or --incoming",
                             field="ram")
    if args.dirty_rate < 0:
        raise ParameterError("--dirty-rate must not be negative", field="dirty-rate")
    loaded = None
    if args.load:
        from qmigx.tools.streams import load_stream

        loaded = load_stream(args.load, create_missing=True)
    m = Machine(ram_bytes=parse_size(args.ram) if args.ram else None,
                dirty_rate=args.dirty_rate, load=loaded, incoming=args.incoming,
                paused=args.paused, drives=args.drive, qemu_version=args.qemu_version,
                machine_type=args.machine)
    for text in args.object:
        m.objects.add_option(text)
    if args.cap or args.param:
        caps, params = settings_from_args(args.cap, args.param, incoming=bool(args.incoming),
                                          qemu_version=args.qemu_version,
                                          defaults={"zero-page-detection":
                                                    m.params.get("zero-page-detection")})
        m.caps.set_many([(k, v) for k, v in caps.as_dict().items() if v],
                        incoming=bool(args.incoming))
        changed = {k: v for k, v in params.as_dict().items() if v != m.params.get(k)}
        if changed:
            m.params.set(changed)
    return m


def cmd_serve(args) -> int:
    from qmigx.qmp import QMPServer

    server = QMPServer(_machine(args), args.qmp)

    def ready(bound: str) -> None:
        print(f"qmigx: QMP listening on {bound}", file=sys.stderr, flush=True)

    return server.run(ready)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``qmigx serve`` on its own (``python -m qmigx.cli.serve ...``)."""
    from qmigx.errors import MigrationError, one_line

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MigrationError, OSError) as exc:
        print(f"qmigx: error: {one_line(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
