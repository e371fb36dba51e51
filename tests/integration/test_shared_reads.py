"""Samples read through shared memory on the server's host (GetSamples into a registered segment): the same samples
as over the wire, arrays that stay valid while they are kept, the wire wherever shared memory cannot be used, and
precise errors for segments the server cannot use."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import _decoding, _shared_reads
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client.torch import PytorchDatasetAdapter
from patchwire.service import PatchwireServer
from patchwire.service import _dataset_service as dataset_service
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, tensor_pb2
from patchwire.wire import framing, shared_memory

from _checks import expect_raw, region_of_another_identity
from _datasets import make_pymia_dataset
from _servers import server_in_thread

SHAPE = (24, 40, 36)
RPC_TIMEOUT_S = 30
CATEGORIES = ("images", "labels")
CALL = list(range(8))
"""Eight slices: 92 KB of images, sent as a payload (smaller ones travel inline, in the message)."""

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pymia_dataset(tmp_path_factory.mktemp("reads"), shape=SHAPE)


@pytest.fixture(scope="module")
def server(h5: Path) -> Iterator[PatchwireServer]:
    with server_in_thread({"big": h5}) as srv:
        yield srv


@pytest.fixture
def segments(monkeypatch: pytest.MonkeyPatch) -> _shared_reads.ReadSegments:
    """This test's own pool of read segments."""
    fresh = _shared_reads.ReadSegments()
    monkeypatch.setattr(_shared_reads, "SEGMENTS", fresh)
    return fresh


def datasource(client: pw.Client, indexing: Any = None, **kwargs: Any) -> pw.RemoteDatasource:
    # a Permute on the server: its samples are strided views, copied straight into the segment
    return client.datasource(
        "big",
        indexing or extr.SliceIndexing(0),
        extr.DataExtractor(categories=CATEGORIES),
        tfm.Permute(
            permutation=(3, 0, 1, 2) if isinstance(indexing, extr.PatchWiseIndexing) else (2, 0, 1), entries=("images",)
        ),
        **kwargs,
    )


