"""The VMState model: descriptions, fields, flags and QEMU's constructor macros.

Device state has no self-description on the wire (vmstate.md §1): both
sides must agree on an ordered field list, versions and predicates. This
module is how such a list is written down in Python, mirroring QEMU's
``VMStateDescription``/``VMStateField`` and its ``VMSTATE_*`` macros (by
the same names in lower case), so a QEMU device description can be
transcribed line by line.

The state itself is a plain dict: field name -> value; nested structs are
dicts, arrays lists, buffers bytes, pointers hold the pointee, NULL
elements of an array of pointers are None, queues are lists of dicts and
trees lists of ``(key, value)`` pairs. Where QEMU locates a count or a
size by a byte offset into the C struct (``num_offset``, ``size_offset``)
a field here names an earlier field instead (``num_field``,
``size_field``); it is looked up in the same dict, then in the enclosing
ones.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional, Sequence, Union

from qmigx.vmstate import infos as _i
from qmigx.vmstate.infos import VMStateInfo

__all__ = [
    "VMSFlag",
    "MigrationPriority",
    "VMStateField",
    "VMStateDescription",
    "vmstate_single",
    "vmstate_bool",
    "vmstate_int8",
    "vmstate_int16",
    "vmstate_int32",
    "vmstate_int64",
    "vmstate_uint8",
    "vmstate_uint16",
    "vmstate_uint32",
    "vmstate_uint64",
    "vmstate_int32_equal",
    "vmstate_int32_le",
    "vmstate_uint8_equal",
    "vmstate_uint16_equal",
    "vmstate_uint32_equal",
    "vmstate_uint64_equal",
    "vmstate_float64",
    "vmstate_cpudouble",
    "vmstate_timer",
    "vmstate_buffer",
    "vmstate_vbuffer",
    "vmstate_unused",
    "vmstate_unused_varray_uint32",
    "vmstate_array",
    "vmstate_varray_int32",
    "vmstate_varray_uint8",
    "vmstate_varray_uint16",
    "vmstate_varray_uint32",
    "vmstate_struct",
    "vmstate_vstruct",
    "vmstate_struct_array",
    "vmstate_struct_varray_int32",
    "vmstate_struct_varray_uint8",
    "vmstate_struct_varray_uint16",
    "vmstate_struct_varray_uint32",
    "vmstate_pointer",
    "vmstate_struct_pointer",
    "vmstate_array_of_pointer",
    "vmstate_array_of_pointer_to_struct",
    "vmstate_bitmap",
    "vmstate_qtailq",
    "vmstate_qlist",
    "vmstate_gtree",
    "vmstate_tmp",
    "vmstate_validate",
    "vmstate_str8",
    "vmstate_capability",
]


class VMSFlag(enum.IntFlag):
    """``VMStateField.flags`` (vmstate.md §2), QEMU's values."""

    SINGLE = 0x0001
    POINTER = 0x0002
    ARRAY = 0x0004
    STRUCT = 0x0008
    VARRAY_INT32 = 0x0010
    BUFFER = 0x0020
    ARRAY_OF_POINTER = 0x0040
    VARRAY_UINT16 = 0x0080
    VBUFFER = 0x0100
    MULTIPLY = 0x0200
    VARRAY_UINT8 = 0x0400
    VARRAY_UINT32 = 0x0800
    MUST_EXIST = 0x1000
    ALLOC = 0x2000
    MULTIPLY_ELEMENTS = 0x4000
    VSTRUCT = 0x8000


class MigrationPriority(enum.IntEnum):
    """``VMStateDescription.priority`` values of QEMU 7.2 (higher saves first)."""

    DEFAULT = 0
    IOMMU = 1
    PCI_BUS = 2
    VIRTIO_MEM = 3
    GICV3_ITS = 4
    GICV3 = 5
    MAX = 6


_F = VMSFlag
_VARRAY = _F.VARRAY_INT32 | _F.VARRAY_UINT8 | _F.VARRAY_UINT16 | _F.VARRAY_UINT32
_LIST_FLAGS = _F.ARRAY | _VARRAY | _F.MULTIPLY_ELEMENTS

FieldExists = Callable[[dict, int], bool]
Hook = Callable[[dict], Any]
InfoLike = Union[VMStateInfo, str]


def _as_info(info: InfoLike) -> VMStateInfo:
    return _i.info_by_name(info) if isinstance(info, str) else info


