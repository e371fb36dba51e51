"""Registering this process's segments with a server: over the process's connection to the server's socket, with a
ticket from RegisterSharedMemory, once per segment and connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from patchwire.client._connection import Connection
from patchwire.client._errors import RpcError
from patchwire.client.assembly import process
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import shared_memory

__all__ = ["UNUSABLE", "Registrar", "Registration"]

UNUSABLE = (RpcError, OSError, shared_memory.SegmentError)
"""What registering a segment raises where shared memory cannot be used (then the transports fall back). A server
that stays unreachable raises ConnectionFailed, which is an OSError too: callers let it through first."""


class Registration(Protocol):
    def register(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        """The region ``segment`` is registered as; raises one of ``UNUSABLE`` where it cannot be."""
        ...


class Registrar:
    """Registers segments with ``connection``'s server; ``retrying(what, call, read)`` makes the RPC under the
    assembler's retry policy."""

    def __init__(self, connection: Connection, retrying: Callable[..., Any]) -> None:
        self._connection = connection
        self._retrying = retrying

    def register(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        """The region ``segment`` is registered as with the server: registered now where it is not yet (over this
        process's connection to the server's socket). Raises RpcError, OSError (the socket cannot be reached) or
        SegmentError (the server refused it, with the reason)."""
        address = self._connection.address
        channel = process.CHANNELS.get(address)
        region = None if channel is None else segment.region_on(channel)
        if region is not None:
            return region
        request = apb.RegisterSharedMemoryRequest(for_posting=for_posting)
        register = self._connection.assembly.RegisterSharedMemory
        timeout = self._connection.timeouts.unary_s
        response = self._retrying(
            "registering shared memory with the server", lambda: register(request, timeout=timeout), read=True
        )
        channel = process.CHANNELS.connect(address, response.socket_path)
        return segment.register(channel, response.ticket)
