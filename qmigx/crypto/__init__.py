"""TLS credentials, authorization and sessions (QEMU's crypto/ and authz/, migration/tls.c).

* :mod:`.objects`: :class:`ObjectRoot`, user-created objects by id
  (``-object``, ``object-add``, ``object-del``, ``qom-list-types``);
* :mod:`.tlscreds`: ``tls-creds-x509`` and ``tls-creds-psk``;
* :mod:`.authz`: ``authz-simple``, ``authz-list``, ``authz-listfile``;
* :mod:`.dn`: distinguished names as GnuTLS (and so QEMU's authz) prints them;
* :mod:`.session`: sans-IO TLS sessions (x509 on Python's ``ssl``, PSK on
  GnuTLS) and :class:`TLSSettings`, what a migration hands its transport.
"""

from qmigx.crypto.authz import AuthZ, AuthZList, AuthZListFile, AuthZSimple, is_allowed_by_id
from qmigx.crypto.objects import ObjectRoot, UserCreatable
from qmigx.crypto.session import (PSKSession, TLSSession, TLSSettings, X509Session, get_creds,
                                  match_hostname)
from qmigx.crypto.tlscreds import TLSCreds, TLSCredsPSK, TLSCredsX509



def __getattr__(name: str):
    # the DN printers import ``cryptography`` (60 ms): loaded on first use
    if name in ("cert_dn", "gnutls_dn"):
        from qmigx.crypto import dn

        return getattr(dn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ObjectRoot",
    "UserCreatable",
    "TLSCreds",
    "TLSCredsX509",
    "TLSCredsPSK",
    "AuthZ",
    "AuthZSimple",
    "AuthZList",
    "AuthZListFile",
    "is_allowed_by_id",
    "gnutls_dn",
    "cert_dn",
    "TLSSession",
    "X509Session",
    "PSKSession",
    "TLSSettings",
    "get_creds",
    "match_hostname",
]
