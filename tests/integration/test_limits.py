"""Limits: every request that would make the server grow beyond a configured limit is refused with
RESOURCE_EXHAUSTED (INVALID_ARGUMENT where the request is malformed rather than large), the message names the limit's
flag, and the server goes on serving correct data; work for a client that has gone stops within a sample; refused
requests leave no memory behind.

Long because there is one refusal per limit, each on a server configured for it, plus the memory check over all of
them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service._limits import Limits
from patchwire.v1 import (
    assembly_service_pb2 as apb,
)
from patchwire.v1 import (
    assembly_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    spec_pb2,
    tensor_pb2,
)
from patchwire.wire import framing, tensors

from _checks import eventually, expect_raw
from _datasets import make_pymia_dataset
from _servers import serve_process, threaded_server

T = TypeVar("T")
RPC_TIMEOUT_S = 30
SHAPE = (20, 24, 16)  # every subject of "tiny"
LIMITS = Limits(
    max_calls_per_identity=3,
    max_jobs_per_identity=2,
    max_jobs=3,
    max_post_bytes=1 << 20,
    max_sample_bytes=1 << 20,
    max_batch_size=1000,
    max_batch_bytes=2 << 20,
    max_indices=100,
    max_subjects=10,
    max_epoch_samples=200,
    max_spec_depth=4,
    max_repeated=50,
)


# -- helpers ----------------------------------------------------------------------------------------------------------


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (a plaintext loopback channel: the client library sends
    tokens over TLS only, raw stubs do as they are told)."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


@contextlib.contextmanager
def stubs(address: str, token: str | None = None) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(address, options=framing.channel_options()) as plain:
        channel = plain if token is None else grpc.intercept_channel(plain, _Bearer(token))
        yield (
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            assembly_service_pb2_grpc.AssemblyServiceStub(channel),
        )


def spec(
    indexing: spec_pb2.IndexingStrategy | None = None,
    transform: spec_pb2.Transform | None = None,
    extractor: spec_pb2.Extractor | None = None,
    subjects: Sequence[str] | None = None,
) -> spec_pb2.DatasourceSpec:
    out = spec_pb2.DatasourceSpec(
        dataset="tiny", extractor=extractor or spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))
    )
    if indexing is not None:
        out.indexing_strategy.CopyFrom(indexing)
    if transform is not None:
        out.transform.CopyFrom(transform)
    if subjects is not None:
        out.subject_subset.values.extend(subjects)
    return out


VOXELS = spec_pb2.IndexingStrategy(voxel_wise=spec_pb2.VoxelWiseIndexing(image_dimension=3))
SLICES = spec_pb2.IndexingStrategy(slice=spec_pb2.SliceIndexing(slice_axis=[0]))


def get_samples(dstub: Any, request_spec: spec_pb2.DatasourceSpec, indices: Sequence[int]) -> list[Any]:
    request = dataset_service_pb2.GetSamplesRequest(spec=request_spec, sample_indices=list(indices))
    return list(dstub.GetSamples(request, timeout=RPC_TIMEOUT_S))


def indices_of(messages: Sequence[Any]) -> list[int]:
    """The sample indices of the batches of a sample stream."""
    return [int(i) for m in messages if m.HasField("batch") for i in m.batch.sample_indices]


def nested_transforms(depth: int) -> spec_pb2.Transform:
    """``depth`` ComposeTransforms inside each other around one SizeCorrection, built without the recursion of
    protobuf's parser (the client library never builds such a spec)."""
    inner = spec_pb2.Transform(size_correction=spec_pb2.SizeCorrection(entries=["images"]))
    for _ in range(depth):
        inner = spec_pb2.Transform(compose=spec_pb2.ComposeTransform(transforms=[inner]))
    return inner


