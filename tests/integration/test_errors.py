"""Bad input gets a precise status and a message that names the bad field; the server keeps serving.

Through the client, every failure arrives as a patchwire exception (never a raw ``grpc.RpcError``) whose class
matches the status: InvalidArgumentError (ValueError), NotFoundError (KeyError), OutOfRangeError (IndexError).
Malformed requests that the client never builds are sent with the generated stub directly.

Long because it lists, per method, every bad input a client can send and the status and message it must get.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.service import PatchwireServer
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, spec_pb2

import _checks

TINY_IMAGE_SHAPE = (20, 24, 16, 2)
TINY_SLICES = 3 * 20
SERVED = "tiny, vary"
RPC_TIMEOUT_S = 30


@pytest.fixture(autouse=True)
def server_still_serves(client: pw.Client) -> Iterator[None]:
    """After each error, the same server answers a valid request."""
    yield
    ds = client.datasource("tiny", extr.EmptyIndexing(), extr.DataExtractor(categories=("images", "labels")))
    try:
        sample = ds[0]
        assert sample["images"].shape == TINY_IMAGE_SHAPE
        assert sample["labels"].shape == (*TINY_IMAGE_SHAPE[:3], 1)
    finally:
        ds.close()


def expect(error: type[pw.RpcError], code: grpc.StatusCode, *fragments: str) -> contextlib.AbstractContextManager[None]:
    """The block raises ``error`` with status ``code``, the fragments in the server's own words."""
    return _checks.expect(error, code, *fragments, in_details=True)


def first_sample(
    client: pw.Client,
    dataset: str,
    indexing: extr.IndexingStrategy | None,
    extractor: extr.Extractor | None,
    transform: Any = None,
    subject_subset: list[str] | None = None,
) -> dict[str, Any]:
    """Opens a datasource and reads sample 0: an error may surface at either step."""
    ds = client.datasource(dataset, indexing, extractor, transform, subject_subset)
    try:
        return ds[0]
    finally:
        ds.close()


@pytest.fixture
def slices(client: pw.Client) -> Iterator[pw.RemoteDatasource]:
    ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=("images", "labels")))
    yield ds
    ds.close()


# -- unknown names ------------------------------------------------------------------------------------------------


def _open_unknown(client: pw.Client) -> None:
    client.datasource("nope", extr.SliceIndexing(), extr.DataExtractor())


def _describe_unknown(client: pw.Client) -> None:
    client.describe("nope")


def _direct_extract_unknown(client: pw.Client) -> None:
    ds = client.datasource("tiny", extr.EmptyIndexing(), extr.DataExtractor())
    try:
        ds.dataset = "nope"  # as if the server stopped serving the dataset this datasource was opened on
        ds.direct_extract(extr.DataExtractor(), 0)
    finally:
        ds.close()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (_open_unknown, "spec.dataset"),
        (_describe_unknown, "dataset"),
        (_direct_extract_unknown, "extraction.dataset"),
    ],
    ids=["datasource", "describe", "direct_extract"],
)
def test_unknown_dataset_is_not_found_and_lists_the_served_ones(
    client: pw.Client, call: Callable[[pw.Client], None], field: str
) -> None:
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, f"{field}: unknown dataset 'nope'", f"served: {SERVED}"):
        call(client)


@pytest.mark.parametrize(
    ("extractor", "field"),
    [
        (extr.DataExtractor(categories=("images", "bogus")), "spec.extractor.data.categories"),
        (extr.NamesExtractor(categories=("bogus",)), "spec.extractor.names.categories"),
        (extr.FilesExtractor(categories=("bogus",)), "spec.extractor.files.categories"),
        (extr.SelectiveDataExtractor(selection="T1", category="bogus"), "spec.extractor.selective_data.category"),
        (
            extr.ComposeExtractor([extr.SubjectExtractor(), extr.DataExtractor(categories=("bogus",))]),
            "spec.extractor.compose.extractors[1].data.categories",
        ),
    ],
    ids=["data", "names", "files", "selective", "compose"],
)
def test_unknown_category_is_not_found(client: pw.Client, extractor: extr.Extractor, field: str) -> None:
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, field, "'bogus'", "categories: images, labels, mask"):
        client.datasource("tiny", extr.SliceIndexing(), extractor)


