"""Migration parameters: QEMU 7.2's and 10.0's tunables, their defaults and checks.

``migrate-set-parameters`` may be called at any time, even during a
migration, and tools rely on both the defaults that
``query-migrate-parameters`` reports and the exact refusals (control.md
§3). A request is handled as QEMU handles it: first QMP's own argument
checks (types, unknown names), then the range and cross checks on the
full resulting set, and only then is anything changed (all or nothing).
Error texts are QEMU's, including its use of underscores in names.

Each :class:`Parameters` speaks one QEMU version (``qemu_version``):
7.2's 27 parameters, or 10.0's 29 (the ``compress-*`` ones and
``block-incremental`` gone; ``avail-switchover-bandwidth``, ``direct-io``,
``mode``, ``multifd-qatzip-level``, ``vcpu-dirty-limit``,
``x-vcpu-dirty-limit-period`` and ``zero-page-detection`` new, qemu10.md
§7.2), or (None) both at once, as qmigx's own command line does. A
parameter of another version reads as its default and cannot be set.

One deliberate difference: QEMU 7.2 silently ignores
``multifd-zlib-level`` / ``multifd-zstd-level`` given to
``migrate-set-parameters`` (they are missing from its apply code); qmigx
range-checks and stores them as the schema intends.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

from qmigx.control._qdict import qdict
from qmigx.control.options import ZERO_COPY_REFUSED, SettingsView, zero_copy_conflict
from qmigx.errors import ParameterError
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = [
    "ParamSpec",
    "PARAMETERS",
    "PARAMETERS_10",
    "DEFAULTS",
    "ZERO_PAGE_DETECTION",
    "MIG_MODES",
    "MULTIFD_COMPRESSION",
    "Parameters",
    "InternalProperties",
    "CLEAR_BITMAP_SHIFT_MIN",
    "CLEAR_BITMAP_SHIFT_MAX",
    "CLEAR_BITMAP_SHIFT_DEFAULT",
]

U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)

MULTIFD_COMPRESSION: tuple[str, ...] = ("none", "zlib", "zstd")
#: QEMU 10's ``zero-page-detection`` and ``mode`` values.
ZERO_PAGE_DETECTION: tuple[str, ...] = ("none", "legacy", "multifd")
MIG_MODES: tuple[str, ...] = ("normal", "cpr-reboot", "cpr-transfer")


class ParamSpec(NamedTuple):
    """One parameter: QMP name, QAPI type and default."""

    name: str
    qapi_type: str  # uint8 | uint32 | uint64 | size | bool | StrOrNull | MultiFDCompression | mapping
    default: Any

    @property
    def attr(self) -> str:
        """The Python name (``-`` becomes ``_``)."""
        return self.name.replace("-", "_")


#: Every parameter, in the QAPI schema's member order (QMP visits them so).
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("announce-initial", "size", 50),
    ParamSpec("announce-max", "size", 550),
    ParamSpec("announce-rounds", "size", 5),
    ParamSpec("announce-step", "size", 100),
    ParamSpec("compress-level", "uint8", 1),
    ParamSpec("compress-threads", "uint8", 8),
    ParamSpec("compress-wait-thread", "bool", True),
    ParamSpec("decompress-threads", "uint8", 2),
    ParamSpec("throttle-trigger-threshold", "uint8", 50),
    ParamSpec("cpu-throttle-initial", "uint8", 20),
    ParamSpec("cpu-throttle-increment", "uint8", 10),
    ParamSpec("cpu-throttle-tailslow", "bool", False),
    ParamSpec("tls-creds", "StrOrNull", ""),
    ParamSpec("tls-hostname", "StrOrNull", ""),
    ParamSpec("tls-authz", "StrOrNull", None),  # unset; reported as ""
    ParamSpec("max-bandwidth", "size", 128 << 20),
    ParamSpec("downtime-limit", "uint64", 300),
    ParamSpec("x-checkpoint-delay", "uint32", 20000),
    ParamSpec("block-incremental", "bool", False),
    ParamSpec("multifd-channels", "uint8", 2),
    ParamSpec("xbzrle-cache-size", "size", 64 << 20),
    ParamSpec("max-postcopy-bandwidth", "size", 0),
    ParamSpec("max-cpu-throttle", "uint8", 99),
    ParamSpec("multifd-compression", "MultiFDCompression", "none"),
    ParamSpec("multifd-zlib-level", "uint8", 1),
    ParamSpec("multifd-zstd-level", "uint8", 1),
    ParamSpec("block-bitmap-mapping", "mapping", None),  # unset until given
)

_SPEC72 = {p.name: p for p in PARAMETERS}
#: QEMU 10.0's parameters, in its schema's member order.
PARAMETERS_10: tuple[ParamSpec, ...] = tuple(
    _SPEC72[n] if n in _SPEC72 else spec for n, spec in (
        ("announce-initial", None), ("announce-max", None), ("announce-rounds", None),
        ("announce-step", None), ("throttle-trigger-threshold", None),
        ("cpu-throttle-initial", None), ("cpu-throttle-increment", None),
        ("cpu-throttle-tailslow", None), ("tls-creds", None), ("tls-hostname", None),
        ("tls-authz", None), ("max-bandwidth", None),
        ("avail-switchover-bandwidth", ParamSpec("avail-switchover-bandwidth", "size", 0)),
        ("downtime-limit", None), ("x-checkpoint-delay", None), ("multifd-channels", None),
        ("xbzrle-cache-size", None), ("max-postcopy-bandwidth", None),
        ("max-cpu-throttle", None), ("multifd-compression", None),
        ("multifd-zlib-level", None),
        ("multifd-qatzip-level", ParamSpec("multifd-qatzip-level", "uint8", 1)),
        ("multifd-zstd-level", None), ("block-bitmap-mapping", None),
        ("x-vcpu-dirty-limit-period", ParamSpec("x-vcpu-dirty-limit-period", "uint64", 1000)),
        ("vcpu-dirty-limit", ParamSpec("vcpu-dirty-limit", "uint64", 1)),
        ("mode", ParamSpec("mode", "MigMode", "normal")),
        ("zero-page-detection", ParamSpec("zero-page-detection", "ZeroPageDetection", "multifd")),
        ("direct-io", ParamSpec("direct-io", "bool", False)),
    ))
_BY_VERSION: dict[Optional[str], tuple[ParamSpec, ...]] = {
    "7.2": PARAMETERS,
    "10.0": PARAMETERS_10,
    None: PARAMETERS + tuple(p for p in PARAMETERS_10 if p.name not in _SPEC72),
}

_SPECS = {p.name: p for p in _BY_VERSION[None]}
_BY_ATTR = {p.attr: p for p in _BY_VERSION[None]}

#: Defaults by QMP name, of every version's parameters (``tls-authz`` and
#: ``block-bitmap-mapping`` start unset: None; ``zero-page-detection`` is
#: ``legacy`` on machine types <= 8.2).
DEFAULTS: dict[str, Any] = {p.name: p.default for p in _BY_VERSION[None]}

_UINT_MAX = {"uint8": (0xFF, "uint8_t"), "uint32": (0xFFFFFFFF, "uint32_t")}

# (name, low, high, what) in the order QEMU checks them; low None = cpu-throttle-initial.
_RANGES: tuple[tuple[str, Optional[int], int, str], ...] = (
    ("compress-level", 0, 9, "a value between 0 and 9"),
    ("compress-threads", 1, 255, "a value between 1 and 255"),
    ("decompress-threads", 1, 255, "a value between 1 and 255"),
    ("throttle-trigger-threshold", 1, 100, "an integer in the range of 1 to 100"),
    ("cpu-throttle-initial", 1, 99, "an integer in the range of 1 to 99"),
    ("cpu-throttle-increment", 1, 99, "an integer in the range of 1 to 99"),
    ("max-bandwidth", 0, U64_MAX, "an integer in the range of 0 to (18446744073709551615UL) bytes/second"),
    ("downtime-limit", 0, 2000000, "an integer in the range of 0 to (2000 * 1000) ms"),
    ("multifd-channels", 1, 255, "a value between 1 and 255"),
    ("multifd-zlib-level", 0, 9, "a value between 0 and 9"),
    ("multifd-zstd-level", 0, 20, "a value between 0 and 20"),
    ("xbzrle-cache-size", 0, U64_MAX, "a power of two no less than the target page size"),
    ("max-cpu-throttle", None, 99, "an integer in the range of cpu_throttle_initial to 99"),
    ("announce-initial", 0, 100000, "a value between 0 and 100000"),
    ("announce-max", 0, 100000, "a value between 0 and 100000"),
    ("announce-rounds", 0, 1000, "a value between 0 and 1000"),
    ("announce-step", 1, 10000, "a value between 0 and 10000"),  # sic: QEMU says 0
    # QEMU 10's (its texts: underscores for some names, dashes for one)
    ("avail-switchover-bandwidth", 0, U64_MAX,
     "an integer in the range of 0 to (18446744073709551615UL) bytes/second"),
    ("multifd-qatzip-level", 1, 9, "a value between 1 and 9"),
    ("x-vcpu-dirty-limit-period", 1, 1000, "a value between 1 and 1000"),
    ("vcpu-dirty-limit", 1, U64_MAX, "must be greater than 1 MB/s"),
)
#: names QEMU 10 writes with dashes in these messages
_DASHED = {"x-vcpu-dirty-limit-period"}

_NODE_NAME_MAX = 31
_BITMAP_NAME_MAX = 1023
_ALIAS_MAX = 255


def _err(message: str, name: str) -> ParameterError:
    return ParameterError(message, field=name)


# --- QMP argument checks (QEMU's input visitor) ---------------------------------


def _parse_uint(name: str, value: Any, qapi_type: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not _I64_MIN <= value <= U64_MAX:
        raise _err(f"Parameter '{name}' expects uint64", name)
    value &= U64_MAX  # QMP accepts negative numbers for unsigned types, two's complement
    if qapi_type in _UINT_MAX:
        limit, cname = _UINT_MAX[qapi_type]
        if value > limit:
            raise _err(f"Parameter '{name}' expects {cname}", name)
    return value


def _expect(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise _err(f"Invalid parameter type for '{path}', expected: {what}", path)


def _struct(obj: Any, path: str, members: tuple[tuple[str, str, bool], ...]) -> dict[str, Any]:
    """Visit a QAPI struct: members (name, kind, required) in schema order, then extras."""
    _expect(isinstance(obj, Mapping), path, "object")
    out: dict[str, Any] = {}
    for key, kind, required in members:
        sub = f"{path}.{key}"
        if key not in obj:
            if required:
                raise _err(f"Parameter '{sub}' is missing", sub)
            continue
        val = obj[key]
        if kind == "str":
            _expect(isinstance(val, str), sub, "string")
        elif kind == "bool":
            _expect(isinstance(val, bool), sub, "boolean")
        elif kind == "bitmaps":
            _expect(isinstance(val, (list, tuple)), sub, "array")
            val = [_struct(b, f"{sub}[{j}]", _BITMAP_MEMBERS) for j, b in enumerate(val)]
        elif kind == "transform":
            val = _struct(val, sub, (("persistent", "bool", False),))
        out[key] = val
    known = {m[0] for m in members}
    for key in obj:
        if key not in known:
            raise _err(f"Parameter '{path}.{key}' is unexpected", f"{path}.{key}")
    return out


_BITMAP_MEMBERS = (("name", "str", True), ("alias", "str", True), ("transform", "transform", False))
_NODE_MEMBERS = (("node-name", "str", True), ("alias", "str", True), ("bitmaps", "bitmaps", True))


def _parse_mapping(name: str, value: Any) -> list[dict[str, Any]]:
    _expect(isinstance(value, (list, tuple)), name, "array")
    return [_struct(node, f"{name}[{i}]", _NODE_MEMBERS) for i, node in enumerate(value)]


_ENUMS = {"MultiFDCompression": MULTIFD_COMPRESSION, "ZeroPageDetection": ZERO_PAGE_DETECTION,
          "MigMode": MIG_MODES}


def _parse_value(spec: ParamSpec, value: Any) -> Any:
    name, kind = spec.name, spec.qapi_type
    if kind in ("uint8", "uint32", "uint64", "size"):
        return _parse_uint(name, value, kind)
    if kind == "bool":
        _expect(isinstance(value, bool), name, "boolean")
        return value
    if kind == "StrOrNull":
        _expect(value is None or isinstance(value, str), name, "StrOrNull")
        return "" if value is None else value  # null means "" (QEMU rewrites it)
    if kind in _ENUMS:
        _expect(isinstance(value, str), name, "string")
        if value not in _ENUMS[kind]:
            raise _err(f"Parameter '{name}' does not accept value '{value}'", name)
        return value
    return _parse_mapping(name, value)


# --- checks on the full set (QEMU's migrate_params_check) -----------------------


def _id_wellformed(raw: bytes) -> bool:
    if not raw or not (65 <= raw[0] <= 90 or 97 <= raw[0] <= 122):
        return False
    return all(chr(c).isascii() and (chr(c).isalnum() or c in b"-._") for c in raw[1:])


def _check_alias_map(mapping: list[dict[str, Any]], name_to_alias: bool) -> Optional[str]:
    seen_nodes: set[str] = set()
    for node in mapping:
        node_name, alias = node["node-name"], node["alias"]
        if not _id_wellformed(alias.encode()):
            return f"The node alias '{alias}' is not well-formed"
        if len(alias.encode()) > _ALIAS_MAX:
            return f"The node alias '{alias}' is longer than {_ALIAS_MAX} bytes"
        if len(node_name.encode()) > _NODE_NAME_MAX:
            return f"The node name '{node_name}' is longer than {_NODE_NAME_MAX} bytes"
        key = node_name if name_to_alias else alias
        if key in seen_nodes:
            return (f"The node name '{node_name}' is mapped twice" if name_to_alias
                    else f"The node alias '{alias}' is used twice")
        seen_nodes.add(key)
        seen_bitmaps: set[str] = set()
        for bm in node["bitmaps"]:
            if len(bm["alias"].encode()) > _ALIAS_MAX:
                return f"The bitmap alias '{bm['alias']}' is longer than {_ALIAS_MAX} bytes"
            if len(bm["name"].encode()) > _BITMAP_NAME_MAX:
                return f"The bitmap name '{bm['name']}' is longer than {_BITMAP_NAME_MAX} bytes"
            bkey = bm["name"] if name_to_alias else bm["alias"]
            if bkey in seen_bitmaps:
                return (f"The bitmap '{node_name}'/'{bm['name']}' is mapped twice" if name_to_alias
                        else f"The bitmap alias '{alias}'/'{bm['alias']}' is used twice")
            seen_bitmaps.add(bkey)
    return None


def _check_full(p: Mapping[str, Any], page_size: int, zero_copy_send: bool) -> None:
    for name, low, high, what in _RANGES:
        if name not in p:  # a parameter of another QEMU version
            continue
        v = p[name]
        if name == "xbzrle-cache-size":
            ok = v >= page_size and v & (v - 1) == 0
        else:
            ok = (p["cpu-throttle-initial"] if low is None else low) <= v <= high
        if not ok:
            shown = name if name in _DASHED else name.replace("-", "_")
            verb = "" if what.startswith("must") else "expects "
            raise _err(f"Parameter '{shown}' {verb}{what}", name)
    mapping = p["block-bitmap-mapping"]
    if mapping is not None:
        problem = _check_alias_map(mapping, True) or _check_alias_map(mapping, False)
        if problem:
            raise _err(f"Invalid mapping given for block-bitmap-mapping: {problem}", "block-bitmap-mapping")
    conflict = zero_copy_conflict(p) if zero_copy_send else None
    if conflict:
        raise _err(ZERO_COPY_REFUSED, conflict)


def _copy_mapping(mapping: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    return copy.deepcopy(mapping)


class Parameters:
    """One side's migration parameters, starting at its QEMU version's defaults.

    Read with :meth:`get` (QMP or Python name) or as attributes with
    Python names (``params.max_bandwidth``); change only with :meth:`set`.

    Args:
        page_size: target page size (the ``xbzrle-cache-size`` floor).
        capabilities: the same side's :class:`Capabilities`; linked both
            ways so each checks the rules that involve the other
            (``zero-copy-send`` vs multifd compression and TLS).
        qemu_version: ``"7.2"`` (default), ``"10.0"``, or None for both.
        defaults: other starting values (QEMU 10 on a machine type <= 8.2
            starts with ``zero-page-detection`` ``legacy``).
    """

    def __init__(self, *, page_size: int = TARGET_PAGE_SIZE, capabilities: Optional[SettingsView] = None,
                 qemu_version: Optional[str] = "7.2",
                 defaults: Optional[Mapping[str, Any]] = None) -> None:
        if qemu_version not in _BY_VERSION:
            raise ValueError(f"qemu_version must be '7.2', '10.0' or None, not {qemu_version!r}")
        self.qemu_version = qemu_version
        self._specs = _BY_VERSION[qemu_version]
        self._own = {p.name for p in self._specs}
        self._values: dict[str, Any] = {p.name: p.default for p in self._specs}
        for k, v in (defaults or {}).items():
            if k in self._own:
                self._values[k] = v
        self.page_size = page_size
        self.capabilities = capabilities
        if capabilities is not None:
            capabilities.parameters = self
        self._listeners: list[Callable[[dict[str, Any]], object]] = []

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != DEFAULTS[k]}
        return f"Parameters({changed!r})"

    def get(self, name: str) -> Any:
        """Value of ``name`` (``"max-bandwidth"`` or ``"max_bandwidth"``).

        A parameter only another QEMU version has reads as its default.
        """
        spec = _SPECS.get(name) or _BY_ATTR.get(name)
        if spec is None:
            raise _err(f"Parameter '{name}' is unexpected", name)
        value = self._values.get(spec.name, spec.default)
        return _copy_mapping(value) if spec.qapi_type == "mapping" else value

    def __getattr__(self, attr: str) -> Any:
        spec = _BY_ATTR.get(attr)
        if spec is None:
            raise AttributeError(attr)
        return self.get(spec.name)

    def add_listener(self, fn: Callable[[dict[str, Any]], object]) -> None:
        """Call ``fn(changes)`` after each successful :meth:`set` (QMP names -> new values)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict[str, Any]], object]) -> None:
        self._listeners.remove(fn)

    def set(self, values: Optional[Mapping[str, Any]] = None, /, **kwargs: Any) -> dict[str, Any]:
        """``migrate-set-parameters``: all of it or nothing.

        ``values`` uses QMP names (``{"max-bandwidth": 1 << 30}``),
        keyword arguments Python names (``max_bandwidth=1 << 30``).
        ``tls-*`` accept None (≡ ""). Returns the applied values by QMP
        name. Raises :class:`ParameterError` with QEMU 7.2's text.
        """
        request: dict[str, Any] = dict(values or {})
        for attr, v in kwargs.items():
            request[attr.replace("_", "-")] = v
        parsed: dict[str, Any] = {}
        for spec in self._specs:  # QMP visits members in schema order ...
            if spec.name in request:
                parsed[spec.name] = _parse_value(spec, request[spec.name])
        for key in request:  # ... then complains about the rest
            if key not in self._own:
                raise _err(f"Parameter '{key}' is unexpected", key)
        full = dict(self._values)
        full.update(parsed)
        zero_copy = self.capabilities is not None and self.capabilities.get("zero-copy-send")
        _check_full(full, self.page_size, zero_copy)
        self._values = full
        changes = {k: _copy_mapping(v) if k == "block-bitmap-mapping" else v for k, v in parsed.items()}
        for fn in list(self._listeners):
            fn(dict(changes))
        return changes

    def as_dict(self) -> dict[str, Any]:
        """Every parameter by QMP name, schema order, unset ones as None."""
        return {k: _copy_mapping(v) if k == "block-bitmap-mapping" else v for k, v in self._values.items()}

    def as_qmp(self) -> dict[str, Any]:
        """``query-migrate-parameters`` as this QEMU version sends it (its key order too)."""
        out: dict[str, Any] = {}
        for spec in self._specs:
            v = self._values[spec.name]
            if spec.qapi_type == "mapping":
                if v is None:
                    continue
                v = [_mapping_qmp(node) for node in v]
            elif v is None:
                v = ""
            out[spec.name] = v
        return qdict(out)


