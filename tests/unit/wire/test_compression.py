"""Tensor compression: codec names and policies, round trips of every dtype the service serves through every codec
(inline and chunked, empty and odd sizes), and payloads from a hostile or broken peer (truncated frames, sizes that
lie, wrong typesizes, decompression bombs, flags that would hand out uninitialised memory)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from patchwire.v1 import tensor_pb2
from patchwire.wire import compression, framing, tensors
from patchwire.wire.compression import FRAME_BYTES, MIN_FRAME_BYTES, Compression, Policy
from patchwire.wire.errors import FramingError, WireError

RAW = Compression.COMPRESSION_UNSPECIFIED
LZ4 = Compression.COMPRESSION_LZ4
SHUFFLE_LZ4 = Compression.COMPRESSION_SHUFFLE_LZ4
SHUFFLE_ZSTD = Compression.COMPRESSION_SHUFFLE_ZSTD
FRAMED = (SHUFFLE_LZ4, SHUFFLE_ZSTD)
#: every dtype a tensor may have on the wire (tensors._NUMPY_TO_PROTO)
DTYPES = ["bool", "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"]


def _volume(shape: Sequence[int], dtype: Any, seed: int = 0) -> np.ndarray:
    """A skull-stripped-looking array: zero background, a block of varying values in the middle."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype)
    if out.size:
        flat = out.reshape(-1)
        middle = slice(flat.size // 4, flat.size // 2)
        values = rng.integers(0, 2, flat[middle].size) if out.dtype == bool else rng.random(flat[middle].size) * 100
        flat[middle] = values.astype(dtype)
    return out


def _received(tensor: tensor_pb2.Tensor, payload: Any, max_bytes: int | None = None) -> np.ndarray:
    """What a receiver makes of an encoded tensor: its chunk messages through a ChunkAssembler, then decoded."""
    if payload is None:
        return tensors.tensor_to_array(tensor)
    assembler = framing.ChunkAssembler([tensor], max_bytes=max_bytes)
    for message in framing.serialized_chunks(payload):
        data = framing.chunk_data(message)
        assert data is not None
        assembler.add(data)
    assert assembler.complete
    (buffer,) = assembler.payloads()
    return tensors.tensor_to_array(tensor, buffer)


def _frames(array: np.ndarray, codec: int) -> bytes:
    """The whole framed payload of ``array`` (compressible) as one bytes object."""
    packed = compression.compress([array.reshape(-1).data.cast("B")], array.nbytes, array.dtype, Policy(codec, codec))
    assert isinstance(packed, compression.Frames)
    return packed.joined()


def _tensor(array: np.ndarray, codec: int, data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=tensors.dtype_to_proto(array.dtype), shape=array.shape, compression=codec, chunked_nbytes=len(data)
    )


def _decode(array: np.ndarray, codec: int, data: bytes | bytearray, messages: Sequence[int] = ()) -> np.ndarray:
    """Decodes a hand-made framed payload for ``array``'s shape and dtype, split into chunk messages at ``messages``
    (offsets), through a ChunkAssembler."""
    tensor = _tensor(array, codec, bytes(data))
    assembler = framing.ChunkAssembler([tensor])
    cuts = [0, *messages, len(data)]
    for start, stop in itertools.pairwise(cuts):
        assembler.add(memoryview(bytes(data))[start:stop])
    (buffer,) = assembler.payloads()
    return tensors.tensor_to_array(tensor, buffer)


# -- names and policies -----------------------------------------------------------------------------------------------


def test_names() -> None:
    assert {compression.codec_from_name(n) for n in compression.SUPPORTED} == {LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD}
    assert [compression.codec_name(c) for c in (RAW, LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD)] == [
        "none",
        "lz4",
        "shuffle-lz4",
        "shuffle-zstd",
    ]
    with pytest.raises(ValueError, match="unknown codec 'gzip' \\(codecs: lz4, shuffle-lz4, shuffle-zstd\\)"):
        compression.codec_from_name("gzip")
    assert compression.compression_from_name(None) == RAW
    assert compression.compression_from_name("shuffle-zstd") == SHUFFLE_ZSTD
    with pytest.raises(ValueError, match=r"label_compression must be None or one of lz4, .*got 'zstd'"):
        compression.compression_from_name("zstd")


def test_offers_from_flag_text() -> None:
    assert compression.offer_from_text("none") == ()
    assert compression.offer_from_text("shuffle-zstd, lz4,shuffle-zstd") == ("shuffle-zstd", "lz4")
    for text in ("gzip", "", "none,lz4"):
        with pytest.raises(ValueError):
            compression.offer_from_text(text)


def test_a_requests_policy() -> None:
    """``compression`` applies to every dtype and wins; without it ``integer_compression`` covers integers only."""
    assert Policy.of_request(SHUFFLE_LZ4, LZ4) == Policy(SHUFFLE_LZ4, SHUFFLE_LZ4)
    assert Policy.of_request(RAW, LZ4) == Policy(LZ4, RAW)
    policy = Policy.of_request(RAW, SHUFFLE_ZSTD)
    assert [policy.codec(np.dtype(d)) for d in ("u1", "bool", "i8", "f4")] == [SHUFFLE_ZSTD] * 3 + [RAW]
    assert not Policy().active and policy.active


def test_compressed_announcements_are_bounded_per_codec() -> None:
    assert compression.max_compressed_bytes(1 << 20, LZ4) == (1 << 20) + (1 << 20) // 255 + 16
    # a header for every frame there can be: all but the last hold at least MIN_FRAME_BYTES
    raw = FRAME_BYTES * 2 + 1
    assert compression.max_compressed_bytes(raw, SHUFFLE_LZ4) == raw + (raw // MIN_FRAME_BYTES + 1) * 32
    tensor, payload = tensors.array_to_tensor(np.zeros(1 << 20, np.uint8), compression=LZ4, inline_bytes=0)
    assert payload is not None and tensors.announced_nbytes(tensor) == len(payload)
    tensor.chunked_nbytes = compression.max_compressed_bytes(1 << 20) + 1
    with pytest.raises(WireError, match="compressed bytes announced"):
        tensors.announced_nbytes(tensor)
    framed = tensor_pb2.Tensor(dtype=tensors.dtype_to_proto(np.dtype("f4")), shape=[1000], compression=SHUFFLE_LZ4)
    framed.chunked_nbytes = 4000 + 33
    with pytest.raises(WireError, match="4033 compressed bytes announced for 4000"):
        tensors.announced_nbytes(framed)
    framed.compression = 9
    with pytest.raises(WireError, match="unknown codec 9"):
        tensors.announced_nbytes(framed)


# -- round trips ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [LZ4, *FRAMED])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_inline_and_chunked(dtype: str, codec: int) -> None:
    itemsize = np.dtype(dtype).itemsize
    # inline once compressed; one frame plus an odd remainder of elements; several frames, chunked
    for elements in (5003, FRAME_BYTES // itemsize + 7, 2 * FRAME_BYTES // itemsize + 3):
        array = _volume((elements,), dtype)
        tensor, payload = tensors.array_to_tensor(array, compression=Policy(codec, codec))
        assert tensor.compression == codec, (dtype, elements)
        out = _received(tensor, payload)
        assert out.dtype == np.dtype(dtype) and np.array_equal(out, array)
        assert out.flags.writeable


@pytest.mark.parametrize("codec", FRAMED)
@pytest.mark.parametrize("shape", [(0,), (0, 7), (1,), (3, 5, 7), (1023,), (2, 511)])
def test_empty_and_small_tensors_travel_raw_and_round_trip(shape: tuple[int, ...], codec: int) -> None:
    array = _volume(shape, "<f4")
    tensor, payload = tensors.array_to_tensor(array, compression=Policy(codec, codec))
    assert tensor.compression == RAW  # under MIN_COMPRESS_BYTES
    assert np.array_equal(_received(tensor, payload), array) and _received(tensor, payload).shape == shape


def _frame_sizes(data: bytes) -> list[int]:
    """The raw sizes of the frames of a framed payload, from their headers."""
    sizes, pos = [], 0
    while pos < len(data):
        sizes.append(int.from_bytes(data[pos + 4 : pos + 8], "little"))
        pos += int.from_bytes(data[pos + 12 : pos + 16], "little")
    return sizes


@pytest.mark.parametrize("codec", FRAMED)
def test_stacked_samples_round_trip_with_frames_of_their_own(codec: int) -> None:
    """A batch of axial slices (odd sizes, 314 KB each): a frame per sample, whole frames per message."""
    slices = [_volume((217, 181, 2), "<f4", seed=s) for s in range(16)]
    tensor, payload = tensors.stacked_to_tensor(slices, compression=Policy(RAW, codec))
    assert tensor.compression == codec and payload is not None
    assert tensor.chunked_nbytes * 2 < sum(s.nbytes for s in slices)
    (frames,) = payload
    assert _frame_sizes(frames.joined()) == [slices[0].nbytes] * 16
    messages = list(framing.serialized_chunks(payload))
    assert len(messages) >= 1 and all(len(m) <= framing.CHUNK_BYTES + 64 for m in messages)
    assert np.array_equal(_received(tensor, payload), np.stack(slices))


@pytest.mark.parametrize(
    ("sample_bytes", "expected"),
    [
        (5 * FRAME_BYTES // 2, [1747628, 1747628, 1747624]),  # the fewest pieces of at most 2 MiB, equal
        (FRAME_BYTES + 12, [FRAME_BYTES // 2 + 8, FRAME_BYTES // 2 + 4]),  # equal up to whole float32 elements
        (MIN_FRAME_BYTES, [MIN_FRAME_BYTES]),
    ],
)
def test_each_large_sample_is_cut_on_its_own(sample_bytes: int, expected: list[int]) -> None:
    samples = [_volume((sample_bytes // 4,), "<f4", seed=s) for s in range(3)]
    tensor, payload = tensors.stacked_to_tensor(samples, 0, Policy(SHUFFLE_LZ4, SHUFFLE_LZ4))
    (frames,) = payload or [None]
    assert _frame_sizes(frames.joined()) == expected * 3
    assert np.array_equal(_received(tensor, payload), np.stack(samples))


def test_small_samples_share_frames() -> None:
    """Samples under MIN_FRAME_BYTES: pieces of FRAME_BYTES across them, the last one the rest."""
    samples = [_volume((MIN_FRAME_BYTES // 4 - 1,), "<f4", seed=s) for s in range(200)]
    tensor, payload = tensors.stacked_to_tensor(samples, compression=Policy(SHUFFLE_LZ4, SHUFFLE_LZ4))
    (frames,) = payload or [None]
    total = sum(s.nbytes for s in samples)
    assert _frame_sizes(frames.joined()) == [FRAME_BYTES, total - FRAME_BYTES]
    assert np.array_equal(_received(tensor, payload), np.stack(samples))


@pytest.mark.parametrize("codec", FRAMED)
def test_packed_samples_are_sent_as_they_are_beside_fresh_ones(codec: int) -> None:
    policy = Policy(codec, codec)
    samples = [_volume((64, 64, 64), "<f4", seed=s) for s in range(3)]
    packed = compression.pack(samples[0], policy)
    assert packed is not None and (packed.shape, packed.dtype, packed.codec) == ((64, 64, 64), np.dtype("<f4"), codec)
    assert packed.nbytes == samples[0].nbytes > packed.packed_nbytes and np.array_equal(packed.array(), samples[0])
    fresh = compression.compress([memoryview(samples[0]).cast("B")], samples[0].nbytes, samples[0].dtype, policy)
    assert isinstance(fresh, compression.Frames) and list(fresh.frames) == list(packed.frames)
    mixed = [packed, samples[1], compression.pack(samples[2], policy)]
    tensor, payload = tensors.stacked_to_tensor(mixed, compression=policy)  # type: ignore[arg-type]
    assert (tensor.compression, list(tensor.shape)) == (codec, [3, 64, 64, 64])
    assert np.array_equal(_received(tensor, payload), np.stack(samples))
    other = SHUFFLE_ZSTD if codec == SHUFFLE_LZ4 else SHUFFLE_LZ4
    with pytest.raises(ValueError, match="packed with"):
        tensors.stacked_to_tensor(mixed, compression=Policy(other, other))  # type: ignore[arg-type]


def test_what_is_not_packed() -> None:
    policy = Policy(SHUFFLE_LZ4, SHUFFLE_LZ4)
    assert compression.pack(np.zeros(MIN_FRAME_BYTES // 4 - 1, np.float32), policy) is None  # small: shares frames
    assert compression.pack(np.zeros(1 << 16, np.float32), Policy(LZ4, LZ4)) is None  # not a framed codec
    assert compression.pack(np.zeros(1 << 16, ">f4"), policy) is None  # big-endian: swapped when encoded
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    packed = compression.pack(noise, policy)  # kept: frames that store the bytes as they are
    assert packed is not None and packed.packed_nbytes == noise.nbytes + 32


def test_a_chunk_assembler_hands_framed_tensors_over_raw() -> None:
    array = _volume((3 * FRAME_BYTES // 4,), "<f4")
    tensor, payload = tensors.array_to_tensor(array, compression=Policy(SHUFFLE_LZ4, SHUFFLE_LZ4))
    wire = tensor.chunked_nbytes
    assembler = framing.ChunkAssembler([tensor])
    assert assembler.decoding
    for message in framing.serialized_chunks(payload):
        data = framing.chunk_data(message)
        assert data is not None
        assembler.add(data)
    assert (tensor.compression, tensor.chunked_nbytes) == (RAW, array.nbytes) and wire < array.nbytes
    assert np.array_equal(tensors.tensor_to_array(tensor, assembler.payloads()[0]), array)


@pytest.mark.parametrize(
    ("array", "policy", "why"),
    [
        (np.zeros((64, 64), np.float32), Policy(LZ4, RAW), "integer_compression leaves floats raw"),
        (np.zeros(100, np.uint8), Policy(SHUFFLE_LZ4, SHUFFLE_LZ4), "smaller than MIN_COMPRESS_BYTES"),
        (np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8), Policy(LZ4, LZ4), "noise"),
        (np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8), Policy(SHUFFLE_ZSTD, RAW), "noise"),
    ],
)
def test_what_is_not_compressed(array: np.ndarray, policy: Policy, why: str) -> None:
    tensor, _ = tensors.array_to_tensor(array, compression=policy)
    assert tensor.compression == RAW, why


def test_label_maps_shrink_more_with_a_shuffle_and_zstd() -> None:
    labels = np.zeros((64, 64, 64), np.uint8)
    labels[20:40, 10:50, 5:60] = 3
    sizes = {}
    for codec in (LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD):
        tensor, payload = tensors.array_to_tensor(labels, compression=codec, inline_bytes=0)
        sizes[codec] = tensor.chunked_nbytes
        assert np.array_equal(_received(tensor, payload), labels)
    assert max(sizes.values()) * 15 < labels.nbytes


# -- hostile and broken payloads --------------------------------------------------------------------------------------

ARRAY = _volume((FRAME_BYTES // 4 + 1000,), "<f4")  # two frames: a whole one and 4,000 bytes


def _with(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def _first_frame_size(data: bytes) -> int:
    return int.from_bytes(data[12:16], "little")


@pytest.mark.parametrize("codec", FRAMED)
def test_truncated_frames_are_refused(codec: int) -> None:
    data = _frames(ARRAY, codec)
    first = _first_frame_size(data)
    for cut in (10, first - 1, len(data) - 1):
        with pytest.raises(WireError):
            compression.decompress(codec, data[:cut], ARRAY.nbytes, 4)
    half = _frame_sizes(data)[0]
    with pytest.raises(WireError, match=f"decompressed to {half} bytes, expected 2101152"):
        compression.decompress(codec, data[:first], ARRAY.nbytes, 4)  # the last frame missing
    with pytest.raises(FramingError, match=r"bytes left, less than a frame header|compressed bytes, the message holds"):
        _decode(ARRAY, codec, data, messages=[first // 2])  # a frame split across two chunk messages


@pytest.mark.parametrize("codec", FRAMED)
def test_frames_whose_sizes_lie_are_refused_before_decompressing(codec: int) -> None:
    data = _frames(ARRAY, codec)
    first = _first_frame_size(data)
    for nbytes in (FRAME_BYTES + 4, 1 << 30, 0, -1, 6):  # raw size of the first frame: too large, none, part elements
        lying = _with(data, 4, nbytes.to_bytes(4, "little", signed=True))
        with pytest.raises(WireError, match=f"its header says {nbytes} raw bytes; a frame holds whole elements of 4"):
            compression.decompress(codec, lying, ARRAY.nbytes, 4)
    lying = _with(data, 4, (MIN_FRAME_BYTES - 4).to_bytes(4, "little"))  # small, and not the tensor's last frame
    with pytest.raises(WireError, match=f"only a tensor's last frame may hold under {MIN_FRAME_BYTES}"):
        compression.decompress(codec, lying, ARRAY.nbytes, 4)
    for cbytes in (first + 1, 31, 1 << 30):  # compressed size of the first frame
        lying = _with(data, 12, cbytes.to_bytes(4, "little", signed=True))
        with pytest.raises(WireError):
            compression.decompress(codec, lying, ARRAY.nbytes, 4)
    with pytest.raises(WireError, match="already hold all"):  # a frame beyond the tensor's bytes
        compression.decompress(codec, data + data[first:], ARRAY.nbytes, 4)
    # the chunk assembler finds the tensor incomplete when its announced compressed bytes are used up
    with pytest.raises(FramingError, match="decompressed to"):
        _decode(ARRAY, codec, data[:first])


@pytest.mark.parametrize("codec", FRAMED)
def test_a_frame_of_the_wrong_typesize_or_codec_is_refused(codec: int) -> None:
    data = _frames(ARRAY, codec)
    with pytest.raises(WireError, match="typesize 4, the tensor's itemsize is 2"):
        compression.decompress(codec, data, ARRAY.nbytes, 2)
    with pytest.raises(WireError, match="typesize 8, the tensor's itemsize is 4"):
        compression.decompress(codec, _with(data, 3, b"\x08"), ARRAY.nbytes, 4)
    other = SHUFFLE_ZSTD if codec == SHUFFLE_LZ4 else SHUFFLE_LZ4
    with pytest.raises(WireError, match="compressed with blosc2 codec"):
        compression.decompress(other, data, ARRAY.nbytes, 4)


@pytest.mark.parametrize(
    ("offset", "value", "what"),
    [
        (16, b"\x02", "filters"),  # bit shuffle
        (17, b"\x04", "filters"),  # truncated precision (lossy)
        (31, b"\x40", "uninitialised"),  # special value: uninitialised (would hand out stale memory)
        (31, b"\x01", "dictionaries"),
        (31, b"\x08", "lazy"),
        (2, b"\x21", "not a blosc2 frame"),  # no extended header
        (2, b"\xc5", "codec"),  # a user-defined codec
    ],
)
def test_frames_with_features_this_format_does_not_use_are_refused(offset: int, value: bytes, what: str) -> None:
    data = _frames(ARRAY, SHUFFLE_LZ4)
    with pytest.raises(WireError, match=what):
        compression.decompress(SHUFFLE_LZ4, _with(data, offset, value), ARRAY.nbytes, 4)


def test_a_decompression_bomb_allocates_nothing_it_was_not_allowed() -> None:
    """16 GiB of zeros is a few KiB of frames; the receiver allocates the shape's bytes, which it bounds first."""
    huge = tensor_pb2.Tensor(
        dtype=tensors.dtype_to_proto(np.dtype("u1")), shape=[1 << 34], compression=SHUFFLE_LZ4, chunked_nbytes=8192
    )
    with pytest.raises(FramingError, match="tensors announce 17179869184 payload bytes, more than the 1048576"):
        framing.ChunkAssembler([huge], max_bytes=1 << 20)
    huge.shape[0] = (1 << 34) + 1
    with pytest.raises(WireError, match="over 17179869184"):
        framing.ChunkAssembler([huge])
    # a frame that claims more raw bytes than the tensor has is refused before blosc2 sees it
    zeros = _frames(np.zeros(FRAME_BYTES, np.uint8), SHUFFLE_LZ4)
    assert len(zeros) <= 64
    with pytest.raises(WireError, match=r"its header says 2097152 raw bytes; .* at most 4096 here"):
        compression.decompress(SHUFFLE_LZ4, zeros, 4096, 1)


@pytest.mark.parametrize("codec", FRAMED)
def test_corrupt_frame_bodies_are_wire_errors_never_crashes(codec: int) -> None:
    data = _frames(ARRAY, codec)
    rng = np.random.default_rng(7)
    refused = 0
    for _ in range(300):
        broken = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            broken[int(rng.integers(0, len(broken)))] = int(rng.integers(0, 256))
        try:
            out = compression.decompress(codec, bytes(broken), ARRAY.nbytes, 4)
        except WireError:
            refused += 1
        else:
            assert len(out) == ARRAY.nbytes  # a flip blosc2 cannot see (no checksums) still fills the tensor exactly
    assert refused > 0


def test_corrupt_and_unknown_lz4_payloads_are_wire_errors() -> None:
    tensor, _ = tensors.array_to_tensor(np.zeros((300, 300), np.uint8), compression=LZ4)
    tensor.data = tensor.data[: len(tensor.data) // 2]
    with pytest.raises(WireError, match="LZ4-compressed tensor"):
        tensors.tensor_to_array(tensor)
    with pytest.raises(WireError, match="unknown compression"):
        compression.decompress(99, b"x", 1)
