"""TLS sessions, sans-IO: ciphertext in and out as bytes, whatever carries it.

A :class:`TLSSession` never touches a socket. The transport
(:mod:`qmigx.transport.tls`) feeds it what the peer sent (:meth:`feed`,
:meth:`feed_eof`), sends what it produced (:meth:`take_output`), and asks
it to handshake, encrypt (:meth:`send`) and decrypt (:meth:`recv_into`).
So one transport drives every backend, over sockets and pipes alike:

* :class:`X509Session`: Python's ``ssl`` (``SSLObject`` over memory BIOs);
* :class:`PSKSession`: GnuTLS, the library QEMU uses (:mod:`qmigx._core.gnutls`).

After the handshake :meth:`check_credentials` does what QEMU's
qcrypto_tls_session_check_credentials does, in its order: with
``verify-peer``, the peer must have presented a certificate; its subject
DN (GnuTLS's form, :mod:`.dn`) is checked against ``tls-authz``; then the
certificate must match the hostname (a client needs one: "No hostname
for certificate validation"). Refusals raise
:class:`~qmigx.errors.TLSPeerRejected`, other failures
:class:`~qmigx.errors.TLSError`, each with QEMU's text where QEMU has one.

A session is not thread-safe; the transport serialises calls on it.

:class:`TLSSettings` is what a migration hands the transport: the
parameters ``tls-creds``, ``tls-hostname`` and ``tls-authz`` and the
objects they name, resolved when a connection is made (as QEMU resolves
them), not when the parameters are set.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass
from typing import Optional

from qmigx.crypto.authz import is_allowed_by_id
from qmigx.crypto.objects import ObjectRoot
from qmigx.crypto.tlscreds import TLSCreds, TLSCredsPSK, TLSCredsX509
from qmigx.errors import ObjectError, TLSError, TLSPeerRejected

__all__ = ["TLSSession", "X509Session", "PSKSession", "TLSSettings", "get_creds",
           "RecordTracker", "match_hostname"]


#: a TLS record header's length field (bytes 3-4)
_RECORD_LENGTH = struct.Struct(">H")


class RecordTracker:
    """Follows TLS record boundaries in a ciphertext stream (5-byte headers).

    At the end of the peer's stream it tells a clean end (between records)
    from a truncated record, whichever library decrypts.
    """

    def __init__(self) -> None:
        self._left = 0  # bytes of the current record still to come
        self._head = bytearray()  # a partial record header

    def feed(self, data) -> None:
        mv = memoryview(data)
        n = len(mv)
        i = self._left
        if self._head:  # complete a header split across feeds
            need = 5 - len(self._head)
            self._head += mv[:need]
            if len(self._head) < 5:
                return
            i = need + int.from_bytes(self._head[3:5], "big")
            self._head.clear()
        # whole headers: hop from one to the next (the common case: one step per record)
        length = _RECORD_LENGTH.unpack_from
        while i + 5 <= n:
            i += 5 + length(mv, i + 3)[0]
        if i < n:
            self._head += mv[i:]
            i = n
        self._left = i - n

    @property
    def inside_record(self) -> bool:
        return bool(self._left or self._head)


def match_hostname(der: bytes, hostname: str) -> bool:
    """Whether a certificate names ``hostname`` (subjectAltName, else the CN), as GnuTLS checks.

    An IP address must be one of the certificate's IP addresses; a name
    one of its DNS names (a leading ``*.`` matches one label), or its
    common name when it has no DNS names at all.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        ip = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return san is not None and ip in san.get_values_for_type(x509.IPAddress)
    want = hostname.rstrip(".").lower()
    names = san.get_values_for_type(x509.DNSName) if san is not None else []
    if not names:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                 if isinstance(a.value, str)]
    for name in names:
        name = name.rstrip(".").lower()
        if name.startswith("*.") and "." in want:
            if want.split(".", 1)[1] == name[2:]:
                return True
        elif name == want:
            return True
    return False


class TLSSession:
    """The interface every backend implements (see the module docstring)."""

    endpoint: str
    #: the peer: its certificate's DN (x509) or PSK username (server), once known
    peer_name: Optional[str] = None

    def handshake(self) -> bool:
        """Advance the handshake with what was fed; True once it is complete."""
        raise NotImplementedError

    def feed(self, data) -> None:
        raise NotImplementedError

    def feed_eof(self) -> None:
        raise NotImplementedError

    def take_output(self) -> bytes:
        raise NotImplementedError

    def recv_into(self, buf) -> Optional[int]:
        """Decrypt into ``buf``: bytes decrypted, 0 at the peer's end, None if more input is needed."""
        raise NotImplementedError

    def send(self, data) -> None:
        """Encrypt all of ``data``; the ciphertext waits in :meth:`take_output`."""
        raise NotImplementedError

    def check_credentials(self) -> None:
        """After the handshake: verify the peer as QEMU does (see the module docstring)."""

    @property
    def description(self) -> str:
        return ""


