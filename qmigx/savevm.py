"""Section handlers and their registry (QEMU's SaveStateEntry list, savevm.c).

Every section of a stream belongs to a handler registered under an idstr
and an instance id, and the parser, the source and the destination all
dispatch through one :class:`SaveVMRegistry`:

* a **live** handler (``ram``, ``block``, ``dirty-bitmap``) has QEMU's
  SaveVMHandlers shape: ``save_setup`` writes the START payload,
  ``save_live_iterate`` one PART payload, ``save_pending`` says how much is
  left, ``save_complete_precopy`` writes the END payload, and
  ``save_cleanup`` runs whatever happened. Its record grammar,
  ``read_record``, is sans-IO: it consumes one record from a
  :class:`~qmigx.qemufile.Cursor` and returns it, so the same handler class
  delimits the section for ``analyze`` and applies it on a destination
  (``load_setup`` / ``load_record`` / ``load_cleanup``).
* a **device** handler (:class:`VMStateHandler`) is a VMState description
  with its state: one FULL section, loaded whole.

The registry finds the handler for an incoming section as QEMU's
``find_se`` does (idstr and instance id, or the bare VMSD name for
streams from QEMUs that did not prefix qdev paths), refuses versions a
device cannot load, and gives the source its handlers in QEMU's order.
Section ids are handed out in registration order, as QEMU numbers
``savevm_state.global_section_id``.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from qmigx.errors import UnknownSectionError, VMStateError, printable_name
from qmigx.qemufile import Cursor, QEMUFile
from qmigx.records import Record, factory

__all__ = [
    "Section",
    "SaveVMHandler",
    "VMStateHandler",
    "SaveVMRegistry",
    "DeviceState",
    "vmstate_device",
]


class Section(Record):
    """Identity of a section as introduced by its START or FULL header."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int

    @property
    def label(self) -> str:
        """``idstr (id)`` as QEMU's error messages and the analyze script name it."""
        return f"{self.idstr} ({self.section_id})"


class SaveVMHandler:
    """A live section's handlers; subclasses override what they implement.

    Source side, in the order the migration thread calls them:
    ``is_active`` (is the section in this migration at all), ``save_setup``
    (START payload), then per iteration ``save_pending`` and, while
    ``is_active_iterate``, ``save_live_iterate`` (PART payload; returns
    True once the current stage is done, as QEMU's ``ret > 0``), then
    ``save_complete_precopy`` (END payload) and ``save_cleanup``.

    Destination side: ``load_setup`` once the section first appears,
    ``load_record`` for every record ``read_record`` produced, and
    ``load_cleanup(ok)`` at the end of the incoming migration.

    Payload methods write the section body only: the driver writes the
    section header before and the footer after.
    """

    idstr: str = ""
    instance_id: int = 0
    version_id: int = 1
    #: the section id a source gives it (QEMU's registration order on x86
    #: ``pc``: ``block`` 1, ``ram`` 2, ``dirty-bitmap`` 3); None: after RAM
    section_id: Optional[int] = None
    #: live sections are START/PART/END; others are one FULL section
    live: bool = True

    # -- the record grammar (sans-IO, every side) ------------------------------
    def read_record(self, cur: Cursor, section: Section) -> tuple[Any, bool]:
        """Consume exactly one record of a payload from ``cur``.

        Returns ``(record, last)``; ``last`` is True for the record that
        ends the payload (an EOS). Cursor reads raise ``NeedData`` when the
        input stops short: the parser rewinds and calls again with more
        input, so this must not change any state. Bad input raises a
        :class:`~qmigx.errors.StreamError` naming the offset and field.
        """
        raise NotImplementedError(f"{type(self).__name__} has no record grammar")

    def describe(self, record: Any) -> Any:
        """A JSON-able view of one record, for ``analyze``."""
        return repr(record)

    # -- source ------------------------------------------------------------------
    def is_active(self) -> bool:
        return True

    def is_active_iterate(self) -> bool:
        return True

    def save_setup(self, f: QEMUFile) -> None:
        pass

    def save_pending(self, max_size: int = 0) -> tuple[int, int]:
        """Bytes left to send: ``(precopy_only, postcopy_compatible)``.

        ``max_size`` is what the driver could send within the downtime
        limit (QEMU's threshold): a section that must not complete yet
        reports more than that.
        """
        return (0, 0)

    def save_live_iterate(self, f: QEMUFile) -> bool:
        return True

    def save_complete_precopy(self, f: QEMUFile) -> None:
        pass

    def has_postcopy(self) -> bool:
        """Whether the section goes on after a postcopy switch-over (QEMU's ``has_postcopy``).

        Such a section is not ended at the switch-over: its PART sections
        follow the device state, beside RAM's, and its END comes with RAM's
        (:meth:`save_complete_postcopy`).
        """
        return False

    def save_complete_postcopy(self, f: QEMUFile) -> None:
        pass

    def save_cleanup(self) -> None:
        pass

    # -- destination ------------------------------------------------------------
    def load_setup(self) -> None:
        pass

    def load_record(self, record: Any, section: Section) -> None:
        pass

    def load_cleanup(self, ok: bool) -> None:
        pass


