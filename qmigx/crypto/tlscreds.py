"""TLS credentials objects: ``tls-creds-x509`` and ``tls-creds-psk`` (QEMU's crypto/tlscreds*.c).

Both read a directory (``dir``) at creation, for one ``endpoint``
(``client``, the default, or ``server``), and refuse it with QEMU 7.2's
texts when something is missing or wrong, so a mistake shows at
``object-add`` rather than in the middle of a migration:

``tls-creds-x509``
    ``ca-cert.pem`` (required), ``ca-crl.pem`` (optional, server);
    ``server-cert.pem`` + ``server-key.pem`` (required on a server),
    ``client-cert.pem`` + ``client-key.pem`` (optional on a client: without
    them the client is anonymous). ``verify-peer`` (default on): check the
    peer's certificate (a server then demands one). ``sanity-check``
    (default on): check our own certificates first, as QEMU does (validity
    dates, CA constraints, key usage and purpose, issued by the CA).
    ``priority``: a GnuTLS priority string; with Python's ``ssl`` only its
    protocol versions (``-VERS-TLS1.3``, ...) take effect.
``tls-creds-psk``
    ``keys.psk``: ``username:hexkey`` lines; a client picks the line of its
    ``username`` (default ``qemu``), a server accepts any of them.
    ``priority`` goes to GnuTLS as is, with QEMU's PSK additions. Without
    one, QEMU's ``NORMAL`` is used with one change where the CPU has AES
    instructions: AES-GCM ranks before ChaCha20 (and a server's order
    wins). GnuTLS 3.7 here ranks ChaCha20 first and a GnuTLS server follows
    the client's order, so a QEMU pair encrypts with ChaCha20 at a
    fraction of AES-GCM's speed; either peer still accepts both.

:func:`qmigx.crypto.session.new_session` starts one TLS session on these credentials
(see :mod:`.session`).
"""

from __future__ import annotations

import datetime
import errno as errno_mod
import os
import ssl
from typing import TYPE_CHECKING, Optional

from qmigx.crypto.objects import Prop, UserCreatable, register
from qmigx.errors import ObjectError

if TYPE_CHECKING:  # imported where used: it costs 60 ms, and most runs never check a certificate
    from cryptography import x509

__all__ = ["TLSCreds", "TLSCredsX509", "TLSCredsPSK", "ENDPOINTS", "ssl_versions"]

ENDPOINTS = ("client", "server")

_BASE_PROPS = (
    Prop("verify-peer", "bool", True),
    Prop("dir", "str"),
    Prop("endpoint", "enum", "client", values=ENDPOINTS),
    Prop("priority", "str"),
)


class TLSCreds(UserCreatable):
    """Credentials for one endpoint (QEMU's abstract ``tls-creds``)."""

    parent = "tls-creds"

    @property
    def endpoint(self) -> str:
        return self.get("endpoint")

    @property
    def verify_peer(self) -> bool:
        return bool(self.get("verify-peer"))

    @property
    def priority(self) -> Optional[str]:
        return self.get("priority")

    def _dir(self) -> str:
        d = self.get("dir")
        if not d:
            raise ObjectError("Missing 'dir' property value", field="dir")
        return d

    def path(self, filename: str, required: bool) -> Optional[str]:
        """``dir/filename`` if readable; None if optional and absent (QEMU's get_path)."""
        full = os.path.join(self._dir(), filename)
        if os.access(full, os.R_OK):
            return full
        err = errno_mod.ENOENT if not os.path.exists(full) else errno_mod.EACCES
        if err == errno_mod.ENOENT and not required:
            return None
        raise ObjectError(f"Unable to access credentials {full}: {os.strerror(err)}",
                          field="dir")


# --- x509 -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ObjectError(f"Cannot load CA cert list {path}: {exc.strerror}", field="dir") from None


def _role(server: bool) -> str:
    return "server" if server else "client"


def _check_times(cert: x509.Certificate, path: str, server: bool, ca: bool) -> None:
    who = "CA" if ca else _role(server)
    now = _now()
    if cert.not_valid_after_utc < now:
        raise ObjectError(f"The {who} certificate {path} has expired", field="dir")
    if cert.not_valid_before_utc > now:
        raise ObjectError(f"The {who} certificate {path} is not yet active", field="dir")


