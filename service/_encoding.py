"""Turns extracted samples into Batch messages (and the TensorChunk messages of large tensors)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from patchwire.service._errors import InvalidArgument
from patchwire.service._extraction import ImagePropertiesValue, IndexExpressionValue
from patchwire.service._indexing import expression_to_proto
from patchwire.v1 import codec, dataset_service_pb2, tensor_pb2, values_pb2

__all__ = ["Encoded", "encode_batch", "properties_to_proto"]


class Encoded:
    """A Batch message plus the payloads of its chunked tensors, in announcement order."""

    def __init__(self, batch: dataset_service_pb2.Batch, payloads: list[Any]) -> None:
        self.batch = batch
        self.payloads = payloads
        self.nbytes = batch.ByteSize() + sum(t.chunked_nbytes for t in codec.batch_tensors(batch))

    def messages(self, response_type: Any) -> Iterator[Any]:
        """Response messages of the given type: the batch, then every chunk, pre-serialised (sent with
        ``codec.passthrough_serializer``: the payload is copied once, into the chunk's wire bytes), made lazily."""
        yield response_type(batch=self.batch)
        for payload in self.payloads:
            yield from codec.serialized_chunks(payload)


def _nested_strings(value: list[Any]) -> tensor_pb2.StringArray:
    arr = np.array(value, dtype=object)
    if arr.ndim > 1 and all(isinstance(v, str) for v in arr.ravel()):
        return tensor_pb2.StringArray(values=arr.ravel().tolist(), shape=arr.shape)
    if not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"cannot send a list holding {sorted({type(v).__name__ for v in value})}")
    return tensor_pb2.StringArray(values=value)


def _value(value: Any, key: str, payloads: list[Any], compression: int) -> values_pb2.Value:
    if isinstance(value, np.ndarray) and value.dtype != object:
        tensor, payload = codec.array_to_tensor(value, compression=compression)
        if payload is not None:
            payloads.append(payload)
        return values_pb2.Value(tensor=tensor)
    if isinstance(value, np.generic) and not isinstance(value, np.str_ | np.bytes_):
        tensor, payload = codec.array_to_tensor(np.asarray(value))
        return values_pb2.Value(numpy_scalar=tensor)
    if isinstance(value, bool | np.bool_):
        raise InvalidArgument(f"entry {key!r}: booleans are not sent as sample values")
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
    if isinstance(value, ImagePropertiesValue):
        return values_pb2.Value(image_properties=properties_to_proto(value))
    if isinstance(value, IndexExpressionValue):
        return values_pb2.Value(index_expression=expression_to_proto(value.expression))
    raise InvalidArgument(f"entry {key!r}: a {type(value).__name__} cannot be sent as a sample value")


def properties_to_proto(value: ImagePropertiesValue) -> values_pb2.ImageProperties:
    return values_pb2.ImageProperties(
        size=value.size,
        origin=value.origin,
        spacing=value.spacing,
        direction=value.direction,
        dimensions=value.dimensions,
        number_of_components_per_pixel=value.number_of_components_per_pixel,
        pixel_id=value.pixel_id,
    )


def _stackable(values: Sequence[Any]) -> bool:
    first = values[0]
    if not isinstance(first, np.ndarray) or first.dtype == object:
        return False
    return all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype for v in values[1:])


def encode_batch(
    samples: Sequence[dict[str, Any]],
    sample_indices: Sequence[int] = (),
    position: int = 0,
    compression: int = codec.Compression.COMPRESSION_UNSPECIFIED,
) -> Encoded:
    """Encodes samples: arrays equal in shape and dtype across the batch are stacked into one tensor per key;
    ``compression`` applies to integer and bool tensors (``codec.stacked_to_tensor``)."""
    batch = dataset_service_pb2.Batch(sample_indices=sample_indices, position=position)
    payloads: list[Any] = []
    keys = list(samples[0]) if samples else []
    for sample in samples[1:]:
        keys.extend(k for k in sample if k not in keys)
    for key in keys:
        values = [s.get(key) for s in samples]
        if any(v is None for v in values):
            raise InvalidArgument(
                f"entry {key!r} is missing from some samples of the batch; "
                "samples of one datasource must have the same entries"
            )
        field = batch.fields.add(key=key)
        if _stackable(values):
            arrays: list[np.ndarray] = values  # type: ignore[assignment]
            tensor, parts = codec.stacked_to_tensor(arrays, compression=compression)
            field.stacked.CopyFrom(tensor)
            if parts is not None:
                payloads.append(parts)
        else:
            field.per_sample.SetInParent()
            for v in values:
                field.per_sample.values.append(_value(v, key, payloads, compression))
    return Encoded(batch, payloads)
