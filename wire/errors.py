"""The wire layer's errors: bytes that break the wire format, and values that have no form on the wire.

Both are ``ValueError``s. The server answers them with INVALID_ARGUMENT (a client sent them, or asked for samples
that cannot travel); the client raises ``ProtocolError`` for a malformed stream from a server.
"""

from __future__ import annotations

__all__ = ["EncodingError", "FramingError", "WireError"]


class WireError(ValueError):
    """Bytes that break the wire format: an unknown dtype, a payload that does not fill its tensor, a corrupt
    compressed block, an index expression with neither index nor range, a broken stream (:class:`FramingError`)."""


class FramingError(WireError):
    """A stream that breaks the framing: chunks without a batch, a batch before the last one's chunks were
    complete, a chunk overrunning its tensor, sizes that cannot be right. The message starts with the field."""


class EncodingError(ValueError):
    """A sample value that cannot travel (an object the wire has no form for, entries missing from some samples)."""
