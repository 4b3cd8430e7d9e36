"""Credentials for TLS tests, made fresh by each test run (no key is ever checked in).

:func:`make_x509_dir` writes a directory laid out as QEMU's
``tls-creds-x509`` reads it: ``ca-cert.pem``, ``server-cert.pem`` /
``server-key.pem`` and, unless asked not to, ``client-cert.pem`` /
``client-key.pem``, signed by a throw-away CA with the extensions QEMU's
sanity check wants (basic constraints, key usage, extended key usage).
Keys are P-256: generating them takes microseconds where RSA takes a good
fraction of a second, and both GnuTLS and OpenSSL speak ECDSA.

:func:`make_psk_dir` writes ``keys.psk`` (``username:hexkey`` lines).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CLIENT_DN", "HOSTILE_DN", "X509Dir", "make_x509_dir", "make_psk_dir", "name",
           "self_signed"]

#: The client's distinguished name as GnuTLS prints it (certificate order, no spaces).
CLIENT_DN = "C=GB,O=ACME,CN=qemu-client"
#: A client that the CA signed too, but that authz does not name.
HOSTILE_DN = "C=GB,O=ACME,CN=qemu-client-hostile"

_ATTR = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME,
         "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "L": NameOID.LOCALITY_NAME,
         "ST": NameOID.STATE_OR_PROVINCE_NAME}


def name(dn: str) -> x509.Name:
    """``"C=GB,O=ACME,CN=x"`` -> a Name with those attributes in that order."""
    attrs = []
    for part in dn.split(","):
        key, _, value = part.partition("=")
        attrs.append(x509.NameAttribute(_ATTR[key], value))
    return x509.Name(attrs)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool,
          purpose=None, hosts: Sequence[str] = (), days: float = 1.0,
          not_before: Optional[datetime.datetime] = None) -> x509.Certificate:
    start = not_before or _now() - datetime.timedelta(hours=1)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                          False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([purpose]), critical=True)
    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    if alt:
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class X509Dir:
    """A credentials directory and what it holds."""

    path: Path
    client_dn: Optional[str]

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


def make_x509_dir(path, *, hosts: Sequence[str] = ("127.0.0.1",), client_dn: Optional[str] = CLIENT_DN,
                  server_days: float = 1.0, server_expired: bool = False,
                  server_self_signed: bool = False, other_clients: Optional[dict] = None) -> X509Dir:
    """A ``tls-creds-x509`` directory usable by both endpoints (QEMU's tests share one too).

    ``hosts``: the server certificate's subjectAltNames (IP addresses or
    DNS names). ``client_dn`` None leaves out the client certificate (an
    anonymous client). ``server_expired``: a server certificate whose
    validity ended yesterday. ``server_self_signed``: a server certificate
    not issued by the directory's CA. ``other_clients``: ``{path: dn}``,
    further client-only directories (``ca-cert.pem`` and a client
    certificate with that DN, or none for ``None``) from the same CA.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = name("C=GB,O=ACME,CN=qmigx test CA")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True, days=2)
    (path / "ca-cert.pem").write_bytes(_pem(ca))
    skey = _key()
    sname = name("C=GB,O=ACME,CN=qemu-server")
    if server_self_signed:
        issuer, issuer_key = sname, skey
    else:
        issuer, issuer_key = ca_name, ca_key
    start = _now() - datetime.timedelta(days=3) if server_expired else None
    scert = _cert(sname, skey, issuer, issuer_key, ca=False, purpose=ExtendedKeyUsageOID.SERVER_AUTH,
                  hosts=hosts, days=1.0 if server_expired else server_days, not_before=start)
    (path / "server-cert.pem").write_bytes(_pem(scert))
    (path / "server-key.pem").write_bytes(_pem_key(skey))
    os.chmod(path / "server-key.pem", 0o600)
    _client(path, client_dn, ca_name, ca_key)
    for other, dn in (other_clients or {}).items():
        other = Path(other)
        other.mkdir(parents=True, exist_ok=True)
        (other / "ca-cert.pem").write_bytes(_pem(ca))
        _client(other, dn, ca_name, ca_key)
    return X509Dir(path, client_dn)


def _client(path: Path, dn: Optional[str], ca_name, ca_key) -> None:
    if dn is None:
        return
    ckey = _key()
    ccert = _cert(name(dn), ckey, ca_name, ca_key, ca=False, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
    (path / "client-cert.pem").write_bytes(_pem(ccert))
    (path / "client-key.pem").write_bytes(_pem_key(ckey))
    os.chmod(path / "client-key.pem", 0o600)


def self_signed(path, dn: str = "C=GB,O=ACME,CN=qemu-server", hosts: Sequence[str] = ("127.0.0.1",)):
    """Replace a directory's server certificate with a self-signed one (same name)."""
    path = Path(path)
    key = _key()
    n = name(dn)
    cert = _cert(n, key, n, key, ca=False, purpose=ExtendedKeyUsageOID.SERVER_AUTH, hosts=hosts)
    (path / "server-cert.pem").write_bytes(_pem(cert))
    (path / "server-key.pem").write_bytes(_pem_key(key))


def make_psk_dir(path, keys: dict) -> Path:
    """A ``tls-creds-psk`` directory: ``keys.psk`` with ``username:hexkey`` per line."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "keys.psk").write_text("".join(f"{user}:{key.hex()}\n" for user, key in keys.items()))
    os.chmod(path / "keys.psk", 0o600)
    return path