class VMStateField:
    """One entry of a description's field list.

    Args:
        name: member name (and vmdesc field name).
        info: the basic type, unless the field nests ``vmsd``.
        vmsd: nested description (VMS_STRUCT/VMS_VSTRUCT; the child of
            ``tmp``/``qtailq``/``qlist``; the value description of ``gtree``).
        flags: :class:`VMSFlag` bits.
        size: bytes of one element (for VMS_VBUFFER|VMS_MULTIPLY the factor).
            Defaults to the type's natural size (1 for nested structs:
            non-zero, which is what makes NULL elements send 0x30).
        num: element count for VMS_ARRAY; the factor for
            VMS_MULTIPLY_ELEMENTS.
        num_field: earlier field holding the count of a VMS_VARRAY_* field.
        size_field: earlier field holding the byte size of a VMS_VBUFFER
            field (read as int32, like QEMU).
        version_id: the field exists from this section version on
            (ignored when ``field_exists`` is given).
        field_exists: ``(obj, version) -> bool`` presence predicate.
        struct_version_id: version a VMS_VSTRUCT child is processed at.
        expected: receiver's value for ``*_equal``/``int32 le`` checks when
            the object being loaded has none.
        err_hint: appended to an ``*_equal`` mismatch error.
        key_vmsd: key description of a ``gtree`` (None = direct be64 key).
        to_tmp, from_tmp: the ``tmp`` mapping parent -> temporary and back.
    """

    __slots__ = (
        "name", "info", "vmsd", "flags", "size", "num", "num_field", "size_field",
        "version_id", "field_exists", "struct_version_id", "expected", "err_hint",
        "key_vmsd", "to_tmp", "from_tmp", "_can_compress",
    )

    def __init__(
        self,
        name: str,
        info: Optional[InfoLike] = None,
        *,
        vmsd: Optional["VMStateDescription"] = None,
        flags: int = 0,
        size: Optional[int] = None,
        num: int = 0,
        num_field: Optional[str] = None,
        size_field: Optional[str] = None,
        version_id: int = 0,
        field_exists: Optional[FieldExists] = None,
        struct_version_id: int = 0,
        expected: Any = None,
        err_hint: Optional[str] = None,
        key_vmsd: Optional["VMStateDescription"] = None,
        to_tmp: Optional[Callable[[dict], dict]] = None,
        from_tmp: Optional[Callable[[dict, dict], None]] = None,
    ) -> None:
        self.name = name
        self.info = None if info is None else _as_info(info)
        self.vmsd = vmsd
        self.flags = VMSFlag(flags)
        self.num = num
        self.num_field = num_field
        self.size_field = size_field
        self.version_id = version_id
        self.field_exists = field_exists
        self.struct_version_id = struct_version_id
        self.expected = expected
        self.err_hint = err_hint
        self.key_vmsd = key_vmsd
        self.to_tmp = to_tmp
        self.from_tmp = from_tmp
        self._can_compress: Optional[bool] = None
        f = self.flags
        if f & (_F.STRUCT | _F.VSTRUCT):
            if vmsd is None:
                raise ValueError(f"field {name!r}: VMS_STRUCT/VMS_VSTRUCT needs a vmsd")
        elif self.info is None and not (f & _F.MUST_EXIST and f & _F.ARRAY and num == 0):
            raise ValueError(f"field {name!r}: needs an info (basic type) or a nested vmsd")
        if f & _VARRAY and num_field is None:
            raise ValueError(f"field {name!r}: a VMS_VARRAY_* field needs num_field")
        if f & _VARRAY and f & _F.ARRAY:
            raise ValueError(f"field {name!r}: VMS_ARRAY cannot be combined with VMS_VARRAY_*")
        if f & _F.VBUFFER and size_field is None:
            raise ValueError(f"field {name!r}: a VMS_VBUFFER field needs size_field")
        if size is None:
            if f & (_F.STRUCT | _F.VSTRUCT):
                size = 1
            else:
                size = self.info.size if self.info is not None else 0
        self.size = size

    @property
    def is_list(self) -> bool:
        """Whether the value is a list of elements (any array flag)."""
        return bool(self.flags & _LIST_FLAGS)

    @property
    def type_name(self) -> str:
        """The vmdesc ``type`` string of this field."""
        if self.flags & _F.STRUCT:
            return "struct"
        if self.flags & _F.VSTRUCT:
            return "vstruct"
        return self.info.name if self.info is not None else "unknown"

    @property
    def can_compress(self) -> bool:
        """vmdesc "compressible": one entry with ``array_len`` stands for all elements."""
        c = self._can_compress
        if c is None:
            if self.field_exists is not None:
                c = False
            elif self.flags & _F.STRUCT:
                c = all(f.can_compress for f in self.vmsd.fields) and not self.vmsd.subsections
            else:
                c = True
            self._can_compress = c
        return c

    def __repr__(self) -> str:
        return f"<VMStateField {self.name!r} {self.type_name} flags={self.flags!r}>"