def _ext(cert: x509.Certificate, kind):
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _check_constraints(cert: x509.Certificate, path: str, server: bool, ca: bool) -> None:
    from cryptography import x509

    bc = _ext(cert, x509.BasicConstraints)
    if bc is None:
        if ca:
            raise ObjectError(f"The certificate {path} is missing basic constraints for a CA",
                              field="dir")
    elif bc.value.ca and not ca:
        raise ObjectError(f"The certificate {path} basic constraints show a CA, but we need one "
                          f"for a {_role(server)}", field="dir")
    elif not bc.value.ca and ca:
        raise ObjectError(f"The certificate {path} basic constraints do not show a CA", field="dir")


def _check_usage(cert: x509.Certificate, path: str, ca: bool) -> None:
    from cryptography import x509

    ku = _ext(cert, x509.KeyUsage)
    if ku is None or not ku.critical:
        return  # absent: QEMU assumes what the role needs; non-critical: never enforced
    if ca:
        if not ku.value.key_cert_sign:
            raise ObjectError(f"Certificate {path} usage does not permit certificate signing",
                              field="dir")
        return
    if not ku.value.digital_signature:
        raise ObjectError(f"Certificate {path} usage does not permit digital signature", field="dir")
    if not ku.value.key_encipherment:
        raise ObjectError(f"Certificate {path} usage does not permit key encipherment", field="dir")


def _check_purpose(cert: x509.Certificate, path: str, server: bool) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is None:
        return
    purposes = set(eku.value)
    anyp = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes
    want = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    if not (anyp or want in purposes) and eku.critical:
        raise ObjectError(f"Certificate {path} purpose does not allow use with a TLS "
                          f"{_role(server)}", field="dir")


def _issued_by_any(cert: x509.Certificate, cas: list) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except Exception:  # noqa: BLE001 - wrong issuer name or a bad signature alike
            continue
    return False


def _sanity_check(server: bool, cacert: str, cert_path: Optional[str]) -> None:
    """QEMU's qcrypto_tls_creds_x509_sanity_check: our own certificates, before use."""
    from cryptography import x509

    cert = None
    if cert_path and os.access(cert_path, os.R_OK):
        try:
            cert = x509.load_pem_x509_certificate(_read(cert_path))
        except ValueError as exc:
            raise ObjectError(f"Unable to import {_role(server)} certificate {cert_path}: {exc}",
                              field="dir") from None
    cas: list = []
    if os.access(cacert, os.R_OK):
        try:
            cas = x509.load_pem_x509_certificates(_read(cacert))
        except ValueError:
            raise ObjectError(f"Unable to import CA certificate list {cacert}", field="dir") from None
    if cert is not None:
        _check_times(cert, cert_path, server, False)
        _check_constraints(cert, cert_path, server, False)
        _check_usage(cert, cert_path, False)
        _check_purpose(cert, cert_path, server)
    for ca in cas:
        _check_times(ca, cacert, server, True)
        _check_constraints(ca, cacert, server, True)
        _check_usage(ca, cacert, True)
    if cert is not None and cas and not _issued_by_any(cert, cas):
        raise ObjectError(f"Our own certificate {cert_path} failed validation against {cacert}: "
                          "The certificate hasn't got a known issuer", field="dir")


_VERSIONS = {"TLS1.0": ssl.TLSVersion.TLSv1, "TLS1.1": ssl.TLSVersion.TLSv1_1,
             "TLS1.2": ssl.TLSVersion.TLSv1_2, "TLS1.3": ssl.TLSVersion.TLSv1_3}


def ssl_versions(priority: Optional[str]) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """The protocol versions a GnuTLS priority string allows, as (minimum, maximum).

    Only ``VERS-*`` tokens map onto Python's ``ssl``; the rest of the string
    (cipher and key-exchange preferences) is left to OpenSSL's defaults.
    """
    allowed = {"TLS1.2", "TLS1.3"}
    for tok in (priority or "").split(":")[1:]:
        sign, body = tok[:1], tok[1:]
        if sign not in "+-!" or not body.startswith("VERS-"):
            continue
        which = body[5:]
        names = set(_VERSIONS) if which in ("ALL", "TLS-ALL") else {which} & set(_VERSIONS)
        if sign == "+":
            allowed |= names
        else:
            allowed -= names
    if not allowed:
        raise ObjectError(f"Cannot set default TLS session priority {priority}: "
                          "no TLS protocol version is left", field="priority")
    order = sorted(allowed, key=lambda v: _VERSIONS[v])
    return _VERSIONS[order[0]], _VERSIONS[order[-1]]


