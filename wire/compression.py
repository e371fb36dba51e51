"""Tensor payload compression: which tensors may be compressed, with what, and the codec itself.

Integer and bool tensors (label maps, masks) may travel LZ4-compressed when a client asks for it
(``Tensor.compression``): label maps shrink 15-25x at about 2 GB/s per core. Float tensors always travel raw: LZ4 on
float32 MRI volumes costs about what it saves on these machines (the benchmark's "lz4 labels" rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lz4.block
import numpy as np

from patchwire.v1 import tensor_pb2
from patchwire.wire.errors import WireError

__all__ = [
    "COMPRESSIBLE_KINDS",
    "MIN_COMPRESS_BYTES",
    "NAMES",
    "Compression",
    "compress",
    "compression_from_name",
    "decompress",
    "max_compressed_bytes",
]

Compression = tensor_pb2.Compression
#: numpy dtype kinds that compression applies to: bool and (un)signed integers (label maps, masks).
COMPRESSIBLE_KINDS = "biu"
#: Smaller tensors are never compressed: a few KiB cost more to compress than to send.
MIN_COMPRESS_BYTES = 4096
#: The names a client gives a compression (``label_compression``), and their wire values.
NAMES: dict[str | None, Compression.ValueType] = {
    None: Compression.COMPRESSION_UNSPECIFIED,
    "lz4": Compression.COMPRESSION_LZ4,
}


def compression_from_name(name: str | None) -> Compression.ValueType:
    """The wire value of a compression name: None (raw) or 'lz4'; ValueError for anything else."""
    try:
        return NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"label_compression must be None or 'lz4', got {name!r}") from None


def max_compressed_bytes(raw: int) -> int:
    """LZ4's worst case for ``raw`` input bytes: no compressed payload may announce more."""
    return raw + raw // 255 + 16


def compress(parts: Sequence[memoryview], nbytes: int, dtype: np.dtype[Any], compression: int) -> bytes | None:
    """The compressed payload of ``parts`` (``nbytes`` in all, of ``dtype``), or None where ``compression`` does not
    apply to the dtype, the payload is too small to be worth it, or compressing would not make it smaller."""
    if compression == Compression.COMPRESSION_UNSPECIFIED or dtype.kind not in COMPRESSIBLE_KINDS:
        return None
    if nbytes < MIN_COMPRESS_BYTES:
        return None
    if compression != Compression.COMPRESSION_LZ4:
        raise ValueError(f"unknown compression {compression}")
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    packed: bytes = lz4.block.compress(raw, store_size=False)
    if len(packed) >= nbytes:
        return None  # incompressible (noise): the raw bytes are smaller
    return packed


def decompress(compression: int, data: bytes | bytearray | memoryview | np.ndarray, expected: int) -> bytearray:
    """The ``expected`` raw bytes of a compressed payload; WireError for an unknown codec or a corrupt payload."""
    if compression != Compression.COMPRESSION_LZ4:
        raise WireError(f"tensor uses an unknown compression ({compression}): upgrade patchwire")
    try:
        raw: bytearray = lz4.block.decompress(data, uncompressed_size=expected, return_bytearray=True)
    except lz4.block.LZ4BlockError as exc:
        raise WireError(f"LZ4-compressed tensor payload is corrupt: {exc}") from None
    if len(raw) != expected:
        raise WireError(f"LZ4-compressed tensor decompressed to {len(raw)} bytes, expected {expected}")
    return raw