class VMStateDescription:
    """A device-state description (QEMU's ``VMStateDescription``).

    Hooks receive the state dict: ``pre_save(obj)``, ``post_save(obj)``,
    ``pre_load(obj)``, ``post_load(obj, version)``, ``needed(obj) -> bool``.
    A hook fails by raising (a :class:`~qmigx.errors.VMStateError` gets the
    location filled in) or by returning a negative errno.
    """

    __slots__ = (
        "name", "version_id", "minimum_version_id", "fields", "subsections", "needed",
        "pre_save", "post_save", "pre_load", "post_load", "priority", "unmigratable",
        "name_bytes", "desc_names", "_sub_by_name",
    )

    def __init__(
        self,
        name: str,
        version_id: int = 0,
        minimum_version_id: int = 0,
        fields: Sequence[VMStateField] = (),
        subsections: Sequence["VMStateDescription"] = (),
        *,
        needed: Optional[Callable[[dict], bool]] = None,
        pre_save: Optional[Hook] = None,
        post_save: Optional[Hook] = None,
        pre_load: Optional[Hook] = None,
        post_load: Optional[Callable[[dict, int], Any]] = None,
        priority: int = MigrationPriority.DEFAULT,
        unmigratable: bool = False,
    ) -> None:
        self.name = name
        self.version_id = version_id
        self.minimum_version_id = minimum_version_id
        self.fields = tuple(fields)
        self.subsections = tuple(subsections)
        self.needed = needed
        self.pre_save = pre_save
        self.post_save = post_save
        self.pre_load = pre_load
        self.post_load = post_load
        self.priority = priority
        self.unmigratable = unmigratable
        self.name_bytes = name.encode("utf-8", "surrogateescape")
        if len(self.name_bytes) > 255:
            raise ValueError(f"VMSD name longer than 255 bytes: {name[:40]!r}...")
        counts: dict[str, int] = {}
        for f in self.fields:
            counts[f.name] = counts.get(f.name, 0) + 1
        seen: dict[str, int] = {}
        names = []
        for f in self.fields:
            if counts[f.name] > 1:
                k = seen.get(f.name, 0)
                seen[f.name] = k + 1
                names.append(f"{f.name}[{k}]")
            else:
                names.append(f.name)
        #: vmdesc name of each field: ``name[k]`` when the name is not unique.
        self.desc_names = tuple(names)
        self._sub_by_name: dict[bytes, VMStateDescription] = {}
        for s in self.subsections:
            self._sub_by_name.setdefault(s.name_bytes, s)

    def find_subsection(self, name: bytes) -> Optional["VMStateDescription"]:
        """The declared subsection called ``name`` (first match), or None."""
        return self._sub_by_name.get(name)

    def __repr__(self) -> str:
        return f"<VMStateDescription {self.name!r} v{self.version_id}>"


# -- constructor helpers (QEMU's VMSTATE_* macros) ----------------------------


def vmstate_single(name: str, info: InfoLike, *, version: int = 0,
                   field_exists: Optional[FieldExists] = None, **kw) -> VMStateField:
    """VMSTATE_SINGLE(_TEST): one value of a basic type."""
    return VMStateField(name, info, flags=_F.SINGLE, version_id=version,
                        field_exists=field_exists, **kw)


def _single(info: VMStateInfo):
    def make(name: str, *, version: int = 0, field_exists: Optional[FieldExists] = None,
             expected: Any = None, err_hint: Optional[str] = None) -> VMStateField:
        return VMStateField(name, info, flags=_F.SINGLE, version_id=version,
                            field_exists=field_exists, expected=expected, err_hint=err_hint)
    make.__name__ = f"vmstate_{info.name.replace(' ', '_')}"
    make.__doc__ = f"One ``{info.name}`` field."
    return make


