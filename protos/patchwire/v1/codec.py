"""How arrays and sample values travel in patchwire.v1 messages, shared by the server and the client.

A tensor is one raw little-endian C-order ``bytes`` blob with its dtype and shape beside it. A tensor larger than
:data:`INLINE_MAX_BYTES` is announced with ``chunked_nbytes`` and its payload follows in :class:`TensorChunk` messages
of at most :data:`CHUNK_BYTES` each, so no message grows with the sample size (and chunk messages are written and
read by hand, without protobuf's copies). Integer tensors (label maps) may travel LZ4-compressed when a client asks
for it (``Tensor.compression``); the payload is then the compressed block.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import lz4.block
import numpy as np

from patchwire.v1 import _pages, tensor_pb2

__all__ = [
    "CHUNK_BYTES",
    "COMPRESSIBLE_KINDS",
    "INLINE_MAX_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_TENSOR_BYTES",
    "TARGET_MESSAGE_BYTES",
    "BufferPool",
    "ChunkAssembler",
    "Compression",
    "DataType",
    "announced_nbytes",
    "array_to_tensor",
    "batch_arrays",
    "batch_tensors",
    "channel_options",
    "chunk_data",
    "chunks",
    "dtype_from_proto",
    "dtype_to_proto",
    "passthrough_serializer",
    "raw_nbytes",
    "serialized_chunks",
    "shared_pool",
    "stacked_to_tensor",
    "tensor_to_array",
]

DataType = tensor_pb2.DataType
Compression = tensor_pb2.Compression

#: Payload size of one TensorChunk. Measured against 1 MiB (three interleaved rounds, 2 cores): +6% axial slices,
#: +17% 64^3 patches (fewer messages: less per-message work on both ends); 4 MiB gained less for patches, 8 MiB lost.
CHUNK_BYTES = 2 << 20
#: The largest tensor sent inline, inside its Batch message. An inline payload is copied by protobuf on both ends
#: (into the message, when serialising, when parsing, out of it: 64 KiB keeps that cheap); larger payloads travel as
#: chunk messages, copied once per end. Measured: axial slices with 40 KB label maps per sample streamed 14% faster
#: than with a 1 MiB inline limit.
INLINE_MAX_BYTES = 64 << 10
#: Whole batches are grouped into one message (a Batch header and its chunks) until it carries about this many bytes:
#: two batches of 16 axial 181x217x181 slices (5.6 MB each). Measured against 1 MiB (one batch per message), three
#: interleaved rounds: +10% axial and +8% axis-2 slices (half the per-message work: executor hand-offs, headers).
TARGET_MESSAGE_BYTES = 16 << 20
#: Receive and send limit set on both ends. Messages stay near CHUNK_BYTES; the headroom is for large headers
#: (many small per-sample values) and for clients posting bigger messages than ours.
MAX_MESSAGE_BYTES = 64 << 20
#: numpy dtype kinds that ``integer_compression`` applies to: bool and (un)signed integers (label maps, masks).
COMPRESSIBLE_KINDS = "biu"
#: Smaller tensors are never compressed: a few KiB cost more to compress than to send.
MIN_COMPRESS_BYTES = 4096

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
    """The wire DataType of a numpy dtype (byte order is normalised to little-endian)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NUMPY_TO_PROTO[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} cannot travel as a patchwire tensor") from None


def dtype_from_proto(dtype: int) -> np.dtype[Any]:
    """The numpy dtype of a wire DataType."""
    try:
        return _PROTO_TO_NUMPY[tensor_pb2.DataType.ValueType(dtype)]
    except KeyError:
        raise ValueError(f"unknown or unspecified tensor dtype {dtype}") from None


def _compress(
    tensor: tensor_pb2.Tensor,
    parts: Sequence[memoryview],
    nbytes: int,
    dtype: np.dtype[Any],
    compression: int,
    inline_bytes: int,
) -> tuple[tensor_pb2.Tensor, memoryview | None] | None:
    """``tensor`` with its payload compressed, if ``compression`` applies to the dtype and pays off; else None."""
    if compression == Compression.COMPRESSION_UNSPECIFIED or dtype.kind not in COMPRESSIBLE_KINDS:
        return None
    if nbytes < MIN_COMPRESS_BYTES:
        return None
    if compression != Compression.COMPRESSION_LZ4:
        raise ValueError(f"unknown compression {compression}")
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) >= nbytes:
        return None  # incompressible (noise): the raw bytes are smaller
    tensor.compression = Compression.COMPRESSION_LZ4
    if len(packed) > inline_bytes:
        tensor.chunked_nbytes = len(packed)
        return tensor, memoryview(packed)
    tensor.data = packed
    return tensor, None


