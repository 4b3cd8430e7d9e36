"""TLS credentials and authz objects: properties, QEMU's checks and texts, authz rules, DNs.

The texts asserted here are QEMU 7.2's (tests/test_tls_qemu.py's
``test_object_replies_match_qemu`` asks a real QEMU the same questions).
Credentials are made fresh per test (tests/tls_support.py).
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qmigx.crypto import (AuthZListFile, ObjectRoot, TLSCredsPSK, TLSCredsX509, TLSSettings,
                          cert_dn, get_creds, gnutls_dn, is_allowed_by_id, match_hostname)
from qmigx.crypto.authz import glob_match
from qmigx.crypto.objects import split_option
from qmigx.crypto.tlscreds import ssl_versions
from qmigx.errors import ObjectError
from tls_support import CLIENT_DN, make_psk_dir, make_x509_dir, self_signed


@pytest.fixture
def root():
    return ObjectRoot()


@pytest.fixture
def x509dir(tmp_path):
    return make_x509_dir(tmp_path / "x509")


# --- creating objects -----------------------------------------------------------------


def test_x509_defaults_and_properties(root, x509dir):
    obj = root.add({"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(x509dir)})
    assert isinstance(obj, TLSCredsX509)
    assert obj.endpoint == "client" and obj.verify_peer is True
    assert obj.get("sanity-check") is True and obj.get("priority") is None
    assert root.get("tls0") is obj and root.ids() == ["tls0"]
    assert obj.has_certificate  # the directory holds a client certificate
    srv = root.add({"qom-type": "tls-creds-x509", "id": "tls1", "dir": str(x509dir),
                    "endpoint": "server", "verify-peer": False})
    assert srv.endpoint == "server" and srv.context.verify_mode == ssl.CERT_NONE
    assert srv.context.num_tickets == 0  # a source closes without reading them


def test_psk_client_picks_its_username_and_the_server_takes_the_file(root, tmp_path):
    d = make_psk_dir(tmp_path / "psk", {"alice": b"\x01" * 16, "qemu": b"\x02" * 32})
    cli = root.add({"qom-type": "tls-creds-psk", "id": "c", "dir": str(d)})
    assert isinstance(cli, TLSCredsPSK) and cli.hexkey == "02" * 32
    alice = root.add({"qom-type": "tls-creds-psk", "id": "a", "dir": str(d), "username": "alice"})
    assert alice.hexkey == "01" * 16
    srv = root.add({"qom-type": "tls-creds-psk", "id": "s", "dir": str(d), "endpoint": "server"})
    assert srv.keyfile == str(d / "keys.psk") and srv.hexkey is None
    assert srv.session_priority.startswith("NORMAL:")
    assert srv.session_priority.endswith(":+ECDHE-PSK:+DHE-PSK:+PSK")  # QEMU's PSK additions
    mine = root.add({"qom-type": "tls-creds-psk", "id": "m", "dir": str(d),
                     "priority": "SECURE256:-VERS-TLS1.3"})
    assert mine.session_priority == "SECURE256:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "tls-creds-psk", "id": "b", "dir": str(d), "username": "bob"})
    assert ei.value.message == f"Username bob not found in PSK file {d}/keys.psk"


#: (object-add arguments, QEMU 7.2's error) -- {dir} is a directory without files
QMP_ERRORS = [
    ({"qom-type": "tls-creds-x509", "id": "t"}, "Missing 'dir' property value"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{empty}"},
     "Unable to access credentials {empty}/ca-cert.pem: No such file or directory"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{empty}", "endpoint": "server"},
     "Unable to access credentials {empty}/ca-cert.pem: No such file or directory"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{junk}"},
     "Unable to import CA certificate list {junk}/ca-cert.pem"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{empty}", "endpoint": "bogus"},
     "Parameter 'endpoint' does not accept value 'bogus'"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{empty}", "verify-peer": "yes"},
     "Invalid parameter type for 'verify-peer', expected: boolean"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "{empty}", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ({"qom-type": "tls-creds-psk", "id": "p", "dir": "{empty}"},
     "Unable to access credentials {empty}/keys.psk: No such file or directory"),
    ({"qom-type": "tls-creds-psk", "id": "p"}, "Missing 'dir' property value"),
    ({"qom-type": "tls-creds-psk", "id": "p", "dir": "{empty}", "username": 5},
     "Invalid parameter type for 'username', expected: string"),
    ({"qom-type": "authz-simple", "id": "a"}, "Parameter 'identity' is missing"),
    ({"qom-type": "authz-list", "id": "l", "policy": "maybe"},
     "Parameter 'policy' does not accept value 'maybe'"),
    ({"qom-type": "authz-list", "id": "l", "rules": [{"match": "CN=*", "format": "regex"}]},
     "Parameter 'rules[0].policy' is missing"),
    ({"qom-type": "authz-list", "id": "l", "rules": [{"format": "glob"}]},
     "Parameter 'rules[0].match' is missing"),
    ({"qom-type": "authz-list", "id": "l", "rules": [{"match": "a", "policy": "allow",
                                                     "format": "regex"}]},
     "Parameter 'format' does not accept value 'regex'"),
    ({"qom-type": "authz-list", "id": "l", "rules": [{"match": "a", "policy": "allow", "x": 1}]},
     "Parameter 'rules[0].x' is unexpected"),
    ({"qom-type": "authz-list", "id": "l", "rules": {"match": "a"}},
     "Invalid parameter type for 'rules', expected: array"),
    ({"qom-type": "bogus-type", "id": "b"}, "Parameter 'qom-type' does not accept value 'bogus-type'"),
    ({"qom-type": "authz-simple", "id": "1bad", "identity": "x"}, "Parameter 'id' expects an identifier"),
    ({"qom-type": "authz-simple", "identity": "x"}, "Parameter 'id' is missing"),
]


@pytest.fixture
def dirs(tmp_path):
    empty = tmp_path / "empty"
    junk = tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "ca-cert.pem").write_text("junk\n")
    return {"empty": str(empty), "junk": str(junk)}


def _fill(value, dirs):
    if isinstance(value, str):
        return value.format(**dirs)
    if isinstance(value, dict):
        return {k: _fill(v, dirs) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, dirs) for v in value]
    return value


@pytest.mark.parametrize("args,error", QMP_ERRORS, ids=[e for _, e in QMP_ERRORS])
def test_object_add_refuses_with_qemus_texts(root, dirs, args, error):
    with pytest.raises(ObjectError) as ei:
        root.add(_fill(args, dirs))
    assert ei.value.message == error.format(**dirs)
    assert root.ids() == []


def test_duplicate_ids_and_object_del(root):
    root.add({"qom-type": "authz-simple", "id": "a1", "identity": "CN=x"})
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "authz-simple", "id": "a1", "identity": "CN=y"})
    assert ei.value.message == "attempt to add duplicate property 'a1' to object (type 'container')"
    assert root.get("a1").get("identity") == "CN=x"
    root.delete("a1")
    with pytest.raises(ObjectError) as ei:
        root.delete("a1")
    assert ei.value.message == "object 'a1' not found"
    root.add({"qom-type": "authz-simple", "id": "a1", "identity": "CN=y"})  # the id is free again


def test_a_refused_object_leaves_its_id_free(root, dirs):
    with pytest.raises(ObjectError):
        root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": dirs["empty"]})
    assert "t" not in root
    root.add({"qom-type": "authz-simple", "id": "t", "identity": "x"})


def test_qom_list_types(root):
    creds = root.list_types("tls-creds")
    assert {t["name"] for t in creds} == {"tls-creds-x509", "tls-creds-psk"}
    assert all(t["parent"] == "tls-creds" for t in creds)
    authz = root.list_types("authz", abstract=True)
    assert {"abstract": True, "name": "authz", "parent": "object"} in authz
    assert {t["name"] for t in authz} == {"authz-simple", "authz-list", "authz-listfile", "authz"}


# --- -object ----------------------------------------------------------------------------


def test_split_option_doubles_commas():
    assert split_option("authz-simple,id=s,identity=C=GB,,O=ACME,,CN=c") == [
        "authz-simple", "id=s", "identity=C=GB,O=ACME,CN=c"]
    assert split_option("a,,b") == ["a,b"]


def test_object_option_forms(root, x509dir):
    s = root.add_option("authz-simple,id=s,identity=C=GB,,O=ACME,,CN=qemu-client")
    assert s.get("identity") == CLIENT_DN
    t = root.add_option(f"tls-creds-x509,id=tls0,dir={x509dir},endpoint=server,verify-peer=off")
    assert t.endpoint == "server" and t.verify_peer is False
    for word, value in (("yes", True), ("on", True), ("no", False), ("false", False)):
        o = root.add_option(f"tls-creds-x509,id=t{word},dir={x509dir},verify-peer={word}")
        assert o.verify_peer is value
    rep = root.add_option("authz-simple,id=r,identity=a,identity=b")
    assert rep.get("identity") == "b"  # the last of repeated keys wins, as in QEMU
    j = root.add_option(json.dumps({"qom-type": "authz-list", "id": "l", "policy": "allow",
                                    "rules": [{"match": "CN=*", "format": "glob", "policy": "deny"}]}))
    assert j.get("rules") == [{"match": "CN=*", "format": "glob", "policy": "deny"}]


@pytest.mark.parametrize("text,error", [
    ("tls-creds-x509,id=t,dir=/nonexist,verify-peer=maybe",
     "-object tls-creds-x509,id=t,dir=/nonexist,verify-peer=maybe: "
     "Parameter 'verify-peer' expects 'on' or 'off'"),
    ("tls-creds-x509,id=t,dir=/nonexist,bogus=1",
     "-object tls-creds-x509,id=t,dir=/nonexist,bogus=1: Invalid parameter 'bogus'"),
    ("authz-list,id=l,rules.0.match=x", "-object authz-list,id=l,rules.0.match=x: "
     "Invalid parameter 'rules.0.match'"),
    ("authz-simple,id=s", "-object authz-simple,id=s: Parameter 'identity' is missing"),
    ("tls-creds-x509,dir=/x", "-object tls-creds-x509,dir=/x: Parameter 'id' is missing"),
    ("nosuch,id=x", "-object nosuch,id=x: Parameter 'qom-type' does not accept value 'nosuch'"),
    ("authz-simple,id=9,identity=x", "-object authz-simple,id=9,identity=x: "
     "Parameter 'id' expects an identifier"),
    # creating (complete) fails without the option prefix, as QEMU prints it
    ("tls-creds-x509,id=t,dir=/nonexist,verify-peer=yes",
     "Unable to access credentials /nonexist/ca-cert.pem: No such file or directory"),
])
def test_object_option_errors(root, text, error):
    with pytest.raises(ObjectError) as ei:
        root.add_option(text)
    assert ei.value.message == error


# --- x509 sanity checks ---------------------------------------------------------------------


def test_sanity_check_refuses_an_expired_server_certificate(root, tmp_path):
    d = make_x509_dir(tmp_path / "x", server_expired=True)
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": str(d), "endpoint": "server"})
    assert ei.value.message == f"The server certificate {d}/server-cert.pem has expired"
    # sanity-check off: QEMU loads it anyway (the peer will refuse it)
    root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": str(d), "endpoint": "server",
              "sanity-check": False})


def test_sanity_check_refuses_a_certificate_from_another_ca(root, tmp_path):
    d = make_x509_dir(tmp_path / "x")
    self_signed(d)
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": str(d), "endpoint": "server"})
    assert ei.value.message == (f"Our own certificate {d}/server-cert.pem failed validation "
                                f"against {d}/ca-cert.pem: The certificate hasn't got a known issuer")


def test_sanity_check_refuses_a_client_certificate_used_by_a_server(root, tmp_path):
    d = make_x509_dir(tmp_path / "x")
    for name in ("cert", "key"):
        os.replace(d.path / f"client-{name}.pem", d.path / f"server-{name}.pem")
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": str(d), "endpoint": "server"})
    assert ei.value.message == (f"Certificate {d}/server-cert.pem purpose does not allow use "
                                "with a TLS server")


def test_sanity_check_refuses_a_ca_without_ca_constraints(root, tmp_path):
    d = make_x509_dir(tmp_path / "x")
    (d.path / "ca-cert.pem").write_bytes((d.path / "server-cert.pem").read_bytes())
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "tls-creds-x509", "id": "t", "dir": str(d)})
    assert ei.value.message == f"The certificate {d}/ca-cert.pem basic constraints do not show a CA"


def test_priority_versions_map_onto_ssl():
    assert ssl_versions(None) == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    assert ssl_versions("NORMAL:-VERS-TLS1.3") == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    assert ssl_versions("@SYSTEM:-VERS-ALL:+VERS-TLS1.3") == (ssl.TLSVersion.TLSv1_3,) * 2
    with pytest.raises(ObjectError):
        ssl_versions("NORMAL:-VERS-ALL")


# --- resolving credentials ------------------------------------------------------------------


def test_get_creds_uses_qemus_texts(root, x509dir):
    root.add({"qom-type": "tls-creds-x509", "id": "cli", "dir": str(x509dir)})
    root.add({"qom-type": "authz-simple", "id": "az", "identity": "x"})
    assert get_creds(root, "cli", "client").id == "cli"
    cases = [("nope", "client", "No TLS credentials with id 'nope'"),
             ("az", "client", "Object with id 'az' is not TLS credentials"),
             ("cli", "server", "Expected TLS credentials for a server endpoint")]
    for obj_id, endpoint, error in cases:
        with pytest.raises(ObjectError) as ei:
            get_creds(root, obj_id, endpoint)
        assert ei.value.message == error
    with pytest.raises(ObjectError) as ei:
        TLSSettings(root, "cli").server_session()
    assert ei.value.message == "Expected TLS credentials for a server endpoint"


# --- authz --------------------------------------------------------------------------------


def test_authz_simple_is_an_exact_match(root):
    root.add({"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
    assert is_allowed_by_id(root, "a", CLIENT_DN)
    assert not is_allowed_by_id(root, "a", "CN=qemu-client")
    assert not is_allowed_by_id(root, "a", CLIENT_DN.replace(",", ", "))


def test_authz_list_first_match_decides(root):
    root.add({"qom-type": "authz-list", "id": "l", "policy": "deny", "rules": [
        {"match": "C=GB,O=ACME,CN=evil*", "format": "glob", "policy": "deny"},
        {"match": "C=GB,O=ACME,CN=*", "format": "glob", "policy": "allow"},
        {"match": "C=FR,O=X,CN=one", "policy": "allow"}]})
    assert is_allowed_by_id(root, "l", CLIENT_DN)
    assert not is_allowed_by_id(root, "l", "C=GB,O=ACME,CN=evil-twin")
    assert is_allowed_by_id(root, "l", "C=FR,O=X,CN=one")
    assert not is_allowed_by_id(root, "l", "C=FR,O=X,CN=on?")  # exact rules take no patterns
    assert not is_allowed_by_id(root, "l", "C=US,O=ACME,CN=x")  # the default policy
    root.add({"qom-type": "authz-list", "id": "open", "policy": "allow"})
    assert is_allowed_by_id(root, "open", "anything")


def test_glob_is_glibs_simple_pattern():
    assert glob_match("CN=a?c*", "CN=abcdef") and glob_match("*", "")
    assert not glob_match("CN=[ab]", "CN=a")  # no character classes
    assert glob_match("CN=[ab]", "CN=[ab]") and glob_match("a.b", "a.b") and not glob_match("a.b", "axb")


def test_authz_listfile_follows_its_file(root, tmp_path):
    f = tmp_path / "rules.json"
    f.write_text(json.dumps({"policy": "deny", "rules": [{"match": CLIENT_DN, "policy": "allow"}]}))
    obj = root.add({"qom-type": "authz-listfile", "id": "lf", "filename": str(f)})
    fixed = root.add({"qom-type": "authz-listfile", "id": "fixed", "filename": str(f),
                      "refresh": False})
    assert isinstance(obj, AuthZListFile) and obj.get("refresh") is True
    assert is_allowed_by_id(root, "lf", CLIENT_DN) and not is_allowed_by_id(root, "lf", "CN=x")
    time.sleep(0.01)
    f.write_text(json.dumps({"policy": "allow", "rules": [{"match": CLIENT_DN, "policy": "deny"}]}))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not is_allowed_by_id(root, "lf", CLIENT_DN) and is_allowed_by_id(root, "lf", "CN=x")
    assert is_allowed_by_id(root, "fixed", CLIENT_DN)  # refresh off: the rules it read first
    f.write_text("{not json")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(ObjectError):
        is_allowed_by_id(root, "lf", "CN=x")  # a broken file refuses, it never allows
    with pytest.raises(ObjectError) as ei:
        root.add({"qom-type": "authz-listfile", "id": "bad", "filename": str(tmp_path / "none")})
    assert "Unable to read" in ei.value.message and "No such file" in ei.value.message


def test_authz_by_id_errors(root, tmp_path):
    root.add({"qom-type": "authz-simple", "id": "a", "identity": "x"})
    root.add({"qom-type": "tls-creds-psk", "id": "p",
              "dir": str(make_psk_dir(tmp_path, {"qemu": b"k"}))})
    with pytest.raises(ObjectError) as ei:
        is_allowed_by_id(root, "nonexist", "x")
    assert ei.value.message == "Cannot find QAuthZ object ID nonexist"
    with pytest.raises(ObjectError) as ei:
        is_allowed_by_id(root, "p", "x")
    assert ei.value.message == "Object 'p' is not a QAuthZ subclass"


# --- distinguished names and hostnames --------------------------------------------------------

_A = x509.NameAttribute
NAMES = [
    [_A(NameOID.COUNTRY_NAME, "GB"), _A(NameOID.ORGANIZATION_NAME, "ACME"),
     _A(NameOID.COMMON_NAME, "qemu-client")],
    [_A(NameOID.COMMON_NAME, 'a,b+c"d\\e<f>g;h=i#j')],
    [_A(NameOID.COMMON_NAME, " lead"), _A(NameOID.COMMON_NAME, "trail "),
     _A(NameOID.COMMON_NAME, "#hash")],
    [_A(NameOID.COMMON_NAME, "ünï€"), _A(NameOID.EMAIL_ADDRESS, "a@b.example")],
    [_A(NameOID.LOCALITY_NAME, "L"), _A(NameOID.STATE_OR_PROVINCE_NAME, "S"),
     _A(NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"), _A(NameOID.DOMAIN_COMPONENT, "dc"),
     _A(NameOID.USER_ID, "uid"), _A(NameOID.SERIAL_NUMBER, "123"), _A(NameOID.TITLE, "t"),
     _A(NameOID.GIVEN_NAME, "g"), _A(NameOID.SURNAME, "s"), _A(NameOID.POSTAL_CODE, "pc")],
    [_A(x509.ObjectIdentifier("1.2.3.4"), "x"), _A(NameOID.COMMON_NAME, "tab\there")],
]


def _self_signed_der(name: x509.Name, hosts=()) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(1).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=1)))
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName(hosts), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_client_dn_is_in_certificate_order_without_spaces():
    name = x509.Name(NAMES[0])
    assert gnutls_dn(name) == CLIENT_DN
    assert name.rfc4514_string() == "CN=qemu-client,O=ACME,C=GB"  # what authz must not see


@pytest.mark.parametrize("attrs", NAMES, ids=range(len(NAMES)))
def test_dn_matches_gnutls(attrs):
    gnutls = pytest.importorskip("qmigx._core.gnutls")
    if not gnutls.available():
        pytest.skip(gnutls.load_error())
    der = _self_signed_der(x509.Name(attrs))
    assert cert_dn(der) == gnutls.x509_dn(der)


def test_multi_valued_rdn_matches_gnutls():
    gnutls = pytest.importorskip("qmigx._core.gnutls")
    if not gnutls.available():
        pytest.skip(gnutls.load_error())
    name = x509.Name([x509.RelativeDistinguishedName([_A(NameOID.COMMON_NAME, "x"),
                                                      _A(NameOID.ORGANIZATION_NAME, "y")]),
                      x509.RelativeDistinguishedName([_A(NameOID.COUNTRY_NAME, "GB")])])
    der = _self_signed_der(name)
    assert cert_dn(der) == gnutls.x509_dn(der)


def test_match_hostname():
    import ipaddress

    der = _self_signed_der(x509.Name([_A(NameOID.COMMON_NAME, "ignored.example")]), [
        x509.DNSName("qemu.org"), x509.DNSName("*.dst.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))])
    for host in ("qemu.org", "QEMU.ORG", "a.dst.example", "127.0.0.1", "::1", "[::1]"):
        assert match_hostname(der, host), host
    for host in ("ignored.example", "a.b.dst.example", "dst.example", "10.0.0.1", "127.0.0.2"):
        assert not match_hostname(der, host), host
    cn_only = _self_signed_der(x509.Name([_A(NameOID.COMMON_NAME, "legacy.example")]))
    assert match_hostname(cn_only, "legacy.example")  # no DNS names: the CN counts