# --- x509: Python's ssl -----------------------------------------------------------------

#: OpenSSL verification results -> QEMU's (GnuTLS's) reasons
_VERIFY_REASONS = {
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    2: "The certificate hasn't got a known issuer",
    18: "The certificate hasn't got a known issuer",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}


class X509Session(TLSSession):
    """An x509 session on ``ssl.SSLObject`` (server: no session tickets, see tlscreds)."""

    def __init__(self, creds: TLSCredsX509, *, hostname: Optional[str] = None,
                 authz: Optional[tuple[ObjectRoot, Optional[str]]] = None) -> None:
        self.creds = creds
        self.endpoint = creds.endpoint
        self.hostname = hostname
        self.authz = authz
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._records = RecordTracker()
        self._eof = False
        self._obj = creds.context.wrap_bio(self._in, self._out, server_side=self.endpoint == "server")

    def handshake(self) -> bool:
        try:
            self._obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            if self._eof:
                raise TLSError("the peer closed the connection during the TLS handshake",
                               field="tls") from None
            return False
        except ssl.SSLCertVerificationError as exc:
            reason = _VERIFY_REASONS.get(exc.verify_code, "The certificate is not trusted")
            raise TLSPeerRejected(f"{reason} ({exc.verify_message})", field="tls") from None
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake failed: {exc.reason or exc}", field="tls") from None

    def feed(self, data) -> None:
        self._records.feed(data)
        self._in.write(data)

    def feed_eof(self) -> None:
        self._eof = True
        self._in.write_eof()

    def take_output(self) -> bytes:
        return self._out.read() if self._out.pending else b""

    def recv_into(self, buf) -> Optional[int]:
        try:
            return self._obj.read(len(buf), buf)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return 0
        except ssl.SSLEOFError:
            if self._records.inside_record:
                raise TLSError("Cannot read from TLS channel: the stream ended inside a TLS record",
                               field="tls") from None
            return 0  # QEMU closes without close_notify: a clean end between records
        except ssl.SSLError as exc:
            raise TLSError(f"Cannot read from TLS channel: {exc.reason or exc}", field="tls") from None

    def send(self, data) -> None:
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise TLSError(f"Cannot write to TLS channel: {exc.reason or exc}", field="tls") from None

    def check_credentials(self) -> None:
        if not self.creds.verify_peer:
            return
        der = self._obj.getpeercert(binary_form=True)
        if der is None:
            raise TLSPeerRejected("No certificate peers", field="tls")
        try:
            from qmigx.crypto.dn import cert_dn  # imports cryptography: only when used

            self.peer_name = cert_dn(der)
        except ValueError as exc:
            raise TLSPeerRejected(f"Cannot get client distinguished name: {exc}", field="tls") from None
        if self.authz is not None and self.authz[1]:
            objects, authz_id = self.authz
            try:
                allowed = is_allowed_by_id(objects, authz_id, self.peer_name)
            except ObjectError as exc:
                raise TLSPeerRejected(exc.message, peer=self.peer_name, field="tls-authz") from None
            if not allowed:
                raise TLSPeerRejected(f"TLS x509 authz check for {self.peer_name} is denied",
                                      peer=self.peer_name, field="tls-authz")
        if self.hostname:
            if not match_hostname(der, self.hostname):
                raise TLSPeerRejected(f"Certificate does not match the hostname {self.hostname}",
                                      peer=self.peer_name, field="tls-hostname")
        elif self.endpoint == "client":
            raise TLSPeerRejected("No hostname for certificate validation", field="tls-hostname")

    @property
    def description(self) -> str:
        c = self._obj.cipher()
        return f"{c[1]} {c[0]}" if c else ""


# --- PSK: GnuTLS ------------------------------------------------------------------------


def _gnutls():
    from qmigx._core import gnutls

    return gnutls


