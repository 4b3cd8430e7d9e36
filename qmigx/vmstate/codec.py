"""Saving and loading device state by its description (vmstate.md §3-§6, §8).

This is QEMU's VMState interpreter (vmstate.c) over dicts: fields in
order, present by ``field_exists`` or version, counts and sizes from
earlier fields, nested structs with their own subsections in the middle
of the parent's payload, subsections after the fields (sent when
``needed``; on load recognised by the peek rules of §5), hooks around it
all. While saving it can also write the section's vmdesc entry (§8) into
a :class:`~qmigx.qjson.JSONWriter`, with every quirk of QEMU 7.2's text.

Loading never trusts a length: byte counts are checked against the
cursor before anything is allocated, element lists grow one decoded
element at a time, and running out of bytes raises the cursor's
:class:`~qmigx.qemufile.NeedData` unchanged (the stream parser decides
whether that means "wait" or "truncated"). Every other problem is a
:class:`~qmigx.errors.VMStateError` naming the absolute offset, the
caller's section label and the dotted field path.
"""

from __future__ import annotations

from typing import Any, Optional

from qmigx.errors import VMStateError, printable_name
from qmigx.qemufile import Cursor, NeedData
from qmigx.vmstate.fields import VMSFlag, VMStateDescription, VMStateField
from qmigx.vmstate.infos import VMSTATE_INFO_NULLPTR
from qmigx.wire import SectionType

__all__ = ["save_state", "load_state", "section_needed", "check_migratable"]

_F = VMSFlag
_SUBSECTION = int(SectionType.SUBSECTION)
#: Elements that consume no bytes cannot be bounded by the input size;
#: more than this many of them in one field is refused.
MAX_ZERO_SIZE_ELEMENTS = 1 << 16


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _hook_failed(result: Any) -> bool:
    return isinstance(result, int) and not isinstance(result, bool) and result < 0


class _Base:
    """Lookups shared by saving and loading: counts, sizes, presence."""

    section: Optional[str]
    parents: list

    def error(self, message: str, offset: Optional[int], path: Optional[str]) -> VMStateError:
        return VMStateError(message, offset=offset, section=self.section, field=path or None)

    def _member(self, obj: dict, name: str, path: str, what: str, offset: Optional[int]) -> Any:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        for parent in reversed(self.parents):
            if isinstance(parent, dict) and name in parent:
                return parent[name]
        raise self.error(f"{what} member {name!r} has no value", offset, path)

    def _int_member(self, obj, name, path, what, offset) -> int:
        v = self._member(obj, name, path, what, offset)
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                v = v.__index__()
            except (AttributeError, TypeError):
                raise self.error(f"{what} member {name!r} is not an int: {v!r}",
                                 offset, path) from None
        return v

    def n_elems(self, field: VMStateField, obj: dict, path: str, offset: Optional[int]) -> int:
        """Element count as QEMU computes it (C int arithmetic included)."""
        f = field.flags
        if f & _F.ARRAY:
            n = field.num
        elif f & (_F.VARRAY_INT32 | _F.VARRAY_UINT32 | _F.VARRAY_UINT16 | _F.VARRAY_UINT8):
            v = self._int_member(obj, field.num_field, path, "count", offset)
            if f & (_F.VARRAY_INT32 | _F.VARRAY_UINT32):
                n = _int32(v)
            elif f & _F.VARRAY_UINT16:
                n = v & 0xFFFF
            else:
                n = v & 0xFF
        else:
            n = 1
        if f & _F.MULTIPLY_ELEMENTS:
            n = _int32(n * field.num)
        return max(n, 0)

    def elem_size(self, field: VMStateField, obj: dict, path: str, offset: Optional[int]) -> int:
        if not field.flags & _F.VBUFFER:
            return field.size
        size = _int32(self._int_member(obj, field.size_field, path, "size", offset))
        if field.flags & _F.MULTIPLY:
            size = _int32(size * field.size)
        if size < 0:
            raise self.error(f"negative size {size} for {field.name!r}", offset, path)
        return size

    def present(self, field: VMStateField, obj: dict, version: int) -> bool:
        if field.field_exists is not None:
            return bool(field.field_exists(obj, version))
        return field.version_id <= version


