"""Arrays to Tensor messages and back: the dtype table, inline versus chunked payloads, stacking, announced sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from patchwire.v1 import tensor_pb2
from patchwire.wire import tensors
from patchwire.wire.errors import WireError

DTYPES = ["bool", "uint8", "int8", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips(dtype: str) -> None:
    wire = tensors.dtype_to_proto(np.dtype(dtype))
    assert tensors.dtype_from_proto(wire) == np.dtype(dtype)
    assert tensors.dtype_to_proto(np.dtype(dtype).newbyteorder(">")) == wire  # big-endian travels little-endian


@pytest.mark.parametrize("dtype", [object, "U3", "complex64", "datetime64[s]"])
def test_dtypes_without_a_wire_form_are_type_errors(dtype: object) -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        tensors.dtype_to_proto(np.dtype(dtype))


def test_unknown_wire_dtype_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="unknown or unspecified tensor dtype 0"):
        tensors.dtype_from_proto(0)


@given(hnp.arrays(st.sampled_from([np.dtype(d) for d in DTYPES]), hnp.array_shapes(min_dims=0, max_side=12)))
def test_arrays_round_trip_inline_and_chunked(array: np.ndarray) -> None:
    for inline_bytes in (0, tensors.INLINE_MAX_BYTES):
        tensor, payload = tensors.array_to_tensor(array, inline_bytes=inline_bytes)
        chunked = array.nbytes > inline_bytes
        assert (payload is not None) == chunked and (tensor.chunked_nbytes == array.nbytes) == chunked
        out = tensors.tensor_to_array(tensor, None if payload is None else bytes(payload))
        assert out.dtype == array.dtype and out.shape == array.shape
        assert np.array_equal(out, array, equal_nan=array.dtype.kind == "f")
        out.reshape(-1)[:0] = 0  # writable, as pymia's arrays are
        assert out.flags.writeable


def test_big_endian_and_strided_arrays_travel_as_little_endian_contiguous() -> None:
    array = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    tensor, payload = tensors.array_to_tensor(array, inline_bytes=0)
    assert payload is not None and tensor.chunked_nbytes == array.nbytes
    out = tensors.tensor_to_array(tensor, bytes(payload))
    assert out.dtype == np.dtype("<i4") and np.array_equal(out, array)


def test_stacked_parts_are_views_copied_once() -> None:
    arrays = [np.full((64, 64), i, np.float32) for i in range(5)]
    tensor, parts = tensors.stacked_to_tensor(arrays, inline_bytes=0)
    assert parts is not None and len(parts) == 5
    assert np.shares_memory(np.frombuffer(parts[2], np.float32), arrays[2])
    out = tensors.tensor_to_array(tensor, b"".join(parts))
    assert np.array_equal(out, np.stack(arrays))


def test_small_stacks_are_inline() -> None:
    tensor, parts = tensors.stacked_to_tensor([np.ones(3, np.int16), np.zeros(3, np.int16)])
    assert parts is None and tensor.data and list(tensor.shape) == [2, 3]


def test_detached_tensor_keeps_large_numeric_arrays_as_they_are() -> None:
    large = np.zeros((200, 200, 2), np.float32)[..., :1]  # strided: copied once where it is sent
    tensor, payload = tensors.detached_tensor(large)
    assert payload is large and tensor.chunked_nbytes == large.nbytes and list(tensor.shape) == [200, 200, 1]
    small = np.ones(4, np.float32)
    tensor, payload = tensors.detached_tensor(small)
    assert payload is None and tensors.tensor_to_array(tensor).tolist() == [1, 1, 1, 1]


def test_announced_sizes_must_match_the_elements() -> None:
    tensor = tensor_pb2.Tensor(dtype=tensors.dtype_to_proto(np.dtype("<f4")), shape=[10, 10], chunked_nbytes=400)
    assert tensors.announced_nbytes(tensor) == 400
    tensor.chunked_nbytes = 401
    with pytest.raises(WireError, match="401 bytes announced for 400 bytes of elements"):
        tensors.announced_nbytes(tensor)
    tensor.chunked_nbytes = tensors.MAX_TENSOR_BYTES + 1
    with pytest.raises(WireError, match="is not a payload size"):
        tensors.announced_nbytes(tensor)


def test_raw_sizes_refuse_negative_huge_and_too_many_axes() -> None:
    f4 = tensors.dtype_to_proto(np.dtype("<f4"))
    with pytest.raises(WireError, match="negative axis"):
        tensors.raw_nbytes(tensor_pb2.Tensor(dtype=f4, shape=[3, -1]))
    with pytest.raises(WireError, match="over"):
        tensors.raw_nbytes(tensor_pb2.Tensor(dtype=f4, shape=[1 << 20, 1 << 20]))
    with pytest.raises(WireError, match="33 axes"):
        tensors.raw_nbytes(tensor_pb2.Tensor(dtype=f4, shape=[1] * 33))


def test_a_payload_of_the_wrong_size_is_a_wire_error() -> None:
    tensor, _ = tensors.array_to_tensor(np.zeros((3, 5), np.uint16))
    tensor.data = tensor.data[:-1]
    with pytest.raises(WireError, match=r"shape \(3, 5\) and dtype uint16 needs 30 bytes, got 29"):
        tensors.tensor_to_array(tensor)


def test_shape_text_is_cut() -> None:
    assert tensors.shape_text((1, 2)) == "(1, 2)"
    text = tensors.shape_text(tuple(range(100)))
    assert len(text) < 120 and text.endswith("(100 axes)")


def test_stacked_parts_for_shared_memory_are_the_arrays_themselves() -> None:
    volume = np.arange(2 * 40 * 30 * 20, dtype=np.float32).reshape(40, 30, 20, 2)
    strided = [volume.transpose(3, 0, 1, 2), volume[::-1].transpose(3, 0, 1, 2)]
    tensor, parts = tensors.stacked_to_tensor(strided, contiguous=False)
    assert parts is not None and all(p is a for p, a in zip(parts, strided, strict=True))
    assert tensor.chunked_nbytes == 2 * strided[0].nbytes and list(tensor.shape) == [2, 2, 40, 30, 20]
    wire = b"".join(bytes(tensors.contiguous_bytes(p)) for p in parts)
    assert wire == np.stack(strided).tobytes()
    small, inline = tensors.stacked_to_tensor([np.ones(3, np.float32)], contiguous=False)
    assert inline is None and small.data == np.ones(3, np.float32).tobytes()  # small ones stay inline