class PSKSession(TLSSession):
    """A PSK session through GnuTLS (server: no session tickets)."""

    def __init__(self, creds: TLSCredsPSK) -> None:
        g = _gnutls()
        self.creds = creds
        self.endpoint = creds.endpoint
        self._g = g
        self._records = RecordTracker()
        self._eof = False
        if creds.endpoint == "server":
            self._s = g.Session(True, creds.session_priority, keyfile=creds.keyfile)
        else:
            self._s = g.Session(False, creds.session_priority, username=creds.get("username"),
                                hexkey=creds.hexkey)
        if self._s.status:
            why = g.strerror(self._s.status)
            if self._s.failed_call == "set priority":
                raise TLSError(f"Unable to set TLS session priority {creds.session_priority}: {why}",
                               field="priority")
            who = "server" if creds.endpoint == "server" else "client"
            raise TLSError(f"Cannot set PSK {who} credentials: {why}"
                           if "PSK" in self._s.failed_call else f"TLS is not available: {why}",
                           field="tls")

    def _error(self, code: int, what: str) -> TLSError:
        g = self._g
        text = f"{what}: {g.strerror(code)}"
        if code in (g.E_DECRYPTION_FAILED, g.E_INSUFFICIENT_CREDENTIALS):
            return TLSPeerRejected(text, peer=self.peer_name, field="tls")  # a wrong key
        return TLSError(text, field="tls")

    def handshake(self) -> bool:
        code = self._s.handshake()
        if code == 0:
            if self.endpoint == "server":
                self.peer_name = self._s.username or None
            return True
        if code == self._g.E_AGAIN:
            if self._eof:
                raise TLSError("the peer closed the connection during the TLS handshake",
                               field="tls")
            return False
        raise self._error(code, "TLS handshake failed")

    def feed(self, data) -> None:
        self._records.feed(data)
        self._s.feed(data)

    def feed_eof(self) -> None:
        self._eof = True
        self._s.feed_eof()

    def take_output(self) -> bytes:
        return self._s.take_output()

    def recv_into(self, buf) -> Optional[int]:
        code = self._s.recv_into(buf)
        if code >= 0:
            return code
        if code == self._g.E_AGAIN:
            return None
        if code in (self._g.E_PREMATURE_TERMINATION, self._g.E_UNEXPECTED_PACKET_LENGTH) and self._eof:
            if self._records.inside_record:
                raise TLSError("Cannot read from TLS channel: the stream ended inside a TLS record",
                               field="tls")
            return 0
        raise self._error(code, "Cannot read from TLS channel")

    def send(self, data) -> None:
        code = self._s.send(data)
        if code < 0:
            raise self._error(code, "Cannot write to TLS channel")

    @property
    def description(self) -> str:
        return self._s.description


# --- what a migration hands the transport -------------------------------------------------


def get_creds(objects: ObjectRoot, creds_id: str, endpoint: str) -> TLSCreds:
    """The credentials object ``creds_id`` for ``endpoint`` (QEMU's migration_tls_get_creds).

    Raises:
        ObjectError: with QEMU's texts: "No TLS credentials with id 'X'",
            "Object with id 'X' is not TLS credentials", "Expected TLS
            credentials for a client endpoint".
    """
    obj = objects.get(creds_id)
    if obj is None:
        raise ObjectError(f"No TLS credentials with id '{creds_id}'", field="tls-creds")
    if not isinstance(obj, TLSCreds):
        raise ObjectError(f"Object with id '{creds_id}' is not TLS credentials", field="tls-creds")
    if obj.endpoint != endpoint:
        raise ObjectError(f"Expected TLS credentials for a {endpoint} endpoint", field="tls-creds")
    return obj


@dataclass(frozen=True)
class TLSSettings:
    """TLS for every connection of one migration: the parameters and the objects they name.

    ``hostname`` overrides the one a client checks the server's
    certificate against (otherwise the ``tcp:`` URI's host); ``authz`` is
    the server's ``tls-authz`` (None: any verified peer).
    """

    objects: ObjectRoot
    creds: str
    hostname: str = ""
    authz: Optional[str] = None

    def client_session(self, default_hostname: Optional[str] = None) -> TLSSession:
        """A client session (the source's side of each connection)."""
        creds = get_creds(self.objects, self.creds, "client")
        return new_session(creds, hostname=self.hostname or default_hostname or None)

    def server_session(self) -> TLSSession:
        """A server session (the destination's side of each accepted connection)."""
        creds = get_creds(self.objects, self.creds, "server")
        return new_session(creds, authz=(self.objects, self.authz))


def new_session(creds: TLSCreds, *, hostname: Optional[str] = None, authz=None) -> TLSSession:
    """A TLS session on ``creds``: x509 on Python's ``ssl``, PSK on GnuTLS."""
    if isinstance(creds, TLSCredsPSK):
        return PSKSession(creds)
    return X509Session(creds, hostname=hostname, authz=authz)
