"""Tensors on the wire: the dtype table, arrays to ``Tensor`` messages and back, and the sizes a tensor announces.

A tensor is one raw little-endian C-order ``bytes`` blob with its dtype and shape beside it. A tensor larger than
:data:`INLINE_MAX_BYTES` is announced with ``chunked_nbytes`` and its payload travels apart from it: in the chunk
messages after its batch (:mod:`patchwire.wire.framing`) or in shared memory (:mod:`patchwire.wire.shared_memory`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from patchwire.v1 import tensor_pb2
from patchwire.wire import compression as _compression
from patchwire.wire.compression import Compression, Packed, Policy
from patchwire.wire.errors import WireError

__all__ = [
    "INLINE_MAX_BYTES",
    "MAX_TENSOR_BYTES",
    "DataType",
    "announced_nbytes",
    "array_to_tensor",
    "contiguous_bytes",
    "detached_tensor",
    "dtype_from_proto",
    "dtype_to_proto",
    "raw_nbytes",
    "shape_text",
    "stacked_to_tensor",
    "tensor_to_array",
]

DataType = tensor_pb2.DataType

#: The largest tensor sent inline, inside its Batch message. An inline payload is copied by protobuf on both ends
#: (into the message, when serialising, when parsing, out of it: 64 KiB keeps that cheap); larger payloads travel as
#: chunk messages, copied once per end. Measured: axial slices with 40 KB label maps per sample streamed 14% faster
#: than with a 1 MiB inline limit.
INLINE_MAX_BYTES = 64 << 10
#: The largest payload a tensor may announce (``chunked_nbytes``): a 1024^3 volume of 4 float32 channels is 16 GiB.
#: Larger announcements are refused as malformed before anything is allocated; servers bound sizes further.
MAX_TENSOR_BYTES = 1 << 34
#: numpy takes at most this many axes.
MAX_AXES = 32

_NUMPY_TO_PROTO: dict[np.dtype[Any], tensor_pb2.DataType.ValueType] = {
    np.dtype(np.bool_): DataType.DATA_TYPE_BOOL,
    np.dtype(np.uint8): DataType.DATA_TYPE_UINT8,
    np.dtype(np.int8): DataType.DATA_TYPE_INT8,
    np.dtype("<u2"): DataType.DATA_TYPE_UINT16,
    np.dtype("<i2"): DataType.DATA_TYPE_INT16,
    np.dtype("<u4"): DataType.DATA_TYPE_UINT32,
    np.dtype("<i4"): DataType.DATA_TYPE_INT32,
    np.dtype("<u8"): DataType.DATA_TYPE_UINT64,
    np.dtype("<i8"): DataType.DATA_TYPE_INT64,
    np.dtype("<f2"): DataType.DATA_TYPE_FLOAT16,
    np.dtype("<f4"): DataType.DATA_TYPE_FLOAT32,
    np.dtype("<f8"): DataType.DATA_TYPE_FLOAT64,
}
_PROTO_TO_NUMPY = {v: k for k, v in _NUMPY_TO_PROTO.items()}


def dtype_to_proto(dtype: np.dtype[Any]) -> tensor_pb2.DataType.ValueType:
    """The wire DataType of a numpy dtype (byte order is normalised to little-endian); TypeError for dtypes that
    cannot travel (objects, strings, complex numbers)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NUMPY_TO_PROTO[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} cannot travel as a patchwire tensor") from None


def dtype_from_proto(dtype: int) -> np.dtype[Any]:
    """The numpy dtype of a wire DataType; WireError (a ValueError) for an unknown or unspecified one."""
    try:
        return _PROTO_TO_NUMPY[tensor_pb2.DataType.ValueType(dtype)]
    except KeyError:
        raise WireError(f"unknown or unspecified tensor dtype {dtype}") from None


def shape_text(shape: Sequence[int]) -> str:
    """A shape for an error message, cut to 80 characters."""
    text = str(tuple(shape))
    return text if len(text) <= 80 else f"{text[:80]}... ({len(shape)} axes)"


def raw_nbytes(tensor: tensor_pb2.Tensor) -> int:
    """The element bytes of a tensor from its dtype and shape. Raises WireError for an unknown dtype, a negative
    axis or more than MAX_TENSOR_BYTES."""
    dtype = dtype_from_proto(tensor.dtype)
    if any(d < 0 for d in tensor.shape):
        raise WireError(f"shape: {shape_text(tensor.shape)} has a negative axis")
    if len(tensor.shape) > MAX_AXES:
        raise WireError(f"shape: {len(tensor.shape)} axes (numpy takes at most {MAX_AXES})")
    nbytes = math.prod(tensor.shape) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise WireError(f"shape: {shape_text(tensor.shape)} of {dtype} is {nbytes} bytes, over {MAX_TENSOR_BYTES}")
    return nbytes