def array_to_tensor(
    array: np.ndarray, inline_bytes: int = INLINE_MAX_BYTES, compression: int = Compression.COMPRESSION_UNSPECIFIED
) -> tuple[tensor_pb2.Tensor, memoryview | None]:
    """Encodes ``array``; returns the Tensor and, when it is to be chunked, the payload to send after it (a view of
    the array's memory: the array must not change until the payload is sent). ``compression`` applies to integer and
    bool arrays (see :func:`stacked_to_tensor`)."""
    dt = np.dtype(array.dtype)
    wire_dtype = dtype_to_proto(dt)
    if dt.byteorder == ">" or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dt.newbyteorder("<"))
    tensor = tensor_pb2.Tensor(dtype=wire_dtype, shape=array.shape)
    packed = _compress(tensor, [array.reshape(-1).data.cast("B")], array.nbytes, dt, compression, inline_bytes)
    if packed is not None:
        return packed
    if array.nbytes > inline_bytes:
        tensor.chunked_nbytes = array.nbytes
        return tensor, array.reshape(-1).data.cast("B")
    tensor.data = array.tobytes()
    return tensor, None


def tensor_to_array(
    tensor: tensor_pb2.Tensor, payload: bytes | bytearray | memoryview | np.ndarray | None = None
) -> np.ndarray:
    """Decodes a Tensor (with its chunked ``payload`` when it had one) into a writable numpy array."""
    dtype = dtype_from_proto(tensor.dtype)
    shape = tuple(tensor.shape)
    data = payload if tensor.chunked_nbytes else tensor.data
    expected = raw_nbytes(tensor)
    if tensor.compression != Compression.COMPRESSION_UNSPECIFIED and data is not None:
        data = _decompress(tensor.compression, data, expected)
    if data is None or len(data) != expected:
        got = 0 if data is None else len(data)
        raise ValueError(f"tensor of shape {_shape_text(shape)} and dtype {dtype} needs {expected} bytes, got {got}")
    if isinstance(data, bytes):
        # bytes are immutable: copy once so that callers may modify the array in place (as pymia's arrays allow)
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decompress(compression: int, data: bytes | bytearray | memoryview | np.ndarray, expected: int) -> bytearray:
    if compression != Compression.COMPRESSION_LZ4:
        raise ValueError(f"tensor uses an unknown compression ({compression}): upgrade patchwire")
    try:
        raw = lz4.block.decompress(data, uncompressed_size=expected, return_bytearray=True)
    except lz4.block.LZ4BlockError as exc:
        raise ValueError(f"LZ4-compressed tensor payload is corrupt: {exc}") from None
    if len(raw) != expected:
        raise ValueError(f"LZ4-compressed tensor decompressed to {len(raw)} bytes, expected {expected}")
    return raw


