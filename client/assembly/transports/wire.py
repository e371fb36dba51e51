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
from patchwire.wire import compression, framing, tensors
from patchwire.wire.batches import DecodedBatch

__all__ = ["FETCH_SUBJECT", "WireTransport", "compressed", "with_chunks"]

FETCH_SUBJECT = "/patchwire.v1.AssemblyService/FetchSubject"


def with_chunks(
    batch: apb.PredictionBatch, payloads: Sequence[np.ndarray], codec: int = compression.NONE
) -> list[Request]:
    """The batch request, then its tensors' chunk messages as wire bytes (one copy of each payload). With ``codec``,
    payloads are compressed where that makes them smaller (:func:`compressed`)."""
    batch, parts = compressed(batch, payloads, codec)
    out: list[Request] = [apb.PostPredictionsRequest(batch=batch)]
    for part in parts:
        out.extend(framing.serialized_chunks(part))
    return out


def compressed(
    batch: apb.PredictionBatch, payloads: Sequence[np.ndarray], codec: int = compression.NONE
) -> tuple[apb.PredictionBatch, list[Any]]:
    """The batch and its payloads as they go on the wire: C-order bytes, or with ``codec`` compressed where that makes
    them smaller, their tensors saying so (in a copy of the batch: the caller's may be posted again another way)."""
    parts: list[Any] = [np.ascontiguousarray(p).reshape(-1).data.cast("B") for p in payloads]
    if codec == compression.NONE or not parts:
        return batch, parts
    batch = apb.PredictionBatch.FromString(batch.SerializeToString())
    policy = compression.Policy(codec, codec)
    announced = [t for t in framing.batch_tensors(batch) if t.chunked_nbytes]
    for k, (tensor, raw) in enumerate(zip(announced, parts, strict=True)):
        packed = compression.compress([raw], len(raw), tensors.dtype_from_proto(tensor.dtype), policy)
        if packed is not None:
            tensor.compression = compression.Compression.ValueType(codec)
            tensor.chunked_nbytes = len(packed) if isinstance(packed, bytes) else packed.nbytes
            parts[k] = packed
    return batch, parts


class WireTransport(Transport):
    """``codec``: what predictions are posted compressed with (the datasource's resolved codec: compressed over a link
    only), on the thread that posts them, and what fetched subjects come compressed with (the server compresses
    them)."""

    name = "wire"

    def __init__(
        self, connection: Connection, statistics: TransportStatistics | None = None, codec: int = compression.NONE
    ) -> None:
        self._connection = connection
        self.statistics = statistics or TransportStatistics()
        self.codec = codec

    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        batch, parts = compressed(batch, payloads, self.codec)
        self.statistics.posted_wire_bytes += sum(
            p.nbytes if isinstance(p, compression.Frames) else len(p) for p in parts
        )
        out: list[Request] = [apb.PostPredictionsRequest(batch=batch)]
        for part in parts:
            out.extend(framing.serialized_chunks(part))
        return out

    def open(self, request: apb.FetchSubjectRequest) -> Any:
        """The FetchSubject response stream for ``request``, as wire bytes."""
        return self._connection.raw_stream(FETCH_SUBJECT)(request)

    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        request.ClearField("shared_memory")
        request.compression = compression.Compression.ValueType(self.codec)
        with translate_rpc_errors(what):
            return self.decode(self.open(request))

    def decode(self, responses: Iterable[Any]) -> DecodedBatch:
        """The one subject of a FetchSubject response stream whose payloads came as chunks."""

        def received(nbytes: int) -> None:
            self.statistics.fetched_wire_bytes += nbytes

        (decoded,) = list(decode_stream(responses, on_wire=received))
        return decoded
