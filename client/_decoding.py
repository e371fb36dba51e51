"""Reads sample streams into batches of numpy arrays and Python values (the wire layer's reader and batch codec)."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

from patchwire.v1 import dataset_service_pb2
from patchwire.wire.batches import DecodedBatch, decode_batch
from patchwire.wire.framing import BatchReader, PayloadPool

__all__ = ["DecodedBatch", "decode_batch", "decode_stream"]


def decode_stream(responses: Iterable[Any], pool: PayloadPool | None = None) -> Generator[DecodedBatch, None, None]:
    """Decodes a GetSamples / DirectExtract / StreamBatches / FetchSubject response stream, batch by batch.
    Responses may be messages or their wire bytes (``Connection.raw_stream``): chunk bytes are copied straight
    into the tensor's buffer, taken from ``pool`` when given. A stream that breaks the framing raises
    :class:`~patchwire.wire.errors.FramingError`."""
    # (the four response types share one layout: any of them parses the bytes)
    reader = BatchReader(dataset_service_pb2.StreamBatchesResponse.FromString, pool)
    for response in responses:
        complete = reader.feed(response)
        if complete is not None:
            yield decode_batch(*complete)
    reader.finish()
