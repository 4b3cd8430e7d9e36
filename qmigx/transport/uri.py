"""Migration URIs (QEMU's migration.c / socket.c address parsing, control.md §7).

:func:`parse_uri` turns ``tcp:``, ``unix:``, ``vsock:``, ``exec:``,
``fd:`` and ``file:`` URIs into a :class:`MigrationURI`; bad URIs raise
:class:`~qmigx.errors.ParameterError` with QEMU's texts. ``file:PATH`` and
``file:PATH,offset=N`` are QEMU 10's (qemu10.md §5.1); QEMU 4.1 and 7.2
have no ``file:`` (use ``exec:cat > FILE`` / ``exec:cat FILE`` with them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from qmigx.errors import ParameterError, TransportNotSupported

__all__ = ["MigrationURI", "parse_uri", "OUT_ERROR", "MULTI_ERROR", "RDMA_NOT_SUPPORTED"]

OUT_ERROR = "Parameter 'uri' expects a valid migration protocol"
MULTI_ERROR = "multifd is not supported by current protocol"
#: what qmigx adds to QEMU's text (that of a QEMU built without RDMA) for ``rdma:`` URIs
RDMA_NOT_SUPPORTED = "RDMA transport is not supported by qmigx (it needs an RDMA device and rdma-core)"


@dataclass(frozen=True)
class MigrationURI:
    """A parsed migration URI.

    ``scheme`` is ``tcp``, ``unix``, ``vsock``, ``exec``, ``fd`` or ``file``;
    the other fields are set as the scheme needs: ``host``/``port`` (tcp;
    IPv6 without brackets; ``cid``/``port`` for vsock), ``path`` (unix,
    file), ``command`` (exec), ``fd_name`` (fd: a number or a registered name).
    """

    uri: str
    scheme: str
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    command: Optional[str] = None
    fd_name: Optional[str] = None
    cid: Optional[int] = None
    #: ``file:PATH,offset=N`` (QEMU 10): where in the file the stream starts
    offset: int = 0

    @property
    def multi_channel(self) -> bool:
        """Whether the transport can open further connections (multifd, preempt)."""
        return self.scheme in ("tcp", "unix", "vsock")

    @property
    def fd_number(self) -> Optional[int]:
        """The fd number of ``fd:N``, None for ``fd:NAME`` and other schemes."""
        if self.fd_name is not None and self.fd_name.isdigit():
            return int(self.fd_name)
        return None


_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]+)$")


def parse_uri(uri: str, *, incoming: bool = False) -> MigrationURI:
    """Parse a migration URI; ``incoming`` selects QEMU's destination error text.

    Raises:
        ParameterError: an unknown scheme, with QEMU's texts: "Parameter
            'uri' expects a valid migration protocol" (outgoing) or "unknown
            migration protocol: URI" (incoming); or a known scheme with a
            malformed address ("error parsing address 'h' in migration URI
            'tcp:h'").
        TransportNotSupported: ``rdma:``: QEMU's text for a build without
            RDMA, followed by the reason in words.

    ``fd:`` accepts a number or a registered name in both directions (QEMU's
    outgoing ``fd:`` takes names only). ``tcp:`` takes numeric ports only and
    no ``,ipv4``/``,to=`` options. ``defer`` is not a transport: the caller
    handles ``-incoming defer`` before it gets here.
    """
    if not isinstance(uri, str):
        raise ParameterError(OUT_ERROR, field="uri")
    scheme, sep, rest = uri.partition(":")

    def bad(reason: Optional[str] = None) -> ParameterError:
        if reason:  # a known scheme with a malformed address
            return ParameterError(f"{reason} in migration URI '{uri}'", field="uri")
        text = f"unknown migration protocol: {uri}" if incoming else OUT_ERROR
        return ParameterError(text, field="uri")

    if not sep:
        raise bad()
    if scheme == "rdma":
        # QEMU's own refusal when built without RDMA, then why, in words
        text = f"unknown migration protocol: {uri}" if incoming else OUT_ERROR
        raise TransportNotSupported(f"{text}; {RDMA_NOT_SUPPORTED}", field="uri")
    if scheme == "tcp":
        m = _HOSTPORT.match(rest)
        if not m:
            raise bad(f"error parsing address '{rest}'")
        host = m.group("v6") if m.group("v6") is not None else m.group("host")
        port = _parse_port(m.group("port"))
        if port is None:
            raise bad(f"invalid port '{m.group('port')}'")
        return MigrationURI(uri, "tcp", host=host, port=port)
    if scheme == "vsock":
        cid, _, port = rest.partition(":")
        if not cid.isdigit() or _parse_port(port, limit=0xFFFFFFFF) is None:
            raise bad(f"error parsing vsock address '{rest}'")
        return MigrationURI(uri, "vsock", cid=int(cid), port=int(port))
    if scheme == "unix":
        if not rest:
            raise bad("empty socket path")
        return MigrationURI(uri, "unix", path=rest)
    if scheme == "exec":
        if not rest.strip():
            raise bad("empty command")
        return MigrationURI(uri, "exec", command=rest)
    if scheme == "fd":
        if not rest:
            raise bad("empty fd name")
        return MigrationURI(uri, "fd", fd_name=rest)
    if scheme == "file":
        path, offset = rest, 0
        if ",offset=" in rest:  # QEMU 10's option (a number with an optional size suffix)
            path, _, text = rest.rpartition(",offset=")
            offset = _parse_size(text)
            if offset is None:
                raise bad(f"invalid offset '{text}'")
        if not path:
            raise bad("empty file name")
        return MigrationURI(uri, "file", path=path, offset=offset)
    raise bad()


def _parse_size(text: str) -> Optional[int]:
    """QEMU's size syntax: a number (decimal or 0x hex) with an optional K/M/G/T suffix."""
    mult = 1
    if text and text[-1] in "kKmMgGtT":
        mult = 1 << (10 * "kmgt".index(text[-1].lower()) + 10)
        text = text[:-1]
    try:
        n = int(text, 0)
    except ValueError:
        return None
    return n * mult if n >= 0 else None


def _parse_port(text: str, limit: int = 65535) -> Optional[int]:
    if not text.isdigit():
        return None
    port = int(text)
    return port if port <= limit else None
