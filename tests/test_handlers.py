"""The handler registry: matching, version checks, loading through the parser."""

from __future__ import annotations

import io

import pytest

from qmigx.errors import UnknownSectionError, VMStateError
from qmigx.savevm import SaveVMRegistry as HandlerRegistry
from qmigx.ram import RAMBlockList
from qmigx.tools.streams import StreamReader, save_stream
from qmigx.stream import SectionData
from qmigx.vmstate import VMStateDescription, vmstate_uint16, vmstate_uint32

V1 = VMStateDescription("ctr", 1, 1, [vmstate_uint32("count")])
V2 = VMStateDescription("ctr", 2, 1, [vmstate_uint32("count"), vmstate_uint16("extra", version=2)])
V3_MIN3 = VMStateDescription("ctr", 3, 3, [vmstate_uint32("count")])


def stream_of(registry: HandlerRegistry) -> bytes:
    out = io.BytesIO()
    save_stream(out.write, RAMBlockList(), registry.device_states())
    return out.getvalue()


def load_into(data: bytes, registry: HandlerRegistry) -> list:
    reader = StreamReader(data, vmdesc=None, registry=registry)
    return [ev for ev in reader.events() if isinstance(ev, SectionData)]


def test_instances_are_numbered_and_loaded_into_their_state():
    src = HandlerRegistry()
    src.register("ctr", V2, {"count": 7, "extra": 1})
    src.register("ctr", V2, {"count": 9, "extra": 2})
    dst = HandlerRegistry()
    a = dst.register("ctr", V2)
    b = dst.register("ctr", V2)
    evs = load_into(stream_of(src), dst)
    assert [(e.section.idstr, e.section.instance_id) for e in evs] == [("ctr", 0), ("ctr", 1)]
    assert a.state == {"count": 7, "extra": 1} and b.state == {"count": 9, "extra": 2}


def test_older_version_loads_without_the_newer_field():
    src = HandlerRegistry()
    src.register("ctr", V1, {"count": 5})
    dst = HandlerRegistry()
    h = dst.register("ctr", V2)
    load_into(stream_of(src), dst)
    assert h.state == {"count": 5}


def test_newer_version_is_refused():
    src = HandlerRegistry()
    src.register("ctr", V2, {"count": 1, "extra": 2})
    dst = HandlerRegistry()
    dst.register("ctr", V1)
    with pytest.raises(VMStateError) as ei:
        load_into(stream_of(src), dst)
    assert "unsupported version 2" in str(ei.value)


def test_too_old_version_is_refused():
    src = HandlerRegistry()
    src.register("ctr", V2, {"count": 1, "extra": 2})
    dst = HandlerRegistry()
    dst.register("ctr", V3_MIN3)
    with pytest.raises(VMStateError) as ei:
        load_into(stream_of(src), dst)
    assert "too old" in str(ei.value)


def test_compat_match_of_a_bare_vmsd_name():
    src = HandlerRegistry()
    src.register("ctr", V1, {"count": 3})
    dst = HandlerRegistry()
    h = dst.register("0000:00:04.0/ctr", V1, instance_id=0)
    assert dst.find("ctr", 0) is h
    assert dst.find("ctr", 1) is None


def test_unknown_instance():
    dst = HandlerRegistry()
    dst.register("ctr", V1)
    with pytest.raises(UnknownSectionError):
        from qmigx.qemufile import Cursor
        from qmigx.stream import Section

        dst.load(Cursor(b"\0\0\0\1"), Section(3, "ctr", 5, 1))