def announced_nbytes(tensor: tensor_pb2.Tensor) -> int:
    """The payload size a chunked tensor announces, checked against its dtype and shape: exactly the element bytes,
    or for a compressed tensor at most its codec's bound for them (``compression.max_compressed_bytes``). Raises
    WireError for sizes that cannot be right and for codecs this build does not know."""
    n = tensor.chunked_nbytes
    if not 0 < n <= MAX_TENSOR_BYTES:
        raise WireError(f"chunked_nbytes: {n} is not a payload size (1 to {MAX_TENSOR_BYTES} bytes)")
    raw = raw_nbytes(tensor)
    codec = tensor.compression
    if codec == Compression.COMPRESSION_UNSPECIFIED:
        if n != raw:
            raise WireError(f"chunked_nbytes: {n} bytes announced for {raw} bytes of elements")
    elif codec not in Compression.values():
        raise WireError(f"compression: unknown codec {codec} (upgrade patchwire)")
    elif n > _compression.max_compressed_bytes(raw, codec):
        raise WireError(f"chunked_nbytes: {n} compressed bytes announced for {raw} bytes of elements")
    return n


def _packed(
    tensor: tensor_pb2.Tensor, packed: bytes | _compression.Frames, inline_bytes: int, policy: Policy | int
) -> tuple[tensor_pb2.Tensor, Any]:
    """The tensor with its compressed payload: inline, or announced with the payload to send after it (LZ4 bytes
    as a memoryview, blosc2 frames as :class:`~patchwire.wire.compression.Frames`)."""
    dtype = dtype_from_proto(tensor.dtype)
    tensor.compression = Compression.ValueType(policy.codec(dtype) if isinstance(policy, Policy) else policy)
    nbytes = len(packed) if isinstance(packed, bytes) else packed.nbytes
    if nbytes > inline_bytes:
        tensor.chunked_nbytes = nbytes
        return tensor, memoryview(packed) if isinstance(packed, bytes) else packed
    tensor.data = packed if isinstance(packed, bytes) else packed.joined()
    return tensor, None


def array_to_tensor(
    array: np.ndarray | Packed, inline_bytes: int = INLINE_MAX_BYTES, compression: Policy | int = _compression.RAW
) -> tuple[tensor_pb2.Tensor, Any]:
    """Encodes ``array``; returns the Tensor and, when it is to be chunked, the payload to send after it (a view of
    the array's memory: the array must not change until the payload is sent; compressed: LZ4 bytes or blosc2
    ``Frames``). ``compression``: the codec per dtype (see :func:`stacked_to_tensor`); an array already
    :class:`~patchwire.wire.compression.Packed` is sent with its own."""
    if isinstance(array, Packed):
        tensor = tensor_pb2.Tensor(dtype=dtype_to_proto(array.dtype), shape=array.shape)
        return _packed(tensor, _compression.Frames(array.frames), inline_bytes, array.codec)
    dt = np.dtype(array.dtype)
    wire_dtype = dtype_to_proto(dt)
    if dt.byteorder == ">" or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dt.newbyteorder("<"))
    tensor = tensor_pb2.Tensor(dtype=wire_dtype, shape=array.shape)
    packed = _compression.compress([array.reshape(-1).data.cast("B")], array.nbytes, dt, compression)
    if packed is not None:
        return _packed(tensor, packed, inline_bytes, compression)
    if array.nbytes > inline_bytes:
        tensor.chunked_nbytes = array.nbytes
        return tensor, array.reshape(-1).data.cast("B")
    tensor.data = array.tobytes()
    return tensor, None


def contiguous_bytes(part: np.ndarray | memoryview) -> memoryview:
    """A payload part as C-order bytes: a view of a contiguous array, else a contiguous copy."""
    if isinstance(part, np.ndarray):
        return np.ascontiguousarray(part).reshape(-1).data.cast("B")
    return part