class _Saver(_Base):
    def __init__(self, out: bytearray, section: Optional[str]) -> None:
        self.out = out
        self.section = section
        self.parents: list = []

    def save_vmsd(self, vmsd: VMStateDescription, obj: dict, version: int, vmdesc,
                  path: str, parent: Optional[dict]) -> None:
        if parent is not None:
            self.parents.append(parent)
        try:
            self._save(vmsd, obj, version, vmdesc, path)
        finally:
            if parent is not None:
                self.parents.pop()

    def _save(self, vmsd: VMStateDescription, obj: dict, version: int, vmdesc,
              path: str) -> None:
        if not isinstance(obj, dict):
            raise self.error(f"state of {vmsd.name!r} must be a dict, not "
                             f"{type(obj).__name__}", None, path)
        if vmsd.pre_save is not None and _hook_failed(vmsd.pre_save(obj)):
            raise self.error(f"pre-save failed: {vmsd.name}", None, path)
        if vmdesc is not None:
            vmdesc.str("vmsd_name", vmsd.name)
            vmdesc.int64("version", version)
            vmdesc.start_array("fields")
        ok = False
        try:
            for fi, field in enumerate(vmsd.fields):
                if self.present(field, obj, version):
                    self._save_field(vmsd, fi, field, obj, vmdesc, path)
                elif field.flags & _F.MUST_EXIST:
                    raise self.error(f"Output state validation failed: {vmsd.name}/{field.name}",
                                     None, _join(path, field.name))
            if vmdesc is not None:
                vmdesc.end_array()
            self._save_subsections(vmsd, obj, vmdesc, path)
            ok = True
        finally:
            if vmsd.post_save is not None:
                r = vmsd.post_save(obj)
                if ok and _hook_failed(r):
                    raise self.error(f"post-save failed: {vmsd.name}", None, path)

    def _save_field(self, vmsd, fi: int, field: VMStateField, obj: dict, vmdesc,
                    path: str) -> None:
        fpath = _join(path, field.name)
        n = self.n_elems(field, obj, fpath, None)
        size = self.elem_size(field, obj, fpath, None)
        info = field.info
        is_list = field.is_list
        if info is not None and info.whole_object:
            value: Any = obj
        elif (info is not None and not info.stores) or n == 0:
            value = obj.get(field.name)
        elif field.name in obj:
            value = obj[field.name]
        else:
            raise self.error(f"no value for field {field.name!r} of {vmsd.name!r}", None, fpath)
        if is_list and n and value is not None:
            try:
                have = len(value)
            except TypeError:
                raise self.error(f"array field {field.name!r} needs a list, not "
                                 f"{type(value).__name__}", None, fpath) from None
            if have < n:
                raise self.error(f"array field {field.name!r} has {have} elements, "
                                 f"{n} are sent", None, fpath)
        loop = vmdesc
        out = self.out
        struct_like = field.flags & (_F.STRUCT | _F.VSTRUCT)
        for i in range(n):
            if is_list:
                elem = value[i] if value is not None else None
                epath = f"{fpath}[{i}]"
            else:
                elem = value
                epath = fpath
            if loop is not None:
                self._desc_field_start(loop, vmsd, fi, field, i, n)
            start = len(out)
            if elem is None and field.flags & _F.ARRAY_OF_POINTER:
                if size:
                    VMSTATE_INFO_NULLPTR.put(self, None, size, field, epath, loop)
            elif field.flags & _F.STRUCT:
                self.save_vmsd(field.vmsd, elem, field.vmsd.version_id, loop, epath, obj)
            elif struct_like:
                self.save_vmsd(field.vmsd, elem, field.struct_version_id, loop, epath, obj)
            elif info is None:
                raise self.error(f"field {field.name!r} has no type", None, epath)
            else:
                info.put(self, elem, size, field, epath, loop)
            if loop is not None:
                if field.flags & _F.STRUCT:
                    loop.end_object()
                loop.int64("size", len(out) - start)
                loop.end_object()
                if field.can_compress:
                    loop = None

    @staticmethod
    def _desc_field_start(w, vmsd, fi: int, field: VMStateField, i: int, n: int) -> None:
        w.start_object(None)
        w.str("name", vmsd.desc_names[fi])
        if n > 1:
            if field.can_compress:
                w.int64("array_len", n)
            else:
                w.int64("index", i)
        w.str("type", field.type_name)
        if field.flags & _F.STRUCT:
            w.start_object("struct")

    def _save_subsections(self, vmsd: VMStateDescription, obj: dict, vmdesc, path: str) -> None:
        opened = False
        for sub in vmsd.subsections:
            if sub.needed is not None and not sub.needed(obj):
                continue
            if vmdesc is not None:
                if not opened:
                    vmdesc.start_array("subsections")
                    opened = True
                vmdesc.start_object(None)
            out = self.out
            out.append(_SUBSECTION)
            out.append(len(sub.name_bytes))
            out += sub.name_bytes
            out += (sub.version_id & 0xFFFFFFFF).to_bytes(4, "big")
            self._save(sub, obj, sub.version_id, vmdesc, _join(path, sub.name))
            if vmdesc is not None:
                vmdesc.end_object()
        if opened:
            vmdesc.end_array()


