"""QMP for qmigx: a served VM that orchestrators drive as they drive QEMU 7.2.

Tools written for QEMU (libvirt, KubeVirt, scripts using the ``qemu.qmp``
package) talk to a migration peer over QMP. ``qmigx serve`` puts qmigx's
migration engine behind that same protocol, so those tools can migrate
to, from and between qmigx instances with no code changes:

* :mod:`.protocol` -- QEMU's JSON lexer/streamer/parser and writer, error replies;
* :mod:`.commands` -- the commands, their argument checks and :func:`dispatch`;
* :mod:`.machine`  -- :class:`Machine`: runstates, guest stand-in, migrations;
* :mod:`.server`   -- :class:`QMPServer`: sockets, greeting, sessions, events.
"""

from __future__ import annotations

from qmigx.qmp.commands import COMMANDS, PACKAGE, QEMU_VERSION, Session, dispatch
from qmigx.qmp.machine import GuestImage, Machine
from qmigx.qmp.protocol import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    JSONStreamer,
    QMPError,
    dumps,
    encode_message,
    parse_json,
)
from qmigx.qmp.server import QMPServer, greeting, parse_address

__all__ = [
    "COMMANDS",
    "COMMAND_NOT_FOUND",
    "GENERIC_ERROR",
    "PACKAGE",
    "QEMU_VERSION",
    "GuestImage",
    "JSONStreamer",
    "Machine",
    "QMPError",
    "QMPServer",
    "Session",
    "dispatch",
    "dumps",
    "encode_message",
    "greeting",
    "parse_address",
    "parse_json",
]
