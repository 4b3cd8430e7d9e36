"""The registry of section handlers (QEMU's SaveStateEntry list, savevm.c).

A handler is a device's VMState description plus its state object,
registered under an idstr and instance id. The registry finds the handler
for an incoming START/FULL section the way QEMU's ``find_se`` does
(idstr and instance id, or the bare VMSD name for streams from QEMUs
that did not prefix qdev paths), refuses versions it cannot load (newer
than its own, older than its minimum), and loads payloads into the state
object. On the source side it gives the device sections to save, in
QEMU's order (priority, then registration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qmigx.errors import UnknownSectionError, VMStateError
from qmigx.qemufile import Cursor
from qmigx.stream import Section

__all__ = ["Handler", "HandlerRegistry"]


@dataclass
class Handler:
    """One registered device: identity, description and live state."""

    idstr: str
    instance_id: int
    vmsd: object
    state: dict = field(default_factory=dict)
    order: int = 0

    @property
    def compat_idstr(self) -> str:
        """The bare VMSD name that older streams use for a qdev-path idstr."""
        return self.vmsd.name


class HandlerRegistry:
    """Handlers by (idstr, instance id); see the module docstring."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, int], Handler] = {}

    def register(self, idstr: str, vmsd, state: Optional[dict] = None, *,
                 instance_id: Optional[int] = None) -> Handler:
        """Add a device; ``instance_id`` None takes the next free one for ``idstr``."""
        if instance_id is None:
            instance_id = 1 + max((i for (n, i) in self._handlers if n == idstr), default=-1)
        key = (idstr, instance_id)
        if key in self._handlers:
            raise ValueError(f"handler {idstr!r} instance {instance_id} already registered")
        h = Handler(idstr, instance_id, vmsd, {} if state is None else state,
                    order=len(self._handlers))
        self._handlers[key] = h
        return h

    def find(self, idstr: str, instance_id: int) -> Optional[Handler]:
        h = self._handlers.get((idstr, instance_id))
        if h is not None:
            return h
        for cand in self._handlers.values():  # compat: "dev/vmsd" saved as "vmsd"
            if "/" in cand.idstr and cand.compat_idstr == idstr and cand.instance_id == instance_id:
                return cand
        return None

    def __iter__(self):
        """Handlers in save order: higher VMSD priority first, then registration."""
        return iter(sorted(self._handlers.values(),
                           key=lambda h: (-int(getattr(h.vmsd, "priority", 0)), h.order)))

    def __len__(self) -> int:
        return len(self._handlers)

    def load(self, cur: Cursor, sec: Section) -> dict:
        """Load a section payload into its handler's state (a parser device loader)."""
        from qmigx.vmstate import load_state

        h = self.find(sec.idstr, sec.instance_id)
        if h is None:
            raise UnknownSectionError(
                f"Unknown savevm section or instance '{sec.idstr}' {sec.instance_id}",
                offset=cur.tell(), section=sec.label, field="idstr")
        vmsd = h.vmsd
        if sec.version_id > vmsd.version_id:
            raise VMStateError(
                f"savevm: unsupported version {sec.version_id} for '{sec.idstr}' "
                f"v{vmsd.version_id}", offset=cur.tell(), section=sec.label, field="version_id")
        if sec.version_id < vmsd.minimum_version_id:
            raise VMStateError(
                f"{vmsd.name}: incoming version_id {sec.version_id} is too old for local "
                f"minimum_version_id {vmsd.minimum_version_id}",
                offset=cur.tell(), section=sec.label, field="version_id")
        return load_state(vmsd, cur, sec.version_id, section=sec.label, obj=h.state)

    def parser_devices(self) -> dict:
        """The ``devices`` mapping for :class:`~qmigx.stream.StreamParser`."""
        return {(h.idstr, h.instance_id): self.load for h in self._handlers.values()}

    def device_states(self) -> list:
        """DeviceState sections to save, in order, with vmdesc entries."""
        from qmigx.savevm import vmstate_device

        return [vmstate_device(h.idstr, h.instance_id, h.vmsd, h.state) for h in self]
