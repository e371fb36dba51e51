"""Batches: samples (dicts of arrays and Python values) to ``Batch`` messages and back.

Arrays that agree in shape and dtype across a batch travel as one stacked tensor per key (:func:`same_shape_and_dtype`
decides, on both ends); anything else travels per sample as a ``Value``: tensors, numpy scalars, numbers, strings,
string lists, int tuples, image properties and index expressions (pymia's extractors give all of these).
:func:`encode_batch` builds the message and the payloads of its chunked tensors; :func:`decode_batch` is its inverse;
:func:`batch_arrays` reads a batch that may hold only tensors (predictions), one array per sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchwire.v1 import dataset_service_pb2, tensor_pb2, values_pb2
from patchwire.wire import framing, tensors
from patchwire.wire.compression import RAW, Packed, Policy
from patchwire.wire.errors import EncodingError, WireError
from patchwire.wire.geometry import ImageProperties
from patchwire.wire.indexexpression import IndexExpression

__all__ = [
    "DecodedBatch",
    "Encoded",
    "batch_arrays",
    "decode_batch",
    "decode_value",
    "encode_batch",
    "encode_value",
    "same_shape_and_dtype",
]


def same_shape_and_dtype(values: Sequence[Any]) -> bool:
    """Whether ``values`` are numeric numpy arrays (or arrays already :class:`Packed`) of one shape and dtype: what
    is stacked into one tensor."""
    first = values[0]
    if not isinstance(first, np.ndarray | Packed) or first.dtype == object:
        return False
    return all(
        isinstance(v, np.ndarray | Packed) and v.shape == first.shape and v.dtype == first.dtype for v in values[1:]
    )


# -- encoding ---------------------------------------------------------------------------------------------------------


class Encoded:
    """A Batch message plus the payloads of its chunked tensors, in announcement order."""

    def __init__(self, batch: dataset_service_pb2.Batch, payloads: list[Any], raw_nbytes: int | None = None) -> None:
        self.batch = batch
        self.payloads = payloads
        self.nbytes = batch.ByteSize() + sum(t.chunked_nbytes for t in framing.batch_tensors(batch))
        """Bytes of the message and its chunks on the wire (compressed payloads at their compressed size)."""
        self.raw_nbytes = self.nbytes if raw_nbytes is None else raw_nbytes
        """Bytes of the samples' arrays as delivered (what message sizing and byte limits count)."""

    def make_contiguous(self) -> None:
        """Payload parts that are arrays (``encode_batch(contiguous=False)``) made C-order bytes, for the wire."""
        self.payloads = [
            [tensors.contiguous_bytes(p) for p in payload] if isinstance(payload, list) else payload
            for payload in self.payloads
        ]

    def messages(self, response_type: Any) -> Iterator[Any]:
        """Messages of the given type: the batch, then every chunk, pre-serialised (sent with
        ``framing.passthrough_serializer``: the payload is copied once, into the chunk's wire bytes), made lazily."""
        yield response_type(batch=self.batch)
        for payload in self.payloads:
            yield from framing.serialized_chunks(payload)


def _nested_strings(value: list[Any]) -> tensor_pb2.StringArray:
    arr = np.array(value, dtype=object)
    if arr.ndim > 1 and all(isinstance(v, str) for v in arr.ravel()):
        return tensor_pb2.StringArray(values=arr.ravel().tolist(), shape=arr.shape)
    if not all(isinstance(v, str) for v in value):
        raise EncodingError(f"cannot send a list holding {sorted({type(v).__name__ for v in value})}")
    return tensor_pb2.StringArray(values=value)


def encode_value(value: Any, key: str, payloads: list[Any], compression: Policy | int) -> values_pb2.Value:
    """One per-sample value; a chunked tensor's payload is appended to ``payloads``."""
    if isinstance(value, Packed) or (isinstance(value, np.ndarray) and value.dtype != object):
        tensor, payload = tensors.array_to_tensor(value, compression=compression)
        if payload is not None:
            payloads.append(payload)
        return values_pb2.Value(tensor=tensor)
    if isinstance(value, np.generic) and not isinstance(value, np.str_ | np.bytes_):
        tensor, payload = tensors.array_to_tensor(np.asarray(value))
        return values_pb2.Value(numpy_scalar=tensor)
    if isinstance(value, bool | np.bool_):
        raise EncodingError(f"entry {key!r}: booleans are not sent as sample values")
    if isinstance(value, int):
        return values_pb2.Value(int_value=value)
    if isinstance(value, float):
        return values_pb2.Value(float_value=value)
    if isinstance(value, str):
        return values_pb2.Value(string_value=value)
    if isinstance(value, bytes):
        return values_pb2.Value(bytes_value=value)
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return values_pb2.Value(int_tuple=values_pb2.IntTuple(values=value))
    if isinstance(value, list):
        return values_pb2.Value(string_list=_nested_strings(value))
    if isinstance(value, ImageProperties):
        return values_pb2.Value(image_properties=value.to_proto())
    if isinstance(value, IndexExpression):
        return values_pb2.Value(index_expression=value.to_proto())
    raise EncodingError(f"entry {key!r}: a {type(value).__name__} cannot be sent as a sample value")


