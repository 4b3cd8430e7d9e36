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
    │   ├── DirtyBitmapError              a dirty-bitmap record is malformed or does not fit
    │   └── ReturnPathError               a return-path message is malformed
    ├── BitmapError (ValueError)          a block dirty bitmap (or bitmaps file) is refused
    ├── XbzrleError (ValueError)          malformed XBZRLE delta
    ├── MultifdPacketError (ValueError)   malformed multifd packet
    ├── CapabilityError (ValueError)      capability refused
    ├── ParameterError (ValueError)       parameter out of range or refused
    │   └── TransportNotSupported         a URI of a transport qmigx cannot run (rdma:)
    ├── ObjectError (ValueError)          a user-created object (credentials, authz) refused
    ├── StateError (RuntimeError)         an operation or transition not allowed in this state
    ├── ChannelError (OSError)            a transport failed
    │   ├── ChannelTimeout                no progress within the timeout
    │   ├── ChannelClosed                 shut down (cancel)
    │   └── TLSError                      a TLS handshake or record failed
    │       └── TLSPeerRejected           the peer's credentials were refused (certificate, authz)
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
    "DirtyBitmapError",
    "ReturnPathError",
    "BitmapError",
    "XbzrleError",
    "MultifdPacketError",
    "CapabilityError",
    "ParameterError",
    "TransportNotSupported",
    "ObjectError",
    "StateError",
    "ChannelError",
    "ChannelTimeout",
    "ChannelClosed",
    "TLSError",
    "TLSPeerRejected",
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


class DirtyBitmapError(StreamError):
    """A ``dirty-bitmap`` record is malformed or does not fit the bitmaps it names.

    Raised when the error ends the migration; when QEMU would only cancel
    the bitmap migration and keep loading, the destination keeps the error
    (``DirtyBitmapDestination.cancelled``) instead of raising it.
    """


class ReturnPathError(StreamError):
    """A return-path message is malformed or unexpected."""


class BitmapError(MigrationError, ValueError):
    """A block dirty bitmap, or a bitmaps file, is refused; ``field`` names the part."""


class XbzrleError(MigrationError, ValueError):
    """An XBZRLE delta is malformed; ``offset`` is the position in the delta."""


class MultifdPacketError(MigrationError, ValueError):
    """A multifd packet is malformed; ``field`` names the offending field."""


class CapabilityError(MigrationError, ValueError):
    """A capability or combination of capabilities is refused."""


class ParameterError(MigrationError, ValueError):
    """A migration parameter is out of range or refused."""


class TransportNotSupported(ParameterError):
    """A URI names a transport that exists in QEMU but that qmigx cannot run (``rdma:``)."""


class ObjectError(MigrationError, ValueError):
    """A user-created object (``tls-creds-*``, ``authz-*``) is refused, missing or of the wrong kind.

    ``field`` names the object id or the property concerned.
    """


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


class TLSError(ChannelError):
    """A TLS handshake or record failed: the peer spoke no TLS, broke off, or sent garbage."""


class TLSPeerRejected(TLSError):
    """The TLS peer's credentials were refused: its certificate, its hostname, or authz.

    ``peer`` is the peer certificate's distinguished name (GnuTLS's form) when known.
    """

    def __init__(self, message: str, *, peer: str | None = None, **where) -> None:
        super().__init__(message, **where)
        self.peer = peer