vmstate_bool = _single(_i.VMSTATE_INFO_BOOL)
vmstate_int8 = _single(_i.VMSTATE_INFO_INT8)
vmstate_int16 = _single(_i.VMSTATE_INFO_INT16)
vmstate_int32 = _single(_i.VMSTATE_INFO_INT32)
vmstate_int64 = _single(_i.VMSTATE_INFO_INT64)
vmstate_uint8 = _single(_i.VMSTATE_INFO_UINT8)
vmstate_uint16 = _single(_i.VMSTATE_INFO_UINT16)
vmstate_uint32 = _single(_i.VMSTATE_INFO_UINT32)
vmstate_uint64 = _single(_i.VMSTATE_INFO_UINT64)
vmstate_int32_equal = _single(_i.VMSTATE_INFO_INT32_EQUAL)
#: VMSTATE_INT32_POSITIVE_LE: 0 <= received <= the receiver's value.
vmstate_int32_le = _single(_i.VMSTATE_INFO_INT32_LE)
vmstate_uint8_equal = _single(_i.VMSTATE_INFO_UINT8_EQUAL)
vmstate_uint16_equal = _single(_i.VMSTATE_INFO_UINT16_EQUAL)
vmstate_uint32_equal = _single(_i.VMSTATE_INFO_UINT32_EQUAL)
#: vmdesc type "int64 equal" (QEMU's name for its uint64 equality type).
vmstate_uint64_equal = _single(_i.VMSTATE_INFO_UINT64_EQUAL)
#: QEMU 4.1 only (removed in 7.2).
vmstate_float64 = _single(_i.VMSTATE_INFO_FLOAT64)
vmstate_cpudouble = _single(_i.VMSTATE_INFO_CPUDOUBLE)
#: be64 expiry in ns, -1 = not armed.
vmstate_timer = _single(_i.VMSTATE_INFO_TIMER)
vmstate_uint64_equal.__name__ = "vmstate_uint64_equal"
vmstate_int32_le.__name__ = "vmstate_int32_le"
vmstate_cpudouble.__name__ = "vmstate_cpudouble"


