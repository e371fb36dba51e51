"""The one interface for how an assembler's payloads travel: a batch's prediction payloads to the server and a
fetched subject's payloads back, with the byte counts a user can read to see which way they went."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from patchwire.client.assembly.posting import Request
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire.batches import DecodedBatch

__all__ = ["Transport", "TransportStatistics"]


@dataclass
class TransportStatistics:
    """Payload bytes by the way they travelled, over an assembler's life (inline values not counted)."""

    posted_shared_bytes: int = 0
    """Prediction payloads copied into the posting segment."""
    posted_wire_bytes: int = 0
    """Prediction payloads sent as chunk messages."""
    fetched_mapped_bytes: int = 0
    """Volume payloads mapped from the server's files or memory."""
    fetched_shared_bytes: int = 0
    """Volume payloads the server wrote into this process's fetch segment."""
    fetched_wire_bytes: int = 0
    """FetchSubject messages received over the wire: volume payloads as they travelled (compressed where the fetch
    was), with their messages' few bytes of framing."""


class Transport(abc.ABC):
    """How payloads reach the server and come back. An assembler asks its transport for the requests that post a
    batch (the batch message pointing at its payloads, or followed by them) and for the decoded subject a
    FetchSubject request returns; everything else (jobs, acknowledgements, retries) is the assembler's."""

    name: ClassVar[str]
    """Which transport this is: 'wire', 'posting segment', 'mapped volumes' or 'memory'."""
    statistics: TransportStatistics

    @property
    def shared(self) -> bool:
        """Whether payloads go through shared memory (False once a transport has fallen back to the wire)."""
        return False

    @abc.abstractmethod
    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        """The requests that post ``batch`` with ``payloads`` (its chunked tensors' bytes, in announcement order)."""

    @abc.abstractmethod
    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        """The subject ``request`` asks for, decoded (``what``: the call, for error messages)."""

    def resending(self, batches: Sequence[list[Request]]) -> None:  # noqa: B027 (most transports need nothing)
        """Called before unacknowledged ``batches`` are sent again on a new stream."""

    def close(self, idle: bool) -> None:  # noqa: B027 (most transports hold nothing)
        """Lets go of what the transport holds; ``idle``: no batch is in flight (nothing reads its memory any more)."""