@pytest.mark.parametrize("kind", ["selective_data", "random_data"])
def test_unknown_entry_in_selection_is_not_found(client: pw.Client, kind: str) -> None:
    extractor = (
        extr.SelectiveDataExtractor(selection=("T1", "FLAIR"), category="images")
        if kind == "selective_data"
        else extr.RandomDataExtractor(selection=("FLAIR",), category="images", seed=1)
    )
    with expect(
        pw.NotFoundError, grpc.StatusCode.NOT_FOUND, f"spec.extractor.{kind}.selection", "'FLAIR'", "entries: T1, T2"
    ):
        client.datasource("tiny", extr.SliceIndexing(), extractor)


def test_unknown_subject_in_subset_is_not_found(client: pw.Client) -> None:
    with expect(
        pw.NotFoundError,
        grpc.StatusCode.NOT_FOUND,
        "spec.subject_subset",
        "'Subject_9'",
        "subjects: Subject_1, Subject_2, Subject_3",
    ):
        client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(), subject_subset=["Subject_1", "Subject_9"])


# -- indices out of range ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject_index", [3, -1, 2**40])
def test_direct_extract_subject_out_of_range(slices: pw.RemoteDatasource, subject_index: int) -> None:
    with expect(
        pw.OutOfRangeError,
        grpc.StatusCode.OUT_OF_RANGE,
        "extraction.subject_index",
        f"subject index {subject_index}",
        "3 subjects (valid: 0..2)",
    ):
        slices.direct_extract(extr.DataExtractor(), subject_index)


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        (extr.IndexExpression(20), "(0-19)"),
        (extr.IndexExpression(-21), "data/images/0"),
        (extr.IndexExpression([1, 2, 3, 0, 0]), "5 axes"),
    ],
    ids=["past-the-end", "too-negative", "too-many-axes"],
)
def test_direct_extract_index_expression_out_of_range(
    slices: pw.RemoteDatasource, expression: extr.IndexExpression, fragment: str
) -> None:
    with expect(pw.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE, "extraction.index_expression", fragment):
        slices.direct_extract(extr.DataExtractor(), 0, expression)
    assert slices.direct_extract(extr.DataExtractor(), 0, extr.IndexExpression(19))["images"].shape == (24, 16, 2)


@pytest.mark.parametrize("index", [TINY_SLICES, TINY_SLICES + 7, -TINY_SLICES - 1])
def test_sample_index_out_of_range_is_an_index_error(slices: pw.RemoteDatasource, index: int) -> None:
    assert len(slices) == TINY_SLICES
    with expect(
        pw.OutOfRangeError,
        grpc.StatusCode.OUT_OF_RANGE,
        "sample_indices",
        f"sample index {index}",
        f"{TINY_SLICES} samples",
    ):
        slices[index]
    with pytest.raises(IndexError):
        slices[index]
    assert slices[-TINY_SLICES]["images"].shape == (24, 16, 2)  # negative indices count from the end, as in pymia


def test_out_of_range_ends_iteration_by_index(client: pw.Client) -> None:
    """Python's old iteration protocol (``__getitem__`` until IndexError), which pymia's datasource relies on."""
    ds = client.datasource("tiny", extr.EmptyIndexing(), extr.SubjectExtractor())

    class ByIndex:
        def __getitem__(self, i: int) -> dict[str, Any]:
            return ds[i]

    try:
        assert [s["subject"] for s in ByIndex()] == ["Subject_1", "Subject_2", "Subject_3"]  # type: ignore[attr-defined]
    finally:
        ds.close()


@pytest.mark.parametrize("index", [1.5, "0", None])
def test_non_integer_sample_index_is_a_type_error(slices: pw.RemoteDatasource, index: Any) -> None:
    with pytest.raises(TypeError):
        slices[index]


def test_one_bad_index_fails_get_samples(slices: pw.RemoteDatasource) -> None:
    with expect(pw.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE, f"sample index {TINY_SLICES}"):
        slices.get_samples([0, 1, TINY_SLICES])


