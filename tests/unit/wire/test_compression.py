"""LZ4 for integer and bool tensors: what is compressed, names, and corrupt payloads."""

from __future__ import annotations

import numpy as np
import pytest

from patchwire.wire import compression, tensors
from patchwire.wire.compression import Compression
from patchwire.wire.errors import WireError

LZ4 = Compression.COMPRESSION_LZ4


def test_names() -> None:
    assert compression.compression_from_name(None) == Compression.COMPRESSION_UNSPECIFIED
    assert compression.compression_from_name("lz4") == LZ4
    with pytest.raises(ValueError, match="label_compression must be None or 'lz4', got 'zstd'"):
        compression.compression_from_name("zstd")


def test_label_maps_shrink_and_round_trip() -> None:
    labels = np.zeros((64, 64, 64), np.uint8)
    labels[20:40, 10:50, 5:60] = 3
    tensor, payload = tensors.array_to_tensor(labels, compression=LZ4)
    assert tensor.compression == LZ4
    size = len(payload) if payload is not None else len(tensor.data)
    assert size * 15 < labels.nbytes
    out = tensors.tensor_to_array(tensor, None if payload is None else bytes(payload))
    assert np.array_equal(out, labels)


@pytest.mark.parametrize(
    ("array", "why"),
    [
        (np.zeros((64, 64), np.float32), "floats travel raw"),
        (np.zeros(100, np.uint8), "smaller than MIN_COMPRESS_BYTES"),
        (np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8), "noise does not shrink"),
    ],
)
def test_what_is_not_compressed(array: np.ndarray, why: str) -> None:
    tensor, _ = tensors.array_to_tensor(array, compression=LZ4)
    assert tensor.compression == Compression.COMPRESSION_UNSPECIFIED, why


def test_compressed_announcements_are_bounded_by_lz4s_worst_case() -> None:
    tensor, payload = tensors.array_to_tensor(np.zeros(1 << 20, np.uint8), compression=LZ4, inline_bytes=0)
    assert payload is not None and tensors.announced_nbytes(tensor) == len(payload)
    tensor.chunked_nbytes = compression.max_compressed_bytes(1 << 20) + 1
    with pytest.raises(WireError, match="compressed bytes announced"):
        tensors.announced_nbytes(tensor)


def test_corrupt_and_unknown_payloads_are_wire_errors() -> None:
    tensor, _ = tensors.array_to_tensor(np.zeros((300, 300), np.uint8), compression=LZ4)
    tensor.data = tensor.data[: len(tensor.data) // 2]
    with pytest.raises(WireError, match="LZ4-compressed tensor"):
        tensors.tensor_to_array(tensor)
    with pytest.raises(WireError, match="unknown compression"):
        compression.decompress(99, b"x", 1)