@register
class TLSCredsX509(TLSCreds):
    """``tls-creds-x509``: certificates, checked with Python's ``ssl`` (OpenSSL)."""

    qom_type = "tls-creds-x509"
    props = _BASE_PROPS + (Prop("loaded", "bool", False), Prop("sanity-check", "bool", True),
                           Prop("passwordid", "str"))

    context: ssl.SSLContext

    def complete(self) -> None:
        server = self.endpoint == "server"
        cacert = self.path("ca-cert.pem", True)
        crl = self.path("ca-crl.pem", False) if server else None
        if server:
            cert = self.path("server-cert.pem", True)
            key = self.path("server-key.pem", True)
        else:
            cert = self.path("client-cert.pem", False)
            key = self.path("client-key.pem", False)
        if self.get("sanity-check"):
            _sanity_check(server, cacert, cert)
        if self.get("passwordid"):
            raise ObjectError("passwordid: encrypted private keys are not supported by qmigx",
                              field="passwordid")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version, ctx.maximum_version = ssl_versions(self.priority)
        if not server:
            ctx.check_hostname = False  # checked after the handshake, as QEMU does
        try:
            ctx.load_verify_locations(cafile=cacert)
        except (ssl.SSLError, OSError) as exc:
            raise ObjectError(f"Cannot load CA certificate '{cacert}': {exc}", field="dir") from None
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise ObjectError(f"Cannot load certificate '{cert}' & key '{key}': {exc}",
                                  field="dir") from None
        if crl is not None:
            try:
                ctx.load_verify_locations(cafile=crl)
            except (ssl.SSLError, OSError) as exc:
                raise ObjectError(f"Cannot load CRL '{crl}': {exc}", field="dir") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if server:
            # A source closes without reading: tickets it never read would turn
            # its close into a connection reset here.
            ctx.num_tickets = 0
            ctx.verify_mode = ssl.CERT_OPTIONAL if self.verify_peer else ssl.CERT_NONE
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        self.context = ctx
        self.has_certificate = cert is not None and key is not None


# --- PSK --------------------------------------------------------------------------------

#: QEMU's additions to the priority string of a PSK session
PSK_PRIORITY_ADDITIONS = "+ECDHE-PSK:+DHE-PSK:+PSK"
#: QEMU's default priority (CONFIG_TLS_PRIORITY of the Debian 7.2 build)
DEFAULT_PRIORITY = "NORMAL"
#: the default with AES-GCM before ChaCha20 (re-added last), for CPUs with AES instructions
AES_FIRST = "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305"


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " aes " in f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    return False


_AES = _cpu_has_aes()


@register
class TLSCredsPSK(TLSCreds):
    """``tls-creds-psk``: pre-shared keys, through GnuTLS (see :mod:`qmigx._core.gnutls`)."""

    qom_type = "tls-creds-psk"
    props = _BASE_PROPS + (Prop("loaded", "bool", False), Prop("username", "str", "qemu"))

    keyfile: str
    hexkey: Optional[str] = None

    @property
    def session_priority(self) -> str:
        """The priority string a session uses (see the module docstring)."""
        if self.priority:
            return f"{self.priority}:{PSK_PRIORITY_ADDITIONS}"
        if not _AES:
            return f"{DEFAULT_PRIORITY}:{PSK_PRIORITY_ADDITIONS}"
        server = ":%SERVER_PRECEDENCE" if self.endpoint == "server" else ""
        return f"{AES_FIRST}{server}:{PSK_PRIORITY_ADDITIONS}"

    def complete(self) -> None:
        self.keyfile = self.path("keys.psk", True)
        if self.endpoint == "server":
            return
        user = self.get("username")
        try:
            with open(self.keyfile, "r", encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ObjectError(f"Cannot read PSK file {self.keyfile}: {exc.strerror}",
                              field="dir") from None
        for line in lines:
            name, sep, key = line.partition(":")
            if sep and name == user:
                self.hexkey = key.strip()
                return
        raise ObjectError(f"Username {user} not found in PSK file {self.keyfile}", field="username")