# -- invalid parameters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("indexing", "fragments"),
    [
        (extr.SliceIndexing(4), ("indexing_strategy.slice.slice_axis", "axis 4", "(20, 24, 16, 2)")),
        (extr.SliceIndexing((0, 7)), ("indexing_strategy.slice.slice_axis", "axis 7")),
        (extr.SliceIndexing(-1), ("indexing_strategy.slice.slice_axis", "axis -1 is negative")),
        (extr.PatchWiseIndexing((0, 4, 4)), ("indexing_strategy.patch_wise.patch_shape", "positive", "(0, 4, 4)")),
        (extr.PatchWiseIndexing((4, -2, 4)), ("indexing_strategy.patch_wise.patch_shape", "positive", "(4, -2, 4)")),
        (extr.PatchWiseIndexing((2, 2, 2, 2, 2)), ("indexing_strategy.patch_wise.patch_shape", "5 dimensions")),
        (extr.VoxelWiseIndexing(5), ("indexing_strategy.voxel_wise.image_dimension", "5 exceeds the 4 axes")),
        (extr.VoxelWiseIndexing(0), ("indexing_strategy.voxel_wise.image_dimension", "positive")),
    ],
    ids=[
        "slice-beyond-ndim",
        "slice-second-axis",
        "slice-negative",
        "patch-zero",
        "patch-negative",
        "patch-too-many-dims",
        "voxel-too-big",
        "voxel-zero",
    ],
)
def test_invalid_indexing_is_invalid_argument(
    client: pw.Client, indexing: extr.IndexingStrategy, fragments: tuple[str, ...]
) -> None:
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, *fragments):
        client.datasource("tiny", indexing, extr.DataExtractor())
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError, as pymia's own checks raise
        client.datasource("tiny", indexing, extr.DataExtractor())


@pytest.mark.parametrize(
    ("transform", "fragments"),
    [
        (tfm.Permute((0, 0, 1)), ("spec.transform.permute.permutation", "(0, 0, 1)", "not a permutation")),
        (tfm.ClipPercentile(101), ("spec.transform.clip_percentile.upper_percentile", "[0, 100]", "101")),
        (tfm.ClipPercentile(90, -5), ("spec.transform.clip_percentile.lower_percentile", "[0, 100]", "-5")),
        (tfm.SizeCorrection((-1, 16)), ("spec.transform.size_correction.shape", "negative")),
        (tfm.Mask(""), ("spec.transform.mask.mask_key",)),
        (
            tfm.ComposeTransform([tfm.Squeeze(), tfm.Permute((1, 1))]),
            ("spec.transform.compose.transforms[1].permute.permutation",),
        ),
    ],
    ids=["permute", "clip-upper", "clip-lower", "size-correction", "mask-without-key", "in-compose"],
)
def test_invalid_transform_parameters_fail_when_opening(
    client: pw.Client, transform: tfm.Transform, fragments: tuple[str, ...]
) -> None:
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, *fragments):
        client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(), transform)


RUNTIME_FAILURES = [
    (
        extr.DataExtractor(categories=("images", "labels")),
        tfm.Permute((1, 0, 2, 3), entries=("images",)),
        ("transform.permute", "images"),
    ),
    (
        extr.DataExtractor(categories=("images",)),
        tfm.Permute((2, 0, 1)),
        ("transform.permute", "labels", "not extracted"),
    ),
    (
        extr.DataExtractor(categories=("labels",)),
        tfm.IntensityNormalization(entries=("labels",)),
        ("transform.intensity_normalization", "labels"),
    ),
]
RUNTIME_IDS = ["permute-wrong-axes", "permute-default-entries-without-labels", "normalize-integer-labels"]


@pytest.mark.parametrize(("extractor", "transform", "fragments"), RUNTIME_FAILURES, ids=RUNTIME_IDS)
def test_transform_failing_on_a_sample_names_transform_and_entry(
    client: pw.Client, extractor: extr.Extractor, transform: tfm.Transform, fragments: tuple[str, ...]
) -> None:
    ds = client.datasource("tiny", extr.SliceIndexing(), extractor, transform)
    try:
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "spec.", *fragments):
            ds[0]
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "spec.", *fragments):
            next(ds.batches(batch_size=4))
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "extraction.", *fragments):
            ds.direct_extract(extractor, 0, extr.IndexExpression(3), transform)
    finally:
        ds.close()


