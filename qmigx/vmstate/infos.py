"""The basic types of VMState fields (QEMU's ``VMStateInfo``), vmstate.md §7.

A field either nests a whole description (``VMS_STRUCT``) or names one of
these types, which knows how one element goes on the wire and what its
``type`` string in the vmdesc JSON is. The codec (``codec.py``) drives
them through a small context object:

* saving: ``ctx.out`` (a bytearray) and ``ctx.save_vmsd(...)`` for the
  types that recurse into a child description (``tmp``, ``qtailq``,
  ``qlist``, ``gtree``), which is how their children end up written into
  the field's vmdesc object (the §8 quirk);
* loading: ``ctx.cur`` (a :class:`~qmigx.qemufile.Cursor`),
  ``ctx.error(...)`` building a located :class:`~qmigx.errors.VMStateError`
  and ``ctx.load_vmsd(...)``.

Values are plain Python: ints, bools, floats, bytes, str, dicts and lists.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from qmigx.errors import printable_name
from qmigx.wire import QTAILQ_END, QTAILQ_ELEM_START, VMSTATE_NULLPTR_MARKER

__all__ = [
    "VMStateInfo",
    "IntInfo",
    "BoolInfo",
    "FloatInfo",
    "TimerInfo",
    "BufferInfo",
    "UnusedBufferInfo",
    "BitmapInfo",
    "Str8Info",
    "TmpInfo",
    "QListInfo",
    "GTreeInfo",
    "NullptrInfo",
    "VMSTATE_INFO_BOOL",
    "VMSTATE_INFO_INT8",
    "VMSTATE_INFO_INT16",
    "VMSTATE_INFO_INT32",
    "VMSTATE_INFO_INT64",
    "VMSTATE_INFO_UINT8",
    "VMSTATE_INFO_UINT16",
    "VMSTATE_INFO_UINT32",
    "VMSTATE_INFO_UINT64",
    "VMSTATE_INFO_INT32_EQUAL",
    "VMSTATE_INFO_INT32_LE",
    "VMSTATE_INFO_UINT8_EQUAL",
    "VMSTATE_INFO_UINT16_EQUAL",
    "VMSTATE_INFO_UINT32_EQUAL",
    "VMSTATE_INFO_UINT64_EQUAL",
    "VMSTATE_INFO_FLOAT64",
    "VMSTATE_INFO_CPUDOUBLE",
    "VMSTATE_INFO_TIMER",
    "VMSTATE_INFO_BUFFER",
    "VMSTATE_INFO_UNUSED_BUFFER",
    "VMSTATE_INFO_BITMAP",
    "VMSTATE_INFO_TMP",
    "VMSTATE_INFO_QTAILQ",
    "VMSTATE_INFO_QLIST",
    "VMSTATE_INFO_GTREE",
    "VMSTATE_INFO_NULLPTR",
    "VMSTATE_INFO_CAPABILITY",
    "VMSTATE_INFO_STR8",
    "MIGRATION_CAPABILITIES",
    "BASIC_INFOS",
    "info_by_name",
]

_U64_MASK = (1 << 64) - 1
_DOUBLE = struct.Struct(">d")


class VMStateInfo:
    """One basic type: its vmdesc name and its wire encoding.

    Attributes:
        name: the ``type`` string of the vmdesc JSON.
        size: bytes of one element when fixed (0 when the field gives it).
        stores: whether a loaded value is kept in the object (``unused``
            bytes are read and dropped, as QEMU does).
        whole_object: the type works on the containing object rather than
            on one member (``tmp``).
        check: ``"equal"`` / ``"le"`` load-side rule, else None.
    """

    name = "unknown"
    size = 0
    stores = True
    whole_object = False
    check: Optional[str] = None

    def put(self, ctx, value: Any, size: int, field, path: str, vmdesc) -> None:
        raise NotImplementedError

    def get(self, ctx, size: int, field, current: Any, path: str) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<VMStateInfo {self.name!r}>"


def _local_value(ctx, field, current: Any, path: str, offset: int) -> int:
    local = current if current is not None else field.expected
    if local is None:
        raise ctx.error(
            f"no local value to check received '{field.info.name}' field against "
            f"(give the object a value or the field an expected=)",
            offset, path)
    return local


class IntInfo(VMStateInfo):
    """Fixed-width big-endian integers, with the ``*_equal``/``le`` rules."""

    def __init__(self, name: str, size: int, signed: bool, check: Optional[str] = None) -> None:
        self.name = name
        self.size = size
        self.signed = signed
        self.check = check
        bits = size * 8
        self.lo = -(1 << (bits - 1)) if signed else 0
        self.hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(value.__index__())
            except (AttributeError, TypeError):
                raise ctx.error(f"'{self.name}' value must be an int, not {type(value).__name__}",
                                None, path) from None
        if not self.lo <= value <= self.hi:
            raise ctx.error(f"value {value} out of range for '{self.name}'", None, path)
        ctx.out += value.to_bytes(self.size, "big", signed=self.signed)

    def get(self, ctx, size, field, current, path) -> int:
        off = ctx.cur.tell()
        v = int.from_bytes(ctx.cur.read_bytes(self.size), "big", signed=self.signed)
        if self.check == "equal":
            local = _local_value(ctx, field, current, path, off)
            if v != local:
                mask = (1 << (8 * self.size)) - 1
                hint = f"; {field.err_hint}" if field.err_hint else ""
                raise ctx.error(
                    f"'{field.name}' mismatch: local 0x{local & mask:x} != received "
                    f"0x{v & mask:x}{hint}", off, path)
        elif self.check == "le":
            local = _local_value(ctx, field, current, path, off)
            if not 0 <= v <= local:
                raise ctx.error(
                    f"Invalid value {v} expecting positive value <= {local}", off, path)
        return v


class BoolInfo(VMStateInfo):
    """One byte; the sender writes 0/1, the receiver takes any non-zero as true."""

    name = "bool"
    size = 1

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        ctx.out.append(1 if value else 0)

    def get(self, ctx, size, field, current, path) -> bool:
        return ctx.cur.read_u8() != 0


class FloatInfo(VMStateInfo):
    """An IEEE-754 double as be64 (``float64``, 4.1) or as two be32 halves,
    high word first (``CPU_Double_U``) -- the same eight bytes."""

    size = 8

    def __init__(self, name: str) -> None:
        self.name = name

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        try:
            ctx.out += _DOUBLE.pack(value)
        except struct.error:
            raise ctx.error(f"'{self.name}' value must be a float, not {type(value).__name__}",
                            None, path) from None

    def get(self, ctx, size, field, current, path) -> float:
        return _DOUBLE.unpack(ctx.cur.read_bytes(8))[0]


class TimerInfo(VMStateInfo):
    """be64 expiry time in ns; all-ones (value ``-1``) means "not armed".

    Loaded values are the unsigned expiry time, or -1 for a stopped timer;
    ``None`` is accepted on save as "not armed".
    """

    name = "timer"
    size = 8

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        if value is None:
            value = -1
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= _U64_MASK:
            raise ctx.error(f"timer value must be -1 (not armed) or a u64, not {value!r}",
                            None, path)
        ctx.out += (value & _U64_MASK).to_bytes(8, "big")

    def get(self, ctx, size, field, current, path) -> int:
        v = ctx.cur.read_be64()
        return -1 if v == _U64_MASK else v


class BufferInfo(VMStateInfo):
    """``size`` raw bytes (size fixed by the field or taken from a VBUFFER member)."""

    name = "buffer"

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        try:
            mv = memoryview(value).cast("B")
        except TypeError:
            raise ctx.error(f"buffer value must be bytes-like, not {type(value).__name__}",
                            None, path) from None
        if mv.nbytes != size:
            raise ctx.error(f"buffer holds {mv.nbytes} bytes, the field sends {size}", None, path)
        ctx.out += mv

    def get(self, ctx, size, field, current, path) -> bytes:
        return bytes(ctx.cur.read_bytes(size))


class UnusedBufferInfo(VMStateInfo):
    """``size`` bytes of space kept for compatibility: zeros on save, skipped on load."""

    name = "unused_buffer"
    stores = False

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        ctx.out += bytes(size)

    def get(self, ctx, size, field, current, path) -> None:
        ctx.cur.skip(size)
        return None


class BitmapInfo(VMStateInfo):
    """A bitmap of ``size`` bits as ⌈size/64⌉ be64 words, bit j of word k = bit 64k+j.

    The value is a Python int (bit i = bit i). Bits above ``size`` in the
    last word are carried as they are, as QEMU does.
    """

    name = "bitmap"

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        words = (size + 63) // 64
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 \
                or value.bit_length() > 64 * words:
            raise ctx.error(f"bitmap value must be a non-negative int of at most "
                            f"{64 * words} bits", None, path)
        out = bytearray(8 * words)
        for k in range(words):
            out[8 * k: 8 * k + 8] = ((value >> (64 * k)) & _U64_MASK).to_bytes(8, "big")
        ctx.out += out

    def get(self, ctx, size, field, current, path) -> int:
        words = (size + 63) // 64
        raw = ctx.cur.read_bytes(8 * words)
        v = 0
        for k in range(words - 1, -1, -1):
            v = (v << 64) | int.from_bytes(raw[8 * k: 8 * k + 8], "big")
        return v


#: Every ``MigrationCapability`` name of QEMU 7.2, in QAPI order.
MIGRATION_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress",
    "events", "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt",
)


class Str8Info(VMStateInfo):
    """A counted string (u8 length + bytes), optionally restricted to known names.

    The configuration section's ``capability`` type is this with the
    migration capability names: an unknown name fails the load.
    """

    def __init__(self, name: str, choices: Optional[tuple[str, ...]] = None) -> None:
        self.name = name
        self.choices = None if choices is None else frozenset(choices)

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
        if len(raw) > 255:
            raise ctx.error(f"string of {len(raw)} bytes does not fit a str8", None, path)
        ctx.out.append(len(raw))
        ctx.out += raw

    def get(self, ctx, size, field, current, path) -> str:
        off = ctx.cur.tell()
        n = ctx.cur.read_u8()
        s = bytes(ctx.cur.read_bytes(n)).decode("utf-8", "surrogateescape")
        if self.choices is not None:
            cstr = s.split("\0", 1)[0]
            if cstr not in self.choices:
                raise ctx.error(f"Received unknown capability {printable_name(cstr)}", off, path)
            s = cstr
        return s


class NullptrInfo(VMStateInfo):
    """The ``0x30`` byte standing for a NULL element of VMS_ARRAY_OF_POINTER."""

    name = "nullptr"
    size = 1

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        ctx.out.append(VMSTATE_NULLPTR_MARKER)

    def get(self, ctx, size, field, current, path) -> None:
        off = ctx.cur.tell()
        b = ctx.cur.read_u8()
        if b != VMSTATE_NULLPTR_MARKER:
            raise ctx.error(f"expected the NULL-pointer marker 0x30, got 0x{b:02x}", off, path)
        return None


class TmpInfo(VMStateInfo):
    """Runs the field's child description on a temporary object.

    Nothing extra goes on the wire. The temporary is built from the parent
    by the field's ``to_tmp(parent) -> dict`` and written back by
    ``from_tmp(tmp, parent)``; without them the child works on the parent
    dict itself. The child is saved at its own version and loaded at the
    field's ``version_id`` (as QEMU does).
    """

    name = "tmp"
    stores = False
    whole_object = True

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        tmp = field.to_tmp(value) if field.to_tmp is not None else value
        ctx.save_vmsd(field.vmsd, tmp, field.vmsd.version_id, vmdesc, path, value)

    def get(self, ctx, size, field, current, path) -> None:
        if field.to_tmp is None and field.from_tmp is None:
            ctx.load_vmsd(field.vmsd, current, field.version_id, path, current)
            return None
        tmp: dict = {}
        ctx.load_vmsd(field.vmsd, tmp, field.version_id, path, current)
        if field.from_tmp is not None:
            field.from_tmp(tmp, current)
        else:
            current.update(tmp)
        return None


def _check_child_version(ctx, vmsd, version: int, offset: int, path: str) -> None:
    if version > vmsd.version_id:
        raise ctx.error(f"{vmsd.name} too new", offset, path)
    if version < vmsd.minimum_version_id:
        raise ctx.error(f"{vmsd.name} too old", offset, path)


class QListInfo(VMStateInfo):
    """``qtailq`` / ``qlist``: per element u8 0x01 + the element's description,
    then u8 0x00. The value is a list of dicts.

    Saved at the element description's own version; loaded at the field's
    ``version_id``. As QEMU's loader does, any non-zero marker starts an
    element.
    """

    stores = True

    def __init__(self, name: str) -> None:
        self.name = name

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        if not isinstance(value, (list, tuple)):
            raise ctx.error(f"'{self.name}' value must be a list of dicts", None, path)
        for i, elem in enumerate(value):
            ctx.out.append(QTAILQ_ELEM_START)
            ctx.save_vmsd(field.vmsd, elem, field.vmsd.version_id, vmdesc, f"{path}[{i}]", None)
        ctx.out.append(QTAILQ_END)

    def get(self, ctx, size, field, current, path) -> list:
        _check_child_version(ctx, field.vmsd, field.version_id, ctx.cur.tell(), path)
        out: list = []
        while ctx.cur.read_u8() != QTAILQ_END:
            elem: dict = {}
            ctx.load_vmsd(field.vmsd, elem, field.version_id, f"{path}[{len(out)}]", None)
            out.append(elem)
        return out


class GTreeInfo(VMStateInfo):
    """``gtree``: be32 node count, per node u8 0x01 + key + value, then u8 0x00.

    The key is a be64 ("direct key", the field has no ``key_vmsd``) or a
    dict described by ``key_vmsd``; values are dicts described by the
    field's ``vmsd``. The Python value is a list of ``(key, value)`` pairs
    in wire order (a dict is accepted on save).
    """

    name = "gtree"

    def put(self, ctx, value, size, field, path, vmdesc) -> None:
        items = list(value.items()) if isinstance(value, dict) else list(value)
        ctx.out += len(items).to_bytes(4, "big")
        for i, item in enumerate(items):
            try:
                key, val = item
            except (TypeError, ValueError):
                raise ctx.error("gtree items must be (key, value) pairs", None, path) from None
            ctx.out.append(QTAILQ_ELEM_START)
            if field.key_vmsd is None:
                if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _U64_MASK:
                    raise ctx.error(f"direct gtree key must be a u64, not {key!r}", None,
                                    f"{path}[{i}]")
                ctx.out += key.to_bytes(8, "big")
            else:
                ctx.save_vmsd(field.key_vmsd, key, field.key_vmsd.version_id, vmdesc,
                              f"{path}[{i}].key", None)
            ctx.save_vmsd(field.vmsd, val, field.vmsd.version_id, vmdesc,
                          f"{path}[{i}].value", None)
        ctx.out.append(QTAILQ_END)

    def get(self, ctx, size, field, current, path) -> list:
        off = ctx.cur.tell()
        if field.key_vmsd is not None:
            _check_child_version(ctx, field.key_vmsd, field.version_id, off, path)
        _check_child_version(ctx, field.vmsd, field.version_id, off, path)
        nnodes = ctx.cur.read_sbe32()
        out: list = []
        while True:
            at = ctx.cur.tell()
            if ctx.cur.read_u8() == QTAILQ_END:
                break
            if len(out) + 1 > nnodes:
                raise ctx.error(f"{field.name}: more gtree nodes than the announced {nnodes}",
                                at, path)
            epath = f"{path}[{len(out)}]"
            if field.key_vmsd is None:
                key: Any = ctx.cur.read_be64()
            else:
                key = {}
                ctx.load_vmsd(field.key_vmsd, key, field.version_id, epath + ".key", None)
            val: dict = {}
            ctx.load_vmsd(field.vmsd, val, field.version_id, epath + ".value", None)
            out.append((key, val))
        if len(out) != nnodes:
            raise ctx.error(f"{field.name} inconsistent stream when loading the gtree "
                            f"({len(out)} nodes, {nnodes} announced)", off, path)
        return out


VMSTATE_INFO_BOOL = BoolInfo()
VMSTATE_INFO_INT8 = IntInfo("int8", 1, True)
VMSTATE_INFO_INT16 = IntInfo("int16", 2, True)
VMSTATE_INFO_INT32 = IntInfo("int32", 4, True)
VMSTATE_INFO_INT64 = IntInfo("int64", 8, True)
VMSTATE_INFO_UINT8 = IntInfo("uint8", 1, False)
VMSTATE_INFO_UINT16 = IntInfo("uint16", 2, False)
VMSTATE_INFO_UINT32 = IntInfo("uint32", 4, False)
VMSTATE_INFO_UINT64 = IntInfo("uint64", 8, False)
VMSTATE_INFO_INT32_EQUAL = IntInfo("int32 equal", 4, True, "equal")
VMSTATE_INFO_INT32_LE = IntInfo("int32 le", 4, True, "le")
VMSTATE_INFO_UINT8_EQUAL = IntInfo("uint8 equal", 1, False, "equal")
VMSTATE_INFO_UINT16_EQUAL = IntInfo("uint16 equal", 2, False, "equal")
VMSTATE_INFO_UINT32_EQUAL = IntInfo("uint32 equal", 4, False, "equal")
#: QEMU names its uint64 equality type "int64 equal".
VMSTATE_INFO_UINT64_EQUAL = IntInfo("int64 equal", 8, False, "equal")
VMSTATE_INFO_FLOAT64 = FloatInfo("float64")
VMSTATE_INFO_CPUDOUBLE = FloatInfo("CPU_Double_U")
VMSTATE_INFO_TIMER = TimerInfo()
VMSTATE_INFO_BUFFER = BufferInfo()
VMSTATE_INFO_UNUSED_BUFFER = UnusedBufferInfo()
VMSTATE_INFO_BITMAP = BitmapInfo()
VMSTATE_INFO_TMP = TmpInfo()
VMSTATE_INFO_QTAILQ = QListInfo("qtailq")
VMSTATE_INFO_QLIST = QListInfo("qlist")
VMSTATE_INFO_GTREE = GTreeInfo()
VMSTATE_INFO_NULLPTR = NullptrInfo()
VMSTATE_INFO_CAPABILITY = Str8Info("capability", MIGRATION_CAPABILITIES)
VMSTATE_INFO_STR8 = Str8Info("str8")

#: The types a field can name directly, by vmdesc type string.
BASIC_INFOS = {
    i.name: i
    for i in (
        VMSTATE_INFO_BOOL, VMSTATE_INFO_INT8, VMSTATE_INFO_INT16, VMSTATE_INFO_INT32,
        VMSTATE_INFO_INT64, VMSTATE_INFO_UINT8, VMSTATE_INFO_UINT16, VMSTATE_INFO_UINT32,
        VMSTATE_INFO_UINT64, VMSTATE_INFO_INT32_EQUAL, VMSTATE_INFO_INT32_LE,
        VMSTATE_INFO_UINT8_EQUAL, VMSTATE_INFO_UINT16_EQUAL, VMSTATE_INFO_UINT32_EQUAL,
        VMSTATE_INFO_UINT64_EQUAL, VMSTATE_INFO_FLOAT64, VMSTATE_INFO_CPUDOUBLE,
        VMSTATE_INFO_TIMER, VMSTATE_INFO_BUFFER, VMSTATE_INFO_UNUSED_BUFFER,
        VMSTATE_INFO_BITMAP, VMSTATE_INFO_CAPABILITY,
    )
}


def info_by_name(name: str) -> VMStateInfo:
    """The basic type whose vmdesc name is ``name`` (e.g. ``"uint32"``)."""
    try:
        return BASIC_INFOS[name]
    except KeyError:
        raise ValueError(f"unknown VMState basic type {name!r}") from None
