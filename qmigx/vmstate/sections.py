"""The two VMState sections every stream has: ``configuration`` and ``globalstate``.

Both are produced by QEMU's migration code itself rather than by a
device, so qmigx must send and check them like QEMU does whatever devices
it carries (stream.md §3, other.md §1).

``configuration`` state dict::

    {"name": b"pc-i440fx-7.2", "len": 13,           # len set by pre_save
     "target_page_bits": 12,                          # subsection when > minimum
     "caps_count": 1, "capabilities": ["x-ignore-shared"],  # subsection when any
     "uuid": bytes(16) or None}                       # subsection when not None

``globalstate`` state dict::

    {"size": 10, "runstate": b"prelaunch" + bytes(91)}  # size set by pre_save
    # after loading also: "state": "prelaunch", "received": True
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from qmigx.errors import VMStateError, printable_name
from qmigx.vmstate.fields import (
    VMStateDescription,
    vmstate_buffer,
    vmstate_capability,
    vmstate_uint32,
    vmstate_vbuffer,
)
from qmigx.wire import GLOBALSTATE_RUNSTATE_LEN, TARGET_PAGE_BITS

__all__ = [
    "RUNSTATE_NAMES",
    "VALIDATED_CAPABILITIES",
    "VMSTATE_CONFIGURATION",
    "VMSTATE_GLOBALSTATE",
    "CONFIGURATION_LOAD_VERSION",
    "make_configuration_vmsd",
    "globalstate",
    "configuration",
]

#: QEMU's RunState names (QAPI order); globalstate rejects anything else.
RUNSTATE_NAMES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
    "suspended", "watchdog", "guest-panicked", "colo",
)

#: Capabilities whose state both sides must agree on (4.1 and 7.2).
VALIDATED_CAPABILITIES = ("x-ignore-shared",)


# -- globalstate ---------------------------------------------------------------


def _c_string(raw: bytes) -> bytes:
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _globalstate_pre_save(obj: dict) -> None:
    rs = obj.get("runstate", b"")
    rs = rs.encode() if isinstance(rs, str) else bytes(rs)
    name = _c_string(rs)
    if len(name) >= GLOBALSTATE_RUNSTATE_LEN:
        raise VMStateError(f"runstate name too big: {name[:40]!r}", field="runstate")
    if len(rs) > GLOBALSTATE_RUNSTATE_LEN:
        rs = name
    obj["runstate"] = rs.ljust(GLOBALSTATE_RUNSTATE_LEN, b"\0")
    obj["size"] = len(name) + 1


def _globalstate_post_load(obj: dict, version: int) -> None:
    obj["received"] = True
    raw = bytearray(obj["runstate"])
    if b"\0" not in raw:
        raw[-1] = 0
    name = _c_string(bytes(raw)).decode("utf-8", "surrogateescape")
    if name not in RUNSTATE_NAMES:
        # the buffer bounds the name: shown whole unless it holds escapes
        shown = printable_name(name, limit=GLOBALSTATE_RUNSTATE_LEN)
        raise VMStateError(f"invalid parameter value: {shown}", field="runstate")
    obj["state"] = name


#: ``globalstate`` version 1: uint32 size + 100-byte runstate buffer.
VMSTATE_GLOBALSTATE = VMStateDescription(
    "globalstate", 1, 1,
    fields=[
        vmstate_uint32("size"),
        vmstate_buffer("runstate", GLOBALSTATE_RUNSTATE_LEN),
    ],
    pre_save=_globalstate_pre_save,
    post_load=_globalstate_post_load,
)


def globalstate(runstate: str) -> dict:
    """A globalstate dict for saving ``runstate`` (e.g. ``"running"``)."""
    return {"runstate": runstate.encode()}


# -- configuration -------------------------------------------------------------


def _strncmp_equal(a: bytes, b: bytes, n: int) -> bool:
    """C ``strncmp(a, b, n) == 0`` on NUL-terminated strings."""
    a = _c_string(a)[:n]
    b = _c_string(b)[:n]
    return a == b


def _fmt_uuid(raw: bytes) -> str:
    """The 8-4-4-4-12 form of ``uuid.UUID`` (without importing it: slow to import)."""
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def make_configuration_vmsd(
    *,
    machine_type: Optional[str] = None,
    target_page_bits: int = TARGET_PAGE_BITS,
    target_page_bits_min: int = TARGET_PAGE_BITS,
    capabilities: Optional[Iterable[str]] = None,
    uuid: Optional[bytes] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> VMStateDescription:
    """The ``configuration`` description with the receiver's checks (stream.md §3).

    Args:
        machine_type: local machine type; the received name must be a
            prefix of it. None skips the check.
        target_page_bits, target_page_bits_min: local page bits and the
            architecture minimum (x86: both 12). The minimum is assumed when
            the subsection is absent, and decides when the sender emits it.
        capabilities: locally enabled capabilities; the validated ones must
            match the source's list. None skips the check (unknown names
            still fail).
        uuid: local ``-uuid`` (16 bytes) or None. A received UUID differing
            from it fails; with None only ``warn`` is called.
        warn: receives warning texts (default: ignore).
    """
    local_caps = None if capabilities is None else frozenset(capabilities)

    def pre_save(obj: dict) -> None:
        name = obj["name"]
        if isinstance(name, str):
            name = obj["name"] = name.encode()
        obj["len"] = len(name)
        caps = list(obj.get("capabilities") or [])
        obj["capabilities"] = caps
        obj["caps_count"] = len(caps)
        obj.setdefault("target_page_bits", target_page_bits)

    def pre_load(obj: dict) -> None:
        obj["target_page_bits"] = target_page_bits_min

    def post_load(obj: dict, version: int) -> None:
        name = bytes(obj["name"])
        if machine_type is not None and not _strncmp_equal(name, machine_type.encode(),
                                                           obj["len"]):
            shown = _c_string(name[: obj["len"]]).decode("utf-8", "replace")
            raise VMStateError(
                f"Machine type received is '{printable_name(shown)}' and local is '{machine_type}'",
                field="name")
        if obj["target_page_bits"] != target_page_bits:
            raise VMStateError(f"Received TARGET_PAGE_BITS is {obj['target_page_bits']} "
                               f"but local is {target_page_bits}", field="target_page_bits")
        if local_caps is None:
            return
        source = set(obj.get("capabilities") or ())
        bad = []
        for cap in VALIDATED_CAPABILITIES:
            src_on, dst_on = cap in source, cap in local_caps
            if src_on != dst_on:
                bad.append(f"Capability {cap} is {'on' if dst_on else 'off'}, but received "
                           f"capability is {'on' if src_on else 'off'}")
        if bad:
            raise VMStateError("; ".join(bad), field="capabilities")

    def uuid_post_load(obj: dict, version: int) -> None:
        got = bytes(obj["uuid"])
        if uuid is None:
            if warn is not None:
                warn(f"UUID is received {_fmt_uuid(got)}, but local uuid isn't set")
            return
        if got != bytes(uuid):
            raise VMStateError(f"UUID received is {_fmt_uuid(got)} and local is "
                               f"{_fmt_uuid(uuid)}", field="uuid")

    page_bits = VMStateDescription(
        "configuration/target-page-bits", 1, 1,
        fields=[vmstate_uint32("target_page_bits")],
        needed=lambda o: o.get("target_page_bits", target_page_bits) > target_page_bits_min,
    )
    caps = VMStateDescription(
        "configuration/capabilities", 1, 1,
        fields=[
            vmstate_uint32("caps_count", version=1),
            vmstate_capability("capabilities", "caps_count", version=1),
        ],
        needed=lambda o: bool(o.get("capabilities")),
    )
    # QEMU sends uuid.data as VMSTATE_UINT8_ARRAY(16); as a 16-byte buffer
    # the bytes are the same and the value is more useful.
    uuid_sub = VMStateDescription(
        "configuration/uuid", 1, 1,
        fields=[vmstate_buffer("uuid", 16, version=1)],
        needed=lambda o: o.get("uuid") is not None,
        post_load=uuid_post_load,
    )
    return VMStateDescription(
        "configuration", 1, 0,
        fields=[vmstate_uint32("len"), vmstate_vbuffer("name", "len", alloc=True)],
        subsections=[page_bits, caps, uuid_sub],
        pre_save=pre_save,
        pre_load=pre_load,
        post_load=post_load,
    )


#: ``configuration`` for x86 (page bits 12) without receiver-side machine,
#: capability or UUID expectations (those need :func:`make_configuration_vmsd`).
VMSTATE_CONFIGURATION = make_configuration_vmsd()
#: QEMU loads the configuration at version 0 (and saves it at 1; no header
#: carries either).
CONFIGURATION_LOAD_VERSION = 0


def configuration(machine_type: str, *, capabilities: Iterable[str] = (),
                  uuid: Optional[bytes] = None,
                  target_page_bits: int = TARGET_PAGE_BITS) -> dict:
    """A configuration dict for saving (only validated capabilities are sent)."""
    return {
        "name": machine_type.encode(),
        "capabilities": [c for c in capabilities if c in VALIDATED_CAPABILITIES],
        "uuid": None if uuid is None else bytes(uuid),
        "target_page_bits": target_page_bits,
    }