def test_error_in_the_middle_of_a_stream_arrives_after_the_good_batches(client: pw.Client) -> None:
    """Mask slices at the edges of a subject are constant, which IntensityRescale refuses (as pymia does)."""
    ds = client.datasource(
        "tiny",
        extr.SliceIndexing(),
        extr.DataExtractor(categories=("mask",)),
        tfm.IntensityRescale(0, 1, entries=("mask",)),
    )
    received: list[int] = []
    try:
        with expect(
            pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "spec.transform.intensity_rescale", "mask"
        ):
            for batch in ds.batches(batch_size=1, start_position=5):
                received.extend(batch["sample_index"].tolist())
    finally:
        ds.close()
    assert received[:1] == [5]
    assert all(5 <= i < 19 for i in received), received  # slice 19 is the first constant one after 5


def test_pad_data_extractor_needs_a_data_extractor() -> None:
    with pytest.raises(ValueError, match="categories"):
        extr.PadDataExtractor((1, 1), extr.NamesExtractor())


def test_padding_with_the_wrong_number_of_axes_is_invalid_argument(client: pw.Client) -> None:
    extractor = extr.PadDataExtractor(((1, 1), (2, 2), (0, 0), (0, 0)), extr.DataExtractor())
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "pad_data.padding", "4 axes"):
        first_sample(client, "tiny", extr.SliceIndexing(), extractor)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"batch_size": 0}, ("batch_size", "positive", "got 0")),
        ({"batch_size": -3}, ("batch_size", "got -3")),
        ({"batch_size": 2, "shard_index": 2, "shard_count": 2}, ("shard_index", "[0, shard_count=2)")),
        ({"batch_size": 2, "shard_index": -1, "shard_count": 2}, ("shard_index",)),
        ({"batch_size": 2, "shard_count": -2}, ("shard_count",)),
        ({"batch_size": 2, "start_position": -1}, ("start_position", "negative", "-1")),
    ],
    ids=[
        "batch-size-zero",
        "batch-size-negative",
        "shard-index-too-big",
        "shard-index-negative",
        "shard-count-negative",
        "start-position-negative",
    ],
)
def test_invalid_stream_parameters(
    slices: pw.RemoteDatasource, kwargs: dict[str, int], fragments: tuple[str, ...]
) -> None:
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, *fragments):
        next(slices.batches(**kwargs))


def test_samples_need_an_extractor(client: pw.Client) -> None:
    ds = client.datasource("tiny", extr.SliceIndexing())  # valid: direct_extract needs no datasource extractor
    try:
        assert len(ds) == TINY_SLICES
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "spec.extractor", "extractor"):
            ds[0]
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "spec.extractor", "extractor"):
            next(ds.batches(batch_size=2))
        assert ds.direct_extract(extr.SubjectExtractor(), 1)["subject"] == "Subject_2"
    finally:
        ds.close()


def test_connecting_to_a_port_without_server_fails_quickly() -> None:
    with socket.socket() as sock:  # bound but not listening: connections are refused, and no one else gets the port
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(pw.ConnectionFailed, match=address) as info:
            pw.connect(address, timeout=0.5)
        assert time.monotonic() - started < 10
    assert not isinstance(info.value, grpc.RpcError)


# -- raw malformed requests -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server: PatchwireServer) -> Iterator[dataset_service_pb2_grpc.DatasetServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)


def _spec(**fields: Any) -> spec_pb2.DatasourceSpec:
    spec = spec_pb2.DatasourceSpec(dataset="tiny", **fields)
    return spec


def _open(spec: spec_pb2.DatasourceSpec) -> Callable[[dataset_service_pb2_grpc.DatasetServiceStub], Any]:
    return lambda s: s.OpenDatasource(dataset_service_pb2.OpenDatasourceRequest(spec=spec), timeout=RPC_TIMEOUT_S)


def _direct(extraction: spec_pb2.DirectExtraction) -> Callable[[dataset_service_pb2_grpc.DatasetServiceStub], Any]:
    request = dataset_service_pb2.DirectExtractRequest(extraction=extraction)
    return lambda s: list(s.DirectExtract(request, timeout=RPC_TIMEOUT_S))


def _images() -> spec_pb2.Extractor:
    return spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))