class _Loader(_Base):
    def __init__(self, cur: Cursor, section: Optional[str], complete: bool) -> None:
        self.cur = cur
        self.section = section
        self.complete = complete
        self.parents: list = []

    def load_vmsd(self, vmsd: VMStateDescription, obj: dict, version: int, path: str,
                  parent: Optional[dict]) -> None:
        if parent is not None:
            self.parents.append(parent)
        try:
            self._load(vmsd, obj, version, path)
        finally:
            if parent is not None:
                self.parents.pop()

    def _run_hook(self, hook, vmsd, what: str, path: str, *args) -> None:
        at = self.cur.tell()
        try:
            r = hook(*args)
        except VMStateError as e:
            if e.offset is None:
                e.offset = at
            if e.section is None:
                e.section = self.section
            if e.field is None:
                e.field = path or vmsd.name
            raise
        if _hook_failed(r):
            raise self.error(f"{vmsd.name}: {what} failed ({r})", at, path or vmsd.name)

    def _load(self, vmsd: VMStateDescription, obj: dict, version: int, path: str) -> None:
        cur = self.cur
        if version > vmsd.version_id:
            raise self.error(f"{vmsd.name}: incoming version_id {version} is too new "
                             f"for local version_id {vmsd.version_id}", cur.tell(),
                             path or vmsd.name)
        if version < vmsd.minimum_version_id:
            raise self.error(f"{vmsd.name}: incoming version_id {version} is too old "
                             f"for local minimum version_id  {vmsd.minimum_version_id}",
                             cur.tell(), path or vmsd.name)
        if vmsd.pre_load is not None:
            self._run_hook(vmsd.pre_load, vmsd, "pre_load", path, obj)
        for field in vmsd.fields:
            if self.present(field, obj, version):
                self._load_field(vmsd, field, obj, path)
            elif field.flags & _F.MUST_EXIST:
                raise self.error(f"Input validation failed: {vmsd.name}/{field.name}",
                                 cur.tell(), _join(path, field.name))
        self._load_subsections(vmsd, obj, path)
        if vmsd.post_load is not None:
            self._run_hook(vmsd.post_load, vmsd, "post_load", path, obj, version)

    def _load_field(self, vmsd, field: VMStateField, obj: dict, path: str) -> None:
        cur = self.cur
        fpath = _join(path, field.name)
        at = cur.tell()
        n = self.n_elems(field, obj, fpath, at)
        size = self.elem_size(field, obj, fpath, at)
        info = field.info
        if info is not None and info.whole_object:
            for _ in range(n):
                info.get(self, size, field, obj, fpath)
            return
        if info is None and not field.flags & (_F.STRUCT | _F.VSTRUCT):
            return  # VMSTATE_VALIDATE: no bytes
        is_list = field.is_list
        current = obj.get(field.name)
        cur_list = current if is_list and isinstance(current, (list, tuple)) else None
        f = field.flags
        values: list = []
        start_pos = cur.pos
        for i in range(n):
            if i == MAX_ZERO_SIZE_ELEMENTS and cur.pos == start_pos:
                raise self.error(f"{n} elements of {field.name!r} carry no bytes", at, fpath)
            if is_list:
                epath = f"{fpath}[{i}]"
                known = cur_list is not None and i < len(cur_list)
                local = cur_list[i] if known else None
            else:
                epath = fpath
                known = current is not None
                local = current
            if f & _F.ARRAY_OF_POINTER and known and local is None and size:
                values.append(VMSTATE_INFO_NULLPTR.get(self, size, field, None, epath))
            elif f & (_F.STRUCT | _F.VSTRUCT):
                child = local if isinstance(local, dict) else {}
                ver = field.vmsd.version_id if f & _F.STRUCT else field.struct_version_id
                self.load_vmsd(field.vmsd, child, ver, epath, obj)
                values.append(child)
            else:
                values.append(info.get(self, size, field, local, epath))
        if info is not None and not info.stores:
            return
        if is_list:
            obj[field.name] = values
        elif values:
            obj[field.name] = values[0]

    def _peek_more(self, need: int) -> bool:
        """Whether ``need`` bytes can be peeked; raises NeedData unless complete."""
        cur = self.cur
        if cur.pos + need <= cur.end:
            return True
        if self.complete:
            return False
        raise NeedData(cur.base + cur.end)

    def _load_subsections(self, vmsd: VMStateDescription, obj: dict, path: str) -> None:
        cur = self.cur
        prefix = vmsd.name_bytes
        while True:
            if not self._peek_more(1) or cur.buf[cur.pos] != _SUBSECTION:
                return
            if not self._peek_more(2):
                return
            length = cur.buf[cur.pos + 1]
            if length < len(prefix) + 1:
                return
            if not self._peek_more(2 + length):
                return
            idstr = bytes(cur.buf[cur.pos + 2: cur.pos + 2 + length])
            if not idstr.startswith(prefix):
                return
            cname = idstr.split(b"\0", 1)[0]
            sub = vmsd.find_subsection(cname)
            at = cur.tell()
            if sub is None:
                shown = cname.decode("utf-8", "backslashreplace")
                raise self.error(f"unknown subsection '{printable_name(shown)}' of {vmsd.name} "
                                 "(ENOENT)",
                                 at, _join(path, shown))
            cur.skip(2 + length)
            version = cur.read_be32() & 0xFF
            self._load(sub, obj, version, _join(path, sub.name))