def stacked_to_tensor(
    arrays: Sequence[np.ndarray | Packed],
    inline_bytes: int = INLINE_MAX_BYTES,
    compression: Policy | int = _compression.RAW,
    contiguous: bool = True,
) -> tuple[tensor_pb2.Tensor, list[Any] | None]:
    """Like ``array_to_tensor(np.stack(arrays))`` without building the stacked array: a chunked payload is returned
    as one part per array (views of their memory), copied once, into the chunk messages. ``contiguous`` False: the
    parts of a chunked raw payload are the arrays themselves, strided ones too (copied once, into shared memory;
    :func:`contiguous_bytes` makes them bytes where they go to the wire after all).

    ``compression``: the codec for integer and bool arrays and the one for the others (a
    :class:`~patchwire.wire.compression.Policy`; an int is a codec for integer and bool arrays only). Arrays of at
    least MIN_COMPRESS_BYTES are compressed when that makes them smaller (label maps shrink 15-90x, skull-stripped
    float images about 6x); smaller and incompressible ones travel raw. A compressed payload is one part: LZ4
    bytes, or blosc2 ``Frames`` (sent as whole frames per chunk message). Arrays already
    :class:`~patchwire.wire.compression.Packed` (with the policy's codec for their dtype) add their frames as they
    are."""
    first = arrays[0]
    dt = np.dtype(first.dtype)
    if dt.byteorder == ">":  # swapped to little-endian on the way: a stacked copy is needed anyway
        stacked = np.stack([a.array() if isinstance(a, Packed) else a for a in arrays])
        tensor, payload = array_to_tensor(stacked, inline_bytes, compression)
        return tensor, None if payload is None else [payload]
    tensor = tensor_pb2.Tensor(dtype=dtype_to_proto(dt), shape=(len(arrays), *first.shape))
    nbytes = first.nbytes * len(arrays)
    codec = compression.codec(dt) if isinstance(compression, Policy) else compression
    if not contiguous and nbytes > inline_bytes and codec == Compression.COMPRESSION_UNSPECIFIED:
        tensor.chunked_nbytes = nbytes
        return tensor, list(arrays)
    parts = [a if isinstance(a, Packed) else contiguous_bytes(a) for a in arrays]
    packed = _compression.compress(parts, nbytes, dt, compression)
    if packed is not None:
        tensor, payload = _packed(tensor, packed, inline_bytes, compression)
        return tensor, None if payload is None else [payload]
    views = [p for p in parts if isinstance(p, memoryview)]  # all of them: Packed parts always give frames
    if nbytes <= inline_bytes:
        tensor.data = b"".join(views)
        return tensor, None
    tensor.chunked_nbytes = nbytes
    return tensor, views


def detached_tensor(array: np.ndarray) -> tuple[tensor_pb2.Tensor, np.ndarray | None]:
    """The Tensor for an array whose payload travels apart from it and, when it does, the array itself (strided
    arrays included): shared memory copies it once into a segment, the wire as a contiguous copy in chunks. Small,
    big-endian and non-numeric arrays are encoded by :func:`array_to_tensor` (the payload then as uint8)."""
    if array.dtype.byteorder != ">" and array.nbytes > INLINE_MAX_BYTES and array.dtype.kind in "biuf":
        tensor = tensor_pb2.Tensor(dtype=dtype_to_proto(array.dtype), shape=array.shape, chunked_nbytes=array.nbytes)
        return tensor, array
    tensor, payload = array_to_tensor(array)
    return tensor, None if payload is None else np.frombuffer(payload, dtype=np.uint8)


def tensor_to_array(
    tensor: tensor_pb2.Tensor, payload: bytes | bytearray | memoryview | np.ndarray | None = None
) -> np.ndarray:
    """Decodes a Tensor (with its chunked ``payload`` when it had one) into a writable numpy array; WireError for a
    payload that does not hold exactly the tensor's elements."""
    dtype = dtype_from_proto(tensor.dtype)
    shape = tuple(tensor.shape)
    data = payload if tensor.chunked_nbytes else tensor.data
    expected = raw_nbytes(tensor)
    if tensor.compression != Compression.COMPRESSION_UNSPECIFIED and data is not None:
        data = _compression.decompress(tensor.compression, data, expected, dtype.itemsize)
    if data is None or len(data) != expected:
        got = 0 if data is None else len(data)
        raise WireError(f"tensor of shape {shape_text(shape)} and dtype {dtype} needs {expected} bytes, got {got}")
    if isinstance(data, bytes):
        # bytes are immutable: copy once so that callers may modify the array in place (as pymia's arrays allow)
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    return np.frombuffer(data, dtype=dtype).reshape(shape)
