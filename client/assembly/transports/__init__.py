"""How an assembler's payloads travel, chosen once per assembler: the wire (:class:`WireTransport`), or shared
memory on the server's host (:class:`MappedVolumes`, posting through a :class:`PostingSegment`), each behind the one
:class:`Transport` interface; :class:`MemoryTransport` stands in for them in tests."""

from __future__ import annotations

import logging
from collections.abc import Callable

from patchwire.client._connection import Connection
from patchwire.client._errors import ConnectionFailed
from patchwire.client._shared_memory import UNUSABLE, Registrar, Registration
from patchwire.client.assembly.transports.base import Transport, TransportStatistics
from patchwire.client.assembly.transports.mapped import MappedVolumes
from patchwire.client.assembly.transports.memory import MemoryTransport
from patchwire.client.assembly.transports.segment import PostingSegment
from patchwire.client.assembly.transports.wire import WireTransport
from patchwire.wire import shared_memory

__all__ = [
    "MappedVolumes",
    "MemoryTransport",
    "PostingSegment",
    "Registrar",
    "Registration",
    "Transport",
    "TransportStatistics",
    "WireTransport",
    "choose_transport",
]

_log = logging.getLogger(__name__)


def choose_transport(
    connection: Connection,
    registration: Registration,
    preference: bool | None,
    window: int,
    drain: Callable[[], None],
    codec: int = 0,
) -> Transport:
    """The transport for an assembler: shared memory where a probe segment can be registered with the server (same
    host, a socket it can reach, a user id the server allows, shared memory not turned off on the server), else the
    wire. ``preference``: None tries shared memory, True requires it (ValueError with the reason where it cannot be
    used), False keeps to the wire without probing. ``window`` and ``drain``: see :class:`PostingSegment`. ``codec``:
    what the wire compresses predictions with (shared memory never does)."""
    wire = WireTransport(connection, codec=codec)
    if preference is False:
        return wire
    required = preference is True
    if not shared_memory.available():
        if required:
            raise ValueError("shared_memory=True: this client cannot make segments (it needs Linux)")
        return wire
    segment = shared_memory.Segment(0, sealed=True, name="patchwire-probe")
    try:
        registration.register(segment, for_posting=True)
    except ConnectionFailed:  # (an OSError too: the server stayed unreachable, not unusable)
        raise
    except UNUSABLE as exc:
        # turned off, a server that predates it, another host or container (no socket here), a uid not allowed
        if required:
            raise ValueError(f"shared_memory=True, but the server cannot use it: {exc}") from None
        _log.info("shared memory is not available (%s); predictions go over the wire", exc)
        return wire
    finally:
        segment.close()
    return MappedVolumes(connection, registration, PostingSegment(registration, window, drain, wire))