def save_state(vmsd: VMStateDescription, obj: dict, out, version: Optional[int] = None, *,
               vmdesc=None, section: Optional[str] = None) -> None:
    """Append the payload of ``obj`` described by ``vmsd`` to ``out``.

    Args:
        vmsd: the description.
        obj: the state dict (hooks may update it, e.g. derived sizes).
        out: a bytearray (written in place) or anything with ``extend`` or
            ``write``.
        version: version to write at (default: ``vmsd.version_id``, which is
            what the section header must carry).
        vmdesc: a :class:`~qmigx.qjson.JSONWriter` positioned inside the
            section's vmdesc object (after ``name``/``instance_id``): the
            ``vmsd_name``, ``version``, ``fields`` and ``subsections`` keys
            are written to it as QEMU does.
        section: label used in error messages.
    """
    if vmsd.unmigratable:
        raise VMStateError(f"State blocked by non-migratable device '{vmsd.name}'",
                           section=section)
    buf = out if isinstance(out, bytearray) else bytearray()
    saver = _Saver(buf, section)
    saver.save_vmsd(vmsd, obj, vmsd.version_id if version is None else version, vmdesc, "",
                    None)
    if buf is not out:
        if hasattr(out, "extend"):
            out.extend(buf)
        else:
            out.write(bytes(buf))


def load_state(vmsd: VMStateDescription, cursor: Cursor, version: int, *,
               section: Optional[str] = None, obj: Optional[dict] = None,
               complete: bool = False) -> dict:
    """Decode one payload described by ``vmsd`` from ``cursor``; return the state dict.

    Args:
        vmsd: the receiver's description.
        cursor: positioned at the payload; left right after it.
        version: the version from the section header.
        section: label used in error messages (e.g. ``"fw_cfg (8)"``).
        obj: the receiver's current state, updated in place: it supplies the
            local values of ``*_equal``/``int32 le`` fields and which
            elements of an array of pointers are NULL.
        complete: the cursor's end is the end of all input, so a subsection
            peek that runs past it means "no subsection" (as at a real EOF)
            instead of raising NeedData.

    Raises:
        VMStateError: the bytes do not fit the description.
        NeedData: the payload continues past the cursor's end.
    """
    state = {} if obj is None else obj
    _Loader(cursor, section, complete).load_vmsd(vmsd, state, version, "", None)
    return state


def section_needed(vmsd: VMStateDescription, obj: dict) -> bool:
    """Whether a top-level section is sent at all (its ``needed`` predicate)."""
    return vmsd.needed is None or bool(vmsd.needed(obj))


def check_migratable(vmsd: VMStateDescription) -> None:
    """Raise if ``vmsd`` or anything it nests is marked unmigratable."""
    seen: set[int] = set()

    def walk(d: VMStateDescription) -> None:
        if id(d) in seen:
            return
        seen.add(id(d))
        if d.unmigratable:
            raise VMStateError(f"State blocked by non-migratable device '{vmsd.name}'",
                               field=d.name)
        for f in d.fields:
            for child in (f.vmsd, f.key_vmsd):
                if child is not None:
                    walk(child)
        for s in d.subsections:
            walk(s)

    walk(vmsd)