def chunks(payload: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Splits a chunked tensor's payload into TensorChunk-sized pieces."""
    view = memoryview(payload).cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


Run = list[_pages.Segment]
"""Pieces that lie back to back in memory: a buffer's pages, or a part of them."""


def _run_bytes(run: Run) -> int:
    return sum(length for _, length in run)


def _split_run(run: Run, nbytes: int) -> tuple[Run, Run]:
    """The first ``nbytes`` of a run and the rest (a piece across the boundary is cut in two)."""
    head: Run = []
    for k, (address, length) in enumerate(run):
        if nbytes >= length:
            head.append((address, length))
            nbytes -= length
            continue
        if nbytes:
            head.append((address, nbytes))
        return head, [(address + nbytes, length - nbytes), *run[k + 1 :]]
    return head, []


class BufferPool:
    """Recycles the pages of payload buffers across messages, calls and sizes: a buffer's pages come back once every
    array viewing it is gone, and any later buffer may reuse them.

    A fresh multi-MiB buffer costs a page fault per page on first touch: patch batches (38 MB each) spent about 10%
    of the client's CPU zeroing pages, and the first batch of a stream whose batches are larger than any before (64^3
    patches after slices) took 65-95 ms to touch. Buffers of at least :attr:`MIN_BYTES` are private memory mappings
    (Linux; elsewhere plain numpy buffers). A free buffer at least as large as the one asked for is reused in place
    (the smallest such, its rest stays free); otherwise free buffers are moved into one new range (``mremap``: the
    pages move, nothing is copied or faulted), so batches of slices leave pages that a batch of patches reuses. Each
    buffer is exported through its own small ctypes array, which every numpy view (and torch tensor, through numpy)
    keeps alive through its base: its pages return only when the last view is gone, and buffers the caller keeps are
    never reused. At most ``max_bytes`` of free pages are kept; the rest are unmapped. :func:`shared_pool` is the
    process's pool."""

    #: Smaller buffers come from numpy's allocator, which recycles them well.
    MIN_BYTES = 1 << 20
    #: Free runs smaller than this are unmapped rather than kept.
    MIN_PIECE = 64 << 10

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[Run] = []
        self._free_bytes = 0
        # re-entrant: a garbage collection while the lock is held may free a buffer in this thread
        self._lock = threading.RLock()
        #: Buffers made (at least partly) of recycled pages, and how many of their bytes were.
        self.recycled = 0
        self.recycled_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (contents undefined)."""
        if nbytes < self.MIN_BYTES or not _pages.available():
            return np.empty(nbytes, dtype=np.uint8)
        length = -(-nbytes // _pages.PAGE) * _pages.PAGE
        with self._lock:
            in_place, parts, dropped = self._claim(length)
        for run in dropped:
            for piece in run:
                _pages.unmap(piece)
        run = parts if in_place else self._assemble(length, parts)
        exporter = (ctypes.c_char * nbytes).from_address(run[0][0])
        # not at exit: arrays may still be in use while the interpreter shuts down, and their pages must stay mapped
        weakref.finalize(exporter, self._give_back, run).atexit = False
        return np.frombuffer(memoryview(exporter), dtype=np.uint8)

    def _claim(self, length: int) -> tuple[bool, Run, list[Run]]:
        """Free pages for a buffer of ``length`` bytes (under the lock): the head of the smallest free run that is
        large enough (True: used in place), else every free run, largest first, the last one cut to what is needed
        (False: to be moved). Also the cut-off rests too small to keep."""
        # the most recently freed first among equals: its pages are the likeliest to be in the CPU caches
        newest_first = self._free[::-1]
        fits = [r for r in newest_first if _run_bytes(r) >= length]
        chosen = [min(fits, key=_run_bytes)] if fits else sorted(newest_first, key=_run_bytes, reverse=True)
        parts: Run = []
        dropped: list[Run] = []
        for run in chosen:
            self._free.remove(run)
            self._free_bytes -= _run_bytes(run)
            head, rest = _split_run(run, length - _run_bytes(parts))
            parts.extend(head)
            if _run_bytes(rest) >= self.MIN_PIECE:
                self._free.append(rest)
                self._free_bytes += _run_bytes(rest)
            elif rest:
                dropped.append(rest)
            if _run_bytes(parts) == length:
                break
        if parts:
            self.recycled += 1
            self.recycled_bytes += _run_bytes(parts)
        return bool(fits), parts, dropped

    def _assemble(self, length: int, parts: Run) -> Run:
        """A new range of ``length`` bytes with the recycled pieces moved into its start (fresh pages after them)."""
        base = _pages.map_fresh(length)
        run: Run = []
        offset = 0
        for part in parts:
            try:
                _pages.move(part, base + offset)
            except OSError:
                _pages.unmap(part)  # never expected; that range of the new buffer simply stays fresh
            run.append((base + offset, part[1]))
            offset += part[1]
        if offset < length:
            run.append((base + offset, length - offset))
        return run

    def reserve(self, nbytes: int) -> None:
        """Maps and touches up to ``nbytes`` of free pages ahead of need (within ``max_bytes``), so that the first
        batches larger than any before do not wait for page faults."""
        if not _pages.available():
            return
        with self._lock:
            length = min(nbytes, self.max_bytes - self._free_bytes) // _pages.PAGE * _pages.PAGE
        if length < self.MIN_PIECE:
            return
        self._give_back([(_pages.map_fresh(length, populate=True), length)])

    def _give_back(self, run: Run) -> None:
        with self._lock:
            keep = min(_run_bytes(run), max(self.max_bytes - self._free_bytes, 0))
            kept, dropped = _split_run(run, keep // _pages.PAGE * _pages.PAGE)
            if _run_bytes(kept) >= self.MIN_PIECE:
                self._free.append(kept)
                self._free_bytes += _run_bytes(kept)
            else:
                dropped = run
        for piece in dropped:
            _pages.unmap(piece)

    def _after_fork(self) -> None:
        """In a forked child: the inherited free pages are nobody's (buffers in use stay mapped)."""
        self._lock = threading.RLock()
        for run in self._free:
            for piece in run:
                _pages.unmap(piece)
        self._free, self._free_bytes = [], 0


_shared_pool: BufferPool | None = None
_shared_pool_lock = threading.Lock()
#: Free pages the process's pool maps ahead of need, in the background, when it is first used: measured on the
#: benchmark, the first batch of 64^3 patches (38 MB) after batches of slices arrived in 86-138 ms with the slices'
#: pages recycled alone, 14 MB of them, the rest faulted in while the chunks were copied; with the reserve in 51-73 ms.
SHARED_POOL_RESERVE = 64 << 20


def shared_pool() -> BufferPool:
    """The pool every connection of this process takes payload buffers from. Its first use starts a thread that maps
    :data:`SHARED_POOL_RESERVE` of free pages (a forked child starts with none)."""
    global _shared_pool
    with _shared_pool_lock:
        if _shared_pool is None:
            _shared_pool = BufferPool()
            threading.Thread(
                target=_shared_pool.reserve, args=(SHARED_POOL_RESERVE,), name="patchwire-pages", daemon=True
            ).start()
        return _shared_pool


def _reset_shared_pool_in_child() -> None:
    global _shared_pool_lock
    _shared_pool_lock = threading.Lock()
    if _shared_pool is not None:
        _shared_pool._after_fork()


os.register_at_fork(after_in_child=_reset_shared_pool_in_child)


#: The largest payload a tensor may announce (``chunked_nbytes``): a 1024^3 volume of 4 float32 channels is 16 GiB.
#: Larger announcements are refused as malformed before anything is allocated; servers bound sizes further.
MAX_TENSOR_BYTES = 1 << 34


def announced_nbytes(tensor: tensor_pb2.Tensor) -> int:
    """The payload size a chunked tensor announces, checked against its dtype and shape: exactly the element bytes,
    or for a compressed tensor at most LZ4's bound for them. Raises ValueError for sizes that cannot be right."""
    n = tensor.chunked_nbytes
    if not 0 < n <= MAX_TENSOR_BYTES:
        raise ValueError(f"chunked_nbytes: {n} is not a payload size (1 to {MAX_TENSOR_BYTES} bytes)")
    raw = raw_nbytes(tensor)
    if tensor.compression == Compression.COMPRESSION_UNSPECIFIED:
        if n != raw:
            raise ValueError(f"chunked_nbytes: {n} bytes announced for {raw} bytes of elements")
    elif n > raw + raw // 255 + 16:  # LZ4's worst case
        raise ValueError(f"chunked_nbytes: {n} compressed bytes announced for {raw} bytes of elements")
    return n


def raw_nbytes(tensor: tensor_pb2.Tensor) -> int:
    """The element bytes of a tensor from its dtype and shape. Raises ValueError for an unknown dtype, a negative
    axis or more than MAX_TENSOR_BYTES."""
    dtype = dtype_from_proto(tensor.dtype)
    if any(d < 0 for d in tensor.shape):
        raise ValueError(f"shape: {_shape_text(tensor.shape)} has a negative axis")
    if len(tensor.shape) > 32:
        raise ValueError(f"shape: {len(tensor.shape)} axes (numpy takes at most 32)")
    nbytes = math.prod(tensor.shape) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ValueError(f"shape: {_shape_text(tensor.shape)} of {dtype} is {nbytes} bytes, over {MAX_TENSOR_BYTES}")
    return nbytes


def _shape_text(shape: Sequence[int]) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else f"{text[:80]}... ({len(shape)} axes)"


class ChunkAssembler:
    """Collects TensorChunk payloads for the tensors a message announced, in announcement order, into buffers of
    ``pool`` (fresh ones without). Announced sizes are checked first (:func:`announced_nbytes`: ValueError for sizes
    that cannot be right; with ``max_bytes``, announcements of more bytes in all are refused) before anything is
    allocated; each buffer is allocated when its first chunk arrives, so memory follows the bytes received, not the
    bytes announced. Payloads must fill their announced sizes exactly: :meth:`add` refuses a chunk that overruns one,
    and a new announcement or the end of a stream finds an incomplete one."""

    def __init__(
        self, tensors: Sequence[tensor_pb2.Tensor], pool: BufferPool | None = None, max_bytes: int | None = None
    ) -> None:
        self._pending = [t for t in tensors if t.chunked_nbytes]
        self._sizes = [announced_nbytes(t) for t in self._pending]
        announced = sum(self._sizes)
        if max_bytes is not None and announced > max_bytes:
            raise ValueError(f"tensors announce {announced} payload bytes, more than the {max_bytes} allowed")
        self._pool = pool
        self._buffers: list[np.ndarray] = []
        self._index = 0
        self._offset = 0

    @property
    def complete(self) -> bool:
        return self._index >= len(self._pending)

    def add(self, data: bytes | memoryview) -> None:
        if self.complete:
            raise ValueError("received a tensor chunk that no tensor announced")
        size = self._sizes[self._index]
        if len(self._buffers) == self._index:
            # numpy buffers: no zero-filling (bytearray(n) writes every byte once before the chunks do)
            pool = self._pool
            self._buffers.append(pool.take(size) if pool is not None else np.empty(size, dtype=np.uint8))
        buf = self._buffers[self._index]
        end = self._offset + len(data)
        if end > size:
            raise ValueError("tensor chunk overruns the announced payload size")
        buf[self._offset : end] = np.frombuffer(data, dtype=np.uint8)
        self._offset = end
        if end == size:
            self._index += 1
            self._offset = 0

    def payloads(self) -> list[np.ndarray]:
        """The payloads of the announced tensors, in announcement order (once complete)."""
        return self._buffers


def channel_options() -> list[tuple[str, int]]:
    """gRPC options both ends use: deliberate message limits instead of gRPC's 4 MiB default."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def batch_tensors(batch: Any) -> list[tensor_pb2.Tensor]:
    """The tensors of a Batch in announcement order: fields in order; per-sample values in order within a field."""
    out: list[tensor_pb2.Tensor] = []
    for field in batch.fields:
        if field.WhichOneof("value") == "stacked":
            out.append(field.stacked)
        else:
            for value in field.per_sample.values:
                kind = value.WhichOneof("kind")
                if kind in ("tensor", "numpy_scalar"):
                    out.append(getattr(value, kind))
    return out


def batch_arrays(batch: Any, payloads: Sequence[bytes | bytearray | np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The arrays of a Batch (or PredictionBatch) by field, one per sample: stacked tensors are split along axis 0,
    per-sample values must all be tensors. ``payloads`` are the chunked payloads in announcement order."""
    pending = iter(payloads)
    out: dict[str, list[np.ndarray]] = {}
    for field in batch.fields:
        if field.WhichOneof("value") == "stacked":
            t = field.stacked
            stacked = tensor_to_array(t, next(pending) if t.chunked_nbytes else None)
            out[field.key] = list(stacked)
        else:
            arrays = []
            for value in field.per_sample.values:
                if value.WhichOneof("kind") != "tensor":
                    raise ValueError(f"field {repr(field.key)[:80]}: every per-sample value must be a tensor")
                t = value.tensor
                arrays.append(tensor_to_array(t, next(pending) if t.chunked_nbytes else None))
            out[field.key] = arrays
    return out


# -- pre-serialised chunk messages ------------------------------------------------------------------------------------
# Every response type that carries samples (GetSamples, DirectExtract, StreamBatches, FetchSubject) and the
# prediction requests share one layout: ``oneof payload { Batch batch = 1; TensorChunk chunk = 2; }``. A chunk
# message is therefore ``0x12 varint(len(inner)) 0x0a varint(len(data)) data``; writing it by hand copies the payload
# once (instead of into a TensorChunk, then again when serialising) and reading it by hand skips protobuf's copy.

_CHUNK_FIELD_TAG = b"\x12"  # field 2 (chunk), length-delimited
_DATA_FIELD_TAG = b"\x0a"  # TensorChunk.data: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def serialized_chunks(
    payload: bytes | memoryview | Sequence[memoryview], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The wire bytes of the chunk messages that carry ``payload`` (one copy of the payload, no protobuf).
    ``payload`` may be a sequence of parts (e.g. the samples of a stacked tensor): chunks then span parts, and the
    parts are copied straight into the messages, never joined first."""
    parts = [memoryview(payload).cast("B")] if isinstance(payload, bytes | memoryview) else list(payload)
    pieces: list[memoryview] = []
    size = 0
    for part in parts:
        offset = 0
        while offset < len(part):
            take = min(chunk_bytes - size, len(part) - offset)
            pieces.append(part[offset : offset + take])
            size += take
            offset += take
            if size == chunk_bytes:
                yield _chunk_message(pieces, size)
                pieces, size = [], 0
    if size:
        yield _chunk_message(pieces, size)


def _chunk_message(pieces: list[memoryview], size: int) -> bytes:
    inner_head = _DATA_FIELD_TAG + _varint(size)
    return b"".join((_CHUNK_FIELD_TAG, _varint(len(inner_head) + size), inner_head, *pieces))


def stacked_to_tensor(
    arrays: Sequence[np.ndarray],
    inline_bytes: int = INLINE_MAX_BYTES,
    compression: int = Compression.COMPRESSION_UNSPECIFIED,
) -> tuple[tensor_pb2.Tensor, list[memoryview] | None]:
    """Like ``array_to_tensor(np.stack(arrays))`` without building the stacked array: a chunked payload is returned
    as one part per array (views of their memory), copied once, into the chunk messages.

    ``compression`` (``COMPRESSION_LZ4``) compresses integer and bool arrays of at least MIN_COMPRESS_BYTES when
    that makes them smaller (label maps shrink 15-25x); other dtypes and incompressible data travel raw."""
    first = arrays[0]
    dt = np.dtype(first.dtype)
    if dt.byteorder == ">":  # swapped to little-endian on the way: a stacked copy is needed anyway
        tensor, payload = array_to_tensor(np.stack(arrays), inline_bytes, compression)
        return tensor, None if payload is None else [payload]
    tensor = tensor_pb2.Tensor(dtype=dtype_to_proto(dt), shape=(len(arrays), *first.shape))
    nbytes = first.nbytes * len(arrays)
    parts = [np.ascontiguousarray(a).reshape(-1).data.cast("B") for a in arrays]
    packed = _compress(tensor, parts, nbytes, dt, compression, inline_bytes)
    if packed is not None:
        return packed[0], None if packed[1] is None else [packed[1]]
    if nbytes <= inline_bytes:
        tensor.data = b"".join(parts)
        return tensor, None
    tensor.chunked_nbytes = nbytes
    return tensor, parts


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(data):
            raise ValueError("a varint runs past the end of the message")
        if shift > 63:
            raise ValueError("a varint is longer than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def chunk_data(message: bytes) -> memoryview | None:
    """The payload of a serialised chunk message (a view, no copy), or None if ``message`` is not laid out as one
    (parse it with protobuf then). Raises ValueError for a chunk header that is garbage (a varint that does not end,
    lengths that do not match the message)."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != 0x12:
        return None
    inner, pos = _read_varint(view, 1)
    if pos + inner != len(view):
        if pos + inner > len(view):
            raise ValueError(f"a chunk message announces {inner} bytes but {len(view) - pos} follow")
        return None  # more fields after the chunk: protobuf's parse decides
    if inner == 0 or view[pos] != 0x0A:
        return None
    n, start = _read_varint(view, pos + 1)
    if start + n != len(view):
        if start + n > len(view):
            raise ValueError(f"a tensor chunk announces {n} bytes but {len(view) - start} follow")
        return None
    return view[start:]


def passthrough_serializer(message: Any) -> bytes:
    """A response serializer that sends pre-serialised bytes as they are and serialises messages."""
    if isinstance(message, bytes | bytearray):
        return bytes(message)
    serialized: bytes = message.SerializeToString()
    return serialized
