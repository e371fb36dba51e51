"""Reads sample streams: reassembles chunked tensors and turns Batch messages into numpy arrays and Python values."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchwire.client.conversion import ImageProperties
from patchwire.client.indexexpression import IndexExpression
from patchwire.v1 import codec, dataset_service_pb2, tensor_pb2, values_pb2

__all__ = ["DecodedBatch", "decode_batch", "decode_stream", "decode_value"]


@dataclass
class DecodedBatch:
    """A message's samples by key: ``stacked`` keys hold one array with the samples along axis 0, the others a
    list with one value per sample."""

    sample_indices: list[int]
    position: int
    columns: dict[str, Any]
    stacked: set[str]

    def __len__(self) -> int:
        return len(self.sample_indices) if self.sample_indices else 1

    def sample(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}

    def samples(self) -> list[dict[str, Any]]:
        return [self.sample(i) for i in range(len(self))]

    def split(self, size: int) -> Iterator[DecodedBatch]:
        """Consecutive pieces of ``size`` samples (views of the same buffers). The server decides stacking per
        message, which may hold several batches: a piece whose arrays agree in shape and dtype is stacked even where
        the whole message could not be, so a batch's form never depends on how batches were grouped in messages."""
        n = len(self)
        if n <= size:
            yield self
            return
        for start in range(0, n, size):
            stop = min(start + size, n)
            columns, stacked = {}, set(self.stacked)
            for key, values in self.columns.items():
                piece = values[start:stop]
                if key not in stacked and _uniform_arrays(piece):
                    piece = np.stack(piece)
                    stacked.add(key)
                columns[key] = piece
            yield DecodedBatch(self.sample_indices[start:stop], self.position + start, columns, stacked)


def _uniform_arrays(values: list[Any]) -> bool:
    first = values[0]
    return (
        isinstance(first, np.ndarray)
        and first.dtype != object
        and all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype for v in values[1:])
    )


def _strings(msg: tensor_pb2.StringArray) -> list[Any]:
    values = list(msg.values)
    if not msg.shape:
        return values
    nested: list[Any] = np.array(values, dtype=object).reshape(tuple(msg.shape)).tolist()
    return nested


def decode_value(value: values_pb2.Value, payloads: Iterator[np.ndarray]) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "tensor":
        t = value.tensor
        return codec.tensor_to_array(t, next(payloads) if t.chunked_nbytes else None)
    if kind == "numpy_scalar":
        return codec.tensor_to_array(value.numpy_scalar)[()]
    if kind == "string_list":
        return _strings(value.string_list)
    if kind == "int_tuple":
        return tuple(int(v) for v in value.int_tuple.values)
    if kind == "image_properties":
        return ImageProperties._from_proto(value.image_properties)
    if kind == "index_expression":
        return IndexExpression._from_proto(value.index_expression)
    if kind is None:
        raise ValueError("received a sample value with nothing set")
    return getattr(value, kind)


def decode_batch(batch: Any, payload_list: list[np.ndarray]) -> DecodedBatch:
    """A Batch message with the payloads of its chunked tensors (in announcement order)."""
    payloads = iter(payload_list)
    columns: dict[str, Any] = {}
    stacked: set[str] = set()
    for field in batch.fields:
        if field.WhichOneof("value") == "stacked":
            t = field.stacked
            columns[field.key] = codec.tensor_to_array(t, next(payloads) if t.chunked_nbytes else None)
            stacked.add(field.key)
        else:
            columns[field.key] = [decode_value(v, payloads) for v in field.per_sample.values]
    return DecodedBatch(list(batch.sample_indices), int(batch.position), columns, stacked)


def decode_stream(
    responses: Iterable[Any], pool: codec.BufferPool | None = None
) -> Generator[DecodedBatch, None, None]:
    """Decodes a GetSamples / DirectExtract / StreamBatches / FetchSubject response stream, batch by batch.
    Responses may be messages or their wire bytes (``Connection.raw_stream``): chunk bytes are copied straight
    into the tensor's buffer, taken from ``pool`` when given."""
    batch = None
    assembler: codec.ChunkAssembler | None = None
    for response in responses:
        if isinstance(response, bytes):
            data = codec.chunk_data(response)
            if data is not None:
                if assembler is None:
                    raise ValueError("a tensor chunk arrived before any batch")
                assembler.add(data)
                if assembler.complete and batch is not None:
                    yield decode_batch(batch, assembler.payloads())
                    batch, assembler = None, None
                continue
            response = dataset_service_pb2.StreamBatchesResponse.FromString(response)  # same layout for all four
        if response.WhichOneof("payload") == "batch":
            if assembler is not None and not assembler.complete:
                raise ValueError("a new batch arrived before the previous batch's tensor chunks were complete")
            batch = response.batch
            assembler = codec.ChunkAssembler(codec.batch_tensors(batch), pool)
        else:
            if assembler is None:
                raise ValueError("a tensor chunk arrived before any batch")
            assembler.add(response.chunk.data)
        if assembler is not None and assembler.complete and batch is not None:
            yield decode_batch(batch, assembler.payloads())
            batch, assembler = None, None
    if assembler is not None:
        raise ValueError("the stream ended in the middle of a batch's tensor chunks")