def _mapping_qmp(node: Mapping[str, Any]) -> dict[str, Any]:
    bitmaps = []
    for bm in node["bitmaps"]:
        entry = {k: bm[k] for k in ("name", "alias")}
        if "transform" in bm:
            entry["transform"] = qdict(bm["transform"])
        bitmaps.append(qdict(entry))
    return qdict({"node-name": node["node-name"], "alias": node["alias"], "bitmaps": bitmaps})


CLEAR_BITMAP_SHIFT_MIN = 6
CLEAR_BITMAP_SHIFT_MAX = 31
CLEAR_BITMAP_SHIFT_DEFAULT = 18


@dataclasses.dataclass
class InternalProperties:
    """Properties of QEMU's migration object that are not QMP parameters.

    Set with ``-global migration.<name>=<value>`` or by machine-type
    compat (false for old machine types, see control.md §3).
    """

    store_global_state: bool = True
    send_configuration: bool = True
    send_section_footer: bool = True
    decompress_error_check: bool = True
    #: ``x-clear-bitmap-shift``: log2 of the pages per dirty-log clear chunk (uint8).
    clear_bitmap_shift: int = CLEAR_BITMAP_SHIFT_DEFAULT
    #: ``x-postcopy-preempt-break-huge`` (7.2).
    postcopy_preempt_break_huge: bool = True

    def __post_init__(self) -> None:
        v = self.clear_bitmap_shift
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFF:
            raise _err("Parameter 'x-clear-bitmap-shift' expects uint8_t", "x-clear-bitmap-shift")

    @property
    def effective_clear_bitmap_shift(self) -> int:
        """The shift RAM setup uses: QEMU clamps the property to 6 … 31."""
        return min(max(self.clear_bitmap_shift, CLEAR_BITMAP_SHIFT_MIN), CLEAR_BITMAP_SHIFT_MAX)