def encode_batch(
    samples: Sequence[dict[str, Any]],
    sample_indices: Sequence[int] = (),
    position: int = 0,
    compression: Policy | int = RAW,
    contiguous: bool = True,
) -> Encoded:
    """Encodes samples: arrays equal in shape and dtype across the batch are stacked into one tensor per key;
    ``compression`` is the codec per dtype (``tensors.stacked_to_tensor``; compressing happens here, in the caller's
    thread: the server's executor, never its event loop). ``contiguous`` False: the
    parts of stacked payloads may be strided arrays (for shared memory; :meth:`Encoded.make_contiguous` before the
    wire)."""
    batch = dataset_service_pb2.Batch(sample_indices=sample_indices, position=position)
    payloads: list[Any] = []
    keys = list(samples[0]) if samples else []
    for sample in samples[1:]:
        keys.extend(k for k in sample if k not in keys)
    for key in keys:
        values = [s.get(key) for s in samples]
        if any(v is None for v in values):
            raise EncodingError(
                f"entry {key!r} is missing from some samples of the batch; "
                "samples of one datasource must have the same entries"
            )
        field = batch.fields.add(key=key)
        if same_shape_and_dtype(values):
            arrays: list[np.ndarray] = values  # type: ignore[assignment]
            tensor, parts = tensors.stacked_to_tensor(arrays, compression=compression, contiguous=contiguous)
            field.stacked.CopyFrom(tensor)
            if parts is not None:
                payloads.append(parts)
        else:
            field.per_sample.SetInParent()
            for v in values:
                field.per_sample.values.append(encode_value(v, key, payloads, compression))
    raw = sum(v.nbytes for s in samples for v in s.values() if isinstance(v, np.ndarray | Packed))
    return Encoded(batch, payloads, batch.ByteSize() + raw if _compressed(batch) else None)


def _compressed(batch: dataset_service_pb2.Batch) -> bool:
    return any(t.compression for t in framing.batch_tensors(batch))


# -- decoding ---------------------------------------------------------------------------------------------------------


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
                if key not in stacked and same_shape_and_dtype(piece):
                    piece = np.stack(piece)
                    stacked.add(key)
                columns[key] = piece
            yield DecodedBatch(self.sample_indices[start:stop], self.position + start, columns, stacked)


def _strings(msg: tensor_pb2.StringArray) -> list[Any]:
    values = list(msg.values)
    if not msg.shape:
        return values
    nested: list[Any] = np.array(values, dtype=object).reshape(tuple(msg.shape)).tolist()
    return nested


def decode_value(value: values_pb2.Value, payloads: Iterator[np.ndarray]) -> Any:
    """One per-sample value; a chunked tensor takes the next of ``payloads``."""
    kind = value.WhichOneof("kind")
    if kind == "tensor":
        t = value.tensor
        return tensors.tensor_to_array(t, next(payloads) if t.chunked_nbytes else None)
    if kind == "numpy_scalar":
        return tensors.tensor_to_array(value.numpy_scalar)[()]
    if kind == "string_list":
        return _strings(value.string_list)
    if kind == "int_tuple":
        return tuple(int(v) for v in value.int_tuple.values)
    if kind == "image_properties":
        return ImageProperties.from_proto(value.image_properties)
    if kind == "index_expression":
        return IndexExpression.from_proto(value.index_expression)
    if kind is None:
        raise WireError("received a sample value with nothing set")
    return getattr(value, kind)


def decode_batch(batch: Any, payload_list: Sequence[np.ndarray]) -> DecodedBatch:
    """A Batch message with the payloads of its chunked tensors (in announcement order)."""
    payloads = iter(payload_list)
    columns: dict[str, Any] = {}
    stacked: set[str] = set()
    for field in batch.fields:
        if field.WhichOneof("value") == "stacked":
            t = field.stacked
            columns[field.key] = tensors.tensor_to_array(t, next(payloads) if t.chunked_nbytes else None)
            stacked.add(field.key)
        else:
            columns[field.key] = [decode_value(v, payloads) for v in field.per_sample.values]
    return DecodedBatch(list(batch.sample_indices), int(batch.position), columns, stacked)


def batch_arrays(batch: Any, payloads: Sequence[bytes | bytearray | np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The arrays of a Batch (or PredictionBatch) by field, one per sample: stacked tensors are split along axis 0,
    per-sample values must all be tensors. ``payloads`` are the chunked payloads in announcement order."""
    pending = iter(payloads)
    out: dict[str, list[np.ndarray]] = {}
    for field in batch.fields:
        if field.WhichOneof("value") == "stacked":
            t = field.stacked
            stacked = tensors.tensor_to_array(t, next(pending) if t.chunked_nbytes else None)
            out[field.key] = list(stacked)
        else:
            arrays = []
            for value in field.per_sample.values:
                if value.WhichOneof("kind") != "tensor":
                    raise WireError(f"field {repr(field.key)[:80]}: every per-sample value must be a tensor")
                t = value.tensor
                arrays.append(tensors.tensor_to_array(t, next(pending) if t.chunked_nbytes else None))
            out[field.key] = arrays
    return out
