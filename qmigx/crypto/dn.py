"""Distinguished names as GnuTLS prints them, so ``tls-authz`` sees what QEMU's does.

QEMU passes ``gnutls_x509_crt_get_dn``'s text to authz objects, and an
``authz-simple`` identity must equal it character for character. That
text differs from RFC 4514 (and from ``cryptography``'s
``rfc4514_string``): relative names keep the certificate's order (issuer
side first: ``C=GB,O=ACME,CN=qemu-client``), they are joined by commas
without spaces, multi-valued ones by ``+``, and attribute names follow
GnuTLS's table (``EMAIL``, ``UID``, ``serialNumber``, ...). Values escape
``,+"\\<>;`` with a backslash, as well as a leading space or ``#`` and a
trailing space. An attribute GnuTLS has no name for, or whose value it
does not print as text, is written as ``OID=#`` and the value's DER in
hex. ``tests/test_tls_objects.py`` compares this module with GnuTLS itself.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.name import _ASN1Type

__all__ = ["gnutls_dn", "cert_dn"]

#: GnuTLS's names for attribute OIDs (lib/x509/common.c's table, as 3.7 prints them)
_NAMES = {
    "2.5.4.6": "C",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.12": "title",
    "2.5.4.13": "description",
    "2.5.4.4": "surName",
    "2.5.4.42": "givenName",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym",
    "2.5.4.17": "postalCode",
    "2.5.4.41": "name",
    "2.5.4.5": "serialNumber",
    "2.5.4.15": "businessCategory",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "EMAIL",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionOfIncorporationLocalityName",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionOfIncorporationStateOrProvinceName",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionOfIncorporationCountryName",
}

#: string types GnuTLS prints as text (IA5String only for attributes defined as IA5)
_TEXT = {_ASN1Type.UTF8String, _ASN1Type.PrintableString, _ASN1Type.BMPString}
_IA5_ATTRS = {"1.2.840.113549.1.9.1", "0.9.2342.19200300.100.1.25"}

_ENCODE = {
    _ASN1Type.UTF8String: "utf-8",
    _ASN1Type.PrintableString: "latin-1",
    _ASN1Type.IA5String: "latin-1",
    _ASN1Type.T61String: "latin-1",
    _ASN1Type.VisibleString: "latin-1",
    _ASN1Type.NumericString: "latin-1",
    _ASN1Type.BMPString: "utf-16-be",
    _ASN1Type.UniversalString: "utf-32-be",
}


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (i == 0 and ch in " #") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _der_hex(attr: x509.NameAttribute) -> str:
    kind = getattr(attr, "_type", _ASN1Type.UTF8String)
    raw = attr.value.encode(_ENCODE.get(kind, "utf-8")) if isinstance(attr.value, str) else bytes(attr.value)
    n = len(raw)
    if n < 0x80:
        length = bytes([n])
    else:
        body = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return "#" + (bytes([kind.value]) + length + raw).hex()


def _attr(attr: x509.NameAttribute) -> str:
    oid = attr.oid.dotted_string
    name = _NAMES.get(oid)
    kind = getattr(attr, "_type", _ASN1Type.UTF8String)
    text = kind in _TEXT or (kind is _ASN1Type.IA5String and oid in _IA5_ATTRS)
    if name is None or not text or not isinstance(attr.value, str):
        return f"{name or oid}={_der_hex(attr)}"
    return f"{name}={_escape(attr.value)}"


def gnutls_dn(name: x509.Name) -> str:
    """``name`` as GnuTLS's ``gnutls_x509_crt_get_dn`` prints it.

    Raises:
        ValueError: the name is empty (GnuTLS has no text for it; QEMU
            refuses such a peer: "Cannot get client distinguished name").
    """
    rdns = list(name.rdns)
    if not rdns:
        raise ValueError("the certificate's subject is empty")
    return ",".join("+".join(_attr(a) for a in rdn) for rdn in rdns)


def cert_dn(der: bytes) -> str:
    """The subject DN of a DER certificate, GnuTLS's form."""
    return gnutls_dn(x509.load_der_x509_certificate(der).subject)