class VMStateHandler(Record, mutable=True):
    """One registered device: identity, description and live state."""

    idstr: str
    instance_id: int
    vmsd: object
    state: dict = factory(dict)
    order: int = 0
    live = False

    @property
    def compat_idstr(self) -> str:
        """The bare VMSD name that older streams use for a qdev-path idstr."""
        return self.vmsd.name

    @property
    def version_id(self) -> int:
        return self.vmsd.version_id

    def load(self, cur: Cursor, sec: Section) -> dict:
        """Load a FULL payload into ``state`` with QEMU's version checks."""
        from qmigx.vmstate import load_state

        vmsd = self.vmsd
        if sec.version_id > vmsd.version_id:
            raise VMStateError(
                f"savevm: unsupported version {sec.version_id} for '{printable_name(sec.idstr)}' "
                f"v{vmsd.version_id}", offset=cur.tell(), section=sec.label, field="version_id")
        if sec.version_id < vmsd.minimum_version_id:
            raise VMStateError(
                f"{vmsd.name}: incoming version_id {sec.version_id} is too old for local "
                f"minimum_version_id {vmsd.minimum_version_id}",
                offset=cur.tell(), section=sec.label, field="version_id")
        return load_state(vmsd, cur, sec.version_id, section=sec.label, obj=self.state)

    def device_state(self) -> "DeviceState":
        return vmstate_device(self.idstr, self.instance_id, self.vmsd, self.state)


class SaveVMRegistry:
    """Handlers by (idstr, instance id); see the module docstring."""

    def __init__(self, handlers=()) -> None:
        self._entries: dict[tuple[str, int], Any] = {}
        self._order: dict[tuple[str, int], int] = {}
        for h in handlers:
            self.add(h)

    # -- registration -------------------------------------------------------------
    def add(self, handler) -> Any:
        """Register a handler object (a :class:`SaveVMHandler` or :class:`VMStateHandler`)."""
        key = (handler.idstr, handler.instance_id)
        if key in self._entries:
            raise ValueError(f"handler {key[0]!r} instance {key[1]} already registered")
        self._order[key] = len(self._entries)
        self._entries[key] = handler
        return handler

    def register(self, idstr: str, vmsd, state: Optional[dict] = None, *,
                 instance_id: Optional[int] = None) -> VMStateHandler:
        """Add a VMState device; ``instance_id`` None takes the next free one for ``idstr``."""
        if instance_id is None:
            instance_id = 1 + max((i for (n, i) in self._entries if n == idstr), default=-1)
        h = VMStateHandler(idstr, instance_id, vmsd, {} if state is None else state,
                           order=len(self._entries))
        return self.add(h)

    def remove(self, idstr: str, instance_id: int = 0) -> None:
        self._entries.pop((idstr, instance_id), None)

    # -- lookup -------------------------------------------------------------------
    def find(self, idstr: str, instance_id: int):
        h = self._entries.get((idstr, instance_id))
        if h is not None:
            return h
        for cand in self._entries.values():  # compat: "dev/vmsd" saved as "vmsd"
            if (isinstance(cand, VMStateHandler) and "/" in cand.idstr
                    and cand.compat_idstr == idstr and cand.instance_id == instance_id):
                return cand
        return None

    def live(self, idstr: str) -> Optional[SaveVMHandler]:
        """The live handler whose grammar delimits sections named ``idstr``."""
        for (name, _), h in self._entries.items():
            if name == idstr and getattr(h, "live", False):
                return h
        return None

    def section_id(self, handler) -> int:
        """The section id QEMU would give ``handler``: its registration index."""
        return self._order[(handler.idstr, handler.instance_id)]

    def live_handlers(self) -> list[SaveVMHandler]:
        """Live handlers in registration order (QEMU's iteration order)."""
        return [h for h in self._entries.values() if getattr(h, "live", False)]

    def devices(self) -> list[VMStateHandler]:
        """VMState devices in save order: higher VMSD priority first, then registration."""
        devs = [h for h in self._entries.values() if isinstance(h, VMStateHandler)]
        return sorted(devs, key=lambda h: (-int(getattr(h.vmsd, "priority", 0)), h.order))

    def __iter__(self) -> Iterator:
        return iter(self.devices())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return tuple(key) in self._entries

    # -- loading ------------------------------------------------------------------
    def load(self, cur: Cursor, sec: Section) -> Any:
        """Load a FULL device payload into its handler's state."""
        h = self.find(sec.idstr, sec.instance_id)
        if h is None or not isinstance(h, VMStateHandler):
            raise UnknownSectionError(
                f"Unknown savevm section or instance '{printable_name(sec.idstr)}' {sec.instance_id}",
                offset=cur.tell(), section=sec.label, field="idstr")
        return h.load(cur, sec)

    def device_states(self) -> list["DeviceState"]:
        """DeviceState sections to save, in order, with vmdesc entries."""
        return [h.device_state() for h in self.devices()]


class DeviceState(Record, mutable=True):
    """One device section to save: identity, payload, and its vmdesc entry.

    ``vmdesc`` is the JSON text of the section's entry in the vmdesc
    ``devices`` list (QEMU 7.2's text form), or None to leave it out.
    """

    idstr: str
    instance_id: int
    version_id: int
    payload: bytes
    vmdesc: Optional[str] = None


def vmstate_device(idstr: str, instance_id: int, vmsd, obj: dict) -> DeviceState:
    """A device section saved from a VMState description, with its vmdesc entry."""
    from qmigx.qjson import JSONWriter
    from qmigx.vmstate import save_state

    w = JSONWriter()
    w.start_object(None)
    w.str("name", idstr)
    w.int64("instance_id", instance_id)
    payload = bytearray()
    save_state(vmsd, obj, payload, vmdesc=w, section=f"{idstr} ({instance_id})")
    w.end_object()
    return DeviceState(idstr, instance_id, vmsd.version_id, bytes(payload), w.getvalue())
