"""User-created objects by id: QEMU's ``/objects`` container, ``-object`` and ``object-add``.

Migration refers to its TLS credentials and authorization by object id
(parameters ``tls-creds`` and ``tls-authz``), and orchestrators create
those objects first, with QMP ``object-add`` (libvirt, KubeVirt) or on the
command line with ``-object``. :class:`ObjectRoot` holds them and checks
what it is given the way QEMU 7.2 does, so an orchestrator gets QEMU's
error texts:

1. the type (``qom-type``), then the ``id`` (a well-formed identifier),
   then each property in the type's schema order (wrong type, bad enum
   value, missing), then properties that should not be there;
2. the id must be free ("attempt to add duplicate property ...");
3. the object completes itself (reads its files, QEMU's
   ``UserCreatable.complete``), and only then is it visible.

``-object`` text is either JSON (``{"qom-type": ...}``, checked as
``object-add``) or QEMU's ``TYPE,id=ID,key=value`` with ``,,`` for a comma
inside a value; as in QEMU 7.2 list-valued properties (``authz-list``'s
``rules``) need the JSON form.

Object types register themselves (:func:`register`); the credential and
authorization types live in :mod:`.tlscreds` and :mod:`.authz`.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

from qmigx.errors import ObjectError

__all__ = ["Prop", "UserCreatable", "ObjectRoot", "register", "TYPES", "ABSTRACT_TYPES",
           "split_option"]


class Prop(NamedTuple):
    """One property of an object type, as QEMU's schema declares it.

    ``kind``: ``str``, ``bool``, ``enum`` (one of ``values``), or
    ``rules`` (authz-list's list of rule objects).
    """

    name: str
    kind: str
    default: Any = None
    required: bool = False
    values: tuple[str, ...] = ()


class UserCreatable:
    """Base of the objects ``object-add`` creates (QEMU's TYPE_USER_CREATABLE)."""

    #: the QOM type name and its parent (``qom-list-types``)
    qom_type: ClassVar[str] = ""
    parent: ClassVar[str] = "object"
    #: the properties in schema order
    props: ClassVar[tuple[Prop, ...]] = ()

    def __init__(self, obj_id: str, values: Mapping[str, Any]) -> None:
        self.id = obj_id
        self._values = {p.name: values.get(p.name, p.default) for p in self.props}

    def get(self, name: str) -> Any:
        """A property's value (``qom-get``)."""
        if name not in self._values:
            raise ObjectError(f"Property '{self.qom_type}.{name}' not found", field=name)
        return self._values[name]

    def complete(self) -> None:
        """Finish creating the object (read its files); raise ObjectError to refuse it."""

    def unparent(self) -> None:
        """The object was deleted (``object-del``)."""

    def __repr__(self) -> str:
        return f"<{self.qom_type} id={self.id}>"


#: Concrete types by name, filled by :func:`register`.
TYPES: dict[str, type[UserCreatable]] = {}
#: Abstract parents (``qom-list-types`` with ``abstract``): name -> parent.
ABSTRACT_TYPES: dict[str, str] = {"tls-creds": "object", "authz": "object"}


def register(cls: type[UserCreatable]) -> type[UserCreatable]:
    """Class decorator: make ``cls`` creatable by its ``qom_type``."""
    TYPES[cls.qom_type] = cls
    return cls


_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
_ON = ("on", "yes", "true", "y")
_OFF = ("off", "no", "false", "n")


def _type_error(path: str, what: str) -> ObjectError:
    return ObjectError(f"Invalid parameter type for '{path}', expected: {what}", field=path)


def _enum(value: Any, path: str, name: str, values: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _type_error(path, "string")
    if value not in values:
        # QEMU names a nested enum by its member name only (sic)
        raise ObjectError(f"Parameter '{name}' does not accept value '{value}'", field=path)
    return value


_RULE_MEMBERS = (("match", "str", True), ("policy", "enum", True), ("format", "enum", False))
POLICIES = ("deny", "allow")
FORMATS = ("exact", "glob")


def visit_rules(value: Any, path: str = "rules") -> list[dict]:
    """authz-list ``rules``: a list of ``{match, policy, format}`` (QEMU's QAuthZListRule)."""
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, "array")
    out = []
    for i, rule in enumerate(value):
        rpath = f"{path}[{i}]"
        if not isinstance(rule, Mapping):
            raise _type_error(rpath, "object")
        checked = {}
        for key, kind, required in _RULE_MEMBERS:
            sub = f"{rpath}.{key}"
            if key not in rule:
                if required:
                    raise ObjectError(f"Parameter '{sub}' is missing", field=sub)
                continue
            v = rule[key]
            if kind == "str":
                if not isinstance(v, str):
                    raise _type_error(sub, "string")
            else:
                v = _enum(v, sub, key, POLICIES if key == "policy" else FORMATS)
            checked[key] = v
        for key in rule:
            if key not in ("match", "policy", "format"):
                raise ObjectError(f"Parameter '{rpath}.{key}' is unexpected", field=f"{rpath}.{key}")
        checked.setdefault("format", "exact")
        out.append(checked)
    return out


def _visit_typed(cls: type[UserCreatable], args: Mapping[str, Any]) -> dict[str, Any]:
    """QMP's input visitor over the properties (JSON-typed values)."""
    out: dict[str, Any] = {}
    for p in cls.props:
        if p.name not in args:
            if p.required:
                raise ObjectError(f"Parameter '{p.name}' is missing", field=p.name)
            continue
        v = args[p.name]
        if p.kind == "str":
            if not isinstance(v, str):
                raise _type_error(p.name, "string")
        elif p.kind == "bool":
            if not isinstance(v, bool):
                raise _type_error(p.name, "boolean")
        elif p.kind == "enum":
            v = _enum(v, p.name, p.name, p.values)
        else:
            v = visit_rules(v, p.name)
        out[p.name] = v
    known = {p.name for p in cls.props} | {"qom-type", "id"}
    for key in args:
        if key not in known:
            raise ObjectError(f"Parameter '{key}' is unexpected", field=key)
    return out


def _visit_strings(cls: type[UserCreatable], args: Mapping[str, str]) -> dict[str, Any]:
    """``-object TYPE,key=value`` (QemuOpts): every value a string, parsed by the property's type."""
    by_name = {p.name: p for p in cls.props}
    for key in args:
        if key not in by_name and key not in ("qom-type", "id"):
            raise ObjectError(f"Invalid parameter '{key}'", field=key)
    out: dict[str, Any] = {}
    for p in cls.props:
        if p.name not in args:
            if p.required:
                raise ObjectError(f"Parameter '{p.name}' is missing", field=p.name)
            continue
        v = args[p.name]
        if p.kind == "bool":
            low = v.lower()
            if low not in _ON + _OFF:
                raise ObjectError(f"Parameter '{p.name}' expects 'on' or 'off'", field=p.name)
            out[p.name] = low in _ON
        elif p.kind == "enum":
            out[p.name] = _enum(v, p.name, p.name, p.values)
        elif p.kind == "rules":
            raise ObjectError(f"Invalid parameter '{p.name}'", field=p.name)
        else:
            out[p.name] = v
    return out


def split_option(text: str) -> list[str]:
    """Split QEMU option text at single commas; ``,,`` is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


class ObjectRoot:
    """The objects of one VM (one migration engine), by id; thread-safe.

    A process may hold several (a test runs a source and a destination
    side by side, each with its own ``tls0``); QEMU has one per process.
    """

    def __init__(self) -> None:
        self._objects: dict[str, UserCreatable] = {}
        self._lock = threading.Lock()

    # -- creating ------------------------------------------------------------------------
    def _resolve_type(self, qom_type: Any) -> type[UserCreatable]:
        if qom_type is None:
            raise ObjectError("Parameter 'qom-type' is missing", field="qom-type")
        if not isinstance(qom_type, str):
            raise _type_error("qom-type", "string")
        cls = TYPES.get(qom_type)
        if cls is None:
            raise ObjectError(f"Parameter 'qom-type' does not accept value '{qom_type}'",
                              field="qom-type")
        return cls

    @staticmethod
    def _check_id(obj_id: Any) -> str:
        if obj_id is None:
            raise ObjectError("Parameter 'id' is missing", field="id")
        if not isinstance(obj_id, str):
            raise _type_error("id", "string")
        if not _ID_RE.match(obj_id):
            raise ObjectError("Parameter 'id' expects an identifier", field="id")
        return obj_id

    def add(self, args: Mapping[str, Any]) -> UserCreatable:
        """``object-add``: ``{"qom-type": T, "id": ID, property: value, ...}`` (JSON types)."""
        if not isinstance(args, Mapping):
            raise ObjectError("Invalid parameter type for 'object', expected: object")
        cls = self._resolve_type(args.get("qom-type"))
        obj_id = self._check_id(args.get("id"))
        return self._create(cls, obj_id, _visit_typed(cls, args))

    def add_option(self, text: str) -> UserCreatable:
        """``-object TEXT`` as QEMU 7.2 parses it (JSON, or ``TYPE,id=ID,key=value``)."""
        try:
            cls, obj_id, values = self._parse_option(text)
        except ObjectError as exc:
            raise ObjectError(f"-object {text}: {exc.message}", field=exc.field) from None
        return self._create(cls, obj_id, values)

    def _parse_option(self, text: str):
        if text.lstrip().startswith("{"):
            try:
                args = json.loads(text)
            except ValueError as exc:
                raise ObjectError(f"JSON parse error, {exc}") from None
            if not isinstance(args, dict):
                raise ObjectError("Invalid parameter type for 'object', expected: object")
            cls = self._resolve_type(args.get("qom-type"))
            return cls, self._check_id(args.get("id")), _visit_typed(cls, args)
        args: dict[str, str] = {}
        for i, part in enumerate(split_option(text)):
            key, sep, value = part.partition("=")
            if not sep:
                if i == 0:  # the implied key
                    key, value = "qom-type", part
                else:
                    raise ObjectError(f"Invalid parameter '{part}'", field=part)
            args[key] = value  # the last of repeated keys wins
        cls = self._resolve_type(args.get("qom-type"))
        return cls, self._check_id(args.get("id")), _visit_strings(cls, args)

    def _create(self, cls: type[UserCreatable], obj_id: str, values: dict) -> UserCreatable:
        obj = cls(obj_id, values)
        with self._lock:
            if obj_id in self._objects:
                raise ObjectError(
                    f"attempt to add duplicate property '{obj_id}' to object (type 'container')",
                    field="id")
            self._objects[obj_id] = None  # type: ignore[assignment]  # reserved while completing
        try:
            obj.complete()
        except BaseException:
            with self._lock:
                self._objects.pop(obj_id, None)
            raise
        with self._lock:
            self._objects[obj_id] = obj
        return obj

    # -- using ---------------------------------------------------------------------------
    def get(self, obj_id: str) -> Optional[UserCreatable]:
        """The object with ``obj_id``, or None (also while it is still being created)."""
        with self._lock:
            return self._objects.get(obj_id)

    def delete(self, obj_id: str) -> None:
        """``object-del``."""
        with self._lock:
            obj = self._objects.get(obj_id)
            if obj is None:
                raise ObjectError(f"object '{obj_id}' not found", field="id")
            del self._objects[obj_id]
        obj.unparent()

    def ids(self) -> list[str]:
        with self._lock:
            return [k for k, v in self._objects.items() if v is not None]

    def __contains__(self, obj_id: str) -> bool:
        return self.get(obj_id) is not None

    @staticmethod
    def list_types(implements: Optional[str] = None, abstract: bool = False) -> list[dict]:
        """``qom-list-types``: the object types qmigx implements (QEMU's reply shape)."""
        out: list[dict] = []
        for name, cls in TYPES.items():
            if implements is None or implements in (name, cls.parent):
                out.append({"name": name, "parent": cls.parent})
        if abstract:
            for name, parent in ABSTRACT_TYPES.items():
                if implements is None or implements == name:
                    out.append({"abstract": True, "name": name, "parent": parent})
        return out
