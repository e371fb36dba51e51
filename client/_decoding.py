"""Reads sample streams into batches of numpy arrays and Python values (the wire layer's reader and batch codec)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

import numpy as np

from patchwire.v1 import dataset_service_pb2
from patchwire.wire.batches import DecodedBatch, decode_batch
from patchwire.wire.errors import FramingError
from patchwire.wire.framing import BatchReader, PayloadPool, chunk_data

__all__ = ["DecodedBatch", "Lying", "decode_batch", "decode_stream"]

Lying = Callable[[Any, Sequence[int]], list[np.ndarray]]
"""The payloads of a batch whose message says where they lie (``shared_offsets``: shared memory) instead of chunks
following it."""

# (the response types share one layout: GetSamplesResponse, the one with shared_offsets, parses the bytes of any)
_parse = dataset_service_pb2.GetSamplesResponse.FromString


def decode_stream(
    responses: Iterable[Any],
    pool: PayloadPool | None = None,
    lying: Lying | None = None,
    on_wire: Callable[[int], None] | None = None,
) -> Generator[DecodedBatch, None, None]:
    """Decodes a GetSamples / DirectExtract / StreamBatches / FetchSubject response stream, batch by batch.
    Responses may be messages or their wire bytes (``Connection.raw_stream``): chunk bytes are copied straight
    into the tensor's buffer, taken from ``pool`` when given. With ``lying``, a batch whose message names offsets
    (a call that asked for shared memory) takes its payloads from there. A stream that breaks the framing raises
    :class:`~patchwire.wire.errors.FramingError`. Compressed payloads are decompressed here, as their chunks
    arrive (on the caller's thread: a stream's prefetch thread, not the consumer's). ``on_wire`` is told each
    message's size on the wire."""
    reader = BatchReader(_parse, pool)
    for response in responses:
        if on_wire is not None:
            on_wire(len(response) if isinstance(response, bytes) else response.ByteSize())
        if lying is not None and isinstance(response, bytes) and chunk_data(response) is None:
            response = _parse(response)
            if response.shared_offsets:
                if response.WhichOneof("payload") != "batch":
                    raise FramingError("shared_offsets: given without a batch")
                reader.finish()  # (no batch may be waiting for its chunks)
                yield decode_batch(response.batch, lying(response.batch, list(response.shared_offsets)))
                continue
        complete = reader.feed(response)
        if complete is not None:
            yield decode_batch(*complete)
    reader.finish()