def _malformed() -> list[Any]:
    unset_extractor = _spec(extractor=spec_pb2.Extractor())
    unset_transform = _spec(extractor=_images(), transform=spec_pb2.Transform())
    unset_in_compose = _spec(
        extractor=spec_pb2.Extractor(compose=spec_pb2.ComposeExtractor(extractors=[_images(), spec_pb2.Extractor()]))
    )
    pad_without_inner = _spec(
        extractor=spec_pb2.Extractor(pad_data=spec_pb2.PadDataExtractor(padding=[spec_pb2.Padding(before=1, after=1)]))
    )
    clip_without_upper = _spec(
        extractor=_images(), transform=spec_pb2.Transform(clip_percentile=spec_pb2.ClipPercentile())
    )
    unset_axis = spec_pb2.DirectExtraction(dataset="tiny", extractor=_images(), subject_index=0)
    unset_axis.index_expression.axes.add(index=2)
    unset_axis.index_expression.axes.add()
    whole_and_axes = spec_pb2.DirectExtraction(dataset="tiny", extractor=_images(), subject_index=0)
    whole_and_axes.index_expression.whole = True
    whole_and_axes.index_expression.axes.add(index=1)
    stream_without_batch_size = dataset_service_pb2.StreamBatchesRequest(spec=_spec(extractor=_images()))
    samples_out_of_range = dataset_service_pb2.GetSamplesRequest(spec=_spec(extractor=_images()), sample_indices=[0, 3])
    no = grpc.StatusCode
    return [
        pytest.param(
            _open(unset_extractor),
            no.INVALID_ARGUMENT,
            "spec.extractor: no extractor is set",
            id="extractor-oneof-unset",
        ),
        pytest.param(
            _open(unset_transform),
            no.INVALID_ARGUMENT,
            "spec.transform: no transform is set",
            id="transform-oneof-unset",
        ),
        pytest.param(
            _open(unset_in_compose),
            no.INVALID_ARGUMENT,
            "spec.extractor.compose.extractors[1]",
            id="compose-member-unset",
        ),
        pytest.param(
            _open(pad_without_inner), no.INVALID_ARGUMENT, "spec.extractor.pad_data.extractor", id="pad-without-inner"
        ),
        pytest.param(
            _open(clip_without_upper),
            no.INVALID_ARGUMENT,
            "spec.transform.clip_percentile.upper_percentile",
            id="scalar-unset",
        ),
        pytest.param(
            _direct(unset_axis),
            no.INVALID_ARGUMENT,
            "extraction.index_expression.axes[1]: neither index nor range is set",
            id="index-axis-unset",
        ),
        pytest.param(_direct(whole_and_axes), no.INVALID_ARGUMENT, "extraction.index_expression", id="whole-and-axes"),
        pytest.param(
            _direct(spec_pb2.DirectExtraction(dataset="tiny", subject_index=0)),
            no.INVALID_ARGUMENT,
            "extraction.extractor",
            id="direct-without-extractor",
        ),
        pytest.param(
            _direct(spec_pb2.DirectExtraction(dataset="nope", extractor=_images())),
            no.NOT_FOUND,
            f"extraction.dataset: unknown dataset 'nope' (served: {SERVED})",
            id="direct-unknown-dataset",
        ),
        pytest.param(
            lambda s: list(s.StreamBatches(stream_without_batch_size, timeout=RPC_TIMEOUT_S)),
            no.INVALID_ARGUMENT,
            "batch_size: must be positive, got 0",
            id="stream-without-batch-size",
        ),
        pytest.param(
            lambda s: list(s.GetSamples(samples_out_of_range, timeout=RPC_TIMEOUT_S)),
            no.OUT_OF_RANGE,
            "sample_indices: sample index 3 is out of range",
            id="get-samples-out-of-range",
        ),
        pytest.param(
            lambda s: s.DescribeDataset(dataset_service_pb2.DescribeDatasetRequest(), timeout=RPC_TIMEOUT_S),
            no.NOT_FOUND,
            "dataset: unknown dataset ''",
            id="describe-without-name",
        ),
    ]


@pytest.mark.parametrize(("call", "code", "details"), _malformed())
def test_malformed_request_gets_a_precise_status(
    stub: dataset_service_pb2_grpc.DatasetServiceStub,
    call: Callable[[dataset_service_pb2_grpc.DatasetServiceStub], Any],
    code: grpc.StatusCode,
    details: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    error: grpc.Call = info.value
    assert error.code() == code, error
    assert details in (error.details() or ""), error.details()
    assert "internal error" not in (error.details() or "")
