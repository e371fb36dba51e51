"""Compression against real servers: what travels compressed for each codec and request field, samples that equal
the file (and the raw stream) bit for bit for float images and label maps through GetSamples and StreamBatches,
chunked tensors of several frames, wire bytes in the client's stats, predictions posted compressed, and negotiation
(auto off on loopback, explicit codecs on, codecs a server does not offer refused, ``--compression none``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h5py
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import _compression
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.v1 import (
    assembly_service_pb2,
    assembly_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    server_service_pb2,
    server_service_pb2_grpc,
    spec_pb2,
    tensor_pb2,
)
from patchwire.wire import compression, framing, tensors
from patchwire.wire.compression import Policy

from _datasets import write_arrays_dataset
from _servers import server_in_thread, server_subprocess

SHAPE = (24, 64, 48)
BIG = (48, 128, 96)  # 4.7 MB of float32 images per subject: three frames each
RAW = compression.Compression.COMPRESSION_UNSPECIFIED
LZ4 = compression.Compression.COMPRESSION_LZ4
SHUFFLE_LZ4 = compression.Compression.COMPRESSION_SHUFFLE_LZ4
SHUFFLE_ZSTD = compression.Compression.COMPRESSION_SHUFFLE_ZSTD
CATEGORIES = ("images", "labels")
EXTRACTOR = extr.DataExtractor(categories=CATEGORIES)


def _blocky_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A label map as segmentations look: large constant regions."""
    labels = np.zeros(shape, np.uint8)
    for value in range(1, 5):
        z, y, x = (int(rng.integers(0, n // 2)) for n in shape)
        labels[z : z + shape[0] // 2, y : y + shape[1] // 2, x : x + shape[2] // 2] = value
    return labels


def _stripped(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A skull-stripped scan: intensities inside an ellipsoid, exact zeros around it."""
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((a - n / 2) / (n / 2.6)) ** 2 for a, n in zip(axes, shape, strict=True)) < 1
    return (rng.normal(500, 80, shape) * inside).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("compression")
    labelled = [
        {
            "images": {"T1": _stripped(rng, SHAPE), "T2": _stripped(rng, SHAPE)},
            # subject 1's labels are noise: no codec shrinks them, so they must travel raw
            "labels": {"GT": _blocky_labels(rng, SHAPE) if i == 0 else rng.integers(0, 256, SHAPE, dtype=np.uint8)},
        }
        for i in range(2)
    ]
    big = [
        {"images": {"T1": _stripped(rng, BIG), "T2": _stripped(rng, BIG)}, "labels": {"GT": _blocky_labels(rng, BIG)}}
        for _ in range(2)
    ]
    return {
        "labelled": write_arrays_dataset(folder / "labelled.h5", labelled),
        "big": write_arrays_dataset(folder / "big.h5", big),
    }


@pytest.fixture(scope="module")
def address(files: dict[str, Path]) -> Iterator[str]:
    with server_in_thread(files) as server:
        yield server.address


def _spec(dataset: str, subject: str | None = None, indexing: Any = None) -> spec_pb2.DatasourceSpec:
    spec = spec_pb2.DatasourceSpec(
        dataset=dataset,
        indexing_strategy=(indexing or extr.SliceIndexing())._to_proto(),
        extractor=extr.DataExtractor(categories=CATEGORIES)._to_proto(),
    )
    if subject is not None:
        spec.subject_subset.values.append(subject)
    return spec


def _batches(address: str, subject: str, integer_compression: int = RAW, codec: int = RAW) -> list[Any]:
    """The Batch messages of a StreamBatches call, as the server sent them."""
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=_spec("labelled", subject), batch_size=8, integer_compression=integer_compression, compression=codec
    )
    with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        return [r.batch for r in stub.StreamBatches(request) if r.WhichOneof("payload") == "batch"]


def _field(batch: Any, key: str) -> tensor_pb2.Tensor:
    (field,) = [f for f in batch.fields if f.key == key]
    return field.stacked


def _file_arrays(path: Path, subjects: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return [(f[f"data/images/{s}"][()], f[f"data/labels/{s}"][()]) for s in range(subjects)]


# -- what travels compressed ------------------------------------------------------------------------------------------


def test_integer_compression_compresses_label_maps_and_leaves_images_raw(address: str) -> None:
    packed, raw = _batches(address, "S0", integer_compression=LZ4), _batches(address, "S0")
    assert {_field(b, "labels").compression for b in packed} == {LZ4}
    assert {_field(b, "images").compression for b in packed} == {RAW}
    assert {_field(b, "labels").compression for b in raw} == {RAW}
    packed_bytes = sum(len(_field(b, "labels").data) for b in packed)
    raw_bytes = sum(len(_field(b, "labels").data) for b in raw)
    assert packed_bytes * 5 < raw_bytes


@pytest.mark.parametrize("codec", [SHUFFLE_LZ4, SHUFFLE_ZSTD])
def test_compression_compresses_images_and_labels(address: str, codec: int) -> None:
    """``compression`` covers float images too, and wins over ``integer_compression``."""
    batches = _batches(address, "S0", integer_compression=LZ4, codec=codec)
    assert {_field(b, "images").compression for b in batches} == {codec}
    assert {_field(b, "labels").compression for b in batches} == {codec}
    images = [_field(b, "images") for b in batches]
    raw = sum(tensors.raw_nbytes(t) for t in images)
    assert sum(t.chunked_nbytes or len(t.data) for t in images) * 2 < raw


def test_incompressible_label_maps_travel_raw(address: str) -> None:
    assert {_field(b, "labels").compression for b in _batches(address, "S1", LZ4)} == {RAW}
    assert {_field(b, "labels").compression for b in _batches(address, "S1", codec=SHUFFLE_LZ4)} == {RAW}


# -- what arrives -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connect", "datasource"),
    [
        ({"compression": "none"}, {"label_compression": "lz4"}),
        ({"compression": "shuffle-lz4"}, {}),
        ({}, {"compression": "shuffle-zstd"}),
        ({"compression": "lz4"}, {}),
    ],
)
def test_streams_and_reads_equal_the_file_bit_for_bit(
    address: str, files: dict[str, Path], connect: dict[str, str], datasource: dict[str, str]
) -> None:
    arrays = _file_arrays(files["labelled"])
    with pw.connect(address, **connect) as client:
        ds = client.datasource(  # (GetSamples over the wire: shared memory would carry it on this host)
            "labelled", extr.SliceIndexing(), extr.DataExtractor(CATEGORIES), shared_memory=False, **datasource
        )
        seen = 0
        for batch in ds.batches(batch_size=5, shuffle=True):
            for k, i in enumerate(batch[defs.KEY_SAMPLE_INDEX]):
                images, labels = arrays[int(i) // SHAPE[0]]
                assert np.array_equal(batch[defs.KEY_LABELS][k], labels[int(i) % SHAPE[0]])
                assert np.array_equal(batch[defs.KEY_IMAGES][k], images[int(i) % SHAPE[0]])
                assert batch[defs.KEY_IMAGES].dtype == np.float32
            assert batch[defs.KEY_LABELS].flags.writeable and batch[defs.KEY_IMAGES].flags.writeable
            seen += len(batch[defs.KEY_SAMPLE_INDEX])
        assert seen == 2 * SHAPE[0]
        whole = ds.get_samples([0, SHAPE[0] + 3])
        assert np.array_equal(whole[0][defs.KEY_IMAGES], arrays[0][0][0])
        assert np.array_equal(whole[1][defs.KEY_LABELS], arrays[1][1][3])


@pytest.mark.parametrize("codec", ["shuffle-lz4", "shuffle-zstd"])
def test_compressed_streams_equal_raw_ones(address: str, codec: str) -> None:
    """The same epoch (shuffled, seeded) raw and compressed: every array equal, dtypes and shapes too."""
    with pw.connect(address, compression="none") as plain, pw.connect(address, compression=codec) as packed:
        streams = [
            c.datasource("labelled", extr.SliceIndexing(2), extr.DataExtractor(categories=CATEGORIES)).batches(
                batch_size=3, shuffle=True, seed=4
            )
            for c in (plain, packed)
        ]
        count = 0
        for raw, compressed in zip(*streams, strict=True):
            assert raw.keys() == compressed.keys()
            for key, value in raw.items():
                assert value.dtype == compressed[key].dtype and np.array_equal(value, compressed[key]), key
            count += 1
        assert count == -(-2 * SHAPE[2] // 3)


@pytest.mark.parametrize("codec", ["shuffle-lz4", "shuffle-zstd"])
def test_whole_volumes_of_several_frames_arrive_exact(address: str, files: dict[str, Path], codec: str) -> None:
    """Whole subjects (two 4.7 MB float32 volumes a sample, stacked into one 9.4 MB tensor of five frames, chunked)
    through GetSamples and StreamBatches."""
    arrays = _file_arrays(files["big"])
    with pw.connect(address, compression=codec) as client:
        ds = client.datasource(
            "big", extr.EmptyIndexing(), extr.DataExtractor(categories=CATEGORIES), shared_memory=False
        )
        assert ds.codec == codec
        samples = ds.get_samples([0, 1])
        (batch,) = list(ds.batches(batch_size=2))
        for s in range(2):
            assert np.array_equal(samples[s][defs.KEY_IMAGES], arrays[s][0])
            assert np.array_equal(batch[defs.KEY_IMAGES][s], arrays[s][0])
            assert np.array_equal(batch[defs.KEY_LABELS][s], arrays[s][1])
        stats = ds.stats.snapshot()
        assert stats.bytes == 2 * sum(a.nbytes + b.nbytes for a, b in arrays)
        assert stats.compression_ratio > 2, stats
        assert "on the wire" in stats.summary()
    # the raw messages: five frames of blosc2, whole frames per chunk message
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=_spec("big", indexing=extr.EmptyIndexing()),
        batch_size=2,
        compression=compression.codec_from_name(codec),
    )
    with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
        responses = list(dataset_service_pb2_grpc.DatasetServiceStub(channel).StreamBatches(request))
    images = _field(responses[0].batch, "images")
    assert images.compression == compression.codec_from_name(codec)
    assert tensors.raw_nbytes(images) == 2 * arrays[0][0].nbytes > 4 * compression.FRAME_BYTES
    chunks = [r.chunk.data for r in responses[1:]]
    assert sum(len(c) for c in chunks) == sum(t.chunked_nbytes for t in framing.batch_tensors(responses[0].batch))


@pytest.mark.parametrize("codec", ["shuffle-lz4", "shuffle-zstd"])
def test_epochs_sent_from_samples_kept_compressed_equal_the_file(files: dict[str, Path], codec: str) -> None:
    """The second epoch comes from the server's samples kept compressed (none read or compressed again): every
    array equal to the file, and the very bytes the first epoch sent."""
    arrays = _file_arrays(files["labelled"])
    wire_value = compression.codec_from_name(codec)
    request = dataset_service_pb2.StreamBatchesRequest(spec=_spec("labelled"), batch_size=8, compression=wire_value)
    with server_in_thread(files) as server, pw.connect(server.address, compression=codec) as client:
        assert server.packed is not None
        with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
            stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            first = [r.SerializeToString() for r in stub.StreamBatches(request)]
            assert (server.packed.hits, server.packed.misses) == (0, 2 * SHAPE[0])
            assert [r.SerializeToString() for r in stub.StreamBatches(request)] == first
        assert (server.packed.hits, server.packed.misses) == (2 * SHAPE[0], 2 * SHAPE[0])  # nothing built again
        ds = client.datasource("labelled", extr.SliceIndexing(), EXTRACTOR, shared_memory=False)
        for epoch in range(2):
            for batch in ds.batches(batch_size=5, shuffle=True, seed=epoch):
                for k, i in enumerate(batch[defs.KEY_SAMPLE_INDEX]):
                    images, labels = arrays[int(i) // SHAPE[0]]
                    assert np.array_equal(batch[defs.KEY_IMAGES][k], images[int(i) % SHAPE[0]])
                    assert np.array_equal(batch[defs.KEY_LABELS][k], labels[int(i) % SHAPE[0]])
        assert (server.packed.hits, server.packed.misses) == (6 * SHAPE[0], 2 * SHAPE[0])
        assert server.packed.nbytes > 0


def test_stats_without_compression_count_the_same_bytes_on_the_wire(address: str) -> None:
    with pw.connect(address, compression="none") as client:
        ds = client.datasource("big", extr.EmptyIndexing(), extr.DataExtractor(categories=CATEGORIES))
        for _ in ds.batches(batch_size=1):
            pass
        stats = ds.stats.snapshot()
        assert 0.99 < stats.compression_ratio <= 1.0
        assert "on the wire" not in stats.summary()


# -- predictions posted compressed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD])
def test_predictions_posted_compressed_assemble_exactly(address: str, codec: int) -> None:
    """Predictions posted compressed (float32 with a zero background, chunked or inline) assemble into exactly the
    volume posted."""
    rng = np.random.default_rng(1)
    volume = _stripped(rng, SHAPE)[..., None]  # (z, y, x, 1) float32 with a zero background
    with pw.connect(address, compression="none") as client:
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=("images",)))
        assembler = client.assembler(ds, shared_memory=False)
        assembler.add_batch({"predictions": volume[:1]}, np.array([0]))  # the job; the rest posted by hand below
        job_id = assembler.job_id
        batch = assembly_service_pb2.PredictionBatch(job_id=job_id, sample_indices=list(range(1, SHAPE[0])))
        tensor, payload = tensors.stacked_to_tensor(list(volume[1:]), compression=Policy(codec, codec))
        assert tensor.compression == codec  # chunked, or inline where it compresses into 64 KiB (shuffle-zstd)
        batch.fields.add(key="predictions", stacked=tensor)
        requests = [assembly_service_pb2.PostPredictionsRequest(batch=batch).SerializeToString()]
        requests += list(framing.serialized_chunks(payload)) if payload is not None else []
        with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
            post = channel.stream_stream(
                "/patchwire.v1.AssemblyService/PostPredictions",
                request_serializer=framing.passthrough_serializer,
                response_deserializer=assembly_service_pb2.PostPredictionsResponse.FromString,
            )
            (response,) = list(post(iter(requests)))
        assert response.accepted_samples == SHAPE[0] - 1
        assert np.array_equal(assembler.fetch(0)[0]["predictions"], volume)


@pytest.mark.parametrize("codec", ["shuffle-lz4", "shuffle-zstd"])
def test_the_assembler_posts_and_fetches_compressed_where_its_datasource_reads_compressed(
    address: str, codec: str
) -> None:
    """Over the wire with a datasource that reads compressed, predictions (float32, zero background) are posted
    compressed and the finished volume comes back compressed; it is exact."""
    volume = _stripped(np.random.default_rng(3), SHAPE)[..., None]
    with pw.connect(address, compression=codec) as client:
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=("images",)))
        assembler = client.assembler(ds, shared_memory=False)
        for start in range(0, SHAPE[0], 8):
            assembler.add_batch(volume[start : start + 8], np.arange(start, start + 8))
        assembler.flush()
        assert np.array_equal(assembler.get_assembled_subject(0), volume)
        assert assembler.transport.statistics.posted_wire_bytes * 2 < volume.nbytes
        assert 0 < assembler.transport.statistics.fetched_wire_bytes * 2 < volume.nbytes
    with pw.connect(address, compression="none") as client:  # the same volume fetched raw
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=("images",)))
        raw = client.assembler(ds, shared_memory=False, job_id=assembler.job_id)
        (fetched,) = raw.fetch(0)[0].values()
        assert np.array_equal(fetched, volume)
        assert raw.transport.statistics.fetched_wire_bytes > volume.nbytes


def test_a_corrupt_compressed_post_is_invalid_argument(address: str) -> None:
    with pw.connect(address, compression="none") as client:
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=("images",)))
        assembler = client.assembler(ds, shared_memory=False)
        assembler.add_batch({"predictions": np.zeros((1, *SHAPE[1:], 1), np.float32)}, np.array([0]))
        batch = assembly_service_pb2.PredictionBatch(job_id=assembler.job_id, sample_indices=[1, 2, 3, 4])
        array = _stripped(np.random.default_rng(2), (4, *SHAPE[1:], 1))
        policy = Policy(SHUFFLE_LZ4, SHUFFLE_LZ4)
        tensor, payload = tensors.stacked_to_tensor(list(array), inline_bytes=0, compression=policy)
        assert payload is not None
        batch.fields.add(key="predictions", stacked=tensor)
        chunk = payload[0].joined()
        broken = chunk[:3] + b"\x02" + chunk[4:]  # a typesize that is not float32's
        requests = [
            assembly_service_pb2.PostPredictionsRequest(batch=batch),
            assembly_service_pb2.PostPredictionsRequest(chunk=tensor_pb2.TensorChunk(data=broken)),
        ]
        with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
            stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.PostPredictions(iter(requests)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "typesize 2, the tensor's itemsize is 4" in (info.value.details() or "")


# -- negotiation ------------------------------------------------------------------------------------------------------


def _server_info(address: str) -> server_service_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        stub = server_service_pb2_grpc.ServerServiceStub(channel)
        info: server_service_pb2.GetServerInfoResponse = stub.GetServerInfo(server_service_pb2.GetServerInfoRequest())
        return info


def test_a_server_offers_every_codec_by_default_and_auto_is_off_on_loopback(address: str) -> None:
    assert list(_server_info(address).compressions) == [LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD]
    with pw.connect(address) as client:
        assert client.compression == "auto"
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=CATEGORIES))
        assert (ds.compression, ds.codec) == ("auto", "none")
        for _ in ds.batches(batch_size=8):
            pass
        assert 0.99 < ds.stats.snapshot().compression_ratio <= 1.0
        explicit = client.datasource("labelled", extr.SliceIndexing(), compression="shuffle-lz4")
        assert explicit.codec == "shuffle-lz4"


def test_auto_picks_the_first_codec_a_server_on_another_host_offers(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers on loopback here, so the target is taken for another host's."""
    monkeypatch.setattr(_compression, "is_local_target", lambda target: False)
    with pw.connect(address) as client:
        ds = client.datasource("labelled", extr.SliceIndexing(), extr.DataExtractor(categories=CATEGORIES))
        assert ds.codec == "shuffle-lz4"
        assert ds.stats.snapshot().wire_bytes == 0
        for _ in ds.batches(batch_size=8):
            pass
        assert ds.stats.snapshot().compression_ratio > 1.5


def test_a_codec_the_server_does_not_offer_is_refused_naming_the_offered_ones(files: dict[str, Path]) -> None:
    with (
        server_in_thread(files, compressions=("lz4",)) as server,
        pw.connect(server.address, compression="shuffle-zstd") as client,
    ):
        assert list(_server_info(server.address).compressions) == [LZ4]
        ds = client.datasource("labelled", extr.SliceIndexing(), shared_memory=False)
        with pytest.raises(pw.InvalidArgumentError, match="does not offer shuffle-zstd \\(it offers lz4\\)"):
            ds[0]
        with pytest.raises(pw.InvalidArgumentError, match="compression: this server does not offer shuffle-zstd"):
            next(iter(ds.batches()))
        with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
            fetch = assembly_service_pb2_grpc.AssemblyServiceStub(channel).FetchSubject
            request = assembly_service_pb2.FetchSubjectRequest(job_id="any", compression=SHUFFLE_ZSTD)
            with pytest.raises(grpc.RpcError) as refused:
                list(fetch(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "compression: this server does not offer shuffle-zstd (it offers lz4)" in str(refused.value.details())
        # a client on another host with "auto" finds no blosc2 codec and takes the one offered
        assert _compression.resolve("lz4", client._connection) == LZ4


@pytest.mark.slow
def test_a_server_started_with_compression_none_offers_none(files: dict[str, Path]) -> None:
    with server_subprocess({"labelled": files["labelled"]}, ("--compression", "none")) as address:
        assert list(_server_info(address).compressions) == []
        with pw.connect(address, compression="shuffle-lz4") as client:
            ds = client.datasource("labelled", extr.SliceIndexing(), shared_memory=False)
            with pytest.raises(pw.InvalidArgumentError, match="it offers no compression"):
                ds.get_samples([0])
            labels = client.datasource("labelled", label_compression="lz4", compression="none", shared_memory=False)
            with pytest.raises(pw.InvalidArgumentError, match="integer_compression: this server does not offer lz4"):
                labels.get_samples([0])
            plain = client.datasource("labelled", extr.SliceIndexing(), EXTRACTOR, compression="none")
            assert len(plain.get_samples([0, 1])) == 2
            # reads that shared memory carries ask for no compression: served whatever the codec
            assert len(client.datasource("labelled", extr.SliceIndexing(), EXTRACTOR).get_samples([0, 1])) == 2
        assert _compression.server_offers(client._connection) == ()


def test_an_unknown_codec_is_invalid_argument(address: str) -> None:
    for field in ("integer_compression", "compression"):
        with pytest.raises(grpc.RpcError) as info:
            _batches(address, "S0", **{field: 7} if field == "integer_compression" else {"codec": 7})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field}: unknown codec 7" in (info.value.details() or "")


def test_a_client_rejects_unknown_compression_names() -> None:
    with pytest.raises(ValueError, match="label_compression must be None or one of lz4"):
        pw.Client("127.0.0.1:1").datasource("x", label_compression="gzip")
    with pytest.raises(ValueError, match="compression must be one of 'auto', 'none', 'lz4'"):
        pw.Client("127.0.0.1:1", compression="gzip")