def vmstate_buffer(name: str, size: int, *, version: int = 0,
                   field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_BUFFER / VMSTATE_STATIC_BUFFER: ``size`` raw bytes (value: bytes)."""
    return VMStateField(name, _i.VMSTATE_INFO_BUFFER, flags=_F.BUFFER, size=size,
                        version_id=version, field_exists=field_exists)


def vmstate_vbuffer(name: str, size_field: str, *, multiply: Optional[int] = None,
                    version: int = 0, field_exists: Optional[FieldExists] = None,
                    alloc: bool = False) -> VMStateField:
    """VMSTATE_VBUFFER(_UINT32/_ALLOC_UINT32/_MULTIPLY): bytes whose length is the
    value of ``size_field`` (times ``multiply``)."""
    flags = _F.VBUFFER | _F.POINTER
    if multiply is not None:
        flags |= _F.MULTIPLY
    if alloc:
        flags |= _F.ALLOC
    return VMStateField(name, _i.VMSTATE_INFO_BUFFER, flags=flags,
                        size=multiply if multiply is not None else 0,
                        size_field=size_field, version_id=version, field_exists=field_exists)


def vmstate_unused(size: int, *, version: int = 0,
                   field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_UNUSED(_V/_TEST/_BUFFER): ``size`` zero bytes, skipped on load."""
    return VMStateField("unused", _i.VMSTATE_INFO_UNUSED_BUFFER, flags=_F.BUFFER, size=size,
                        version_id=version, field_exists=field_exists)


def vmstate_unused_varray_uint32(num_field: str, size: int, *, version: int = 0,
                                 field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_UNUSED_VARRAY_UINT32: ``size`` × (uint32 member) discarded bytes."""
    return VMStateField("unused", _i.VMSTATE_INFO_UNUSED_BUFFER,
                        flags=_F.VARRAY_UINT32 | _F.BUFFER, size=size, num_field=num_field,
                        version_id=version, field_exists=field_exists)


def vmstate_array(name: str, info: InfoLike, num: int, *, version: int = 0,
                  field_exists: Optional[FieldExists] = None, expected: Any = None
                  ) -> VMStateField:
    """VMSTATE_ARRAY / VMSTATE_<type>_ARRAY / 2DARRAY: ``num`` elements (value: list)."""
    return VMStateField(name, info, flags=_F.ARRAY, num=num, version_id=version,
                        field_exists=field_exists, expected=expected)


def _varray(flag: VMSFlag, pointer: bool):
    def make(name: str, num_field: str, info: InfoLike, *, multiply: Optional[int] = None,
             version: int = 0, field_exists: Optional[FieldExists] = None) -> VMStateField:
        flags = flag | (_F.POINTER if pointer else 0)
        num = 0
        if multiply is not None:
            flags |= _F.MULTIPLY_ELEMENTS
            num = multiply
        return VMStateField(name, info, flags=flags, num=num, num_field=num_field,
                            version_id=version, field_exists=field_exists)
    return make


#: VMSTATE_VARRAY_INT32: count from an int32 member (``multiply`` -> MULTIPLY_ELEMENTS).
vmstate_varray_int32 = _varray(_F.VARRAY_INT32, True)
vmstate_varray_uint8 = _varray(_F.VARRAY_UINT8, False)
vmstate_varray_uint16 = _varray(_F.VARRAY_UINT16, False)
#: VMSTATE_VARRAY_UINT32 / VMSTATE_VARRAY_MULTIPLY.
vmstate_varray_uint32 = _varray(_F.VARRAY_UINT32, True)
for _n, _fn in (("vmstate_varray_int32", vmstate_varray_int32),
                ("vmstate_varray_uint8", vmstate_varray_uint8),
                ("vmstate_varray_uint16", vmstate_varray_uint16),
                ("vmstate_varray_uint32", vmstate_varray_uint32)):
    _fn.__name__ = _n


def vmstate_struct(name: str, vmsd: VMStateDescription, *, version: int = 0,
                   field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_STRUCT(_TEST): a nested struct at the receiver's own version."""
    return VMStateField(name, vmsd=vmsd, flags=_F.STRUCT, version_id=version,
                        field_exists=field_exists)


def vmstate_vstruct(name: str, vmsd: VMStateDescription, struct_version: int, *,
                    version: int = 0, field_exists: Optional[FieldExists] = None
                    ) -> VMStateField:
    """VMSTATE_VSTRUCT(_V/_TEST): nested struct processed at ``struct_version``."""
    return VMStateField(name, vmsd=vmsd, flags=_F.VSTRUCT, version_id=version,
                        struct_version_id=struct_version, field_exists=field_exists)


def vmstate_struct_array(name: str, vmsd: VMStateDescription, num: int, *, version: int = 0,
                         field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_STRUCT_ARRAY(_TEST) / STRUCT_2DARRAY: ``num`` nested structs."""
    return VMStateField(name, vmsd=vmsd, flags=_F.STRUCT | _F.ARRAY, num=num,
                        version_id=version, field_exists=field_exists)


def _struct_varray(flag: VMSFlag):
    def make(name: str, num_field: str, vmsd: VMStateDescription, *, version: int = 0,
             field_exists: Optional[FieldExists] = None, pointer: bool = False
             ) -> VMStateField:
        flags = _F.STRUCT | flag | (_F.POINTER if pointer else 0)
        return VMStateField(name, vmsd=vmsd, flags=flags, num_field=num_field,
                            version_id=version, field_exists=field_exists)
    return make


vmstate_struct_varray_int32 = _struct_varray(_F.VARRAY_INT32)
vmstate_struct_varray_uint8 = _struct_varray(_F.VARRAY_UINT8)
vmstate_struct_varray_uint16 = _struct_varray(_F.VARRAY_UINT16)
vmstate_struct_varray_uint32 = _struct_varray(_F.VARRAY_UINT32)
for _n, _fn in (("vmstate_struct_varray_int32", vmstate_struct_varray_int32),
                ("vmstate_struct_varray_uint8", vmstate_struct_varray_uint8),
                ("vmstate_struct_varray_uint16", vmstate_struct_varray_uint16),
                ("vmstate_struct_varray_uint32", vmstate_struct_varray_uint32)):
    _fn.__name__ = _n
    _fn.__doc__ = "VMSTATE_STRUCT_VARRAY_*: nested structs counted by an earlier member."


def vmstate_pointer(name: str, info: InfoLike, *, version: int = 0,
                    field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_POINTER(_TEST): the pointee's value is sent; no marker."""
    return VMStateField(name, info, flags=_F.SINGLE | _F.POINTER, version_id=version,
                        field_exists=field_exists)


def vmstate_struct_pointer(name: str, vmsd: VMStateDescription, *, version: int = 0,
                           field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_STRUCT_POINTER(_V/_TEST): a pointed-to struct."""
    return VMStateField(name, vmsd=vmsd, flags=_F.STRUCT | _F.POINTER, version_id=version,
                        field_exists=field_exists)


def vmstate_array_of_pointer(name: str, info: InfoLike, num: int, *, version: int = 0,
                             field_exists: Optional[FieldExists] = None) -> VMStateField:
    """VMSTATE_ARRAY_OF_POINTER: None elements go as the 0x30 marker."""
    return VMStateField(name, info, flags=_F.ARRAY | _F.ARRAY_OF_POINTER, num=num,
                        version_id=version, field_exists=field_exists)


def vmstate_array_of_pointer_to_struct(name: str, vmsd: VMStateDescription, num: int, *,
                                       version: int = 0) -> VMStateField:
    """VMSTATE_ARRAY_OF_POINTER_TO_STRUCT: structs or None (0x30)."""
    return VMStateField(name, vmsd=vmsd, flags=_F.ARRAY | _F.STRUCT | _F.ARRAY_OF_POINTER,
                        num=num, version_id=version)


def vmstate_bitmap(name: str, size_field: str, *, version: int = 0) -> VMStateField:
    """VMSTATE_BITMAP: value an int; bit count from an int32 member."""
    return VMStateField(name, _i.VMSTATE_INFO_BITMAP, flags=_F.VBUFFER | _F.POINTER,
                        size_field=size_field, version_id=version)


def vmstate_qtailq(name: str, vmsd: VMStateDescription, *, version: int = 0) -> VMStateField:
    """VMSTATE_QTAILQ_V: a list of dicts, each preceded by 0x01, ended by 0x00."""
    return VMStateField(name, _i.VMSTATE_INFO_QTAILQ, vmsd=vmsd, version_id=version, size=0)


def vmstate_qlist(name: str, vmsd: VMStateDescription, *, version: int = 0) -> VMStateField:
    """VMSTATE_QLIST_V (7.2): same wire form as a QTAILQ."""
    return VMStateField(name, _i.VMSTATE_INFO_QLIST, vmsd=vmsd, version_id=version, size=0)


def vmstate_gtree(name: str, vmsd: VMStateDescription,
                  key_vmsd: Optional[VMStateDescription] = None, *, version: int = 0
                  ) -> VMStateField:
    """VMSTATE_GTREE_V / GTREE_DIRECT_KEY_V (7.2): ``(key, value)`` pairs.

    ``vmsd`` describes values; ``key_vmsd`` keys (None = direct be64 keys).
    """
    return VMStateField(name, _i.VMSTATE_INFO_GTREE, vmsd=vmsd, key_vmsd=key_vmsd,
                        version_id=version, size=0)


def vmstate_tmp(vmsd: VMStateDescription, *, to_tmp: Optional[Callable[[dict], dict]] = None,
                from_tmp: Optional[Callable[[dict, dict], None]] = None,
                name: str = "tmp") -> VMStateField:
    """VMSTATE_WITH_TMP: run ``vmsd`` on a temporary derived from this object.

    ``to_tmp(parent) -> tmp`` prepares the temporary for saving and
    ``from_tmp(tmp, parent)`` applies a loaded one; without them the child
    description's fields live in the parent dict directly.
    """
    return VMStateField(name, _i.VMSTATE_INFO_TMP, vmsd=vmsd, to_tmp=to_tmp,
                        from_tmp=from_tmp, size=0)


def vmstate_validate(name: str, test: FieldExists) -> VMStateField:
    """VMSTATE_VALIDATE: no bytes; loading fails unless ``test(obj, version)``."""
    return VMStateField(name, flags=_F.ARRAY | _F.MUST_EXIST, num=0, field_exists=test)


def vmstate_str8(name: str, info: InfoLike = _i.VMSTATE_INFO_STR8, *, version: int = 0,
                 field_exists: Optional[FieldExists] = None) -> VMStateField:
    """A counted string (u8 length + bytes); value: str."""
    return VMStateField(name, info, flags=_F.SINGLE, version_id=version,
                        field_exists=field_exists)


def vmstate_capability(name: str, num_field: str, *, version: int = 0) -> VMStateField:
    """The configuration's capability list: ``num_field`` str8 capability names."""
    return VMStateField(name, _i.VMSTATE_INFO_CAPABILITY,
                        flags=_F.VARRAY_UINT32 | _F.POINTER | _F.ALLOC, num_field=num_field,
                        version_id=version)
