"""The rules between capabilities and parameters (QEMU's migration/options.c).

:class:`~qmigx.control.capabilities.Capabilities` and
:class:`~qmigx.control.parameters.Parameters` of one side are linked both
ways, because some of QEMU's checks read both (``zero-copy-send`` against
multifd compression and TLS). The rules live here, over plain views of
either object, so that neither module needs the other.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

__all__ = ["SettingsView", "ZERO_COPY_REFUSED", "zero_copy_refused", "zero_copy_conflict"]

ZERO_COPY_REFUSED = "Zero copy only available for non-compressed non-TLS multifd migration"


class SettingsView(Protocol):
    """What a rule reads of the other object: a value by its QMP name."""

    def get(self, name: str) -> Any: ...


def zero_copy_refused(caps: Mapping[str, bool], params: Optional[SettingsView]) -> bool:
    """Whether ``zero-copy-send`` is refused with these capabilities and parameters."""
    compressed = params is not None and params.get("multifd-compression") != "none"
    tls = params is not None and bool(params.get("tls-creds"))
    return not caps["multifd"] or caps["compress"] or caps["xbzrle"] or compressed or tls


def zero_copy_conflict(params: Mapping[str, Any]) -> Optional[str]:
    """The parameter that ``zero-copy-send`` refuses, or None."""
    if params["multifd-compression"] != "none":
        return "multifd-compression"
    if params["tls-creds"]:
        return "tls-creds"
    return None