def assert_same_samples(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
                np.testing.assert_array_equal(a[key], b[key])
            else:
                assert a[key] == b[key]


def test_samples_through_shared_memory_are_those_of_the_wire(
    client: pw.Client, segments: _shared_reads.ReadSegments
) -> None:
    shared, wire = datasource(client), datasource(client, shared_memory=False)
    patches = datasource(client, extr.PatchWiseIndexing((8, 8, 8)))
    patches_wire = datasource(client, extr.PatchWiseIndexing((8, 8, 8)), shared_memory=False)
    try:
        assert shared.uses_shared_memory is None  # nothing read yet
        for indices in ([0], [3, 1, 4, 1, 5], list(range(len(shared)))):
            assert_same_samples(shared.get_samples(indices), wire.get_samples(indices))
        assert_same_samples([shared[7]], [wire[7]])
        assert_same_samples(patches.get_samples([0, 2, 9]), patches_wire.get_samples([0, 2, 9]))
        assert shared.uses_shared_memory is True and patches.uses_shared_memory is True
        assert wire.uses_shared_memory is None, "shared_memory=False never tries"
        assert shared.get_samples([2])[0]["images"].shape == (2, SHAPE[1], SHAPE[2])
    finally:
        for ds in (shared, wire, patches, patches_wire):
            ds.close()


def test_reads_through_shared_memory_report_no_compression(
    client: pw.Client, segments: _shared_reads.ReadSegments
) -> None:
    """The payloads came raw through shared memory: the stats count them as received as they are, so the ratio of
    delivered to received bytes says 1 and the summary names no compression."""
    ds = datasource(client)
    try:
        ds.get_samples(list(range(len(ds))))
        assert ds.uses_shared_memory is True
        stats = ds.stats.snapshot()
        assert 0.99 < stats.compression_ratio <= 1.0, stats
        assert "on the wire" not in stats.summary()
    finally:
        ds.close()


def test_kept_samples_stay_valid_and_their_segment_is_reused_only_once_they_are_gone(
    client: pw.Client, segments: _shared_reads.ReadSegments
) -> None:
    ds, wire = datasource(client), datasource(client, shared_memory=False)
    try:
        kept = ds.get_samples(CALL)
        expected = [{k: np.array(v, copy=True) for k, v in s.items()} for s in kept]
        assert segments.lent == 1
        for start in range(8, 64, 8):  # later calls must not write where the kept arrays lie
            ds.get_samples(list(range(start, start + 8)))
        assert_same_samples(kept, expected)
        assert_same_samples(kept, wire.get_samples(CALL))
        del kept
        gc.collect()
        ds.get_samples([5])
        gc.collect()
        assert segments.lent == 0 and segments.free, "a segment whose arrays are gone is used again"
    finally:
        ds.close()
        wire.close()


def test_kept_samples_pin_a_bounded_number_of_segments(client: pw.Client, segments: _shared_reads.ReadSegments) -> None:
    ds, wire = datasource(client), datasource(client, shared_memory=False)
    try:
        kept = [ds.get_samples(list(range(i, i + 8))) for i in range(0, 64, 8)]
        assert segments.lent == 4, "beyond the bound, payloads are copied out of the segment"
        for i, samples in zip(range(0, 64, 8), kept, strict=True):
            assert_same_samples(samples, wire.get_samples(list(range(i, i + 8))))
    finally:
        ds.close()
        wire.close()


def test_a_forked_child_keeps_its_parents_samples_and_the_parent_never_overwrites_them(
    client: pw.Client, segments: _shared_reads.ReadSegments
) -> None:
    ds = datasource(client)
    try:
        kept = ds.get_samples(CALL)
        assert segments.lent == 1
        expected = [s["images"].copy() for s in kept]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child waits until the parent has read on, then checks what it inherited
            os.close(write)
            os.read(read, 1)
            same = all(np.array_equal(s["images"], e) for s, e in zip(kept, expected, strict=True))
            os._exit(0 if same else 1)
        os.close(read)
        del kept
        gc.collect()
        for start in range(8, 64, 8):  # would reuse the segment the child still reads, were it not retired
            ds.get_samples(list(range(start, start + 8)))
        os.write(write, b"x")
        os.close(write)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's inherited samples changed"
    finally:
        ds.close()


def test_dataloader_workers_read_through_shared_memory(client: pw.Client) -> None:
    ds, wire = datasource(client), datasource(client, shared_memory=False)
    try:
        loader = torch_data.DataLoader(PytorchDatasetAdapter(ds), batch_size=4, num_workers=2)
        got = [b["images"].numpy() for b in loader]
        expected = [
            np.stack([s["images"] for s in wire.get_samples(list(range(i, min(i + 4, len(ds)))))])
            for i in range(0, len(ds), 4)
        ]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        ds.close()
        wire.close()


def test_workers_of_later_epochs_read_into_the_pages_earlier_ones_left(
    client: pw.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    inheritance = _shared_reads.Inheritance(count=4)
    monkeypatch.setattr(_shared_reads, "INHERITANCE", inheritance)
    ds, wire = datasource(client), datasource(client, shared_memory=False)  # (a datasource that reads shared: wanted)
    try:
        expected = np.stack([s["images"] for s in wire.get_samples(list(range(len(ds))))])
        loader = torch_data.DataLoader(PytorchDatasetAdapter(ds), batch_size=8, shuffle=True, num_workers=2)
        for _ in range(3):
            got = {}
            for batch in loader:
                for i, image in zip(batch["sample_index"].tolist(), batch["images"].numpy(), strict=True):
                    got[i] = image
            assert sorted(got) == list(range(len(ds)))
            np.testing.assert_array_equal(np.stack([got[i] for i in range(len(ds))]), expected)
        kept = inheritance._own
        assert len(kept) == 4 and any(os.fstat(s.fileno()).st_blocks for s in kept), "the workers' pages are kept"
    finally:
        ds.close()
        wire.close()


def test_a_server_without_shared_memory_serves_samples_over_the_wire(h5: Path) -> None:
    with server_in_thread({"big": h5}, shared_memory=False) as srv, pw.connect(srv.address) as client:
        ds = datasource(client)
        try:
            assert len(ds.get_samples([0, 1])) == 2
            assert ds.uses_shared_memory is False
        finally:
            ds.close()


# -- requests a client never makes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_stub(server: PatchwireServer) -> Iterator[dataset_service_pb2_grpc.DatasetServiceStub]:
    with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)


def registered_region(
    stub: Any, segment: shared_memory.Segment, for_posting: bool
) -> tuple[shared_memory.Channel, bytes]:
    response = stub.RegisterSharedMemory(
        apb.RegisterSharedMemoryRequest(for_posting=for_posting), timeout=RPC_TIMEOUT_S
    )
    channel = shared_memory.Channel(response.socket_path)
    return channel, segment.register(channel, response.ticket)


def samples_request(client: pw.Client, region: bytes, indices: list[int]) -> dataset_service_pb2.GetSamplesRequest:
    spec = datasource(client, shared_memory=False)._spec
    return dataset_service_pb2.GetSamplesRequest(
        spec=spec, sample_indices=indices, shared_memory=tensor_pb2.SharedMemory(region=region)
    )


def test_regions_that_cannot_be_used_are_refused_precisely(
    client: pw.Client, stub: Any, dataset_stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad, code, message in (
        (b"short", grpc.StatusCode.INVALID_ARGUMENT, "shared_memory.region: a region id is 32 bytes, got 5"),
        (os.urandom(32), grpc.StatusCode.NOT_FOUND, "shared_memory.region: no such region"),
    ):
        with expect_raw(code, message):
            list(dataset_stub.GetSamples(samples_request(client, bad, [0]), timeout=RPC_TIMEOUT_S))
    posting = shared_memory.Segment(1 << 20, sealed=True)
    channel, region = registered_region(stub, posting, for_posting=True)
    try:
        with expect_raw(grpc.StatusCode.FAILED_PRECONDITION, "the region was not registered for fetching"):
            list(dataset_stub.GetSamples(samples_request(client, region, [0]), timeout=RPC_TIMEOUT_S))
    finally:
        channel.close()
        posting.close()
    segment = shared_memory.Segment(1 << 20, sealed=True)
    channel, region = registered_region(stub, segment, for_posting=False)
    try:
        request = samples_request(client, region, CALL)
        with region_of_another_identity(monkeypatch, dataset_service):
            list(dataset_stub.GetSamples(request, timeout=RPC_TIMEOUT_S))
        responses = list(dataset_stub.GetSamples(request, timeout=RPC_TIMEOUT_S))
        assert responses[0].shared_offsets, "its owner still reads into it"
        assert all(
            o >= shared_memory.HEADER_BYTES and o % shared_memory.ALIGN == 0 for o in responses[0].shared_offsets
        )
    finally:
        channel.close()
        segment.close()


def test_messages_that_do_not_fit_the_segment_come_as_chunks(
    client: pw.Client,
    stub: Any,
    dataset_stub: Any,
    segments: _shared_reads.ReadSegments,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A segment too small for the call: the server writes the messages that fit and sends the others' payloads as
    chunks, and the client's decoder reads both kinds in one call."""
    per_sample = 2 * SHAPE[1] * SHAPE[2] * 4 + SHAPE[1] * SHAPE[2]
    monkeypatch.setattr(framing, "TARGET_MESSAGE_BYTES", 8 * per_sample)  # messages of eight (chunked payloads)
    segment = shared_memory.Segment(12 * per_sample, sealed=True)  # room for one message
    channel, region = registered_region(stub, segment, for_posting=False)
    wire = datasource(client, shared_memory=False)
    try:
        indices = [5, 0, 9, 3, 7, 1, *range(20, 40)]
        responses = list(dataset_stub.GetSamples(samples_request(client, region, indices), timeout=RPC_TIMEOUT_S))
        batches = [r for r in responses if r.WhichOneof("payload") == "batch"]
        assert len(batches[0].batch.sample_indices) == 8 and len(batches) > 1
        assert [bool(b.shared_offsets) for b in batches] == [True] + [False] * (len(batches) - 1)
        assert [r.WhichOneof("payload") for r in responses].count("chunk") >= 2
        target = _shared_reads.Target(segment, region, None)
        raw = [r.SerializeToString() for r in responses]
        decoded = list(_decoding.decode_stream(raw, None, target.payloads))
        got = [s for d in decoded for s in d.samples()]
        expected = wire.get_samples(indices)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a["images"], b["images"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
    finally:
        wire.close()
        channel.close()
        segment.close()
