"""LZ4 for label maps: integer and bool tensors travel compressed when the client asks, everything else raw, and
what arrives equals the file bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, spec_pb2, tensor_pb2
from patchwire.wire import compression, framing, tensors

from _datasets import write_arrays_dataset
from _servers import server_in_thread

SHAPE = (24, 64, 48)
LZ4 = compression.Compression.COMPRESSION_LZ4
RAW = compression.Compression.COMPRESSION_UNSPECIFIED


def _blocky_labels(rng: np.random.Generator) -> np.ndarray:
    """A label map as segmentations look: large constant regions."""
    labels = np.zeros(SHAPE, np.uint8)
    for value in range(1, 5):
        z, y, x = (int(rng.integers(0, n // 2)) for n in SHAPE)
        labels[z : z + SHAPE[0] // 2, y : y + SHAPE[1] // 2, x : x + SHAPE[2] // 2] = value
    return labels


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    rng = np.random.default_rng(5)
    subjects = [
        {
            "images": {"T1": rng.normal(size=SHAPE).astype(np.float32)},
            # subject 1's labels are noise: LZ4 cannot shrink them, so they must travel raw
            "labels": {"GT": _blocky_labels(rng) if i == 0 else rng.integers(0, 256, SHAPE, dtype=np.uint8)},
        }
        for i in range(2)
    ]
    path = write_arrays_dataset(tmp_path_factory.mktemp("labelled") / "labelled.h5", subjects)
    with server_in_thread({"labelled": path}) as server:
        yield server.address, path


def _batches(address: str, compression: int, subject: str) -> list[dataset_service_pb2.Batch]:
    spec = spec_pb2.DatasourceSpec(
        dataset="labelled",
        indexing_strategy=extr.SliceIndexing()._to_proto(),
        extractor=extr.DataExtractor(categories=("images", "labels"))._to_proto(),
        subject_subset=spec_pb2.StringList(values=[subject]),
    )
    request = dataset_service_pb2.StreamBatchesRequest(spec=spec, batch_size=8, integer_compression=compression)
    with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        return [r.batch for r in stub.StreamBatches(request) if r.WhichOneof("payload") == "batch"]


def _field(batch: dataset_service_pb2.Batch, key: str) -> tensor_pb2.Tensor:
    (field,) = [f for f in batch.fields if f.key == key]
    return field.stacked


def test_label_maps_travel_compressed_and_images_raw(labelled: tuple[str, Path]) -> None:
    address, _ = labelled
    packed, raw = _batches(address, LZ4, "S0"), _batches(address, RAW, "S0")
    assert {_field(b, "labels").compression for b in packed} == {LZ4}
    assert {_field(b, "images").compression for b in packed} == {RAW}
    assert {_field(b, "labels").compression for b in raw} == {RAW}
    packed_bytes = sum(len(_field(b, "labels").data) for b in packed)
    raw_bytes = sum(len(_field(b, "labels").data) for b in raw)
    assert packed_bytes * 5 < raw_bytes


def test_incompressible_label_maps_travel_raw(labelled: tuple[str, Path]) -> None:
    address, _ = labelled
    assert {_field(b, "labels").compression for b in _batches(address, LZ4, "S1")} == {RAW}


@pytest.mark.parametrize("label_compression", ["lz4", None])
def test_samples_equal_the_file_with_and_without_compression(
    labelled: tuple[str, Path], label_compression: str | None
) -> None:
    address, path = labelled
    with h5py.File(path, "r") as f:
        files = [(f[f"data/images/{s}"][()], f[f"data/labels/{s}"][()]) for s in range(2)]
    with pw.connect(address) as client:
        ds = client.datasource(
            "labelled",
            extr.SliceIndexing(),
            extr.DataExtractor(categories=("images", "labels")),
            label_compression=label_compression,
        )
        seen = 0
        for batch in ds.batches(batch_size=5, shuffle=True):
            for k, i in enumerate(batch[defs.KEY_SAMPLE_INDEX]):
                images, labels = files[int(i) // SHAPE[0]]
                assert np.array_equal(batch[defs.KEY_LABELS][k], labels[int(i) % SHAPE[0]])
                assert np.array_equal(batch[defs.KEY_IMAGES][k], images[int(i) % SHAPE[0]])
            assert batch[defs.KEY_LABELS].flags.writeable
            seen += len(batch[defs.KEY_SAMPLE_INDEX])
        assert seen == 2 * SHAPE[0]
        whole = ds.get_samples([0, SHAPE[0]])
        assert np.array_equal(whole[1][defs.KEY_LABELS], files[1][1][0])


def test_an_unknown_codec_is_invalid_argument(labelled: tuple[str, Path]) -> None:
    address, _ = labelled
    with pytest.raises(grpc.RpcError) as info:
        _batches(address, 7, "S0")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "integer_compression: unknown codec 7" in (info.value.details() or "")


def test_a_client_rejects_an_unknown_codec_name() -> None:
    with pytest.raises(ValueError, match="label_compression must be None or 'lz4'"):
        pw.Client("127.0.0.1:1").datasource("x", label_compression="gzip")


_RUNS = np.repeat(np.random.default_rng(3).integers(0, 256, 1 << 21, dtype=np.uint8), 8).reshape(64, -1)


@pytest.mark.parametrize(
    ("array", "compressed", "chunked"),
    [
        (np.zeros((300, 300), np.uint8), True, False),  # inline once compressed
        (_RUNS, True, True),  # 16 MiB of runs: compressed, and still more than one chunk
        (np.zeros(1000, np.uint8), False, False),  # below MIN_COMPRESS_BYTES
        (np.zeros((300, 300), np.float32), False, True),  # not an integer dtype; above INLINE_MAX_BYTES
        (np.ones((100, 100), np.bool_), True, False),
        (np.zeros((300, 300), ">i4"), True, False),  # swapped to little-endian first
    ],
)
def test_codec_round_trips(array: np.ndarray, compressed: bool, chunked: bool) -> None:
    parts = list(array[:, None]) if array.ndim > 1 else [array]
    tensor, payload = tensors.stacked_to_tensor(parts, compression=LZ4)
    assert (tensor.compression == LZ4) is compressed
    assert (payload is not None) is chunked
    if payload is not None:
        assert (tensor.chunked_nbytes < array.nbytes) is compressed
        assembler = framing.ChunkAssembler([tensor])
        for message in framing.serialized_chunks(payload):
            data = framing.chunk_data(message)
            assert data is not None
            assembler.add(data)
        (buffer,) = assembler.payloads()
        out = tensors.tensor_to_array(tensor, buffer)
    else:
        out = tensors.tensor_to_array(tensor)
    assert out.dtype == array.dtype.newbyteorder("<") and np.array_equal(out.reshape(array.shape), array)


def test_a_corrupt_compressed_payload_is_a_value_error() -> None:
    tensor, _ = tensors.array_to_tensor(np.zeros((300, 300), np.uint8), compression=LZ4)
    assert tensor.compression == LZ4
    tensor.data = tensor.data[: len(tensor.data) // 2]
    with pytest.raises(ValueError, match="LZ4-compressed tensor"):
        tensors.tensor_to_array(tensor)
