"""The vmdesc trailer document, built while FULL sections are saved (vmstate.md §8).

A precopy stream ends with a JSON description of every FULL section it
carried, which is what lets a receiver without device knowledge delimit
and decode them (§8.1, ``analyze.py``). QEMU writes it as a side effect of
saving; :class:`VMDescBuilder` does the same around
:func:`~qmigx.vmstate.codec.save_state`, producing the document text
byte-identical to QEMU 7.2's (or 4.1's QJSON form).
"""

from __future__ import annotations

from typing import Optional

from qmigx.qjson import FORM_72, JSONWriter
from qmigx.vmstate.codec import save_state
from qmigx.vmstate.fields import VMStateDescription
from qmigx.wire import TARGET_PAGE_SIZE

__all__ = ["VMDescBuilder", "write_old_style_entry"]


def write_old_style_entry(w: JSONWriter, size: int) -> None:
    """The keys QEMU writes for a section saved by a non-VMSD handler."""
    w.int64("size", size)
    w.start_array("fields")
    w.start_object(None)
    w.str("name", "data")
    w.int64("size", size)
    w.str("type", "buffer")
    w.end_object()
    w.end_array()


class VMDescBuilder:
    """``{"page_size": N, "devices": [...]}``, one entry per FULL section.

    Args:
        page_size: the target page size written as ``page_size``.
        form: ``"7.2"`` (JSONWriter) or ``"4.1"`` (QJSON) text.
    """

    def __init__(self, page_size: int = TARGET_PAGE_SIZE, *, form: str = FORM_72) -> None:
        self.writer = JSONWriter(form)
        self.writer.start_object(None)
        self.writer.int64("page_size", page_size)
        self.writer.start_array("devices")
        self._done: Optional[str] = None

    def save_section(self, idstr: str, instance_id: int, vmsd: VMStateDescription,
                     obj: dict, out, *, version: Optional[int] = None,
                     section: Optional[str] = None) -> None:
        """Save one FULL section payload into ``out`` and describe it."""
        w = self.writer
        w.start_object(None)
        w.str("name", idstr)
        w.int64("instance_id", instance_id)
        save_state(vmsd, obj, out, version, vmdesc=w, section=section)
        w.end_object()

    def add_old_style(self, idstr: str, instance_id: int, size: int) -> None:
        """Describe a FULL section of ``size`` bytes written by an old-style handler."""
        w = self.writer
        w.start_object(None)
        w.str("name", idstr)
        w.int64("instance_id", instance_id)
        write_old_style_entry(w, size)
        w.end_object()

    def finish(self) -> str:
        """Close the document and return its text (idempotent)."""
        if self._done is None:
            self.writer.end_array()
            self.writer.end_object()
            self._done = self.writer.getvalue()
        return self._done

    def finish_bytes(self) -> bytes:
        """The document as the UTF-8 bytes that follow ``0x06`` + be32 length."""
        return self.finish().encode("utf-8", "surrogateescape")
