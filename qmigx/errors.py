"""One rooted tree of errors, each saying what went wrong and where.

Every error raised on bad input derives from :class:`MigrationError` and
carries the location it was found at as attributes (``offset``,
``section``, ``field``), which also appear in ``str(err)``. Errors caused
by a peer's bytes also subclass :class:`ValueError`, so generic callers
that catch ``ValueError`` keep working::

    MigrationError
    ├── StreamError (ValueError)          bytes of a migration stream
    │   ├── TruncatedStreamError          the stream ended inside a record
    │   ├── BadHeaderError                wrong magic or version
    │   ├── UnknownSectionError           section type, id or idstr not known
    │   ├── VMStateError                  a device section does not fit its description
    │   ├── RamStreamError                a RAM record is malformed or out of bounds
    │   ├── ReturnPathError               a return-path message is malformed
    │   └── IncompatibleStreamError       a valid stream another QEMU version cannot load
    ├── XbzrleError (ValueError)          malformed XBZRLE delta
    ├── MultifdPacketError (ValueError)   malformed multifd packet
    ├── CapabilityError (ValueError)      capability refused
    ├── ParameterError (ValueError)       parameter out of range or refused
    ├── StateError (RuntimeError)         an operation or transition not allowed in this state
    ├── ChannelError (OSError)            a transport failed
    └── MigrationCancelled                the migration was cancelled
"""

from __future__ import annotations

__all__ = [
    "MigrationError",
    "StreamError",
    "TruncatedStreamError",
    "BadHeaderError",
    "UnknownSectionError",
    "VMStateError",
    "RamStreamError",
    "ReturnPathError",
    "IncompatibleStreamError",
    "XbzrleError",
    "MultifdPacketError",
    "CapabilityError",
    "ParameterError",
    "StateError",
    "ChannelError",
    "ChannelTimeout",
    "ChannelClosed",
    "MigrationCancelled",
]


class MigrationError(Exception):
    """Root of every qmigx error.

    Args:
        message: what went wrong.
        offset: byte offset in the stream (or buffer) where it was found.
        section: the section it belongs to, e.g. ``"ram (2)"``.
        field: the field, record or parameter concerned.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        section: str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.offset = offset
        self.section = section
        self.field = field
        super().__init__(message)

    def where(self) -> str:
        """The location part of the message, or ``""``."""
        parts = []
        if self.offset is not None:
            parts.append(f"offset 0x{self.offset:x}")
        if self.section is not None:
            parts.append(f"section {self.section}")
        if self.field is not None:
            parts.append(f"field {self.field}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{self.message} (at {where})" if where else self.message

    def __reduce__(self):  # keep attributes across pickling (multiprocessing)
        return (
            _rebuild,
            (type(self), self.message, self.offset, self.section, self.field),
        )


def _rebuild(cls, message, offset, section, field):
    return cls(message, offset=offset, section=section, field=field)


class StreamError(MigrationError, ValueError):
    """The bytes of a migration stream are not a valid stream."""


class TruncatedStreamError(StreamError):
    """The stream ended in the middle of a record."""


class BadHeaderError(StreamError):
    """Wrong file magic or stream version."""


class UnknownSectionError(StreamError):
    """A section type, section id or idstr/instance that is not known."""


class VMStateError(StreamError):
    """A device section does not match its VMState description."""


class RamStreamError(StreamError):
    """A RAM record is malformed, names an unknown block or lies outside it."""


class ReturnPathError(StreamError):
    """A return-path message is malformed or unexpected."""


class IncompatibleStreamError(StreamError):
    """A valid stream that the requested QEMU version cannot load (e.g. its machine type)."""


class XbzrleError(MigrationError, ValueError):
    """An XBZRLE delta is malformed; ``offset`` is the position in the delta."""


class MultifdPacketError(MigrationError, ValueError):
    """A multifd packet is malformed; ``field`` names the offending field."""


class CapabilityError(MigrationError, ValueError):
    """A capability or combination of capabilities is refused."""


class ParameterError(MigrationError, ValueError):
    """A migration parameter is out of range or refused."""


class StateError(MigrationError, RuntimeError):
    """An operation or state transition is not allowed in the current state."""


class ChannelError(MigrationError, OSError):
    """A transport (file, socket, pipe, command) failed."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled by request."""


class ChannelTimeout(ChannelError):
    """A channel made no progress within its timeout (a stalled peer or an idle wait)."""


class ChannelClosed(ChannelError):
    """A channel or listener was shut down (cancel) and can no longer be used."""
