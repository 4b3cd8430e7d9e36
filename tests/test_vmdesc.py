"""vmdesc: QEMU's JSON text writers, the vmdesc entries written while saving,
and generic decoding with a stream's own vmdesc (analyze-migration form).

The ``qemu`` tests check everything against a real QEMU 7.2 stream: the
writer re-emits the real vmdesc character for character, the walker
consumes every FULL section exactly and re-encodes it byte-identically,
and (when QEMU's analyze-migration.py is available) the rendering equals
the script's output byte for byte.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmigx.errors import TruncatedStreamError, VMStateError
from qmigx.qemufile import Cursor, NeedData
from qmigx.qjson import FORM_41, JSONPairs, JSONWriter, dumps, loads_pairs, quote_str
from qmigx.vmstate import (
    VMSTATE_GLOBALSTATE,
    BufferInfo,
    Leaf,
    StructValue,
    VMDescBuilder,
    VMStateDescription,
    VMStateField,
    VMSFlag,
    analyze_value,
    dumps_analyze,
    encode_with_vmdesc,
    globalstate,
    load_state,
    save_state,
    vmstate_array,
    vmstate_array_of_pointer_to_struct,
    vmstate_bool,
    vmstate_gtree,
    vmstate_int8,
    vmstate_int32,
    vmstate_int32_le,
    vmstate_int64,
    vmstate_qtailq,
    vmstate_struct,
    vmstate_struct_array,
    vmstate_tmp,
    vmstate_uint8,
    vmstate_uint8_equal,
    vmstate_uint16,
    vmstate_uint32,
    vmstate_uint64,
    vmstate_unused,
    vmstate_vstruct,
    walk_with_vmdesc,
)
from qmigx.wire import SectionType
from test_vmstate import FW_CFG, SETTINGS, vmsd_and_state

H = bytes.fromhex


def describe(vmsd, obj, idstr=None, instance_id=0, form="7.2"):
    """``(vmdesc text, payload)`` for one section."""
    b = VMDescBuilder(form=form)
    out = bytearray()
    b.save_section(idstr or vmsd.name, instance_id, vmsd, obj, out)
    return b.finish(), bytes(out)


# -- the JSON writers ------------------------------------------------------------


@pytest.mark.parametrize("raw,quoted", [
    ("plain", '"plain"'),
    ('a"b\\c', r'"a\"b\\c"'),
    ("\b\f\n\r\t", r'"\b\f\n\r\t"'),
    ("\x01\x1f\x7f", r'"\u0001\u001F\u007F"'),
    ("é€", r'"\u00E9\u20AC"'),
    ("\U0001F600", r'"\uD83D\uDE00"'),
    (b"ab\x00cd", '"ab"'),
    (b"\xff", r'"\uFFFD"'),
    (b"\xc3(", r'"\uFFFD("'),
    (b"\xc0\x80", r'"\u0000"'),
    (b"\xe0\x80\x80", r'"\uFFFD"'),
    (b"\xed\xa0\x80", r'"\uFFFD"'),
    (b"\xef\xbf\xbe", r'"\uFFFD"'),
    (b"\xf4\x90\x80\x80", r'"\uFFFD"'),
    (b"\x80x", r'"\uFFFDx"'),
])
def test_quote_str_matches_qemu_escapes(raw, quoted):
    assert quote_str(raw) == quoted


_NONCHAR = lambda c: 0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE  # noqa: E731


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")))
def test_quote_str_is_ascii_json(s):
    q = quote_str(s)
    assert all(0x20 <= ord(c) < 0x7F for c in q)
    assert json.loads(q) == "".join("\ufffd" if _NONCHAR(c) else c for c in s)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=16))
def test_quote_str_any_bytes_stays_valid_json(b):
    q = quote_str(b)
    assert all(0x20 <= ord(c) < 0x7F for c in q)
    assert isinstance(json.loads(q), str)


def test_writer_forms():
    doc = JSONPairs([("a", 1), ("b", [1, "x"]), ("c", JSONPairs()), ("d", []), ("a", -2),
                     ("e", True), ("f", None)])
    assert dumps(doc) == '{"a": 1, "b": [1, "x"], "c": {}, "d": [], "a": -2, "e": true, "f": null}'
    assert dumps(doc, FORM_41) == (
        '{ "a" : 1, "b" : [ 1, "x" ], "c" : {  }, "d" : [  ], "a" : -2, "e" : true, "f" : null }')
    # 4.1 copies strings verbatim, 7.2 escapes
    assert dumps({'q"': 'x"\n'}, FORM_41) == '{ "q"" : "x"\n" }'
    assert dumps({'q"': 'x"\n'}) == r'{"q\"": "x\"\n"}'
    w = JSONWriter()
    w.start_object()
    with pytest.raises(ValueError):
        w.getvalue()
    with pytest.raises(ValueError):
        w.int64(None, 1)  # an object member needs a name
    with pytest.raises(ValueError):
        w.end_array()
    with pytest.raises(ValueError):
        JSONWriter("5.0")


def test_loads_pairs_keeps_duplicates():
    text = '{"a": 1, "a": {"b": 2, "b": 3}, "c": [{"d": 1}]}'
    tree = loads_pairs(text)
    assert tree == [("a", 1), ("a", [("b", 2), ("b", 3)]), ("c", [[("d", 1)]])]
    assert dumps(tree) == text
    assert tree.get("a").get("b") == 3
    assert tree.to_dict() == json.loads(text)


# -- vmdesc entries written while saving -------------------------------------------

SEGMENT = VMStateDescription("segment", 1, 1, [vmstate_uint32("selector"), vmstate_uint64("base")])
BMDMA = VMStateDescription("bmdma", 0, 0, [vmstate_uint8("cmd")], [
    VMStateDescription("bmdma/x", 1, 1, [vmstate_uint8("x")], needed=lambda o: False)])


def test_entry_names_arrays_and_subsections():
    dev = VMStateDescription("dev", 3, 1, [
        vmstate_uint16("cur"),
        vmstate_uint32("off", field_exists=lambda o, v: False),
        vmstate_uint32("off", version=2),
        vmstate_array("regs", "uint16", 3),
        vmstate_struct_array("segs", SEGMENT, 2),
        vmstate_struct_array("bm", BMDMA, 2),
        vmstate_array("one", "uint8", 1),
        vmstate_array("none", "uint8", 0),
        vmstate_array("dyn", "uint8", 2, field_exists=lambda o, v: True),
    ], [
        VMStateDescription("dev/a", 1, 1, [vmstate_uint8("a")]),
        VMStateDescription("dev/b", 2, 1, [vmstate_uint8("b")], needed=lambda o: False),
    ])
    obj = {"cur": 1, "off": 2, "regs": [1, 2, 3],
           "segs": [{"selector": 1, "base": 2}, {"selector": 3, "base": 4}],
           "bm": [{"cmd": 1}, {"cmd": 2}], "one": [7], "none": [], "dyn": [8, 9], "a": 5}
    text, payload = describe(dev, obj)
    assert text == (
        '{"page_size": 4096, "devices": [{"name": "dev", "instance_id": 0, "vmsd_name": "dev", '
        '"version": 3, "fields": ['
        '{"name": "cur", "type": "uint16", "size": 2}, '
        '{"name": "off[1]", "type": "uint32", "size": 4}, '
        '{"name": "regs", "array_len": 3, "type": "uint16", "size": 2}, '
        '{"name": "segs", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "segment", '
        '"version": 1, "fields": [{"name": "selector", "type": "uint32", "size": 4}, '
        '{"name": "base", "type": "uint64", "size": 8}]}, "size": 12}, '
        '{"name": "bm", "index": 0, "type": "struct", "struct": {"vmsd_name": "bmdma", '
        '"version": 0, "fields": [{"name": "cmd", "type": "uint8", "size": 1}]}, "size": 1}, '
        '{"name": "bm", "index": 1, "type": "struct", "struct": {"vmsd_name": "bmdma", '
        '"version": 0, "fields": [{"name": "cmd", "type": "uint8", "size": 1}]}, "size": 1}, '
        '{"name": "one", "type": "uint8", "size": 1}, '
        '{"name": "dyn", "index": 0, "type": "uint8", "size": 1}, '
        '{"name": "dyn", "index": 1, "type": "uint8", "size": 1}], '
        '"subsections": [{"vmsd_name": "dev/a", "version": 1, "fields": '
        '[{"name": "a", "type": "uint8", "size": 1}]}]}]}')
    tree = walk_with_vmdesc(json.loads(text)["devices"][0], Cursor(payload))
    assert analyze_value(tree) == {
        "cur": "0x0001", "off[1]": "0x00000002", "regs": ["0x0001", "0x0002", "0x0003"],
        "segs": [{"selector": "0x00000001", "base": "0x0000000000000002"},
                 {"selector": "0x00000003", "base": "0x0000000000000004"}],
        "bm": [{"cmd": "0x01"}, {"cmd": "0x02"}], "one": "0x07", "dyn": ["0x08", "0x09"],
        "dev/a": {"a": "0x05"}}


def test_entry_recursive_type_quirks():
    tmp_child = VMStateDescription("fpreg_tmp", 0, 0, [vmstate_uint64("tmp_mant"),
                                                       vmstate_uint16("tmp_exp")])
    fpreg = VMStateDescription("fpreg", 0, 0, [vmstate_tmp(tmp_child)])
    elem = VMStateDescription("elem", 1, 1, [vmstate_uint8("v")])
    vs = VMStateDescription("vs", 5, 0, [vmstate_uint8("a"), vmstate_uint8("b", version=3)])
    val = VMStateDescription("val", 1, 1, [vmstate_uint16("x")])
    key = VMStateDescription("key", 1, 1, [vmstate_uint8("k")])
    top = VMStateDescription("top", 1, 1, [
        vmstate_struct_array("fpregs", fpreg, 2),
        vmstate_qtailq("q", elem),
        vmstate_vstruct("vs", vs, 2),
        vmstate_gtree("t", val, key),
        vmstate_qtailq("empty", elem),
    ])
    obj = {"fpregs": [{"tmp_mant": 1, "tmp_exp": 2}, {"tmp_mant": 3, "tmp_exp": 4}],
           "q": [{"v": 1}, {"v": 2}], "vs": {"a": 1}, "t": [({"k": 1}, {"x": 2})], "empty": []}
    text, payload = describe(top, obj)
    fields = (
        '{"name": "fpregs", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "fpreg", '
        '"version": 0, "fields": [{"name": "tmp", "type": "tmp", "vmsd_name": "fpreg_tmp", '
        '"version": 0, "fields": [{"name": "tmp_mant", "type": "uint64", "size": 8}, '
        '{"name": "tmp_exp", "type": "uint16", "size": 2}], "size": 10}]}, "size": 10}, '
        '{"name": "q", "type": "qtailq", "vmsd_name": "elem", "version": 1, "fields": '
        '[{"name": "v", "type": "uint8", "size": 1}], "vmsd_name": "elem", "version": 1, '
        '"fields": [{"name": "v", "type": "uint8", "size": 1}], "size": 5}, '
        '{"name": "vs", "type": "vstruct", "vmsd_name": "vs", "version": 2, "fields": '
        '[{"name": "a", "type": "uint8", "size": 1}], "size": 1}, '
        '{"name": "t", "type": "gtree", "vmsd_name": "key", "version": 1, "fields": '
        '[{"name": "k", "type": "uint8", "size": 1}], "vmsd_name": "val", "version": 1, '
        '"fields": [{"name": "x", "type": "uint16", "size": 2}], "size": 9}, '
        '{"name": "empty", "type": "qtailq", "size": 1}')
    assert text == ('{"page_size": 4096, "devices": [{"name": "top", "instance_id": 0, '
                    '"vmsd_name": "top", "version": 1, "fields": [' + fields + ']}]}')
    # duplicate keys survive a pairs round trip; a dict keeps the last
    assert dumps(loads_pairs(text)) == text
    entry = json.loads(text)["devices"][0]
    tree = walk_with_vmdesc(entry, Cursor(payload))
    assert analyze_value(tree) == {
        "fpregs": [{"tmp": "00 00 00 00 00 00 00 01 00 02"},
                   {"tmp": "00 00 00 00 00 00 00 03 00 04"}],
        "q": "01 01 01 02 00", "vs": "01", "t": "00 00 00 01 01 01 00 02 00", "empty": "00"}
    assert encode_with_vmdesc(entry, tree) == payload


def test_entry_struct_with_subsection_and_null_pointer_element():
    inner = VMStateDescription("in", 1, 1, [vmstate_uint8("a")],
                               [VMStateDescription("in/s", 1, 1, [vmstate_uint8("s")])])
    elem = VMStateDescription("e", 0, 0, [vmstate_uint8("v")])
    top = VMStateDescription("top", 1, 1, [
        vmstate_struct("st", inner),
        vmstate_array_of_pointer_to_struct("p", elem, 2),
    ])
    text, payload = describe(top, {"st": {"a": 1, "s": 2}, "p": [None, {"v": 3}]})
    assert payload == H("01 05 04") + b"in/s" + H("00 00 00 01 02 30 03")
    assert text == (
        '{"page_size": 4096, "devices": [{"name": "top", "instance_id": 0, "vmsd_name": "top", '
        '"version": 1, "fields": [{"name": "st", "type": "struct", "struct": {"vmsd_name": "in", '
        '"version": 1, "fields": [{"name": "a", "type": "uint8", "size": 1}], "subsections": '
        '[{"vmsd_name": "in/s", "version": 1, "fields": [{"name": "s", "type": "uint8", '
        '"size": 1}]}]}, "size": 12}, '
        '{"name": "p", "array_len": 2, "type": "struct", "struct": {}, "size": 1}]}]}')


def test_spec_examples_timer_globalstate_piix3():
    timer = VMStateDescription("timer", 2, 1, [
        vmstate_int64("cpu_ticks_offset"), vmstate_unused(8), vmstate_int64("cpu_clock_offset")])
    b = VMDescBuilder()
    out = bytearray()
    b.save_section("timer", 0, timer, {"cpu_ticks_offset": 0, "cpu_clock_offset": 0}, out)
    b.save_section("globalstate", 0, VMSTATE_GLOBALSTATE, globalstate("running"), out)
    pci_config = type("PciConfig", (BufferInfo,), {"name": "pci config"})()
    irq_state = type("PciIrq", (BufferInfo,), {"name": "pci irq state"})()
    pcidev = VMStateDescription("PCIDevice", 2, 1, [
        vmstate_int32_le("version_id"),
        VMStateField("config", pci_config, flags=VMSFlag.BUFFER, size=256,
                     field_exists=lambda o, v: True),
        VMStateField("config", pci_config, flags=VMSFlag.BUFFER, size=4096,
                     field_exists=lambda o, v: False),
        VMStateField("irq_state", irq_state, flags=VMSFlag.BUFFER, size=16, version_id=2),
    ])
    piix3 = VMStateDescription("PIIX3", 3, 2, [
        vmstate_struct("dev", pcidev),
        vmstate_array("pci_irq_levels_vmstate", "int32", 4, version=3),
    ], [VMStateDescription("PIIX3/rcr", 1, 1, [vmstate_uint8("rcr")], needed=lambda o: False)])
    b.save_section("0000:00:01.0/PIIX3", 0, piix3, {
        "dev": {"version_id": 2, "config": bytes(256), "irq_state": bytes(16)},
        "pci_irq_levels_vmstate": [0, 0, 0, 0]}, out)
    b.add_old_style("spapr/htab", 0, 5)
    assert b.finish() == (
        '{"page_size": 4096, "devices": ['
        '{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": '
        '[{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, {"name": "unused", "type": '
        '"unused_buffer", "size": 8}, {"name": "cpu_clock_offset", "type": "int64", "size": 8}]}, '
        '{"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1, '
        '"fields": [{"name": "size", "type": "uint32", "size": 4}, {"name": "runstate", "type": '
        '"buffer", "size": 100}]}, '
        '{"name": "0000:00:01.0/PIIX3", "instance_id": 0, "vmsd_name": "PIIX3", "version": 3, '
        '"fields": [{"name": "dev", "type": "struct", "struct": {"vmsd_name": "PCIDevice", '
        '"version": 2, "fields": [{"name": "version_id", "type": "int32 le", "size": 4}, '
        '{"name": "config[0]", "type": "pci config", "size": 256}, {"name": "irq_state", '
        '"type": "pci irq state", "size": 16}]}, "size": 276}, {"name": '
        '"pci_irq_levels_vmstate", "array_len": 4, "type": "int32", "size": 4}]}, '
        '{"name": "spapr/htab", "instance_id": 0, "size": 5, "fields": [{"name": "data", '
        '"size": 5, "type": "buffer"}]}]}')
    assert b.finish_bytes() == b.finish().encode()


def test_qjson_41_form_of_a_section():
    timer = VMStateDescription("timer", 2, 1, [vmstate_int64("a"), vmstate_array("r", "uint8", 0)])
    text, _ = describe(timer, {"a": 0, "r": []}, form=FORM_41)
    assert text == ('{ "page_size" : 4096, "devices" : [ { "name" : "timer", "instance_id" : 0, '
                    '"vmsd_name" : "timer", "version" : 2, "fields" : [ { "name" : "a", '
                    '"type" : "int64", "size" : 8 } ] } ] }')


# -- generic decoding (§8.1) ---------------------------------------------------------


def test_analyze_int_bool_and_generic_renderings():
    vmsd = VMStateDescription("d", 1, 1, [
        vmstate_int8("s8"), vmstate_int32("s32"), vmstate_uint8("u8"), vmstate_bool("b"),
        vmstate_uint8_equal("eq", expected=0xFE), vmstate_unused(2),
        VMStateField("cfg", type("X", (BufferInfo,), {"name": "pci config"})(),
                     flags=VMSFlag.BUFFER, size=3),
    ])
    text, payload = describe(vmsd, {"s8": -1, "s32": 5, "u8": 0xFF, "b": True, "eq": 0xFE,
                                    "cfg": b"\x00\x10\xff"})
    tree = walk_with_vmdesc(json.loads(text)["devices"][0], Cursor(payload))
    got = analyze_value(tree)
    assert got == {"s8": "0xff (-1)", "s32": "0x00000005", "u8": "0xff", "b": True,
                   "eq": "0xfe (-2)", "unused": "00 00", "cfg": "00 10 ff"}
    assert dumps_analyze(got) == (
        '{\n    "s8": "0xff (-1)",\n    "s32": "0x00000005",\n    "u8": "0xff",\n'
        '    "b": true,\n    "eq": "0xfe (-2)",\n    "unused": "00 00",\n    "cfg": "00 10 ff"\n}')
    # leaves can be edited and re-encoded
    tree["s32"].set(-2)
    tree["b"].set(False)
    assert tree["s8"].value == -1 and tree["u8"].value == 255
    assert tree["cfg"].value == b"\x00\x10\xff"
    entry = json.loads(text)["devices"][0]
    again = encode_with_vmdesc(entry, tree)
    assert again == payload[:1] + H("ff ff ff fe") + payload[5:6] + b"\x00" + payload[7:]
    with pytest.raises(ValueError):
        tree["cfg"].set(b"toolong")


def test_walk_errors_name_offset_section_and_field():
    text, payload = describe(FW_CFG, {"cur_entry": 1, "cur_offset": 2, "dma_addr": 3,
                                      "table_mr_size": 4, "linker_mr_size": 5, "rsdp_mr_size": 6})
    entry = json.loads(text)["devices"][0]
    base = 5000
    bad = bytearray(payload)
    bad[6] = 0x04  # the first subsection marker
    with pytest.raises(VMStateError, match="Subsection fw_cfg/dma not found") as ei:
        walk_with_vmdesc(entry, Cursor(bytes(bad), base=base), section="fw_cfg (8)")
    e = ei.value
    assert (e.offset, e.section, e.field) == (base + 6, "fw_cfg (8)", "fw_cfg/dma")
    bad = bytearray(payload)
    bad[10] ^= 0x20  # a letter of the subsection name
    with pytest.raises(VMStateError, match="vmdesc expects 'fw_cfg/dma'"):
        walk_with_vmdesc(entry, Cursor(bytes(bad)))
    with pytest.raises(TruncatedStreamError) as ei:
        walk_with_vmdesc(entry, Cursor(payload[:-3], base=base), section="fw_cfg (8)")
    assert ei.value.offset == base + len(payload) - 3
    assert ei.value.field == "fw_cfg/acpi_mr.rsdp_mr_size"
    with pytest.raises(NeedData):
        walk_with_vmdesc(entry, Cursor(payload[:-3]), eof=False)
    with pytest.raises(VMStateError, match="no 'fields'"):
        walk_with_vmdesc({"name": "x"}, Cursor(payload))
    with pytest.raises(VMStateError, match="'struct' description"):
        walk_with_vmdesc({"fields": [{"name": "s", "type": "struct", "size": 1}]}, Cursor(b"\0"))
    with pytest.raises(VMStateError, match="internal index"):
        walk_with_vmdesc({"fields": [{"name": "a", "index": 1, "type": "uint8", "size": 1}]},
                         Cursor(b"\0"))


def test_walk_follows_the_scripts_array_rules():
    # array_len 0 still reads element 0, as the script does
    tree = walk_with_vmdesc({"fields": [{"name": "a", "array_len": 0, "type": "uint8",
                                         "size": 1}]}, Cursor(b"\x07"))
    assert analyze_value(tree) == {"a": ["0x07"]}
    # a later plain field of the same name replaces the list (the dict keeps one key)
    entry = {"fields": [{"name": "a", "array_len": 2, "type": "uint8", "size": 1},
                        {"name": "a", "type": "uint16", "size": 2}]}
    tree = walk_with_vmdesc(entry, Cursor(b"\x01\x02\x00\x03"))
    assert analyze_value(tree) == {"a": "0x0003"}
    assert encode_with_vmdesc(entry, tree) == b"\x01\x02\x00\x03"
    assert [leaf.raw for leaf in tree.leaves()] == [b"\x01", b"\x02", b"\x00\x03"]


def _entry_and_payload(vmsd, obj):
    text, payload = describe(vmsd, copy.deepcopy(obj))
    return text, json.loads(text)["devices"][0], payload


@SETTINGS
@given(vmsd_and_state(walkable=True))
def test_random_walk_consumes_exactly_and_reencodes(case):
    vmsd, obj, load = case
    text, entry, payload = _entry_and_payload(vmsd, obj)
    # the text survives a parse keeping duplicate keys, in both forms
    assert dumps(loads_pairs(text)) == text
    text41, _ = describe(vmsd, copy.deepcopy(obj), form=FORM_41)
    assert dumps(loads_pairs(text), FORM_41) == text41
    cur = Cursor(payload + b"\x7e", base=77)
    tree = walk_with_vmdesc(entry, cur, section="dev (3)")
    assert cur.pos == len(payload)
    assert encode_with_vmdesc(entry, tree) == payload
    rendered = dumps_analyze(analyze_value(tree))
    assert json.loads(rendered) == analyze_value(tree)
    # the payload also loads with the description itself
    got = load_state(vmsd, Cursor(payload + b"\x7e"), vmsd.version_id, obj=copy.deepcopy(load),
                     complete=True)
    assert got == obj


@SETTINGS
@given(vmsd_and_state(walkable=True), st.data())
def test_random_walk_on_bad_payloads(case, data):
    vmsd, obj, _ = case
    _, entry, payload = _entry_and_payload(vmsd, obj)
    if payload:
        cut = data.draw(st.integers(0, len(payload) - 1))
        with pytest.raises(TruncatedStreamError) as ei:
            walk_with_vmdesc(entry, Cursor(payload[:cut], base=10), section="s (1)")
        assert ei.value.offset == 10 + cut and ei.value.section == "s (1)"
        with pytest.raises(NeedData):
            walk_with_vmdesc(entry, Cursor(payload[:cut]), eof=False)
    bad = bytearray(payload + data.draw(st.binary(max_size=4)))
    for _ in range(data.draw(st.integers(0, 3)) if bad else 0):
        bad[data.draw(st.integers(0, len(bad) - 1))] = data.draw(st.integers(0, 255))
    try:
        tree = walk_with_vmdesc(entry, Cursor(bytes(bad)))
    except (VMStateError, TruncatedStreamError):
        return
    again = encode_with_vmdesc(entry, tree)
    assert bytes(bad).startswith(again)
    assert isinstance(json.loads(dumps_analyze(analyze_value(tree))), dict)


def test_walk_null_struct_elements_and_hostile_descriptions():
    elem = VMStateDescription("e", 0, 0, [vmstate_uint8("v")], [
        VMStateDescription("e/s", 1, 1, [vmstate_uint8("s")], needed=lambda o: False)])
    top = VMStateDescription("top", 1, 1, [vmstate_array_of_pointer_to_struct("p", elem, 3)])
    text, payload = describe(top, {"p": [{"v": 1}, None, {"v": 2}]})
    assert '{"name": "p", "index": 1, "type": "struct", "struct": {}, "size": 1}' in text
    entry = json.loads(text)["devices"][0]
    tree = walk_with_vmdesc(entry, Cursor(payload))
    assert analyze_value(tree) == {"p": [{"v": "0x01"}, "30", {"v": "0x02"}]}
    assert encode_with_vmdesc(entry, tree) == payload == H("01 30 02")
    # a huge array of elements without bytes is refused, not materialised
    with pytest.raises(VMStateError, match="without bytes"):
        walk_with_vmdesc({"fields": [{"name": "a", "array_len": 1 << 40, "type": "buffer",
                                      "size": 0}]}, Cursor(b""))
    with pytest.raises(TruncatedStreamError):
        walk_with_vmdesc({"fields": [{"name": "a", "array_len": 1 << 40, "type": "uint8",
                                      "size": 1}]}, Cursor(b"\x01\x02"))
    deep: dict = {"fields": []}
    for _ in range(100):
        deep = {"fields": [{"name": "s", "type": "struct", "struct": deep, "size": 0}]}
    with pytest.raises(VMStateError, match="deeper than"):
        walk_with_vmdesc(deep, Cursor(b""))


def test_structvalue_getitem():
    tree = walk_with_vmdesc({"fields": [{"name": "a", "array_len": 2, "type": "uint8", "size": 1},
                                        {"name": "b", "type": "bool", "size": 1}]},
                            Cursor(b"\x01\x02\x01"))
    assert [x.value for x in tree["a"]] == [1, 2] and tree["b"].value is True
    with pytest.raises(KeyError):
        tree["c"]
    assert isinstance(tree, StructValue) and isinstance(tree["b"], Leaf)


# -- a real QEMU 7.2 stream ------------------------------------------------------------

DATA = os.path.join(os.path.dirname(__file__), "data")


def _render_stream(data: bytes, reference: dict) -> str:
    """The analyze-migration text of a whole stream: device sections decoded
    here, the RAM section (not a VMState section) taken from ``reference``."""
    from qmigx.stream import find_vmdesc

    raw = find_vmdesc(data)[1]
    desc = json.loads(raw)
    index = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    order, full, _ = _sections(data)
    result = {label: None for label in order}
    for ev in full:
        entry = index[(ev.section.idstr, ev.section.instance_id)]
        cur = Cursor(ev.payload, base=ev.offset)
        tree = walk_with_vmdesc(entry, cur, section=ev.section.label)
        assert cur.pos == len(ev.payload), ev.section.label
        assert encode_with_vmdesc(entry, tree) == ev.payload
        result[ev.section.label] = analyze_value(tree)
    for label, value in result.items():
        if value is None:
            result[label] = reference[label]
    assert list(result) == list(reference)
    return dumps_analyze(result) + "\n"


def test_committed_qemu72_stream_matches_analyze_migration_output():
    import gzip

    from qmigx.stream import find_vmdesc

    with gzip.open(os.path.join(DATA, "qemu72-pc-paused.mig.gz")) as f:
        data = f.read()
    with gzip.open(os.path.join(DATA, "qemu72-pc-paused.state.json.gz")) as f:
        state = f.read().decode()
    text = find_vmdesc(data)[1].decode()
    assert dumps(loads_pairs(text)) == text
    assert _render_stream(data, json.loads(state)) == state


ANALYZE_SCRIPT = os.environ.get(
    "QMIGX_ANALYZE_MIGRATION", "/tmp/qsrc/qemu-7.2.0/scripts/analyze-migration.py")


@pytest.fixture(scope="module")
def real_stream(tmp_path_factory):
    from qemu_support.harness import DEVICE_NAMES, save_stream

    workdir = tmp_path_factory.mktemp("vmdesc")
    path = workdir / "real.mig"
    save_stream(path, ram="32M", guest=False, devices=DEVICE_NAMES, workdir=workdir)
    return path


def _sections(data: bytes):
    from qmigx.stream import Configuration, SectionData, SectionStart, StreamParser

    parser = StreamParser()  # footer-delimited: independent of any vmdesc walker
    parser.feed(data)
    parser.feed_eof()
    order, full, config = [], [], None
    for ev in parser.events():
        if isinstance(ev, Configuration):
            config = ev
        elif isinstance(ev, SectionStart) and ev.section.label not in order:
            order.append(ev.section.label)
        elif isinstance(ev, SectionData) and ev.type == SectionType.SECTION_FULL:
            full.append(ev)
    return order, full, config


@pytest.mark.qemu
def test_real_vmdesc_text_and_every_full_section(real_stream):
    from qmigx.stream import find_vmdesc

    data = real_stream.read_bytes()
    _, raw = find_vmdesc(data)
    text = raw.decode()
    assert dumps(loads_pairs(text)) == text
    desc = json.loads(text)
    index = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    _, full, config = _sections(data)
    assert len(full) == len(desc["devices"]) > 20
    for ev in full:
        entry = index[(ev.section.idstr, ev.section.instance_id)]
        cur = Cursor(ev.payload, base=ev.offset)
        tree = walk_with_vmdesc(entry, cur, section=ev.section.label)
        assert cur.pos == len(ev.payload), ev.section.label
        assert encode_with_vmdesc(entry, tree) == ev.payload
    # our descriptions of a few sections give QEMU's exact entry and bytes
    by_name = {ev.section.idstr: ev for ev in full}
    for vmsd, idstr in ((FW_CFG, "fw_cfg"), (VMSTATE_GLOBALSTATE, "globalstate")):
        ev = by_name[idstr]
        cur = Cursor(ev.payload + b"\x7e")
        state = load_state(vmsd, cur, ev.section.version_id, complete=True)
        assert cur.pos == len(ev.payload)
        b = VMDescBuilder()
        out = bytearray()
        b.save_section(idstr, ev.section.instance_id, vmsd, state, out)
        assert bytes(out) == ev.payload
        entry_text = b.finish()[len('{"page_size": 4096, "devices": ['):-2]
        assert entry_text in text
    assert state["state"] == "paused"
    from qmigx.vmstate import VMSTATE_CONFIGURATION, make_configuration_vmsd

    cfg = load_state(make_configuration_vmsd(machine_type="pc-i440fx-7.2", capabilities=[]),
                     Cursor(config.raw + b"\x01"), 0)
    assert cfg["name"] == b"pc-i440fx-7.2"
    out = bytearray()
    save_state(VMSTATE_CONFIGURATION, {"name": cfg["name"], "capabilities": []}, out)
    assert bytes(out) == config.raw


@pytest.mark.qemu
def test_real_stream_renders_like_analyze_migration(real_stream):
    if not os.path.exists(ANALYZE_SCRIPT):
        pytest.skip("QEMU's analyze-migration.py not available")
    script = subprocess.run([sys.executable, ANALYZE_SCRIPT, "-f", str(real_stream)],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    reference = json.loads(script, object_pairs_hook=collections.OrderedDict)
    assert _render_stream(real_stream.read_bytes(), reference) == script