def nested_bytes(depth: int) -> bytes:
    """The wire bytes of a GetSamplesRequest whose spec nests ``depth`` ComposeTransforms, written by hand (protobuf
    refuses to build messages this deep)."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    transform = field(9, b"")  # Transform.size_correction
    for _ in range(depth):
        transform = field(11, field(1, transform))  # Transform.compose(ComposeTransform.transforms)
    datasource = spec(SLICES).SerializeToString() + field(4, transform)
    return field(1, datasource) + field(2, b"\x00")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def slice_job(astub: Any, job_id: str) -> None:
    astub.CreateJob(
        apb.CreateJobRequest(
            spec=spec(SLICES),
            entries=[apb.OutputEntry(name="seg", channels=1, dtype=tensor_pb2.DATA_TYPE_FLOAT32)],
            job_id=job_id,
            overlap_mode=apb.OVERLAP_MODE_OVERWRITE,
        ),
        timeout=RPC_TIMEOUT_S,
    )


def post(astub: Any, job_id: str, indices: Sequence[int], value: float = 1.0) -> list[Any]:
    """Posts slice predictions (24 x 16 x 1 float32 each) as the client would, chunks and all."""
    arr = np.full((len(indices), 24, 16, 1), value, np.float32)
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=list(indices))
    tensor, payload = tensors.array_to_tensor(arr, inline_bytes=0)
    batch.fields.add(key="seg", stacked=tensor)
    requests = [apb.PostPredictionsRequest(batch=batch)]
    if payload is not None:
        requests += [apb.PostPredictionsRequest(chunk=tensor_pb2.TensorChunk(data=c)) for c in framing.chunks(payload)]
    return list(astub.PostPredictions(iter(requests), timeout=RPC_TIMEOUT_S))


def announced(job_id: str, shape: Sequence[int], chunked_nbytes: int) -> apb.PostPredictionsRequest:
    """A batch that announces a float32 tensor of ``shape`` with a chunked payload of ``chunked_nbytes``."""
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=list(shape), chunked_nbytes=chunked_nbytes)
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=[0])
    batch.fields.add(key="seg", stacked=tensor)
    return apb.PostPredictionsRequest(batch=batch)


def chunk(nbytes: int) -> apb.PostPredictionsRequest:
    return apb.PostPredictionsRequest(chunk=tensor_pb2.TensorChunk(data=bytes(nbytes)))


def image_of(client: pw.Client, subject: int = 0) -> np.ndarray:
    ds = client.datasource("tiny", extr.EmptyIndexing(), extr.DataExtractor(categories=("images",)))
    try:
        return np.asarray(ds[subject]["images"])
    finally:
        ds.close()


# -- a server with small limits ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tiny_h5: Path) -> Iterator[Any]:
    with threaded_server({"tiny": tiny_h5}, limits=LIMITS) as handle:
        yield handle


@pytest.fixture(scope="module")
def reference(tiny_h5: Path) -> np.ndarray:
    """Subject 0's images, read by a server without limits."""
    with threaded_server({"tiny": tiny_h5}) as handle, pw.connect(handle.server.address) as client:
        return image_of(client)


@pytest.fixture
def dstub(limited: Any, reference: np.ndarray) -> Iterator[Any]:
    """A DatasetService stub on the limited server; after the test the server still serves subject 0 exactly and
    holds no call open."""
    with stubs(limited.server.address) as (d, _):
        yield d
    with pw.connect(limited.server.address) as client:
        np.testing.assert_array_equal(image_of(client), reference)
    eventually(lambda: limited.server.calls.total, lambda n: n == 0)


