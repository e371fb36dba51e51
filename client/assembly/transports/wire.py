"""The wire transport: payloads travel as chunk messages after their batch, on the gRPC streams themselves. It works
everywhere; the shared-memory transports fall back to it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from patchwire.client._connection import Connection
from patchwire.client._decoding import decode_stream
from patchwire.client._errors import translate_rpc_errors
from patchwire.client.assembly.posting import Request
from patchwire.client.assembly.transports.base import Transport, TransportStatistics
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import framing
from patchwire.wire.batches import DecodedBatch

__all__ = ["FETCH_SUBJECT", "WireTransport", "with_chunks"]

FETCH_SUBJECT = "/patchwire.v1.AssemblyService/FetchSubject"


def with_chunks(batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
    """The batch request, then its tensors' chunk messages as wire bytes (one copy of each payload)."""
    out: list[Request] = [apb.PostPredictionsRequest(batch=batch)]
    for p in payloads:
        out.extend(framing.serialized_chunks(np.ascontiguousarray(p).reshape(-1).data.cast("B")))
    return out


class _CountingPool:
    """Fresh buffers for chunked payloads, counting their bytes."""

    def __init__(self) -> None:
        self.nbytes = 0

    def take(self, nbytes: int) -> np.ndarray:
        self.nbytes += nbytes
        return np.empty(nbytes, dtype=np.uint8)


class WireTransport(Transport):
    name = "wire"

    def __init__(self, connection: Connection, statistics: TransportStatistics | None = None) -> None:
        self._connection = connection
        self.statistics = statistics or TransportStatistics()

    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        self.statistics.posted_wire_bytes += sum(p.nbytes for p in payloads)
        return with_chunks(batch, payloads)

    def open(self, request: apb.FetchSubjectRequest) -> Any:
        """The FetchSubject response stream for ``request``, as wire bytes."""
        return self._connection.raw_stream(FETCH_SUBJECT)(request)

    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        request.ClearField("shared_memory")
        with translate_rpc_errors(what):
            return self.decode(self.open(request))

    def decode(self, responses: Iterable[Any]) -> DecodedBatch:
        """The one subject of a FetchSubject response stream whose payloads came as chunks."""
        pool = _CountingPool()
        (decoded,) = list(decode_stream(responses, pool))
        self.statistics.fetched_wire_bytes += pool.nbytes
        return decoded
