"""An in-memory transport for tests: it keeps the payloads of every batch posted and serves fetched subjects from a
dict, so a test can see exactly what an assembler hands over and what it makes of a subject, without a server's
shared memory and without patching anything::

    from patchwire.client.assembly import MemoryTransport

    transport = MemoryTransport()
    assembler.transport = transport          # before the first batch: the assembler probes nothing
    assembler.add_batch(prediction, indices)
    batch, payloads = transport.posted[-1]   # the PredictionBatch and the arrays handed over (not copied)
    transport.subjects[0] = decoded          # a DecodedBatch that fetch(0) then returns

Batches are posted as the batch message alone (a real server would find their payloads missing): pair it with a
fake PostPredictions stream, or use it where only what reaches the transport matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from patchwire.client._errors import NotFoundError
from patchwire.client.assembly.posting import Request
from patchwire.client.assembly.transports.base import Transport, TransportStatistics
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire.batches import DecodedBatch

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """Keeps posted payloads in ``posted`` and fetches from ``subjects``; ``shared`` is what it reports as
    ``uses_shared_memory``. Posted bytes count as shared or wire bytes accordingly, fetched ones as mapped or wire."""

    name = "memory"

    def __init__(self, shared: bool = False) -> None:
        self.posted: list[tuple[apb.PredictionBatch, list[np.ndarray]]] = []
        self.subjects: dict[int, DecodedBatch] = {}
        self.fetched: list[apb.FetchSubjectRequest] = []
        self.resent: list[list[Request]] = []
        self.closed: list[bool] = []
        self.statistics = TransportStatistics()
        self._shared = shared

    @property
    def shared(self) -> bool:
        return self._shared

    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        self.posted.append((batch, list(payloads)))
        nbytes = sum(p.nbytes for p in payloads)
        if self._shared:
            self.statistics.posted_shared_bytes += nbytes
        else:
            self.statistics.posted_wire_bytes += nbytes
        return [apb.PostPredictionsRequest(batch=batch)]

    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        self.fetched.append(request)
        try:
            decoded = self.subjects[request.subject_index]
        except KeyError:
            message = f"{what}: no subject {request.subject_index} in this MemoryTransport"
            raise NotFoundError(message, grpc.StatusCode.NOT_FOUND, message) from None
        nbytes = sum(v.nbytes for v in decoded.columns.values() if isinstance(v, np.ndarray))
        if self._shared:
            self.statistics.fetched_mapped_bytes += nbytes
        else:
            self.statistics.fetched_wire_bytes += nbytes
        return decoded

    def resending(self, batches: Sequence[list[Request]]) -> None:
        self.resent.extend(batches)

    def close(self, idle: bool) -> None:
        self.closed.append(idle)