@pytest.fixture
def astub(limited: Any, dstub: Any) -> Iterator[Any]:
    """An AssemblyService stub on the limited server; every job is deleted after the test."""
    with stubs(limited.server.address) as (_, a):
        yield a
        for job in a.ListJobs(apb.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs:
            a.DeleteJob(apb.DeleteJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT_S)


# -- calls and streams ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_streams(astub: Any, count: int) -> Iterator[None]:
    """``count`` PostPredictions streams held open (their requests wait) until the block ends."""
    release = threading.Event()

    def requests() -> Iterator[apb.PostPredictionsRequest]:
        release.wait(RPC_TIMEOUT_S)
        return
        yield  # (a generator that sends nothing)

    calls = [astub.PostPredictions(requests(), timeout=RPC_TIMEOUT_S) for _ in range(count)]
    try:
        yield
    finally:
        release.set()
        for call in calls:
            assert list(call) == []


ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


@pytest.fixture(scope="module")
def identified(tiny_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server with LIMITS and two identities, alice and bob, who may read and write."""
    config = tmp_path_factory.mktemp("auth") / "auth.toml"
    config.write_text(
        "".join(
            f'[[identity]]\nname = "{name}"\nroles = ["read", "write"]\ntoken = "{token}"\n'
            for name, token in (("alice", ALICE), ("bob", BOB))
        )
    )
    with threaded_server({"tiny": tiny_h5}, limits=LIMITS, auth_config=config) as handle:
        yield handle


def test_concurrent_calls_per_identity(identified: Any) -> None:
    calls = identified.server.calls
    address = identified.server.address
    with stubs(address, ALICE) as (alice_d, alice_a), stubs(address, BOB) as (bob_d, _):
        with open_streams(alice_a, 3):
            eventually(lambda: calls.total, lambda n: n == 3)
            with expect_raw(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "concurrent calls", "'alice'", "--max-calls-per-identity"
            ):
                get_samples(alice_d, spec(SLICES), [0])
            assert calls.total == 3  # the refused call is not counted
            assert indices_of(get_samples(bob_d, spec(SLICES), [0])) == [0]  # another identity is not held back
        eventually(lambda: calls.total, lambda n: n == 0)
        assert indices_of(get_samples(alice_d, spec(SLICES), [0, 1])) == [0, 1]


def test_without_authentication_only_the_total_counts(limited: Any, astub: Any, dstub: Any) -> None:
    calls = limited.server.calls
    with open_streams(astub, 3):  # max_calls_per_identity=3, but nobody is identified
        eventually(lambda: calls.total, lambda n: n == 3)
        assert indices_of(get_samples(dstub, spec(SLICES), [0])) == [0]
    eventually(lambda: calls.total, lambda n: n == 0)


def test_concurrent_calls_in_total(tiny_h5: Path) -> None:
    with (
        threaded_server({"tiny": tiny_h5}, limits=Limits(max_calls=2)) as handle,
        stubs(handle.server.address) as (dstub, astub),
    ):
        with open_streams(astub, 2):
            eventually(lambda: handle.server.calls.total, lambda n: n == 2)
            with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "concurrent calls", "--max-calls "):
                astub.ListJobs(apb.ListJobsRequest(), timeout=RPC_TIMEOUT_S)
        eventually(lambda: handle.server.calls.total, lambda n: n == 0)
        assert astub.ListJobs(apb.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs == []
        assert indices_of(get_samples(dstub, spec(SLICES), [0])) == [0]


# -- streams and samples ----------------------------------------------------------------------------------------------


def test_the_35_byte_voxel_wise_stream_is_expect_raw(dstub: Any) -> None:
    request = dataset_service_pb2.StreamBatchesRequest(spec=spec(VOXELS), batch_size=10**9)
    assert request.ByteSize() < 64
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "batch_size: 1000000000 samples", "1000", "--max-batch-size"):
        list(dstub.StreamBatches(request, timeout=RPC_TIMEOUT_S))


def test_a_cancelled_stream_stops_building_within_a_sample(tmp_path: Path) -> None:
    """A voxel-wise stream whose first batch is every sample of a 64^3 subject: the client cancels once the server has
    started building it; the server stops long before the batch is complete. One reading thread: a request served
    afterwards runs only once the cancelled build has returned."""
    h5 = make_pymia_dataset(tmp_path, subjects=1, shape=(64, 64, 64))
    samples = 64**3
    with (
        threaded_server({"big": h5}, workers=1, limits=Limits(max_batch_size=samples)) as handle,
        stubs(handle.server.address) as (dstub, _),
    ):
        servicer = handle.server.servicer
        assert servicer is not None
        voxels = spec(VOXELS)
        voxels.dataset = "big"
        call = dstub.StreamBatches(
            dataset_service_pb2.StreamBatchesRequest(spec=voxels, batch_size=samples), timeout=RPC_TIMEOUT_S
        )
        eventually(lambda: servicer.samples_built, lambda n: n > 0)
        call.cancel()
        eventually(lambda: handle.server.calls.total, lambda n: n == 0)
        voxels.indexing_strategy.CopyFrom(SLICES)
        assert indices_of(get_samples(dstub, voxels, [0])) == [0]  # queued behind the cancelled build
        stopped_at = servicer.samples_built - 1
        assert stopped_at < samples // 2, f"{stopped_at} of {samples} samples built for a client that had gone"
        assert indices_of(get_samples(dstub, voxels, [1])) == [1]
        assert servicer.samples_built == stopped_at + 2  # nothing else runs in the background


def test_get_samples_indices(dstub: Any) -> None:
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "sample_indices: 101 indices", "--max-indices"):
        get_samples(dstub, spec(SLICES), range(101))
    assert indices_of(get_samples(dstub, spec(SLICES), range(50))) == list(range(50))


def test_subject_subset(dstub: Any) -> None:
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "spec.subject_subset.values: 11 values", "--max-subjects"):
        get_samples(dstub, spec(SLICES, subjects=[f"s{i}" for i in range(11)]), [0])


def test_epoch_samples(dstub: Any) -> None:
    """Subsets and weights a stream names, and the draws it asks for, are bounded (--max-epoch-samples)."""
    cases = [
        ({"sample_subset": list(range(201))}, "sample_subset: 201 values"),
        ({"sample_weights": [1.0] * 201}, "sample_weights: 201 values"),
        ({"sample_weights": [1.0] * 60, "samples_per_epoch": 201}, "samples_per_epoch: 201 draws"),
    ]
    for fields, message in cases:
        request = dataset_service_pb2.StreamBatchesRequest(spec=spec(SLICES), batch_size=8, **fields)
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "--max-epoch-samples"):
            list(dstub.StreamBatches(request, timeout=RPC_TIMEOUT_S))
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=spec(SLICES), batch_size=50, sample_weights=[1.0] * 60, samples_per_epoch=200
    )
    assert sum(len(r.batch.sample_indices) for r in dstub.StreamBatches(request, timeout=RPC_TIMEOUT_S)) == 200


def test_repeated_fields(dstub: Any) -> None:
    transform = spec_pb2.Transform(intensity_normalization=spec_pb2.IntensityNormalization(entries=["images"] * 51))
    with expect_raw(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "spec.transform.intensity_normalization.entries", "--max-repeated"
    ):
        get_samples(dstub, spec(SLICES, transform=transform), [0])


def test_nesting_depth(dstub: Any) -> None:
    assert indices_of(get_samples(dstub, spec(SLICES, transform=nested_transforms(4)), [0])) == [0]
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "nested too deep", "--max-spec-depth"):
        get_samples(dstub, spec(SLICES, transform=nested_transforms(5)), [0])
    extractor = spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))
    for _ in range(5):
        extractor = spec_pb2.Extractor(compose=spec_pb2.ComposeExtractor(extractors=[extractor]))
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "spec.extractor.compose", "--max-spec-depth"):
        get_samples(dstub, spec(SLICES, extractor=extractor), [0])


def test_a_spec_nested_60_deep_is_refused_cleanly(limited: Any, dstub: Any) -> None:
    """Deeper than protobuf parses (100 messages): the handler's parsing refuses it with INVALID_ARGUMENT naming the
    message type, and the server goes on serving."""
    with grpc.insecure_channel(limited.server.address) as channel:
        raw = channel.unary_stream(
            "/patchwire.v1.DatasetService/GetSamples", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            list(raw(nested_bytes(60), timeout=RPC_TIMEOUT_S))
    code: Any = info.value
    assert code.code() == grpc.StatusCode.INVALID_ARGUMENT, code
    assert "GetSamplesRequest" in code.details()
    assert indices_of(get_samples(dstub, spec(SLICES), [0])) == [0]


@pytest.mark.parametrize("size", [20000, 600])
def test_size_correction_target(dstub: Any, size: int) -> None:
    """20000 x 20000 is refused from the spec alone; 600 x 600 (x 16 x 2 float32: 46 MB) once the entry's dtype and
    remaining axes are known, before anything is padded."""
    sizes = [spec_pb2.SizeCorrectionDim(size=size), spec_pb2.SizeCorrectionDim(size=size)]
    transform = spec_pb2.Transform(size_correction=spec_pb2.SizeCorrection(shape=sizes, entries=["images"]))
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-sample-mb", "1 MB"):
        get_samples(dstub, spec(spec_pb2.IndexingStrategy(empty=spec_pb2.EmptyIndexing()), transform=transform), [0])


def test_padding(dstub: Any) -> None:
    padded = spec_pb2.Extractor(
        pad_data=spec_pb2.PadDataExtractor(
            padding=[spec_pb2.Padding(before=150, after=150)] * 2,
            extractor=spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"])),
        )
    )
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "padded 'images'", "--max-sample-mb"):
        get_samples(dstub, spec(spec_pb2.IndexingStrategy(empty=spec_pb2.EmptyIndexing()), extractor=padded), [0])


def test_batch_bytes(dstub: Any) -> None:
    """Whole subjects are 61 KB each: the 60 samples of one batch exceed the 2 MB batch limit."""
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=spec(spec_pb2.IndexingStrategy(slice=spec_pb2.SliceIndexing(slice_axis=[0]))), batch_size=1000
    )
    request.spec.extractor.data.ignore_indexing = True  # every sample is a whole subject
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "batch: samples from position 0", "--max-batch-mb"):
        list(dstub.StreamBatches(request, timeout=RPC_TIMEOUT_S))


# -- posted predictions -----------------------------------------------------------------------------------------------


def test_a_post_to_a_missing_job_allocates_nothing(limited: Any, astub: Any) -> None:
    """1 TB announced for a job that does not exist: NOT_FOUND from the announcement alone."""
    with expect_raw(grpc.StatusCode.NOT_FOUND, "batch.job_id: unknown assembly job 'nope'"):
        list(astub.PostPredictions(iter([announced("nope", [1 << 38], 1 << 40)]), timeout=RPC_TIMEOUT_S))


@pytest.mark.parametrize(
    ("requests", "code", "fragment"),
    [
        ([announced("j", [1 << 20, 24, 16, 1], 24 << 26)], grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-post-mb"),
        (
            [announced("j", [1, 24, 16, 1], 1 << 30)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 1536 bytes, but announces",
        ),
        ([announced("j", [1, 24, 16, 1], -5)], grpc.StatusCode.INVALID_ARGUMENT, "needs 1536 bytes, but announces -5"),
        ([announced("j", [1, 24, 16, 1], 1536), chunk(1537)], grpc.StatusCode.INVALID_ARGUMENT, "overruns"),
        ([announced("j", [1, 24, 16, 1], 1536), chunk(1000)], grpc.StatusCode.INVALID_ARGUMENT, "in the middle"),
    ],
    ids=["too-large", "size-mismatch", "negative-size", "more-bytes", "fewer-bytes"],
)
def test_announced_sizes(
    astub: Any, requests: list[apb.PostPredictionsRequest], code: grpc.StatusCode, fragment: str
) -> None:
    slice_job(astub, "j")
    with expect_raw(code, fragment):
        list(astub.PostPredictions(iter(requests), timeout=RPC_TIMEOUT_S))
    assert post(astub, "j", [0])[0].accepted_samples == 1
    status = astub.GetJobStatus(apb.GetJobStatusRequest(job_id="j"), timeout=RPC_TIMEOUT_S)
    assert status.job.received_samples == 1


def test_a_chunk_assembler_refuses_large_announcements_before_allocating() -> None:
    absurd = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[1 << 40], chunked_nbytes=1 << 40)
    with pytest.raises(ValueError, match="chunked_nbytes: 1099511627776 is not a payload size"):
        framing.ChunkAssembler([absurd], max_bytes=1024)
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[2048], chunked_nbytes=2048)
    with pytest.raises(ValueError, match="announce 2048 payload bytes, more than the 1024 allowed"):
        framing.ChunkAssembler([tensor], max_bytes=1024)
    small = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[4], chunked_nbytes=4)
    assembler = framing.ChunkAssembler([small], max_bytes=4)
    with pytest.raises(ValueError, match="overruns"):
        assembler.add(bytes(5))
    assembler.add(bytes(range(4)))
    assert assembler.complete and assembler.payloads()[0].tolist() == [0, 1, 2, 3]


# -- jobs -------------------------------------------------------------------------------------------------------------


def test_jobs_per_identity(identified: Any) -> None:
    address = identified.server.address
    with stubs(address, ALICE) as (_, alice), stubs(address, BOB) as (_, bob):
        slice_job(alice, "a")
        slice_job(alice, "b")
        slice_job(alice, "a")  # the same job again: nothing new
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "'alice' already holds 2 assembly jobs", "--max-jobs-per"):
            slice_job(alice, "c")
        slice_job(bob, "d")  # bob's own count
        alice.DeleteJob(apb.DeleteJobRequest(job_id="a"), timeout=RPC_TIMEOUT_S)
        slice_job(alice, "c")
        assert post(alice, "c", [0, 1])[0].accepted_samples == 2
        assert sorted(j.job_id for j in alice.ListJobs(apb.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs) == ["b", "c"]
        for job_id in ("b", "c"):
            alice.DeleteJob(apb.DeleteJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        bob.DeleteJob(apb.DeleteJobRequest(job_id="d"), timeout=RPC_TIMEOUT_S)


def test_jobs_in_total(tiny_h5: Path) -> None:
    with (
        threaded_server({"tiny": tiny_h5}, limits=Limits(max_jobs=1)) as handle,
        stubs(handle.server.address) as (_, astub),
    ):
        slice_job(astub, "a")
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server already holds 1 assembly jobs", "--max-jobs "):
            slice_job(astub, "b")


# -- disk -------------------------------------------------------------------------------------------------------------

# a subject of "tiny" takes 20 x 24 x 16 x 1 float32 (30720 bytes + a 128-byte header) for its results and as much
# for its spilled buffers; a slice's journal record about 1.6 KB
DISK = Limits(max_job_disk_bytes=100_000, max_disk_bytes=150_000)


def test_disk_quota_per_job_in_total_and_after_restart(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with (
        threaded_server({"tiny": tiny_h5}, state_dir=state, limits=DISK) as handle,
        stubs(handle.server.address) as (_, astub),
    ):
        slice_job(astub, "a")
        post(astub, "a", [0])  # subject 0: room for its results and buffers, and its journal: about 63 KB
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "disk", "job 'a' holds", "--max-job-disk-mb"):
            post(astub, "a", [20])  # subject 1 would take the job past 100 KB
        assert not (state / "jobs" / "a" / "journals" / "1.journal").exists()  # refused before it was journalled
        post(astub, "a", range(1, 20), value=2.0)  # subject 0 complete: its journal and buffers go
        journal = state / "jobs" / "a" / "journals" / "0.journal"
        eventually(journal.exists, lambda exists: not exists)  # the volume is written in the background
        fetched = list(astub.FetchSubject(apb.FetchSubjectRequest(job_id="a"), timeout=RPC_TIMEOUT_S))
        assert list(fetched[0].batch.fields[0].stacked.shape) == [1, *SHAPE, 1]
        post(astub, "a", [20])  # room again: subject 0 holds only its results now

        slice_job(astub, "b")
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "disk", "all jobs hold", "--max-disk-mb"):
            post(astub, "b", [0])
        astub.DeleteJob(apb.DeleteJobRequest(job_id="a"), timeout=RPC_TIMEOUT_S)  # gives its bytes back
        assert post(astub, "b", [0])[0].accepted_samples == 1

    with (
        threaded_server({"tiny": tiny_h5}, state_dir=state, limits=DISK) as handle,
        stubs(handle.server.address) as (_, astub),
    ):
        # recovery charges job b's journal and room for subject 0 again: subject 1 still does not fit
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-job-disk-mb"):
            post(astub, "b", [20])
        assert post(astub, "b", [1])[0].accepted_samples == 1
        status = astub.GetJobStatus(apb.GetJobStatusRequest(job_id="b"), timeout=RPC_TIMEOUT_S)
        assert status.job.received_samples == 2


def test_serve_flags() -> None:
    from patchwire.cli import build_parser as _parser
    from patchwire.cli._limit_flags import limits_from_args

    args = _parser().parse_args(["serve", "--max-calls", "7", "--max-post-mb", "0.5", "--max-spec-depth", "3"])
    limits = limits_from_args(args)
    assert (limits.max_calls, limits.max_post_bytes, limits.max_spec_depth) == (7, 1 << 19, 3)
    assert limits.max_jobs == Limits().max_jobs
    for bad in (["--max-calls", "0"], ["--max-disk-mb", "-1"], ["--max-jobs", "x"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["serve", *bad])


# -- memory after a burst of refused requests -------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _attacks(dstub: Any, astub: Any) -> list[Callable[[], object]]:
    big = [spec_pb2.SizeCorrectionDim(size=20000), spec_pb2.SizeCorrectionDim(size=20000)]
    return [
        lambda: list(
            dstub.StreamBatches(
                dataset_service_pb2.StreamBatchesRequest(spec=spec(VOXELS), batch_size=10**9), timeout=RPC_TIMEOUT_S
            )
        ),
        lambda: list(astub.PostPredictions(iter([announced("nope", [1 << 28], 1 << 30)]), timeout=RPC_TIMEOUT_S)),
        lambda: get_samples(dstub, spec(VOXELS), range(2000)),
        lambda: get_samples(
            dstub,
            spec(
                spec_pb2.IndexingStrategy(empty=spec_pb2.EmptyIndexing()),
                transform=spec_pb2.Transform(size_correction=spec_pb2.SizeCorrection(shape=big, entries=["images"])),
            ),
            [0],
        ),
        lambda: get_samples(dstub, spec(SLICES, transform=nested_transforms(40)), [0]),
    ]


def test_memory_comes_back_after_a_burst_of_refused_requests(tiny_h5: Path) -> None:
    flags = ("--max-indices", "1000", "--max-sample-mb", "64", "--max-post-mb", "64")
    with serve_process({"tiny": tiny_h5}, flags) as (proc, address), stubs(address) as (dstub, astub):
        attacks = _attacks(dstub, astub)
        for attack in attacks:  # once first: what serving any request allocates for good is not counted
            with pytest.raises(grpc.RpcError):
                attack()
        assert indices_of(get_samples(dstub, spec(SLICES), [0])) == [0]
        before = _rss_kb(proc.pid)
        codes = set()
        for k in range(200):
            with pytest.raises(grpc.RpcError) as info:
                attacks[k % len(attacks)]()
            codes.add(info.value.code())  # type: ignore[attr-defined]
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "2000 indices", "limit of 1000", "--max-indices"):
            attacks[2]()  # the flags took effect
        assert indices_of(get_samples(dstub, spec(SLICES), [0])) == [0]
        after = _rss_kb(proc.pid)
        assert after <= before * 1.1, f"RSS {before} kB before 200 refused requests, {after} kB after"
