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
    │   ├── BlockStreamError              a block record is malformed, or names an unknown or too small disk
    │   ├── DirtyBitmapError              a dirty-bitmap record is malformed or does not fit
    │   ├── ReturnPathError               a return-path message is malformed
    │   ├── ColoError                     a COLO message or checkpoint is invalid, unexpected or cut
    │   ├── IncompatibleStreamError       a valid stream another QEMU version cannot load
    │   ├── MachineLayoutError            guest-physical memory cannot be laid out
    │   └── SaveImageError                a libvirt save image's header or body is bad
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

Whatever the input, ``str(err)`` is one line: a corrupted length byte can
turn binary data into a "name" (an idstr running into device state, say),
and such bytes must not break the one-line reports of the command-line
tool or inject terminal control sequences. So the message is shown with
non-printable characters escaped, and the section and field, which are
names, with :func:`printable_name` (escaped and cut). Code that puts a
name read from a stream into a message passes it through
:func:`printable_name` too, so that 255 bytes of garbage become a short
readable excerpt.
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
    "BlockStreamError",
    "DirtyBitmapError",
    "ReturnPathError",
    "ColoError",
    "IncompatibleStreamError",
    "BitmapError",
    "MachineLayoutError",
    "SaveImageError",
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
    "NAME_LIMIT",
    "printable_name",
    "one_line",
]

#: Longest name an error shows, in characters once escaped.
NAME_LIMIT = 64

# characters kept from the end of a name that is cut: a section label
# ends with its section id, ``"idstr (id)"``
_TAIL = 16


def _escape(char: str) -> str:
    """``\\xNN`` for a byte that did not decode (surrogateescape), else as ascii()."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return ascii(char)[1:-1]


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped.

    Newlines, carriage returns, escape sequences, NULs, Unicode line
    separators and undecodable bytes become ``\\n``, ``\\x1b``,
    ``\\u2028`` and so on; printable text (non-ASCII letters included)
    is kept. The result is never longer than one line, and applying it
    again changes nothing.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_name(name: str, limit: int = NAME_LIMIT) -> str:
    """A name read from input as an error shows it: printable ASCII, at most ``limit`` chars.

    Everything outside printable ASCII is escaped as Python's ``ascii()``
    does, undecodable bytes as ``\\xNN``. A longer result keeps its head
    and its last characters around ``...``, never splitting an escape.
    Applying it again changes nothing.
    """
    pieces = [c if " " <= c <= "~" else _escape(c) for c in name]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    keep = limit - 3
    tail_room = min(_TAIL, keep // 3)
    head_room = keep - tail_room
    head: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > head_room:
            break
        head.append(piece)
        used += len(piece)
    tail: list[str] = []
    used = 0
    for piece in reversed(pieces):
        if used + len(piece) > tail_room:
            break
        tail.append(piece)
        used += len(piece)
    return "".join(head) + "..." + "".join(reversed(tail))


class MigrationError(Exception):
    """Root of every qmigx error.

    Args:
        message: what went wrong.
        offset: byte offset in the stream (or buffer) where it was found.
        section: the section it belongs to, e.g. ``"ram (2)"``.
        field: the field, record or parameter concerned.

    The attributes keep what they were given (a QMP error's ``desc`` is
    its message, as is); ``str()`` and :meth:`where` show them on one
    line, escaped (see the module docstring).
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
            parts.append(f"section {printable_name(str(self.section))}")
        if self.field is not None:
            parts.append(f"field {printable_name(str(self.field))}")
        return ", ".join(parts)

    def __str__(self) -> str:
        message = one_line(str(self.message))
        where = self.where()
        return f"{message} (at {where})" if where else message

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


class BlockStreamError(StreamError):
    """A ``block`` record is malformed, names an unknown disk or lies outside it."""


class DirtyBitmapError(StreamError):
    """A ``dirty-bitmap`` record is malformed or does not fit the bitmaps it names.

    Raised when the error ends the migration; when QEMU would only cancel
    the bitmap migration and keep loading, the destination keeps the error
    (``DirtyBitmapDestination.cancelled``) instead of raising it.
    """


class ReturnPathError(StreamError):
    """A return-path message is malformed or unexpected."""


class ColoError(StreamError):
    """A COLO message is invalid or unexpected, or a checkpoint is cut short or oversize.

    The secondary fails over on it, holding the last complete checkpoint.
    """


class IncompatibleStreamError(StreamError):
    """A valid stream that the requested QEMU version cannot load (e.g. its machine type)."""


class BitmapError(MigrationError, ValueError):
    """A block dirty bitmap, or a bitmaps file, is refused; ``field`` names the part."""


class MachineLayoutError(StreamError):
    """The saved state does not say where its RAM sits in guest-physical memory."""


class SaveImageError(StreamError):
    """A libvirt save image has a bad header, or its compressed body is damaged or cut."""


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
