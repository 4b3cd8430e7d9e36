"""The control plane of QEMU 10.0 without QEMU: versions, the union, channels.

(Replies compared with a real QEMU 10 are in test_qmp10_qemu.py.)
"""

from __future__ import annotations

import pytest

from qmigx.control import Capabilities, Parameters
from qmigx.control.capabilities import CAPABILITIES, CAPABILITIES_10
from qmigx.errors import CapabilityError, ParameterError
from qmigx.qmp.commands import channel_uri, commands_for
from qmigx.qmp.protocol import QMPError


def test_capability_lists_per_version():
    assert CAPABILITIES_10[-3:] == ("switchover-ack", "dirty-limit", "mapped-ram")
    assert "compress" not in CAPABILITIES_10 and "block" not in CAPABILITIES_10
    assert len(CAPABILITIES_10) == 22 and len(CAPABILITIES) == 21
    c10 = Capabilities(qemu_version="10.0")
    assert [e["capability"] for e in c10.as_qmp()] == list(CAPABILITIES_10)
    with pytest.raises(CapabilityError, match="does not accept value 'compress'"):
        c10.set("compress")
    assert c10.get("compress") is False  # the engine may ask: off, not an error
    with pytest.raises(CapabilityError, match="does not accept value 'mapped-ram'"):
        Capabilities().set("mapped-ram")


@pytest.mark.parametrize("version", ["10.0", None])
def test_rules_of_the_new_capabilities(version):
    c = Capabilities(qemu_version=version)
    with pytest.raises(CapabilityError, match="requires capability 'return-path'"):
        c.set("switchover-ack")
    c.set_many([("return-path", True), ("switchover-ack", True)])
    with pytest.raises(CapabilityError, match="requires KVM"):
        c.set("dirty-limit")
    with pytest.raises(CapabilityError, match="Mapped-ram migration is incompatible with xbzrle"):
        c.set_many([("mapped-ram", True), ("xbzrle", True)])
    c.set_many([("multifd", True), ("mapped-ram", True)])
    assert c.get("mapped-ram") and c.get("multifd")


def test_multifd_with_xbzrle_is_refused_by_10_only():
    Capabilities().set_many([("multifd", True), ("xbzrle", True)])  # QEMU 7.2 accepts it
    Capabilities(qemu_version=None).set_many([("multifd", True), ("xbzrle", True)])
    with pytest.raises(CapabilityError, match="Multifd is not compatible with xbzrle"):
        Capabilities(qemu_version="10.0").set_many([("multifd", True), ("xbzrle", True)])


def test_parameters_per_version():
    p10 = Parameters(qemu_version="10.0")
    q = p10.as_qmp()
    assert "compress-level" not in q and "block-incremental" not in q
    assert q["zero-page-detection"] == "multifd" and q["mode"] == "normal"
    assert p10.compress_level == 1  # another version's parameter reads as its default
    with pytest.raises(ParameterError, match="'compress-level' is unexpected"):
        p10.set({"compress-level": 2})
    with pytest.raises(ParameterError, match="'vcpu_dirty_limit' must be greater than 1 MB/s"):
        p10.set({"vcpu-dirty-limit": 0})
    with pytest.raises(ParameterError, match="'zero-page-detection' is unexpected"):
        Parameters().set({"zero-page-detection": "none"})
    legacy = Parameters(qemu_version="10.0", defaults={"zero-page-detection": "legacy"})
    assert legacy.get("zero-page-detection") == "legacy"
    both = Parameters(qemu_version=None)
    both.set({"compress-level": 3, "zero-page-detection": "none"})
    assert (both.compress_level, both.zero_page_detection) == (3, "none")


@pytest.mark.parametrize("addr, uri", [
    ({"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"},
     "tcp:127.0.0.1:4444"),
    ({"transport": "socket", "type": "inet", "host": "::1", "port": "4444"}, "tcp:[::1]:4444"),
    ({"transport": "socket", "type": "unix", "path": "/tmp/m.sock"}, "unix:/tmp/m.sock"),
    ({"transport": "socket", "type": "fd", "str": "migfd"}, "fd:migfd"),
    ({"transport": "file", "filename": "/tmp/v.mig", "offset": 4096}, "file:/tmp/v.mig,offset=4096"),
    ({"transport": "file", "filename": "/tmp/v.mig", "offset": 0}, "file:/tmp/v.mig"),
    ({"transport": "exec", "args": ["/bin/cat", "a b"]}, "exec:/bin/cat 'a b'"),
])
def test_channels_become_uris(addr, uri):
    assert channel_uri({"channels": [{"channel-type": "main", "addr": addr}]}) == uri


def test_channels_need_exactly_one_main():
    main = {"channel-type": "main", "addr": {"transport": "file", "filename": "x", "offset": 0}}
    for args in ({}, {"uri": "unix:/x", "channels": [main]}, {"channels": []}):
        with pytest.raises(QMPError, match="need either 'uri' or 'channels' argument"):
            channel_uri(args)
    with pytest.raises(QMPError, match="more than one main entry"):
        channel_uri({"channels": [main, main]})
    with pytest.raises(QMPError, match="no main entry"):
        channel_uri({"channels": [dict(main, **{"channel-type": "cpr"})]})
    assert channel_uri({"uri": "unix:/x", "channels": []}) == "unix:/x"


def test_command_sets():
    c72, c10 = commands_for("7.2"), commands_for("10.0")
    assert "query-migrationthreads" in c10 and "query-migrationthreads" not in c72
    assert {a.name for a in c10["migrate"].args} == {"uri", "channels", "detach", "resume"}
    assert {a.name for a in c72["migrate"].args} >= {"blk", "inc"}
    assert "exit-on-error" in {a.name for a in c10["migrate-incoming"].args}
